"""Summed log-probabilities of responses given prompts: the one quantity every loss is built from.

`tokenize_pairs` turns (prompt text, completion text) into token ids; `collate` right-pads a list of
them into a batch with a mask of the completion tokens; `sequence_logps` runs the model and returns,
per row, the sum of log pi(token) over completion tokens and their count.

Speed: the LM head runs only on completion positions, in chunks, and the log-softmax is taken in fp32
one chunk at a time, so a 150k-token vocabulary never materialises a (batch, length, vocab) fp32
tensor (TRL's DPOTrainer does, and that dominates its step time on small models).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

HEAD_CHUNK = 4096  # completion positions per LM-head chunk


@dataclass
class Encoded:
    prompt_ids: list[int]
    completion_ids: list[int]

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


def encode(tokenizer, prompt_text: str, completion_text: str, max_length: int) -> Encoded:
    """Token ids of prompt and completion, at most `max_length` together.

    When too long, the prompt keeps its last tokens (at least half of `max_length`, or all of it if
    shorter) and the completion its first: the loss is on the completion, its start matters most.
    """
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False).input_ids
    completion_ids = tokenizer(completion_text, add_special_tokens=False).input_ids
    if len(prompt_ids) + len(completion_ids) > max_length:
        keep_prompt = min(len(prompt_ids), max(max_length - len(completion_ids), max_length // 2))
        prompt_ids = prompt_ids[len(prompt_ids) - keep_prompt :]
        completion_ids = completion_ids[: max_length - keep_prompt]
    return Encoded(prompt_ids, completion_ids)


def collate(items: list[Encoded], pad_id: int, pad_to_multiple: int = 8) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and completion_mask (1 on completion tokens)."""
    width = max(len(item) for item in items)
    width = -(-width // pad_to_multiple) * pad_to_multiple
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(items), width), dtype=torch.long)
    completion_mask = torch.zeros((len(items), width), dtype=torch.bool)
    for row, item in enumerate(items):
        ids = item.prompt_ids + item.completion_ids
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        completion_mask[row, len(item.prompt_ids) : len(ids)] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


def _has_plain_head(model) -> bool:
    # Models that rescale or soft-cap logits after the LM head need their own forward.
    config = model.config
    return not (getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None))


def sequence_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of completion-token log-probs, number of completion tokens), one of each per row."""
    input_ids = batch["input_ids"]
    targets_mask = batch["completion_mask"][:, 1:]
    targets = input_ids[:, 1:][targets_mask]
    row_of_target = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(targets_mask)[targets_mask]
    if _has_plain_head(model):
        hidden = model.get_decoder()(input_ids=input_ids, attention_mask=batch["attention_mask"]).last_hidden_state
        picked = hidden[:, :-1][targets_mask]
        head = model.get_output_embeddings()
        token_logps = torch.cat(
            [
                -F.cross_entropy(head(picked[i : i + HEAD_CHUNK]).float(), targets[i : i + HEAD_CHUNK], reduction="none")
                for i in range(0, picked.shape[0], HEAD_CHUNK)
            ]
        ) if picked.shape[0] else picked.new_zeros(0, dtype=torch.float32)
    else:
        logits = model(input_ids=input_ids, attention_mask=batch["attention_mask"]).logits[:, :-1][targets_mask]
        token_logps = -F.cross_entropy(logits.float(), targets, reduction="none")
    sums = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=input_ids.device)
    sums = sums.index_add(0, row_of_target, token_logps)
    counts = targets_mask.sum(dim=1)
    return sums, counts


@torch.no_grad()
def batched_logps(model, tokenizer, items: list[Encoded], batch_size: int, device, progress: str | None = None) -> tuple[list[float], list[int]]:
    """`sequence_logps` over many items without gradients, batched by length to waste little padding."""
    from pipeline.progress import bar

    order = sorted(range(len(items)), key=lambda i: len(items[i]))
    sums, counts = [0.0] * len(items), [0] * len(items)
    was_training = model.training
    model.eval()
    starts = range(0, len(order), batch_size)
    for start in bar(starts, desc=progress, disable=progress is None):
        idx = order[start : start + batch_size]
        batch = {k: v.to(device) for k, v in collate([items[i] for i in idx], tokenizer.pad_token_id).items()}
        batch_sums, batch_counts = sequence_logps(model, batch)
        for i, s, c in zip(idx, batch_sums.tolist(), batch_counts.tolist()):
            sums[i], counts[i] = s, c
    model.train(was_training)
    return sums, counts

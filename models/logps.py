"""Summed log-probabilities of responses given prompts: the one quantity every loss is built from.

`encode` and `encode_pair` turn (prompt text, completion text) into token ids (`Encoded`); `collate`
right-pads a list of them into a batch with a mask of the completion tokens; `sequence_logps` runs the model and returns,
per row, the sum of log pi(token) over completion tokens and their count.

Speed: the LM head runs only on completion positions, in chunks, and the log-softmax is taken in fp32
one chunk at a time, so a 150k-token vocabulary never materialises a (batch, length, vocab) fp32
tensor (TRL's DPOTrainer does, and that dominates its step time on small models). Completions of one
prompt share it: `collate_groups` (and `collate_pairs` for a preference pair's two sides) lays a batch
out so each prompt runs once and its completions continue from its cached keys and values
(`_shared_prompt_logps`); `pair_logps` and `batched_logps` do so without gradients for the reference
pass and the evaluation.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models.packing import packed_linears
from models.padding import pad_rows

# Logits per LM-head chunk (positions x vocabulary): 4,096 positions of a 32k vocabulary, 512 MB in fp32; a chunk of
# Gemma 3's 262,144-token vocabulary then holds 512 positions, not 4,096 (4.3 GB).
HEAD_CHUNK_LOGITS = 4096 * 32768
# Prompts of a batch that start with the same this many tokens or more (a chat template's system turn) run
# those once (_shared_prompt_logps here, the decode loop's prefill in models/generate/fast_generation.py).
SHARED_PREFIX_MIN = 4


@dataclass
class Encoded:
    prompt_ids: list[int]
    completion_ids: list[int]

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


def truncate_group(prompt_ids: list[int], completions: list[list[int]], max_length: int, max_prompt_length: int | None = None):
    """Cut one prompt and the completions that share it so each (prompt, completion) fits `max_length`.

    TRL's DPO rule (DPOTrainer.tokenize_row): the decision is taken once, on the longest completion,
    so every completion keeps the same prompt tokens: DPO compares pi(y_w|x) with pi(y_l|x) for one x.
    When prompt + longest completion is too long, the prompt keeps its last tokens, at least
    `max_prompt_length` of them (default max_length // 2; the pipeline passes its prompt limit, so
    prompts that passed it are never cut), then every completion keeps its first max_length - prompt.
    """
    if max_prompt_length is None:
        max_prompt_length = max_length // 2
    longest = max((len(c) for c in completions), default=0)
    if len(prompt_ids) + longest > max_length:
        keep = min(len(prompt_ids), max(max_length - longest, max_prompt_length), max_length - 1)
        prompt_ids = prompt_ids[len(prompt_ids) - keep :]
        completions = [c[: max_length - keep] for c in completions]
    return prompt_ids, completions


def encode(tokenizer, prompt_text: str, completion_text: str, max_length: int, max_prompt_length: int | None = None) -> Encoded:
    """Token ids of prompt and completion, at most `max_length` together (rule: `truncate_group`)."""
    return encode_group(tokenizer, prompt_text, [completion_text], max_length, max_prompt_length)[0]


def encode_pair(tokenizer, prompt_text: str, chosen_text: str, rejected_text: str, max_length: int,
                max_prompt_length: int | None = None, sampled: tuple | None = None) -> tuple[Encoded, Encoded]:
    """Chosen and rejected of one preference pair, both with the same (possibly cut) prompt tokens;
    `sampled`: for each side, None or (response text, the ids it was sampled as), see completion_token_ids."""
    chosen, rejected = encode_group(tokenizer, prompt_text, [chosen_text, rejected_text], max_length, max_prompt_length,
                                    sampled)
    return chosen, rejected


def completion_token_ids(tokenizer, completion_text: str, response: str | None = None, response_ids=None) -> list[int]:
    """Token ids of a completion (a response and the template's end of turn, data.prompts.format_completion).

    For the model's own sample, pass its text and the ids it was sampled as (without its EOS): those
    ids stand for the text, and only the template's text around it is tokenised. Re-tokenising the
    text is not enough: BPE can split one string several ways and sampling can pick a split the
    tokenizer would not (SmolLM2 sampled 'k' 'alo' where the text re-tokenises to 'kal' 'o'), and the
    text is stripped of the spaces the model wrote around it (data.prompts.clean_response), so the
    sequence trained on would not be the one sampled. Ground truth (no ids) is tokenised as text.
    """
    start = completion_text.find(response) if response_ids is not None and response is not None else -1
    if start < 0:  # no ids, or a template that rewrote the response
        return tokenizer(completion_text, add_special_tokens=False).input_ids

    def tokenize(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids if text else []

    after = completion_text[start + len(response) :]
    return tokenize(completion_text[:start]) + [int(i) for i in response_ids] + tokenize(after)


def encode_group(tokenizer, prompt_text: str, completion_texts: list[str], max_length: int,
                 max_prompt_length: int | None = None, sampled: list | tuple | None = None) -> list[Encoded]:
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False).input_ids
    sampled = sampled or [None] * len(completion_texts)
    completions = [completion_token_ids(tokenizer, text, *(ids or (None, None))) for text, ids in zip(completion_texts, sampled)]
    prompt_ids, completions = truncate_group(prompt_ids, completions, max_length, max_prompt_length)
    return [Encoded(prompt_ids, ids) for ids in completions]


def collate(items: list[Encoded], pad_id: int, pad_to_multiple: int = 8) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and completion_mask (1 on completion tokens)."""
    input_ids, attention_mask = pad_rows([item.prompt_ids + item.completion_ids for item in items], pad_id,
                                         multiple=pad_to_multiple)
    completion_mask = torch.zeros(input_ids.shape, dtype=torch.bool)
    for row, item in enumerate(items):
        completion_mask[row, len(item.prompt_ids) : len(item)] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


def collate_groups(prompts: list[list[int]], completions: list[list[int]], prompt_of: list[int], pad_id: int,
                   pad_to_multiple: int = 8) -> dict[str, torch.Tensor]:
    """Completions that share prompts, laid out for `sequence_logps`'s shared-prompt forward: each distinct
    prompt once (right-padded `prompt_ids`, `prompt_mask`), then every completion in its own row of
    right-padded `completion_ids` / `completion_mask`, continuing from prompt `prompt_of[row]`. Sums come
    back in completion-row order. Every prompt must be non-empty (its last state predicts the first token)."""
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError(f"prompt {i}: an empty prompt cannot share its forward")
    prompt_ids, prompt_mask = pad_rows(prompts, pad_id, multiple=pad_to_multiple)
    completion_ids, completion_mask = pad_rows(completions, pad_id, multiple=pad_to_multiple)
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
            "completion_mask": completion_mask.bool(), "prompt_of": torch.tensor(prompt_of, dtype=torch.long)}


def collate_pairs(chosen: list[Encoded], rejected: list[Encoded], pad_id: int, pad_to_multiple: int = 8) -> dict[str, torch.Tensor]:
    """Preference pairs for the shared-prompt forward (collate_groups): each pair's prompt once, the chosen
    sides in the first rows and the rejected sides after them, so the sums come back as chosen, then
    rejected. Both sides of a pair must have the same prompt tokens (encode_pair guarantees it) and a
    non-empty prompt."""
    for i, (good, bad) in enumerate(zip(chosen, rejected)):
        if good.prompt_ids != bad.prompt_ids or not good.prompt_ids:
            raise ValueError(f"pair {i}: chosen and rejected need the same non-empty prompt tokens to share its forward")
    completions = [side.completion_ids for side in chosen + rejected]
    return collate_groups([item.prompt_ids for item in chosen], completions, [*range(len(chosen))] * 2, pad_id, pad_to_multiple)


def group_by_prompt(items: list[Encoded], max_rows: int) -> list[tuple[list[list[int]], list[int]]]:
    """Batches of at most `max_rows` items for the shared-prompt forward: (distinct prompts, and for each
    item of the batch, by index into `items`, in order), items of one prompt together, batches by length."""
    groups: dict[tuple, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(tuple(item.prompt_ids), []).append(i)
    chunks = [members[start : start + max_rows] for members in groups.values() for start in range(0, len(members), max_rows)]
    chunks.sort(key=lambda chunk: max(len(items[i]) for i in chunk))
    batches, current = [], []
    for chunk in chunks:
        if current and len(current) + len(chunk) > max_rows:
            batches.append(current)
            current = []
        current = current + chunk
    return batches + ([current] if current else [])


def pair_tokens(batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(tokens of the completions as separate sequences with their prompts, tokens the forward runs): the
    same for a flat batch; a shared-prompt batch runs each prompt once instead of once per completion."""
    if "prompt_ids" not in batch:
        tokens = int(batch["attention_mask"].sum())
        return tokens, tokens
    prompt_lengths = batch["prompt_mask"].sum(dim=1)
    completion = int(batch["completion_mask"].sum())
    return int(prompt_lengths[batch["prompt_of"]].sum()) + completion, int(prompt_lengths.sum()) + completion


# Config fields through which a transformers family transforms its logits after the head (read in the
# modeling files of transformers 5.x: Gemma 2/3's and Nanochat's soft-capping, RecurrentGemma's, Cohere's
# logit_scale, Granite's logits_scaling, Falcon-H1's lm_head_multiplier, Muse's output_multiplier, Inkling's cut to
# the unpadded vocabulary, ProphetNet's n-gram streams; tests/test_models.py scans the installed transformers for a
# family that does it otherwise). A model whose config sets none of them computes `lm_head(decoder(...).last_hidden_state)`.
LOGIT_TRANSFORM_FIELDS = (
    "final_logit_softcapping", "logits_soft_cap", "logit_scale", "logits_scaling", "lm_head_multiplier", "output_multiplier",
    "logit_softcapping", "mup_width_multiplier", "unpadded_vocab_size", "ngram",
)


def _all_configs(config, seen=None):
    """`config` and every sub-config nested in it (text_config, decoder, ...)."""
    from transformers import PretrainedConfig

    seen = seen if seen is not None else set()
    if id(config) in seen:
        return
    seen.add(id(config))
    yield config
    for value in vars(config).values():
        if isinstance(value, PretrainedConfig):
            yield from _all_configs(value, seen)


def _inner(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model  # through a PEFT wrapper


def _text_config(model):
    config = _inner(model).config
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def _has_plain_head(model) -> bool:
    """Whether the model's logits are `lm_head(last_hidden_state)`, so the head can run in chunks on the
    completion positions alone: decided from its config, not from a list of families. A transformers causal LM
    (not remote code, whose forward may do anything) that is its own text model (not a wrapper around one)
    and whose config, sub-configs included, sets no field of LOGIT_TRANSFORM_FIELDS. Gemma 3 270M (no final
    soft-capping) takes the chunked head; Gemma 2 (soft-capped at 30) its own forward."""
    inner = _inner(model)
    if not type(inner).__module__.startswith("transformers.models."):
        return False
    if _text_config(inner) is not inner.config:
        return False
    return not any(getattr(c, name, None) is not None for c in _all_configs(inner.config) for name in LOGIT_TRANSFORM_FIELDS)


# Families whose decoder continues from a KV cache at given positions exactly as it runs a whole
# sequence: the shared-prompt forward is used for these (and only with the plain head above); anything
# else runs each pair as two sequences. Layers must all attend fully, or mix full and sliding-window
# layers in a family that takes one mask per layer type (MASK_MAPPING_MODEL_TYPES).
SHARED_PROMPT_MODEL_TYPES = frozenset({"llama", "qwen2", "qwen3", "mistral", "olmo2", "smollm3", "gemma3_text"})
# Families with sliding-window layers whose decoder takes ready masks per layer type (transformers'
# `causal_mask_mapping`: {"full_attention": ..., "sliding_attention": ...}), checked against plain transformers
# past the window (tests/test_gemma.py): our masks apply the window on token positions (attention_masks).
MASK_MAPPING_MODEL_TYPES = frozenset({"gemma3_text"})


def mask_window(model) -> int | None:
    """The sliding window of a model whose layers mix full and sliding-window attention and whose masks we
    build per layer type (MASK_MAPPING_MODEL_TYPES); None for any other model."""
    config = _text_config(model)
    kinds = set(getattr(config, "layer_types", None) or [])
    window = getattr(config, "sliding_window", None)
    if config.model_type not in MASK_MAPPING_MODEL_TYPES or "sliding_attention" not in kinds or not isinstance(window, int):
        return None
    return window if kinds <= {"full_attention", "sliding_attention"} else None


def attention_masks(model, visible: torch.Tensor, query_positions: torch.Tensor, key_positions: torch.Tensor, to_attention_mask=None):
    """`visible` (bool `[rows, 1, queries, keys]`) as the model's attention_mask: itself (through
    `to_attention_mask`, say to an additive mask for eager attention), or for a model with sliding-window
    layers (mask_window) one mask per layer type, the sliding layers' keys limited to the window before the
    query: key position > query position - window, transformers' sliding_window_overlay, on the positions of
    the tokens (`[rows, queries]`, `[rows, keys]`), which padding and shared prefixes make differ from slots."""
    convert = to_attention_mask or (lambda mask: mask)
    window = mask_window(model)
    if window is None:
        return convert(visible)
    near = (query_positions[:, None, :, None] - key_positions[:, None, None, :]) < window
    return {"full_attention": convert(visible), "sliding_attention": convert(visible & near)}


def boolean_or_additive(model):
    """What a ready 4D mask must be for the model's attention: boolean for sdpa, additive (0 / dtype min) for eager."""
    if getattr(_inner(model).config, "_attn_implementation", "sdpa") == "sdpa":
        return None
    dtype = next(_inner(model).parameters()).dtype
    dtype = dtype if dtype.is_floating_point else torch.float32
    return lambda visible: torch.zeros((), dtype=dtype, device=visible.device).masked_fill(~visible, torch.finfo(dtype).min)


def shares_prompt(model) -> bool:
    """Whether a pair's two sides can share one forward of its prompt (collate_pairs) on `model`."""
    inner = _inner(model)
    config = inner.config
    if config.model_type not in SHARED_PROMPT_MODEL_TYPES or not _has_plain_head(model):
        return False
    if getattr(inner, "is_activation_checkpointing", False):
        return False  # checkpointed layers do not return a cache
    if mask_window(model) is not None:  # our ready masks: sdpa or eager
        return getattr(config, "_attn_implementation", None) in ("sdpa", "eager")
    layer_types = getattr(config, "layer_types", None) or []
    sliding = getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True)
    return not sliding and all(kind == "full_attention" for kind in layer_types)


def pairs_share_prompt(model, chosen: list[Encoded], rejected: list[Encoded]) -> bool:
    """Whether these pairs can go through the shared-prompt forward on `model` (collate_pairs)."""
    return shares_prompt(model) and all(c.prompt_ids and c.prompt_ids == r.prompt_ids for c, r in zip(chosen, rejected))


def sequence_logps(model, batch: dict[str, torch.Tensor], share_prefix: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of completion-token log-probs, number of completion tokens), one of each per row; for a
    shared-prompt batch (collate_groups, collate_pairs), one per completion row, a prefix every prompt of the
    batch starts with run once unless `share_prefix` is off (shared_prefix)."""
    if "prompt_ids" in batch:
        return _shared_prompt_logps(model, batch, share_prefix)
    input_ids = batch["input_ids"]
    targets_mask = batch["completion_mask"][:, 1:]
    targets = input_ids[:, 1:][targets_mask]
    row_of_target = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(targets_mask)[targets_mask]
    if _has_plain_head(model):
        hidden = model.get_decoder()(input_ids=input_ids, attention_mask=batch["attention_mask"]).last_hidden_state
        token_logps = _head_logps(model, hidden[:, :-1][targets_mask], targets)
    else:
        logits = model(input_ids=input_ids, attention_mask=batch["attention_mask"]).logits[:, :-1][targets_mask]
        token_logps = -F.cross_entropy(logits.float(), targets, reduction="none")
    sums = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=input_ids.device)
    sums = sums.index_add(0, row_of_target, token_logps)
    counts = targets_mask.sum(dim=1)
    return sums, counts


def _head_logps(model, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(lm_head(hidden))[target] for rows of hidden states, the head run in chunks."""
    if not hidden.shape[0]:
        return hidden.new_zeros(0, dtype=torch.float32)
    head = model.get_output_embeddings()
    chunk = max(1, HEAD_CHUNK_LOGITS // head.weight.shape[0])
    return torch.cat([
        -F.cross_entropy(head(hidden[i : i + chunk]).float(), targets[i : i + chunk], reduction="none")
        for i in range(0, hidden.shape[0], chunk)
    ])


def shared_prefix(prompt_ids: torch.Tensor, prompt_lengths: torch.Tensor) -> int:
    """How many first columns of right-padded prompts hold the same tokens in every row, when at least
    SHARED_PREFIX_MIN of them do and there are several rows (else 0); every prompt keeps a token after it."""
    if prompt_ids.shape[0] < 2:
        return 0
    same = (prompt_ids == prompt_ids[:1]).all(dim=0)[: int(prompt_lengths.min()) - 1]
    prefix = int(same.long().cumprod(dim=0).sum()) if same.numel() else 0
    return prefix if prefix >= SHARED_PREFIX_MIN else 0


def _shared_prompt_logps(model, batch: dict[str, torch.Tensor], share_prefix: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The same sums as each completion run with its prompt as one sequence, with every prompt run once.

    The prompts run first and leave their keys and values in a cache (right padding: the padded slots
    are masked from every later query); the cache's rows are selected for the completions (`prompt_of`),
    and the completions run on it from position len(prompt). The first completion token is predicted by
    the prompt's last hidden state, the others by the completion's own. Gradients flow through the cache
    into the prompt's forward, so the LoRA weights get the same gradient as from full sequences.
    DPO pairs share the prompt by construction, and prompts are often longer than responses (the SmolLM2
    recipes: about 60 prompt and 30 response tokens), so a pair runs about a third fewer tokens; the
    held-out rows of a prompt (greedy answer, samples, its pair) share it four or more ways.
    Prompts that all start with the same tokens (shared_prefix) run those once, and their rests on its
    keys and values.
    """
    prompt_ids, prompt_mask, prompt_of = batch["prompt_ids"], batch["prompt_mask"], batch["prompt_of"]
    completion_ids, completion_mask = batch["completion_ids"], batch["completion_mask"]
    decoder = model.get_decoder()
    prompt_lengths = prompt_mask.sum(dim=1)
    prefix = shared_prefix(prompt_ids, prompt_lengths) if share_prefix else 0
    cache = None
    if mask_window(model) is not None:
        from transformers import DynamicCache

        # Every layer keeps every key: a sliding layer's own cache keeps only the last window's slots, which for a
        # right-padded prompt are not its last tokens. The completions' masks apply the window (below).
        cache = DynamicCache()
    if prefix:
        cache = decoder(input_ids=prompt_ids[:1, :prefix], cache=cache, use_cache=True).cache
        cache.batch_repeat_interleave(prompt_ids.shape[0])
    rest_positions = torch.arange(prefix, prompt_ids.shape[1], device=prompt_ids.device).expand(prompt_ids.shape[0], -1)
    out = decoder(input_ids=prompt_ids[:, prefix:], attention_mask=prompt_mask, position_ids=rest_positions, cache=cache,
                  use_cache=True)
    cache = out.cache
    cache.batch_select_indices(prompt_of)
    last_prompt_hidden = out.last_hidden_state[torch.arange(prompt_ids.shape[0], device=prompt_ids.device), prompt_lengths - 1 - prefix]
    positions = prompt_lengths[prompt_of][:, None] + torch.arange(completion_ids.shape[1], device=prompt_ids.device)
    attention_mask = torch.cat([prompt_mask[prompt_of], completion_mask.long()], dim=1)
    if mask_window(model) is not None:  # ready masks, the window on positions: a padded prompt's slots are not positions
        width, length = prompt_ids.shape[1], completion_ids.shape[1]
        causal = torch.ones(length, width + length, dtype=torch.bool, device=prompt_ids.device).tril(diagonal=width)
        visible = (attention_mask.bool()[:, None, :] & causal)[:, None]
        slots = torch.arange(width, device=prompt_ids.device).expand(len(positions), -1)  # a right-padded prompt's positions
        attention_mask = attention_masks(model, visible, positions, torch.cat([slots, positions], dim=1), boolean_or_additive(model))
    hidden = decoder(input_ids=completion_ids, attention_mask=attention_mask, position_ids=positions, cache=cache,
                     use_cache=True).last_hidden_state
    # what predicts completion token j: the prompt's last state for j = 0, the completion's state j - 1 after
    predictors = torch.cat([last_prompt_hidden[prompt_of][:, None], hidden[:, :-1]], dim=1)
    token_logps = _head_logps(model, predictors[completion_mask], completion_ids[completion_mask])
    rows = torch.arange(completion_ids.shape[0], device=prompt_ids.device)[:, None].expand_as(completion_mask)[completion_mask]
    sums = torch.zeros(completion_ids.shape[0], dtype=torch.float32, device=prompt_ids.device).index_add(0, rows, token_logps)
    return sums, completion_mask.sum(dim=1)


@torch.no_grad()
def cached_prompt_logps(model, prompt_cache, prompt_mask: torch.Tensor, last_logits: torch.Tensor, prompt_of: list[int],
                        completions: list[list[int]], to_attention_mask=None) -> list[float]:
    """Summed log-probs of `completions` (token ids), each continuing prompt `prompt_of[i]` of prompts already
    run: `prompt_cache` holds their keys and values (a DynamicCache; its rows are replaced by those used),
    `prompt_mask` `[prompts, width]` their left padding and `last_logits` `[prompts, vocab]` the logits at
    their last position. The decode loop's prefill is such a run (models/generate/fast_generation.py), so Evaluate
    scores its held-out pairs without running their prompts again.

    A prompt's completions lie end to end in one row: each attends to the prompt's real tokens and causally
    to itself alone, never to the completions before it in the row, with positions counted from the prompt's
    end. So a prompt's cached keys and values serve all its completions with no copy, and a short chosen
    side does not pad out to its long rejected side. The first token of each is scored by the prompt's last
    logits, the others by the completion's own states: the sums of _shared_prompt_logps, up to float
    rounding. `to_attention_mask` turns the boolean `[rows, 1, q, k]` mask into what the model's attention
    takes (the decode session's: additive for eager attention)."""
    if not completions:
        return []
    device = prompt_mask.device
    prompts = list(dict.fromkeys(int(p) for p in prompt_of))  # one row each, in order of first use
    row_of = {prompt: row for row, prompt in enumerate(prompts)}
    rows: list[list[int]] = [[] for _ in prompts]
    owner: list[list[int]] = [[] for _ in prompts]  # which completion each token of a row belongs to
    offset: list[list[int]] = [[] for _ in prompts]  # its position within that completion
    for i, (prompt, ids) in enumerate(zip(prompt_of, completions)):
        row = row_of[int(prompt)]
        rows[row] += ids
        owner[row] += [i] * len(ids)
        offset[row] += range(len(ids))
    input_ids, real = (t.to(device) for t in pad_rows([r or [0] for r in rows], 0))
    width = input_ids.shape[1]
    segment = pad_rows([o or [-1] for o in owner], -1)[0].to(device).masked_fill_(real == 0, -1)
    within = pad_rows([o or [0] for o in offset], 0)[0].to(device)
    prompt_rows = prompt_mask[prompts].bool()
    positions = prompt_rows.sum(dim=1, keepdim=True) + within
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    same = (segment[:, :, None] == segment[:, None, :]) & (segment[:, None, :] >= 0) & causal
    visible = torch.cat([prompt_rows[:, None, :].expand(-1, width, -1), same], dim=2)[:, None]
    key_positions = torch.cat([prompt_rows.long().cumsum(dim=1) - 1, positions], dim=1)  # the prompts are left-padded
    mask = attention_masks(model, visible, positions, key_positions, to_attention_mask)
    prompt_cache.batch_select_indices(torch.tensor(prompts, device=device))
    if _has_plain_head(model):
        hidden = model.get_decoder()(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                                     cache=prompt_cache, use_cache=True).last_hidden_state
    else:
        hidden = None
        logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=prompt_cache,
                       use_cache=True).logits
    first = (segment >= 0) & (within == 0)
    later = (segment[:, 1:] >= 0) & (within[:, 1:] > 0)  # predicted by the state one position before
    first_logps = last_logits[prompts].float().log_softmax(dim=-1)[
        torch.arange(len(prompts), device=device)[:, None].expand_as(first)[first], input_ids[first]]
    targets = input_ids[:, 1:][later]
    if hidden is not None:
        later_logps = _head_logps(model, hidden[:, :-1][later], targets)
    else:
        later_logps = -F.cross_entropy(logits[:, :-1][later].float(), targets, reduction="none")
    sums = torch.zeros(len(completions), dtype=torch.float32, device=device)
    sums = sums.index_add(0, segment[first], first_logps).index_add(0, segment[:, 1:][later], later_logps)
    return sums.tolist()


@torch.no_grad()
def batched_logps(model, tokenizer, items: list[Encoded], batch_size: int, device, progress: str | None = None,
                  forward=None, group_prompts: bool = True) -> tuple[list[float], list[int]]:
    """`sequence_logps` over many items without gradients, `batch_size` items a batch. Where the model
    allows it (shares_prompt) and `group_prompts` is on, items with the same prompt tokens share one forward
    of it (collate_groups); otherwise each item runs as one sequence, in batches sorted by length to waste
    little padding (ceil(items / batch_size) of them, whatever the prompts). `forward(batch)` replaces
    sequence_logps(model, batch) (the trainer's FSDP root, models/train/fsdp.py)."""
    own_forward = forward is None
    forward = forward or (lambda batch: sequence_logps(model, batch))
    from common.progress import bar

    shared = group_prompts and shares_prompt(model) and all(item.prompt_ids for item in items)
    if shared:
        batches = group_by_prompt(items, batch_size)
    else:
        order = sorted(range(len(items)), key=lambda i: len(items[i]))
        batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    sums, counts = [0.0] * len(items), [0] * len(items)
    was_training = model.training
    model.eval()
    # Short completions run few rows per forward, where packed weights pay on a CPU (models/packing.py);
    # a trainer's own forward (FSDP's sharded weights) is left as it is.
    with packed_linears(model, batch_size) if own_forward else nullcontext():
        for idx in bar(batches, desc=progress, disable=progress is None):
            if shared:
                prompts = list(dict.fromkeys(tuple(items[i].prompt_ids) for i in idx))
                prompt_index = {prompt: k for k, prompt in enumerate(prompts)}
                batch = collate_groups([list(p) for p in prompts], [items[i].completion_ids for i in idx],
                                       [prompt_index[tuple(items[i].prompt_ids)] for i in idx], tokenizer.pad_token_id)
            else:
                batch = collate([items[i] for i in idx], tokenizer.pad_token_id)
            batch_sums, batch_counts = forward({k: v.to(device) for k, v in batch.items()})
            for i, s, c in zip(idx, batch_sums.tolist(), batch_counts.tolist()):
                sums[i], counts[i] = s, c
    model.train(was_training)
    return sums, counts


@torch.no_grad()
def pair_logps(model, tokenizer, chosen: list[Encoded], rejected: list[Encoded], pairs_per_batch: int, device,
               shared_prompt: bool = True, forward=None) -> list[tuple[float, float]]:
    """(chosen, rejected) summed log-probs of every pair, without gradients: each pair's prompt run once
    where the model allows it (shares_prompt), else the sides as separate sequences, as the trainer's
    forward then runs them (never grouped by prompt: under FSDP every process must run as many forwards,
    and grouping gives shares with other prompts other numbers of batches). `forward` as in batched_logps."""
    if not (shared_prompt and pairs_share_prompt(model, chosen, rejected)):
        sums, _ = batched_logps(model, tokenizer, chosen + rejected, 2 * pairs_per_batch, device, "reference logps", forward,
                                group_prompts=False)
        return list(zip(sums[: len(chosen)], sums[len(chosen) :]))
    from common.progress import bar

    order = sorted(range(len(chosen)), key=lambda i: len(chosen[i]) + len(rejected[i].completion_ids))
    out: list[tuple[float, float]] = [(0.0, 0.0)] * len(chosen)
    was_training = model.training
    model.eval()
    for start in bar(range(0, len(order), pairs_per_batch), desc="reference logps"):
        idx = order[start : start + pairs_per_batch]
        batch = collate_pairs([chosen[i] for i in idx], [rejected[i] for i in idx], tokenizer.pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        sums, _ = forward(batch) if forward else sequence_logps(model, batch)
        for i, good, bad in zip(idx, sums[: len(idx)].tolist(), sums[len(idx) :].tolist()):
            out[i] = (good, bad)
    model.train(was_training)
    return out

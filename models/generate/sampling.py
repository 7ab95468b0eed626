"""What sampling is asked for and what it gives back, and the reference backend: transformers' `generate`.

`SamplingSettings` and `Sample` are shared by models/generate/generation.py (which batches, seeds and decodes)
and the faster backends of models/generate/fast_generation.py, which fall back to `hf_generate` for models they
cannot run; this module imports nothing else of the project, so neither of those imports the other back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingSettings:
    num_samples: int = 1
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    max_new_tokens: int = 64
    batch_size: int = 64
    seed: int = 0
    backend: str = "hf"
    logps: bool = False  # also give each sample's summed log-prob under the model (Sample.logp)
    greedy_samples: int = 0  # the first this many samples of each prompt are greedy, the others sampled


@dataclass
class Sample:
    text: str  # decoded without special tokens, then data.prompts.clean_response
    num_tokens: int
    finished: bool  # ended with an end-of-sequence token rather than the length limit
    token_ids: list[int] = field(default_factory=list)  # the sampled ids, the ending EOS included when finished
    # sum of log pi(token) over token_ids under the sampling model, untempered (SamplingSettings.logps)
    logp: float | None = None


def hf_generate(model, tokenizer, input_ids, attention_mask, settings: SamplingSettings, eos_ids, greedy_rows=None):
    """The new tokens (`[batch, up to settings.max_new_tokens]`, padded after an eos) of left-padded
    prompts, from transformers' `generate` with the recipe's settings and nothing of the model's own;
    with `settings.logps`, (tokens, each row's summed log-prob of its tokens up to its eos).
    `greedy_rows` (`[batch]` bool): those rows greedy, the others sampled (two generate calls)."""
    if greedy_rows is not None and settings.temperature > 0 and bool(greedy_rows.any()):
        return _hf_mixed(model, tokenizer, input_ids, attention_mask, settings, eos_ids, greedy_rows.to(input_ids.device))
    from transformers import GenerationConfig

    sample = settings.temperature > 0
    config = GenerationConfig(
        max_new_tokens=settings.max_new_tokens,
        do_sample=sample,
        temperature=settings.temperature if sample else None,
        top_p=settings.top_p if sample else None,
        top_k=0 if sample else None,  # only top_p truncates, as in the SPPO recipe
        eos_token_id=eos_ids,
        pad_token_id=tokenizer.pad_token_id,
        output_logits=settings.logps,
        return_dict_in_generate=settings.logps,
    )
    # generate() merges the model's own generation_config (repetition penalty, top_k, ...) into ours;
    # only the recipe's settings should apply, so the model's is swapped out for the call.
    saved, model.generation_config = model.generation_config, GenerationConfig()
    try:
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
    finally:
        model.generation_config = saved
    if not settings.logps:
        return out[:, input_ids.shape[1] :]
    tokens = out.sequences[:, input_ids.shape[1] :]
    logps = torch.zeros(tokens.shape[0], device=tokens.device)
    ended = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    eos = torch.tensor(list(eos_ids), device=tokens.device)
    for step, logits in enumerate(out.logits):  # the raw logits, before temperature and top-p
        token = tokens[:, step]
        logps += torch.where(ended, 0.0, logits.float().log_softmax(-1).gather(1, token[:, None]).squeeze(1))
        ended |= torch.isin(token, eos)
    return tokens, logps


def _hf_mixed(model, tokenizer, input_ids, attention_mask, settings: SamplingSettings, eos_ids, greedy_rows):
    """hf_generate of the greedy rows and of the sampled rows apart, put back in the batch's order."""
    from dataclasses import replace

    tokens = torch.full((input_ids.shape[0], settings.max_new_tokens), tokenizer.pad_token_id, dtype=torch.long, device=input_ids.device)
    logps = torch.zeros(input_ids.shape[0], device=input_ids.device)
    for rows, part in ((greedy_rows, replace(settings, temperature=0.0)), (~greedy_rows, settings)):
        if not bool(rows.any()):
            continue
        out = hf_generate(model, tokenizer, input_ids[rows], attention_mask[rows], part, eos_ids)
        new, row_logps = out if settings.logps else (out, None)
        tokens[rows, : new.shape[1]] = new
        if row_logps is not None:
            logps[rows] = row_logps
    return (tokens, logps) if settings.logps else tokens

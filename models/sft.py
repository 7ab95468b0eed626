"""Supervised fine-tuning, and the small demo base model built with it.

`build_demo_model` makes the base model the pipeline uses when a recipe names none: a Llama-style
config sized by `demo_model:` in the recipe, the byte-level tokenizer of models/tokenizer.py, random
init, then `supervised_finetune` on the demo's prompt/response pairs for `sft_steps` steps. The warm
start stops well short of mastery on purpose, so the self-play rounds have something to improve.

`supervised_finetune` is also the control arm of the improvement experiment (more SFT instead of
self-play), so both spend compute through the same code.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import torch

from configs.recipe import DemoModelConfig
from data.prompts import format_completion, format_prompt
from models.logps import Encoded, collate, encode, sequence_logps

log = logging.getLogger("selfplay")


def encode_examples(tokenizer, rows: list[dict], max_length: int) -> list[Encoded]:
    """rows: dicts with prompt, reference (the target response) and optional system."""
    out = []
    for row in rows:
        prompt_text = format_prompt(tokenizer, row["prompt"], row.get("system"))
        completion = format_completion(tokenizer, row["prompt"], row["reference"], row.get("system"))
        out.append(encode(tokenizer, prompt_text, completion, max_length))
    return out


def supervised_finetune(
    model, tokenizer, examples: list[Encoded], steps: int, batch_size: int, learning_rate: float, seed: int, device
) -> list[float]:
    """Minimise mean token NLL of the completions; returns the loss of every step."""
    from pipeline.progress import bar

    rng = random.Random(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / max(1, steps // 10)) * max(0.0, 1 - step / steps)
    )
    model.train()
    losses, order = [], []
    for _ in bar(range(steps), desc="sft"):
        if len(order) < batch_size:
            order += rng.sample(range(len(examples)), len(examples))
        idx, order = order[:batch_size], order[batch_size:]
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in idx], tokenizer.pad_token_id).items()}
        sums, counts = sequence_logps(model, batch)
        loss = -(sums.sum() / counts.sum())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


def build_demo_model(cfg: DemoModelConfig, rows: list[dict], out_dir: Path, seed: int) -> dict:
    """Build, warm-start and save the demo base model and tokenizer into `out_dir`; returns SFT figures."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from models.tokenizer import build_byte_tokenizer

    torch.manual_seed(seed)
    tokenizer = build_byte_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    device = torch.device("cpu") if not torch.cuda.is_available() else torch.device("cuda")
    model.to(device)
    rows = rows[: cfg.sft_examples] if cfg.sft_examples else rows
    examples = encode_examples(tokenizer, rows, max_length=256)
    losses = supervised_finetune(
        model, tokenizer, examples, cfg.sft_steps, cfg.sft_batch_size, cfg.sft_learning_rate, seed, device
    )
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None
    )
    model.to("cpu").save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("demo base model: %.2fM parameters, SFT loss %.3f -> %.3f", n_params / 1e6, losses[0], losses[-1])
    return {"parameters": n_params, "sft_loss_first": losses[0], "sft_loss_last": losses[-1], "sft_steps": cfg.sft_steps}

"""Supervised fine-tuning, and the small demo base model built with it.

`build_demo_model` makes the base model the pipeline uses when a recipe names none: a Llama-style
config sized by `demo_model:` in the recipe, the byte-level tokenizer of models/load/tokenizer.py, random
init, then `supervised_finetune` on the demo's prompt/response pairs for `sft_steps` steps. The warm
start stops well short of mastery on purpose, so the self-play rounds have something to improve.

`supervised_finetune` is also the control arm of the improvement experiment (more SFT instead of
self-play), so both spend compute through the same code.

The default demo's base (2,400 warm-start steps on data/demo/train_20k.jsonl, about 7 minutes on two
CPU cores) ships in data/demo/base_model/ with a record of the settings that built it; BaseModel copies
it when a recipe asks for exactly those settings, instead of building it again. Rebuild it, or check
that a rebuild gives the shipped weights bit for bit (single-threaded, on a CPU with the same vector
instructions: other matmul kernels round the last float bits differently):

    python -m models.train.sft --rebuild-demo-base            # writes data/demo/base_model/
    python -m models.train.sft --rebuild-demo-base --check    # builds into a temporary directory and compares
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import asdict
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
    model, tokenizer, examples: list[Encoded], steps: int, batch_size: int, learning_rate: float, seed: int, device,
    stop_after: int | None = None,
) -> list[float]:
    """Minimise mean token NLL of the completions; returns the loss of every step.

    `stop_after` runs only the first steps of the same `steps`-step schedule (a quick check that a
    rebuild retraces a recorded run)."""
    from common.progress import bar

    rng = random.Random(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / max(1, steps // 10)) * max(0.0, 1 - step / steps)
    )
    model.train()
    losses, order = [], []
    for _ in bar(range(min(steps, stop_after or steps)), desc="sft"):
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


def build_demo_model(cfg: DemoModelConfig, rows: list[dict], out_dir: Path, seed: int, stop_after: int | None = None) -> dict:
    """Build, warm-start and save the demo base model and tokenizer into `out_dir`; returns SFT figures
    (with the loss of every step)."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from models.load.tokenizer import build_byte_tokenizer

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
        model, tokenizer, examples, cfg.sft_steps, cfg.sft_batch_size, cfg.sft_learning_rate, seed, device, stop_after
    )
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None
    )
    model.to("cpu").save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("demo base model: %.2fM parameters, SFT loss %.3f -> %.3f", n_params / 1e6, losses[0], losses[-1])
    return {"parameters": n_params, "sft_loss_first": losses[0], "sft_loss_last": losses[-1], "sft_steps": cfg.sft_steps,
            "sft_losses": losses}


# --- the shipped demo base -------------------------------------------------------------------------

DEMO_RECIPE = Path(__file__).resolve().parents[2] / "configs" / "demo_spin.yaml"
BUILD_RECORD = "demo_build.json"


def demo_base_dir() -> Path:
    from data.demo_tasks import DEMO_DIR

    return DEMO_DIR / "base_model"


def demo_build_settings(recipe) -> dict:
    """Everything that decides the demo base's weights: model size and warm start, training data, seed."""
    return {"demo_model": asdict(recipe.demo_model), "train": recipe.data.train, "seed": recipe.seed}


def shipped_base_differences(recipe) -> list[str]:
    """The recipe keys whose values differ from the ones the shipped demo base was built with (empty: it fits)."""
    record = demo_base_dir() / BUILD_RECORD
    if not record.is_file():
        return ["(no shipped demo base in this install)"]
    built, wanted = json.loads(record.read_text())["settings"], demo_build_settings(recipe)
    keys = [f"demo_model.{k}" for k in wanted["demo_model"] if wanted["demo_model"][k] != built["demo_model"].get(k)]
    keys += [name for key, name in (("train", "data.train"), ("seed", "seed")) if wanted[key] != built[key]]
    return keys


def shipped_demo_base(recipe) -> Path | None:
    """data/demo/base_model when it was built with exactly this recipe's settings, else None."""
    record = demo_base_dir() / BUILD_RECORD
    if not record.is_file() or not (demo_base_dir() / "model.safetensors").is_file():
        return None
    return demo_base_dir() if json.loads(record.read_text())["settings"] == demo_build_settings(recipe) else None


def build_demo_base(recipe, out_dir: Path, stop_after: int | None = None) -> dict:
    """Build the demo base of `recipe` into `out_dir` with a record of how; returns that record.
    `stop_after`: only the first warm-start steps (see supervised_finetune)."""
    from data.prompts import load_prompts

    rows = load_prompts(recipe.data.train, recipe.data.train_split, recipe.data, require_reference=True)
    # One thread: how a matmul splits its sums across threads changes the last bits of the result, and a
    # bit-for-bit rebuild must not depend on the machine's core count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        build_stats = build_demo_model(recipe.demo_model, rows.to_dict("records"), out_dir, recipe.seed, stop_after)
    finally:
        torch.set_num_threads(threads)
    record = {
        "settings": demo_build_settings(recipe),
        "torch": torch.__version__,
        "threads": 1,
        "model_sha256": hashlib.sha256((out_dir / "model.safetensors").read_bytes()).hexdigest(),
        **build_stats,
    }
    (out_dir / BUILD_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return record


def compare_weights(dir_a: Path, dir_b: Path) -> float:
    """Largest absolute difference between two saved models' tensors (0.0: bit for bit the same)."""
    from safetensors.torch import load_file

    a, b = load_file(dir_a / "model.safetensors"), load_file(dir_b / "model.safetensors")
    if a.keys() != b.keys():
        raise ValueError(f"{dir_a} and {dir_b} hold different tensors")
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import shutil
    import tempfile

    from common.atomic import atomic_path
    from configs.recipe import load_recipe

    parser = argparse.ArgumentParser(description="Rebuild the shipped demo base model (data/demo/base_model).")
    parser.add_argument("--rebuild-demo-base", action="store_true", required=True)
    parser.add_argument("--recipe", default=str(DEMO_RECIPE), help="recipe whose demo_model, data.train and seed to use")
    parser.add_argument("--check", action="store_true", help="build into a temporary directory and compare with the shipped one")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="selfplay: %(message)s")
    recipe = load_recipe(args.recipe)
    with tempfile.TemporaryDirectory() as tmp:
        record = build_demo_base(recipe, Path(tmp))
        if args.check:
            diff = compare_weights(Path(tmp), demo_base_dir())
            same = diff == 0.0
            print(f"rebuilt demo base {'equals' if same else 'differs from'} {demo_base_dir()} (max abs difference {diff:g}; "
                  f"torch {record['torch']}; shipped with torch {json.loads((demo_base_dir() / BUILD_RECORD).read_text())['torch']})")
            return 0 if same else 1
        target = demo_base_dir()
        with atomic_path(target, directory=True) as staging:
            # Plain files, not the temporary directory's modes.
            shutil.copytree(tmp, staging, copy_function=shutil.copyfile, dirs_exist_ok=True)
            staging.chmod(0o755)
        print(f"wrote {target} (sha256 {record['model_sha256'][:16]}..., SFT loss {record['sft_loss_first']:.3f} -> "
              f"{record['sft_loss_last']:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

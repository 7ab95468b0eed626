"""One full round on a model of Qwen2.5-0.5B's exact config, with LoRA in bf16 and with QLoRA.

    python bench/real_model_round.py --out /tmp/real --json real.json          # on a GPU
    python bench/real_model_round.py --tiny --modes lora --out /tmp/real        # CPU smoke run

The model is randomly initialised (no hub here) and saved locally with the byte-level tokenizer, then
`Iterate --rounds 1` runs on it through Luigi exactly as a user's command would: BaseModel, Evaluate(0),
Generate, Judge, Train, Evaluate(1), Report. For every task the script records wall time and peak GPU
memory (torch.cuda.max_memory_allocated, reset when the task starts).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_model(out_dir: Path, tiny: bool) -> str:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from models.load.tokenizer import build_byte_tokenizer

    tokenizer = build_byte_tokenizer()
    if tiny:
        config = Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True)
    else:  # Qwen2.5-0.5B's config.json
        config = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                             num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                             tie_word_embeddings=True, max_window_layers=21, sliding_window=None)
    config.eos_token_id, config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return str(out_dir)


def recipe_for(mode: str, model_path: str, tiny: bool) -> dict:
    return {
        "name": f"qwen05b_{mode}",
        "algorithm": "spin",
        "model": {"base_model": model_path, "precision": "bf16" if torch.cuda.is_available() else "fp32",
                  "quantization": "4bit" if mode == "qlora" else "none"},
        "data": {"prompts_per_round": 16 if tiny else 256, "max_prompt_tokens": 256},
        "generation": {"num_samples": 1, "max_new_tokens": 16 if tiny else 128, "batch_size": 128},
        "training": {"batch_size": 4 if tiny else 16, "epochs": 1, "max_length": 256, "lora_r": 16, "lora_alpha": 32,
                     "learning_rate": 5e-5, "save_steps": 50},
        "evaluation": {"num_prompts": 8 if tiny else 64, "max_new_tokens": 16 if tiny else 64, "kl_samples": 1},
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--modes", default="lora,qlora")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import luigi

    import pipeline  # noqa: F401 - registers the tasks
    from tasks.iterate import Iterate

    args.out.mkdir(parents=True, exist_ok=True)
    model_path = build_model(args.out / "random_qwen2.5_0.5b", args.tiny)
    stages: list[dict] = []
    started: dict[str, float] = {}

    def on_start(task):
        started[task.task_id] = time.perf_counter()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_success(task):
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        stages.append({"mode": mode, "task": task.task_family, "round": getattr(task, "round_idx", None),
                       "seconds": round(time.perf_counter() - started[task.task_id], 2),
                       "peak_gib": None if peak is None else round(peak, 2)})

    luigi.Task.event_handler(luigi.Event.START)(on_start)
    luigi.Task.event_handler(luigi.Event.SUCCESS)(on_success)
    results = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "date": time.strftime("%Y-%m-%d")}
    for mode in args.modes.split(","):
        recipe_path = args.out / f"{mode}.yaml"
        recipe_path.write_text(yaml.safe_dump(recipe_for(mode, model_path, args.tiny)))
        start = time.perf_counter()
        ok = luigi.build([Iterate(recipe=str(recipe_path), runs_dir=str(args.out / "runs"), rounds=1)], local_scheduler=True,
                         log_level="WARNING")
        results[mode] = {"ok": ok, "seconds": round(time.perf_counter() - start, 1)}
        print(json.dumps(results[mode]), flush=True)
    results["stages"] = stages
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

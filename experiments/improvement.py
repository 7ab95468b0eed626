"""Do the rounds make a model better? SPIN, SPPO and iterative DPO against a supervised control.

    python experiments/improvement.py --scale gpu --out experiments/results/gpu    # not yet run on a GPU
    python experiments/improvement.py --scale cpu --out experiments/results/cpu    # ~30 min on 2 CPU cores

1. Builds a base model from scratch on the demo's verifiable tasks through the pipeline's own BaseModel
   task (a byte-level Llama-style model; warm-started by supervised training that stops well short of
   mastery) on 20,000 generated training prompts (never a held-out one; `--train-size`).
2. Runs `--rounds` rounds of each algorithm through the pipeline itself (luigi.build on Iterate, the
   same tasks `luigi --module pipeline Iterate` runs), every run starting from that base:
   SPIN (ground truth vs own sample), SPPO (verifier judge, soft win probabilities) and iterative DPO
   (verifier judge, best vs worst).
3. The control: the same base trained on with more supervised steps (full fine-tuning, the warm
   start's own recipe), in chunks of as many training sequences as one SPIN round used, evaluated
   after each chunk with the same held-out evaluation.
4. Writes results.md / results.json: held-out verifier accuracy and win rate against the base (by the
   verifier; ties count one half) after every round, with the seed, wall times and hardware.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from configs.recipe import deep_merge  # noqa: E402

SCALES = {
    # ~11M parameters. Not yet run on a GPU: its settings follow what worked at the cpu scale below.
    "gpu": {
        "demo_model": {"hidden_size": 384, "num_layers": 6, "num_heads": 6, "intermediate_size": 1152,
                       "sft_steps": 2400, "sft_batch_size": 64, "sft_learning_rate": 0.001},
        "data": {"prompts_per_round": 4096},
        "generation": {"batch_size": 1024, "max_new_tokens": 24},
        "training": {"batch_size": 32, "epochs": 2, "learning_rate": 0.001, "lora_r": 32, "lora_alpha": 64, "max_length": 128,
                     "nll_weight": 1.0, "save_steps": 100},
        "evaluation": {"num_prompts": 300, "max_new_tokens": 24, "kl_samples": 2},
    },
    # For the test that keeps this script working: seconds per round.
    "tiny": {
        "demo_model": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64,
                       "sft_steps": 120, "sft_batch_size": 16, "sft_learning_rate": 0.01},
        "data": {"prompts_per_round": 32},
        "generation": {"batch_size": 128, "max_new_tokens": 8},
        "training": {"batch_size": 8, "epochs": 1, "learning_rate": 0.001, "lora_r": 4, "lora_alpha": 8, "max_length": 96},
        "evaluation": {"num_prompts": 12, "max_new_tokens": 8, "kl_samples": 1},
    },
    # ~0.9M parameters, about two minutes per round on 2 CPU cores. What made the rounds help here
    # (see the README's Results): a base with partial real skill (2,400 steps on 20,000 prompts rather
    # than 800 on the 3,000 shipped, where the model mostly guessed), many pairs per round (4,096
    # prompts), the model's most frequent wrong answer as the rejected side, a learning rate high enough
    # to move a LoRA adapter in ~200 steps, and the chosen side's NLL as an anchor (without it DPO at
    # that rate lost accuracy every round).
    "cpu": {
        "demo_model": {"hidden_size": 128, "num_layers": 4, "num_heads": 4, "intermediate_size": 384,
                       "sft_steps": 2400, "sft_batch_size": 32, "sft_learning_rate": 0.001},
        "data": {"prompts_per_round": 4096},
        "generation": {"batch_size": 256, "max_new_tokens": 24},
        "training": {"batch_size": 16, "epochs": 2, "learning_rate": 0.003, "lora_r": 16, "lora_alpha": 32, "max_length": 128,
                     "nll_weight": 1.0, "save_steps": 50},
        "evaluation": {"num_prompts": 300, "max_new_tokens": 24, "kl_samples": 2},
    },
}
# Generated demo training prompts per scale (0: the 3,000 shipped in data/demo/train.jsonl).
TRAIN_SIZES = {"gpu": 20000, "cpu": 20000, "tiny": 0}
ALGORITHMS = {
    "spin": {"algorithm": "spin", "judge": {"name": "ground_truth"}, "generation": {"num_samples": 1, "temperature": 1.0},
             "training": {"loss": "dpo_sigmoid", "beta": 0.1}},
    # SPPO's loss regresses log(pi/pi_ref) onto eta (P - 1/2), eta = 1/beta. The official beta 0.01 asks
    # for moves of tens of nats, which a LoRA adapter at these learning rates makes (accuracy fell
    # 0.337 -> 0.283 in three rounds); beta 0.1 asks for a few nats.
    "sppo": {"algorithm": "sppo", "judge": {"name": "verifier"}, "generation": {"num_samples": 8, "temperature": 1.0},
             "training": {"loss": "sppo", "beta": 0.1}},
    "dpo": {"algorithm": "dpo", "judge": {"name": "verifier"}, "generation": {"num_samples": 8, "temperature": 1.0},
            "training": {"loss": "dpo_sigmoid", "beta": 0.1}},
}


def write_recipe(path: Path, data: dict) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def build(task) -> None:
    import luigi

    if not luigi.build([task], local_scheduler=True, log_level="WARNING"):
        raise SystemExit(f"{task} failed; see the log above")


def run_control(base_path: str, recipe_path: str, spin_run: Path, out_dir: Path, rounds: int) -> list[dict]:
    """More supervised training instead of self-play, evaluated like a round after each chunk."""
    from configs.recipe import load_recipe
    from data.layout import RunLayout, round_name
    from data.prompts import load_prompts
    from data.schema import EVAL, read_artifact
    from models.evaluate.evaluation import evaluate_round
    from models.load.loading import load_causal_lm, load_tokenizer
    from models.train.sft import encode_examples, supervised_finetune

    recipe = load_recipe(recipe_path)
    train = load_prompts(recipe.data.train, recipe.data.train_split, recipe.data, require_reference=True)
    prompts = load_prompts(recipe.data.eval, recipe.data.eval_split, recipe.data).head(recipe.evaluation.num_prompts)
    base_eval = read_artifact(RunLayout(spin_run).eval(0), EVAL)
    tokenizer = load_tokenizer(base_path, recipe.model)
    model = load_causal_lm(base_path, recipe.model)
    device = next(model.parameters()).device
    examples = encode_examples(tokenizer, train.to_dict("records"), max_length=256)
    previous, rows = base_eval, []
    for round_idx in range(1, rounds + 1):
        # Same number of training sequences as SPIN's round (chosen + rejected of every pair, every epoch).
        log = json.loads(RunLayout(spin_run).training_log(round_idx).read_text())
        sequences = 2 * log["stats"]["pairs"] * recipe.training.epochs
        steps = max(1, round(sequences / recipe.demo_model.sft_batch_size))
        start = time.time()
        # The warm start's final learning rate was ~0; continue at a tenth of its peak.
        supervised_finetune(model, tokenizer, examples, steps, recipe.demo_model.sft_batch_size,
                            recipe.demo_model.sft_learning_rate / 10, recipe.seed + round_idx, device)
        ckpt = out_dir / round_name(round_idx)  # the control's checkpoints, named like rounds
        model.save_pretrained(ckpt)
        tokenizer.save_pretrained(ckpt)
        frame, metrics = evaluate_round(recipe, round_idx, str(ckpt), base_path, prompts, previous, base_eval)
        previous = frame
        rows.append({"round": round_idx, "steps": steps, "seconds": time.time() - start, **metrics})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--algorithms", default="spin,sppo,dpo")
    parser.add_argument("--out", type=Path, default=Path("experiments/results/cpu"))
    parser.add_argument("--base-model", help="reuse a base model built by an earlier run instead of building one")
    parser.add_argument("--train-size", type=int, default=None,
                        help="generated demo training prompts, never the held-out ones (default: the scale's; 0: the 3,000 shipped)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a recipe value for every method, e.g. --set training.learning_rate=0.003")
    args = parser.parse_args()

    import torch

    import pipeline  # noqa: F401 - registers the tasks
    from data.demo_tasks import make_large_train, write_jsonl
    from data.layout import RunLayout
    from data.runs import Run
    from tasks.base_model import BaseModel
    from tasks.iterate import Iterate

    runs = args.out / "runs"
    common = deep_merge(SCALES[args.scale], {"seed": args.seed})
    train_size = TRAIN_SIZES[args.scale] if args.train_size is None else args.train_size
    if train_size:
        train_path = write_jsonl(make_large_train(train_size), args.out / "data" / "train.jsonl")
        common = deep_merge(common, {"data": {"train": str(train_path.resolve())}})
    overrides: dict = {}  # applied last, over the scale's and the algorithm's own settings
    for assignment in args.set:
        key, value = assignment.split("=", 1)
        section, name = key.split(".", 1)
        overrides = deep_merge(overrides, {section: {name: yaml.safe_load(value)}})
    timings = {}
    start = time.time()
    if args.base_model:
        base_path = str(Path(args.base_model).resolve())
    else:
        base_recipe = write_recipe(args.out / "recipes" / "base.yaml", deep_merge(deep_merge(common, overrides), {"name": "base"}))
        build(BaseModel(recipe=base_recipe, runs_dir=str(runs)))
        base_path = str(RunLayout(runs / "base").base_model.resolve())
    timings["base_model"] = time.time() - start

    hardware = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()})"
    record = {"scale": args.scale, "seed": args.seed, "rounds": args.rounds, "hardware": hardware,
              "train_prompts": train_size or 3000, "base_model": args.base_model or "built by this run",
              "overrides": args.set, "timings_seconds": timings, "results": {}, "date": time.strftime("%Y-%m-%d")}
    results = record["results"]
    for name in args.algorithms.split(","):
        recipe = deep_merge(deep_merge(deep_merge(common, ALGORITHMS[name]), overrides), {"name": name, "model": {"base_model": base_path}})
        recipe_path = write_recipe(args.out / "recipes" / f"{name}.yaml", recipe)
        start = time.time()
        build(Iterate(recipe=recipe_path, runs_dir=str(runs), rounds=args.rounds))
        timings[name] = time.time() - start
        results[name] = Run(runs / name).metrics().to_dict("records")
        save(record, args.out)  # after every method, so a cut-off run still leaves its table

    if "spin" in results:
        start = time.time()
        spin_recipe = str(args.out / "recipes" / "spin.yaml")
        control = run_control(base_path, spin_recipe, runs / "spin", args.out / "control", args.rounds)
        timings["control"] = time.time() - start
        results["sft_control"] = [{"round": 0, **{k: results["spin"][0].get(k) for k in ("accuracy", "win_rate_vs_base")}}] + [
            {"round": row["round"], "accuracy": row.get("accuracy"), "win_rate_vs_base": row.get("win_rate_vs_base")}
            for row in control
        ]

    save(record, args.out)
    print(render(record))


def save(record: dict, out: Path) -> None:
    (out / "results.json").write_text(json.dumps(record, indent=2, default=float))
    (out / "results.md").write_text(render(record))


def render(record: dict) -> str:
    lines = [f"Scale `{record['scale']}`, seed {record['seed']}, {record['hardware']}, {record['date']}; "
             f"{record['train_prompts']} training prompts; base model: {record['base_model']}"
             + (f"; overrides: {' '.join(record['overrides'])}" if record["overrides"] else "") + ".", "",
             "| method | " + " | ".join(f"round {r}" for r in range(record["rounds"] + 1)) + " | wall time |",
             "|---|" + "---|" * (record["rounds"] + 2)]
    for name, rows in record["results"].items():
        by_round = {row["round"]: row for row in rows}
        cells = []
        for r in range(record["rounds"] + 1):
            row = by_round.get(r, {})
            acc, win = row.get("accuracy"), row.get("win_rate_vs_base")
            cells.append("-" if acc is None else f"{acc:.3f}" + ("" if win is None or r == 0 else f" / {win:.3f}"))
        seconds = record["timings_seconds"].get(name if name != "sft_control" else "control", 0)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {seconds:.0f} s |")
    lines += ["", "Cells: held-out verifier accuracy (greedy) / win rate against the base by the verifier (ties count 1/2)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

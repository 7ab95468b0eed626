"""Evaluate against Generate, per generated token: what one round's evaluation costs beside its sampling.

    python -m models.fetch smollm2-135m-instruct
    python bench/bench_evaluate.py --recipe configs/smollm2_spin_cpu.yaml --runs-dir /tmp/bench_evaluate --reps 3 \
        --json bench/results/evaluate_smollm2_cpu.json

Needs round 1 of the recipe trained; when `<runs-dir>/<recipe name>` has no round-1 checkpoint, the script
makes it first with `luigi --module pipeline Train --round-idx 1` (and Evaluate 0, whose held-out pairs round 1
scores). Then, in one process and alternately, --reps times each:

- Generate 1: `generate_round` as GenerateShard runs it: tokenizer, model load, sampling the round's prompts;
- Generate 2: the same from round 1's checkpoint (root + adapter: the model Evaluate 1 runs), and again with
  the adapter merged into the weights at load instead of folded by packing (models/packing.py);
- Evaluate 1: `evaluate_rows` as EvaluateShard runs it: tokenizer, policy load (root + adapter), greedy answers
  and KL samples decoded together with the held-out pairs scored on their prefill, the samples under the base;
- Evaluate 1 with compaction off (SELFPLAY_CPU_COMPACT=0), to show what dropping ended rows gives;
- Evaluate 1 with the adapter folded in place by peft (models.load.loading.adapter_merged) instead of by packing:
  what leaving the memory-mapped root weights unwritten gives (the first write to a page copies it).

Each prints its best and median wall seconds, the tokens it generated, and seconds per 1,000 of them; the
ratio compares the best of each. Evaluate runs more through the model per generated token than Generate
(its prompts, the held-out pairs, the samples again under the base), so each arm also counts the positions
its forwards ran (padding included; one untimed run with a hook on the token embedding) and prints
seconds per 1,000 of those: per unit of work done, as against per token generated. Evaluate's parts
(loading, decoding with the pairs, the base pass) are timed inside it. The process start, imports and
Luigi's scheduling (about 1.5 s for either stage, as separate commands: bench/cpu_round.py) are not in
these figures; model loads are, and the page cache is warm for both. On a 2-core CPU timings move by 10-25% between runs: compare figures of one run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import machine  # noqa: E402
from data.layout import RunLayout  # noqa: E402


def ensure_round_one(recipe_path: str, runs_dir: Path) -> RunLayout:
    """The run of `recipe_path` under `runs_dir`, trained through round 1 and evaluated at round 0."""
    run = RunLayout(runs_dir / Path(recipe_path).stem)
    if not (Path(run.checkpoint(1)) / "_SUCCESS").is_file() or not run.eval(0).is_file():
        for task in (["Evaluate", "--round-idx", "0"], ["Train", "--round-idx", "1"]):
            subprocess.run([sys.executable, "-m", "luigi", "--module", "pipeline", *task, "--recipe", recipe_path,
                            "--runs-dir", str(runs_dir)], cwd=REPO, check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    return run


class PartTimer:
    """Wall seconds spent inside chosen functions of chosen modules, while `active`."""

    def __init__(self, targets: list[tuple[object, str, str]]):
        self.targets, self.seconds = targets, {}

    @contextlib.contextmanager
    def active(self):
        self.seconds = {}
        saved = [(module, name, getattr(module, name)) for module, name, _ in self.targets]
        for (module, name, label), (_, _, original) in zip(self.targets, saved):
            setattr(module, name, self._timed(original, label))
        try:
            yield self.seconds
        finally:
            for module, name, original in saved:
                setattr(module, name, original)

    def _timed(self, function, label):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - start
        return timed


@contextlib.contextmanager
def counting_positions():
    """[n]: the positions every token-embedding lookup inside the block ran, one per token a forward runs."""
    import torch

    counted = [0]

    def hook(module, args):
        if type(module) is torch.nn.Embedding and args and torch.is_tensor(args[0]):
            counted[0] += args[0].numel()

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        yield counted
    finally:
        handle.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(REPO / "configs" / "smollm2_spin_cpu.yaml"))
    parser.add_argument("--runs-dir", default="/tmp/bench_evaluate")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()

    import models.evaluate.evaluation as evaluation
    import models.generate.generation as generation
    import models.load.loading as loading
    import models.packing as packing
    from configs.recipe import load_recipe
    from data.prompts import load_prompts, round_prompts
    from data.schema import EVAL, read_artifact
    from models.generate.fast_generation import COMPACT_ENV
    from tasks.evaluate import eval_prompts

    recipe_path = str(Path(args.recipe).resolve())
    run = ensure_round_one(recipe_path, Path(args.runs_dir).resolve())
    recipe = load_recipe(recipe_path).for_round(1)
    base_path, checkpoint = str(run.base_model), str(run.checkpoint(1))
    train = load_prompts(recipe.data.train, recipe.data.train_split, recipe.data, require_reference=recipe.needs_reference)
    prompts = {round_idx: round_prompts(train, round_idx, recipe.data.prompts_per_round) for round_idx in (1, 2)}
    heldout = eval_prompts(recipe)
    base_frame = read_artifact(str(run.eval(0)), EVAL)
    parts = PartTimer([(loading, "load_tokenizer", "load"), (loading, "load_policy", "load"),
                       (generation, "generate_and_score", "decode + held-out pairs"), (evaluation, "batched_logps", "log-prob passes")])

    @contextlib.contextmanager
    def variant(compact: bool = True, packing_folds: bool = True):
        folds_adapters = packing.folds_adapters
        if not compact:
            os.environ[COMPACT_ENV] = "0"
        if not packing_folds:
            packing.folds_adapters = lambda model: False
        try:
            yield
        finally:
            os.environ.pop(COMPACT_ENV, None)
            packing.folds_adapters = folds_adapters

    def generate(round_idx: int, packing_folds: bool = True):
        work = Path(tempfile.mkdtemp(prefix="bench_generate_"))
        model_path = base_path if round_idx == 1 else str(run.checkpoint(round_idx - 1))
        try:
            with variant(packing_folds=packing_folds):
                frame, _ = generation.generate_round(recipe.for_round(round_idx), model_path, prompts[round_idx], round_idx,
                                                     work, root_path=base_path)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return int(frame.num_tokens.sum()), {}

    def evaluate(compact: bool = True, packing_folds: bool = True):
        with variant(compact, packing_folds), parts.active() as seconds:
            frame, _ = evaluation.evaluate_rows(recipe, 1, checkpoint, base_path, heldout, base_frame, base_frame)
        generated = frame[frame.kind.isin(["greedy", "sample"])].num_tokens.sum()
        return int(generated), dict(seconds)

    arms = {"Generate 1": lambda: generate(1), "Generate 2": lambda: generate(2),
            "Generate 2, merged at load": lambda: generate(2, packing_folds=False),
            "Evaluate 1": evaluate, "Evaluate 1, no compaction": lambda: evaluate(compact=False),
            "Evaluate 1, folded in place": lambda: evaluate(packing_folds=False)}
    times: dict[str, list[float]] = {name: [] for name in arms}
    tokens: dict[str, int] = {}
    positions: dict[str, int] = {}
    breakdown: dict[str, list[dict]] = {name: [] for name in arms}
    for name, arm in arms.items():  # untimed: the hook costs a call per module
        with counting_positions() as counted:
            arm()
        positions[name] = counted[0]
    for rep in range(args.reps):
        for name, arm in arms.items():
            start = time.perf_counter()
            tokens[name], seconds = arm()
            times[name].append(time.perf_counter() - start)
            breakdown[name].append({k: round(v, 2) for k, v in seconds.items()})
            print(f"rep {rep + 1} {name}: {times[name][-1]:.2f} s, {tokens[name]} tokens {breakdown[name][-1] or ''}", flush=True)

    rows = {}
    for name in arms:
        best = min(times[name])
        rows[name] = {"best_seconds": round(best, 2), "median_seconds": round(statistics.median(times[name]), 2),
                      "all_seconds": [round(t, 2) for t in times[name]], "generated_tokens": tokens[name],
                      "seconds_per_1k_generated": round(1000 * best / tokens[name], 2), "positions_run": positions[name],
                      "seconds_per_1k_positions": round(1000 * best / positions[name], 3), "parts_each_rep": breakdown[name]}
    generate_row = rows["Generate 1"]
    print(f"\n{'':30} {'best s':>7} {'median s':>9} {'tokens':>7} {'s per 1k':>9} {'x Generate':>11} "
          f"{'positions':>10} {'s per 1k':>9} {'x Generate':>11}")
    for name, row in rows.items():
        row["x_generate_per_token"] = round(row["seconds_per_1k_generated"] / generate_row["seconds_per_1k_generated"], 2)
        row["x_generate_per_position"] = round(row["seconds_per_1k_positions"] / generate_row["seconds_per_1k_positions"], 2)
        print(f"{name:30} {row['best_seconds']:7.2f} {row['median_seconds']:9.2f} {row['generated_tokens']:7d} "
              f"{row['seconds_per_1k_generated']:9.2f} {row['x_generate_per_token']:10.2f}x {row['positions_run']:10d} "
              f"{row['seconds_per_1k_positions']:9.3f} {row['x_generate_per_position']:10.2f}x")
    if args.json:
        out = {"machine": machine(), "recipe": Path(args.recipe).name, "model": recipe.model.base_model,
               "heldout_prompts": len(heldout), "round_prompts": len(prompts[1]), "reps": args.reps, "arms": rows,
               "command": " ".join([Path(sys.executable).name, *sys.argv])}
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Evaluate against Generate, per generated token: what one round's evaluation costs beside its sampling.

    python -m models.fetch smollm2-135m-instruct
    python bench/bench_evaluate.py --recipe configs/smollm2_spin_cpu.yaml --runs-dir /tmp/bench_evaluate --reps 3 \
        --json bench/results/evaluate_smollm2_cpu.json

Needs round 1 of the recipe trained; when `<runs-dir>/<recipe name>` has no round-1 checkpoint, the script
makes it first with `luigi --module pipeline Train --round-idx 1` (and Evaluate 0, whose held-out pairs round 1
scores). Then, in one process and alternately, --reps times each:

- Generate 1: `generate_round` as GenerateShard runs it: tokenizer, model load, sampling the round's prompts;
- Evaluate 1: `evaluate_rows` as EvaluateShard runs it: tokenizer, policy load (root + adapter), greedy answers
  and KL samples decoded together with the held-out pairs scored on their prefill, the samples under the base;
- Evaluate 1 with compaction off (SELFPLAY_CPU_COMPACT=0), to show what dropping ended rows gives.

Each prints its best and median wall seconds, the tokens it generated, and seconds per 1,000 of them; the
ratio compares the best of each. Evaluate's parts (loading, decoding with the pairs, the base pass) are
timed inside it. The process start, imports and Luigi's scheduling (about 1.5 s for either stage, as
separate commands: bench/cpu_round.py) are not in these figures; model loads are, and the page cache is
warm for both. On a 2-core CPU timings move by 10-25% between runs: compare figures of one run.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(REPO / "configs" / "smollm2_spin_cpu.yaml"))
    parser.add_argument("--runs-dir", default="/tmp/bench_evaluate")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()

    import models.evaluation as evaluation
    import models.generation as generation
    import models.loading as loading
    from configs.recipe import load_recipe
    from data.prompts import load_prompts, round_prompts
    from data.schema import EVAL, read_artifact
    from models.fast_generation import COMPACT_ENV
    from tasks.evaluate import eval_prompts

    recipe_path = str(Path(args.recipe).resolve())
    run = ensure_round_one(recipe_path, Path(args.runs_dir).resolve())
    recipe = load_recipe(recipe_path).for_round(1)
    base_path, checkpoint = str(run.base_model), str(run.checkpoint(1))
    train = load_prompts(recipe.data.train, recipe.data.train_split, recipe.data, require_reference=recipe.needs_reference)
    train = round_prompts(train, 1, recipe.data.prompts_per_round)
    heldout = eval_prompts(recipe)
    base_frame = read_artifact(str(run.eval(0)), EVAL)
    parts = PartTimer([(loading, "load_tokenizer", "load"), (loading, "load_policy", "load"),
                       (generation, "generate_and_score", "decode + held-out pairs"), (evaluation, "batched_logps", "log-prob passes")])

    def generate():
        work = Path(tempfile.mkdtemp(prefix="bench_generate_"))
        try:
            frame, _ = generation.generate_round(recipe, base_path, train, 1, work, root_path=base_path)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return int(frame.num_tokens.sum()), {}

    def evaluate(compact: bool):
        def run_it():
            with parts.active() as seconds:
                frame, _ = evaluation.evaluate_rows(recipe, 1, checkpoint, base_path, heldout, base_frame, base_frame)
            generated = frame[frame.kind.isin(["greedy", "sample"])].num_tokens.sum()
            return int(generated), dict(seconds)
        if compact:
            return run_it()
        os.environ[COMPACT_ENV] = "0"
        try:
            return run_it()
        finally:
            del os.environ[COMPACT_ENV]

    arms = {"Generate 1": generate, "Evaluate 1": lambda: evaluate(True), "Evaluate 1, no compaction": lambda: evaluate(False)}
    times: dict[str, list[float]] = {name: [] for name in arms}
    tokens: dict[str, int] = {}
    breakdown: dict[str, list[dict]] = {name: [] for name in arms}
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
                      "seconds_per_1k_generated": round(1000 * best / tokens[name], 2), "parts_each_rep": breakdown[name]}
    generate_rate = rows["Generate 1"]["seconds_per_1k_generated"]
    print(f"\n{'':28} {'best s':>7} {'median s':>9} {'tokens':>7} {'s per 1k':>9} {'x Generate':>11}")
    for name, row in rows.items():
        row["x_generate_per_token"] = round(row["seconds_per_1k_generated"] / generate_rate, 2)
        print(f"{name:28} {row['best_seconds']:7.2f} {row['median_seconds']:9.2f} {row['generated_tokens']:7d} "
              f"{row['seconds_per_1k_generated']:9.2f} {row['x_generate_per_token']:10.2f}x")
    if args.json:
        out = {"machine": machine(), "recipe": Path(args.recipe).name, "model": recipe.model.base_model,
               "heldout_prompts": len(heldout), "round_prompts": len(train), "reps": args.reps, "arms": rows,
               "command": " ".join([Path(sys.executable).name, *sys.argv])}
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Proof that a change left the pipeline's results alone: two run directories compared artifact by artifact.

    python bench/same_artifacts.py run  DIR [--rounds 2] [--recipe demo_spin]   # runs the demo into DIR/<recipe>
    python bench/same_artifacts.py compare BEFORE AFTER                          # exits 1 on any difference

`run` is the README's demo command (`luigi --module pipeline Iterate`) with a fixed runs directory, so the
run name and every seed are the same in both arms. Run it once on the code before a change and once on the
code after (same machine, same SELFPLAY_CPU_THREADS), then `compare` the two directories. Compared, in every
round_NN/ of every run found under both directories:

- every Parquet artifact (generations, pairs, selected, eval, validation): equal frames, columns named like
  a wall time left out; exactly, but for float columns (log-probs, scores), which are compared within the
  tensors' tolerance below;
- every tensor of every .safetensors file under checkpoint/ (the adapter, the merged export, the EMA):
  equal within fp32 rounding, |a - b| <= ATOL + RTOL * |b| (reported with the largest difference seen:
  0 means bit for bit);
- metrics.json, judge_meta.json, selection.json and checkpoint/training_log.json: equal after wall times
  (keys naming seconds, times, rates per second) are left out, floats within the same tolerance.

The run's start and end times, throughput figures and run.yaml (package versions, git commit) are not compared.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

RTOL, ATOL = 1e-5, 1e-7  # fp32 has a 24-bit significand: 1e-5 is about 170 units in the last place
# Wall-clock figures differ from run to run by nature: left out of every comparison.
WALL_TIME = re.compile(r"(seconds|_time|time_|^time$|per_second|tokens_per_s|wall|started|finished_at|duration|elapsed)")
JSON_FILES = ("metrics.json", "judge_meta.json", "selection.json", "checkpoint/training_log.json")


def run_demo(runs_dir: Path, rounds: int, recipe: str) -> None:
    """The README's demo command with a fixed runs directory (the run name is the recipe's name)."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    command = [str(Path(sys.executable).with_name("luigi")), "--module", "pipeline", "Iterate", "--rounds", str(rounds),
               "--recipe", recipe, "--runs-dir", str(runs_dir), "--run-name", recipe]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=runs_dir)


def _without_wall_times(value, path: str, dropped: set[str]):
    if isinstance(value, dict):
        kept = {}
        for key, item in value.items():
            if WALL_TIME.search(str(key)):
                dropped.add(f"{path}.{key}" if path else str(key))
            else:
                kept[key] = _without_wall_times(item, f"{path}.{key}" if path else str(key), dropped)
        return kept
    if isinstance(value, list):
        return [_without_wall_times(item, f"{path}[]", dropped) for item in value]
    return value


def _json_differences(before, after, path: str = "") -> list[str]:
    if isinstance(before, dict) and isinstance(after, dict):
        if set(before) != set(after):
            return [f"{path}: keys {sorted(set(before) ^ set(after))} in one only"]
        return [d for key in before for d in _json_differences(before[key], after[key], f"{path}.{key}")]
    if isinstance(before, list) and isinstance(after, list):
        if len(before) != len(after):
            return [f"{path}: {len(before)} vs {len(after)} items"]
        return [d for i, (b, a) in enumerate(zip(before, after)) for d in _json_differences(b, a, f"{path}[{i}]")]
    if isinstance(before, float) and isinstance(after, float | int) and not isinstance(after, bool):
        if math.isnan(before) and math.isnan(after):
            return []
        return [] if abs(before - after) <= ATOL + RTOL * abs(after) else [f"{path}: {before!r} vs {after!r}"]
    return [] if before == after else [f"{path}: {before!r} vs {after!r}"]


def _compare_parquet(before: Path, after: Path) -> list[str]:
    import pandas as pd

    frames = [pd.read_parquet(p) for p in (before, after)]
    frames = [f[[c for c in f.columns if not WALL_TIME.search(c)]] for f in frames]
    try:
        # Computed floats (log-probs, scores) within fp32 rounding, as the tensors; everything else exactly.
        pd.testing.assert_frame_equal(frames[0], frames[1], check_exact=False, rtol=RTOL, atol=ATOL)
        for column in frames[0].columns:
            if not pd.api.types.is_float_dtype(frames[0][column]):
                pd.testing.assert_series_equal(frames[0][column], frames[1][column], check_exact=True)
    except AssertionError as exc:
        return [f"{after}: {str(exc).splitlines()[0]} ({' '.join(str(exc).split())[:300]})"]
    return []


def _compare_tensors(before: Path, after: Path, largest: dict) -> list[str]:
    from safetensors.torch import load_file

    old, new = load_file(before), load_file(after)
    if set(old) != set(new):
        return [f"{after}: tensors {sorted(set(old) ^ set(new))} in one only"]
    problems = []
    for name in old:
        a, b = old[name].double(), new[name].double()
        if a.shape != b.shape or old[name].dtype != new[name].dtype:
            problems.append(f"{after}:{name}: {old[name].dtype}{tuple(a.shape)} vs {new[name].dtype}{tuple(b.shape)}")
            continue
        diff = (a - b).abs()
        largest["max_abs"] = max(largest.get("max_abs", 0.0), float(diff.max()) if diff.numel() else 0.0)
        largest["tensors"] = largest.get("tensors", 0) + 1
        if not bool((diff <= ATOL + RTOL * b.abs()).all()):
            problems.append(f"{after}:{name}: largest difference {float(diff.max()):.3g}")
    return problems


def compare(before_dir: Path, after_dir: Path, up_to_round: int | None = None) -> int:
    """Print what differs between the runs under `before_dir` and `after_dir`; 0 when nothing does.
    `up_to_round`: compare rounds 0..N only (a shorter run of the same command)."""
    problems: list[str] = []
    dropped: set[str] = set()
    largest: dict = {}
    counted = {"parquet": 0, "safetensors": 0, "json": 0}
    runs = sorted(p.parent.name for p in before_dir.glob("*/run.yaml"))
    if not runs:
        print(f"no run directory (*/run.yaml) under {before_dir}")
        return 1
    for run in runs:
        def rounds_of(runs_dir: Path) -> list[str]:
            names = sorted(p.name for p in (runs_dir / run).glob("round_*") if p.is_dir())
            return [n for n in names if up_to_round is None or int(n.split("_")[-1]) <= up_to_round]

        rounds = rounds_of(before_dir)
        if rounds_of(after_dir) != rounds:
            problems.append(f"{run}: rounds differ")
        for round_name in rounds:
            old_round, new_round = before_dir / run / round_name, after_dir / run / round_name
            for old in sorted(old_round.glob("*.parquet")):
                counted["parquet"] += 1
                new = new_round / old.name
                problems += _compare_parquet(old, new) if new.is_file() else [f"{new}: missing"]
            for old in sorted((old_round / "checkpoint").rglob("*.safetensors")):
                counted["safetensors"] += 1
                new = new_round / old.relative_to(old_round)
                problems += _compare_tensors(old, new, largest) if new.is_file() else [f"{new}: missing"]
            for name in JSON_FILES:
                old, new = old_round / name, new_round / name
                if not old.is_file():
                    continue
                counted["json"] += 1
                if not new.is_file():
                    problems.append(f"{new}: missing")
                    continue
                values = [_without_wall_times(json.loads(p.read_text()), name, dropped) for p in (old, new)]
                problems += [f"{run}/{round_name}/{d}" for d in _json_differences(*values, name)]
    print(f"compared {len(runs)} runs ({', '.join(runs)}): {counted['parquet']} Parquet files (floats within the tolerance, the rest exactly), "
          f"{counted['safetensors']} safetensors files ({largest.get('tensors', 0)} tensors; largest |difference| "
          f"{largest.get('max_abs', 0.0):.3g}; tolerance {ATOL:g} + {RTOL:g} * |value|), {counted['json']} JSON files")
    dropped_keys = sorted({d.replace("[]", "") for d in dropped})
    print(f"left out as wall times: {', '.join(dropped_keys) or 'nothing'}")
    for problem in problems:
        print("DIFFERENT:", problem)
    print("SAME" if not problems else f"{len(problems)} differences")
    return 0 if not problems else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the demo into DIR/<recipe>")
    run.add_argument("runs_dir", type=Path)
    run.add_argument("--rounds", type=int, default=2)
    run.add_argument("--recipe", action="append", help="a shipped recipe's name (repeatable; default demo_spin)")
    cmp = sub.add_parser("compare", help="compare two runs directories; exit 1 on any difference")
    cmp.add_argument("before", type=Path)
    cmp.add_argument("after", type=Path)
    cmp.add_argument("--up-to-round", type=int, help="compare rounds 0..N only")
    args = parser.parse_args(argv)
    if args.command == "run":
        os.environ.setdefault("SELFPLAY_CPU_THREADS", "1")  # the same in both arms
        for recipe in args.recipe or ["demo_spin"]:
            run_demo(args.runs_dir.resolve(), args.rounds, recipe)
        return 0
    return compare(args.before, args.after, args.up_to_round)


if __name__ == "__main__":
    sys.exit(main())

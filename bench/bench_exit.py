"""Our round's command with and without the collector frozen at exit (pipeline/__init__.py), alternately:
wall time, the exit (from the last task's end to the process's end) and whether every artifact is the same.

    python bench/bench_exit.py --tiny --reps 2 --json bench/results/exit_demo_cpu.json

Each run is bench/bench_round.py's arm (a), `luigi --module pipeline Iterate --rounds 1` on the bench's recipe
(--algorithm), once with SELFPLAY_GC_FREEZE_AT_EXIT=0 (before) and once as shipped (after). Artifacts compared:
every Parquet and safetensors file byte for byte, the JSON files with their timings, paths and the order of
peft's target_modules (a set, ordered by the string hash of the process) left out; the stages' work directories
(*_work: resume bookkeeping, keyed by path and time) are not artifacts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import bench_round  # noqa: E402
from bench.common import machine  # noqa: E402

TIMING_WORDS = ("seconds", "per_second", "created", "time", "path", "command", "runs_dir", "copied_from")


def comparable(value, run_dir: str):
    """A JSON value without what differs between two identical runs: timings, paths, set order."""
    if isinstance(value, dict):
        return {k: (sorted(v) if k == "target_modules" and isinstance(v, list) else comparable(v, run_dir))
                for k, v in value.items() if not any(word in k for word in TIMING_WORDS)}
    if isinstance(value, list):
        return [comparable(v, run_dir) for v in value]
    return value.replace(run_dir, "RUN") if isinstance(value, str) else value


def differences(before: Path, after: Path) -> list[str]:
    """The artifacts of `before` that `after` lacks or holds otherwise."""
    out = []
    for path in sorted(before.rglob("*")):
        if path.suffix not in (".parquet", ".safetensors", ".json") or any(part.endswith("_work") for part in path.parts):
            continue
        other = after / path.relative_to(before)
        if not other.is_file():
            out.append(f"missing {path.relative_to(before)}")
        elif path.suffix == ".json":
            if comparable(json.loads(path.read_text()), str(before.parent)) != comparable(json.loads(other.read_text()), str(after.parent)):
                out.append(f"differs {path.relative_to(before)}")
        elif path.read_bytes() != other.read_bytes():
            out.append(f"differs {path.relative_to(before)}")
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="as bench_round.py's --model")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--algorithm", default="dpo")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/bench_exit"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    size_args = argparse.Namespace(tiny=args.tiny, prompts=16, samples=4, new_tokens=32, eval_prompts=8, generation_batch=64,
                                   train_batch=8, model=args.model, threads=args.threads)
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    bench_round.prepare_model(size_args)
    recipe = bench_round.write_recipe(args.algorithm, size_args.model_dir, bench_round.sizes(size_args), work)
    result = {"bench": "exit", "machine": machine(), "recipe": recipe.read_text(), "runs": []}
    for rep in range(args.reps):
        for variant, flag in (("before", "0"), ("after", "1")):
            os.environ["SELFPLAY_GC_FREEZE_AT_EXIT"] = flag
            record = bench_round.run_ours(size_args, args.algorithm, recipe, f"{variant}_{rep}", work)
            exit_seconds = record["stages"]["between tasks"]["seconds"]
            result["runs"].append({"variant": variant, "rep": rep, "seconds": record["seconds"], "exit_seconds": exit_seconds,
                                   "load_before": record["load_before"], "load_after": record["load_after"], "run_dir": record["run_dir"]})
            print(json.dumps(result["runs"][-1]), flush=True)
    first = {v: Path(next(r["run_dir"] for r in result["runs"] if r["variant"] == v)) for v in ("before", "after")}
    result["artifact_differences"] = differences(first["before"], first["after"])
    result["artifacts_compared"] = sum(1 for p in first["before"].rglob("*") if p.suffix in (".parquet", ".safetensors", ".json")
                                       and not any(part.endswith("_work") for part in p.parts))
    result["machine_after"] = machine()
    print(json.dumps({k: result[k] for k in ("artifact_differences", "artifacts_compared")}), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()

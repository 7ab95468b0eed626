"""Wall time and peak memory of every stage of one round of a recipe on this machine's CPU.

    python -m models.fetch smollm2-135m-instruct
    python bench/cpu_round.py configs/smollm2_spin_cpu.yaml configs/smollm2_dpo_cpu.yaml configs/smollm2_self_cpu.yaml \
        --runs-dir /tmp/cpu_rounds --json bench/results/smollm2_cpu.json

Each stage runs as its own `luigi --module pipeline <Task>` command from the repository root, in the
order `Iterate --rounds 1` runs them (BaseModel, Evaluate 0, Generate 1, Judge 1, Train 1,
Evaluate 1, Report), so each one's peak resident memory (ru_maxrss of the child) is its own. A
stage's wall time includes its command's start (imports, about 5-10 s). The load average before and
after each stage is recorded: on a shared machine the times are only as good as that.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from data.layout import RunLayout  # noqa: E402

STAGES = [("BaseModel", None), ("Evaluate", 0), ("Generate", 1), ("Judge", 1), ("Train", 1), ("Evaluate", 1), ("Report", None)]


def run_stage(recipe: str, runs_dir: str, task: str, round_idx: int | None, log) -> dict:
    command = [sys.executable, "-m", "luigi", "--module", "pipeline", task, "--recipe", recipe, "--runs-dir", runs_dir]
    if round_idx is not None:
        command += ["--round-idx", str(round_idx)]
    if task == "Report":
        command += ["--rounds", "1"]
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    child = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    _pid, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed (exit {os.waitstatus_to_exitcode(status)}); see {log.name}")
    return {
        "stage": task if round_idx is None else f"{task} {round_idx}",
        "seconds": round(seconds, 1),
        "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
        "peak_rss_gb": round(usage.ru_maxrss / 1024**2, 2),  # ru_maxrss is in KiB on Linux
        "load_before": round(load_before, 2),
        "load_after": round(os.getloadavg()[0], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="+")
    parser.add_argument("--runs-dir", default="/tmp/cpu_rounds")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    results = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
               "torch_threads": os.environ.get("SELFPLAY_CPU_THREADS", "torch default"), "recipes": {}}
    if args.json and Path(args.json).is_file():  # figures of recipes measured before are kept
        results["recipes"] = json.loads(Path(args.json).read_text())["recipes"]
    Path(args.runs_dir).mkdir(parents=True, exist_ok=True)
    for recipe in args.recipes:
        stages = []
        with open(Path(args.runs_dir) / f"{Path(recipe).stem}.log", "w") as log:
            for task, round_idx in STAGES:
                stages.append(run_stage(str(Path(recipe).resolve()), str(Path(args.runs_dir).resolve()), task, round_idx, log))
                print(Path(recipe).stem, json.dumps(stages[-1]), flush=True)
        run = RunLayout(Path(args.runs_dir) / Path(recipe).stem)
        metrics = json.loads(run.metrics(1).read_text())
        base_metrics = json.loads(run.metrics(0).read_text())
        results["recipes"][Path(recipe).stem] = {
            "stages": stages,
            "total_seconds": round(sum(s["seconds"] for s in stages), 1),
            "peak_rss_gb": max(s["peak_rss_gb"] for s in stages),
            "round_0": base_metrics["eval"], "round_1": metrics["eval"],
            "generate": metrics["generate"], "judge": metrics["judge"], "train": metrics["train"]["stats"],
        }
        print(Path(recipe).stem, "total", results["recipes"][Path(recipe).stem]["total_seconds"], "s", flush=True)
        if args.json:  # after every recipe, so a stopped run keeps what it measured
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

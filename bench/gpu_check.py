"""What is still owed on a GPU, measured in one command of at most 10 minutes on one H100; one JSON out.

    python bench/gpu_check.py                  # on a CUDA GPU: writes bench/results/gpu_check_<date>.json
    python bench/gpu_check.py --dry-run        # on a CPU: every part at a tiny size, to check the script itself

Four parts, each an existing bench or test run as its own process with a time budget (the budgets add up to 570 s;
a part that runs past its budget is stopped and recorded as timed out, and the others still run):

1. `train`: our trainer against TRL's DPOTrainer at the Qwen2.5-0.5B shape (random weights), bf16, 8 pairs of 128 +
   384 tokens a step (bench/bench_train.py): tokens/s of each, their ratio, and both losses on the same batch.
2. `rounds`: one SPIN round through Luigi with LoRA and one with QLoRA on the same shape (bench/real_model_round.py):
   time and peak GPU memory per stage.
3. `generation`: the static backend against plain `generate` (bench/bench_generate.py): tokens/s on random Qwen2.5-0.5B
   weights, and greedy equality in fp32 and in bf16, on those weights (near ties: informative) and on the shipped demo
   model (data/demo/base_model, trained: its greedy tokens are far from ties).
4. `chain`: the chain tests on the GPU (tests/test_chain.py): at step 0 of round 2 the bf16 policy equals its stored
   reference (the reference pass inside the training autocast, INPO's base pass too), and QLoRA's rounds chain
   through the nf4 root plus the adapter.

Each part's own JSON (or the test report) goes into the one result under its name, with its wall time and exit status.
Needs the package installed with a CUDA build of torch, and nothing from the network: the models are random weights
of a fixed shape or ship in the repository. Not run on a GPU yet: the script is checked on a CPU with --dry-run only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO_MODEL = REPO / "data" / "demo" / "base_model"


def parts(work: Path, dry_run: bool) -> list[tuple[str, list[str], int, Path]]:
    """(name, command, budget in seconds, the JSON or report file it writes) for each part."""
    bench = lambda name: [sys.executable, str(REPO / "bench" / name)]  # noqa: E731
    train = ["--config", "tiny", "--batch", "2", "--steps", "3"] if dry_run else ["--config", "qwen2.5-0.5b", "--batch", "8", "--steps", "20"]
    generate = (["--tiny", "--batches", "4"] if dry_run else ["--batches", "64", "--new-tokens", "128", "--reps", "1", "--eq-batch", "32"])
    demo = ["--new-tokens", "16", "--eq-prompts", "16", "--eq-new-tokens", "16"] if dry_run else ["--new-tokens", "64", "--eq-prompts", "64"]
    return [
        ("train", bench("bench_train.py") + train + ["--json", str(work / "train.json")], 150, work / "train.json"),
        ("rounds", bench("real_model_round.py") + ["--out", str(work / "rounds"), "--json", str(work / "rounds.json")]
         + (["--tiny"] if dry_run else []), 240, work / "rounds.json"),
        ("generation", bench("bench_generate.py") + generate + ["--json", str(work / "generation.json")], 60, work / "generation.json"),
        ("generation_demo_model", bench("bench_generate.py") + ["--model", str(DEMO_MODEL), "--batches", "32", "--reps", "1", "--skip-hf"]
         + demo + ["--json", str(work / "generation_demo.json")], 30, work / "generation_demo.json"),
        ("chain", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(REPO / "tests" / "test_chain.py"),
                   "-k", "step_0 or qlora_rounds", f"--junitxml={work / 'chain.xml'}"], 90, work / "chain.xml"),
    ]


def test_report(path: Path) -> dict:
    """Each test of a junit XML report: passed, failed (with its message) or skipped."""
    tests = {}
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        outcome = "passed"
        for kind in ("failure", "error", "skipped"):
            found = case.find(kind)
            if found is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[kind]
                tests[case.get("name")] = {"outcome": outcome, "message": (found.get("message") or "")[:500]}
                break
        else:
            tests[case.get("name")] = {"outcome": outcome, "seconds": float(case.get("time", 0))}
    return tests


def run_part(name: str, command: list[str], budget: int, output: Path, log_dir: Path) -> dict:
    start = time.perf_counter()
    log = log_dir / f"{name}.log"
    with open(log, "w") as handle:
        try:
            status = subprocess.run(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, timeout=budget,
                                    env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}).returncode
        except subprocess.TimeoutExpired:
            status = "timed out"
    result = {"command": " ".join(command[1:]), "budget_s": budget, "seconds": round(time.perf_counter() - start, 1), "exit": status,
              "log_tail": log.read_text(errors="replace")[-1500:] if status != 0 else None}
    if output.is_file():
        result["result"] = test_report(output) if output.suffix == ".xml" else json.loads(output.read_text())
    return result


def summary(results: dict) -> dict:
    """The figures the README's GPU paragraphs want, picked out of the parts' results (None where a part did not finish)."""
    pick = lambda part, *keys: _dig(results.get(part, {}).get("result"), keys)  # noqa: E731
    stages = pick("rounds", "stages") or []
    return {
        "train_tokens_per_s_ours": pick("train", "ours", "tokens_per_s"),
        "train_tokens_per_s_trl": pick("train", "trl", "tokens_per_s"),
        "train_ratio": pick("train", "ratio"),
        "train_loss_trl_vs_ours": [pick("train", "loss_agreement", "trl_loss"), pick("train", "loss_agreement", "our_loss")],
        "round_seconds_and_peak_gib": {f"{s['mode']} {s['task']}{'' if s['round'] is None else ' ' + str(s['round'])}": [s["seconds"], s["peak_gib"]]
                                       for s in stages},
        "greedy_equality": [{"model": part, "check": c["check"], "rows_equal": c["rows_equal"], "token_match": c["token_match"]}
                            for part in ("generation", "generation_demo_model") for c in (pick(part, "greedy_equality") or [])],
        "chain_tests": {name: test["outcome"] for name, test in (pick("chain") or {}).items()},
    }


def _dig(value, keys):
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on whatever device there is (a CPU): checks the script")
    parser.add_argument("--json", type=Path, help="where to write the result (default bench/results/gpu_check_<date>.json; "
                                                  "with --dry-run a temporary file)")
    args = parser.parse_args()
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA GPU here: run it on one, or with --dry-run to check the script on a CPU")
    date = time.strftime("%Y-%m-%d")
    out = args.json or (Path(tempfile.gettempdir()) / "gpu_check_dry_run.json" if args.dry_run else REPO / "bench" / "results" / f"gpu_check_{date}.json")
    results: dict = {"date": date, "dry_run": args.dry_run, "torch": torch.__version__,
                     "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        work = Path(tmp)
        for name, command, budget, output in parts(work, args.dry_run):
            if args.dry_run:
                budget *= 4  # a CPU runs the tiny sizes slower than a GPU runs the real ones
            results[name] = run_part(name, command, budget, output, work)
            print(name, json.dumps({k: results[name][k] for k in ("seconds", "exit")}), flush=True)
            results["summary"] = summary(results)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=2) + "\n")  # after every part: a stopped run keeps what it measured
    results["total_seconds"] = round(time.perf_counter() - started, 1)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["summary"], indent=2))
    print(f"{results['total_seconds']} s; written to {out}")
    return 0 if all(results[name]["exit"] == 0 for name, *_ in parts(Path("."), args.dry_run)) else 1


if __name__ == "__main__":
    sys.exit(main())

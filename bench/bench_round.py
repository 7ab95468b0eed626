"""A whole round, ours against the way the official SPIN and SPPO repositories run it, side by side.

    python bench/bench_round.py --model cache:smollm2-135m-instruct --reps 2 --json bench/results/round_smollm2_cpu.json
    python bench/bench_round.py --tiny --reps 1          # the demo model, a few prompts: checks the bench end to end
    python bench/bench_round.py --summarize RESULT.json  # the tables again from a result file's raw runs

On a machine other jobs share, use --threads 1: with the cores oversubscribed, torch's OpenMP threads wait on each
other and a stage can take several times as long (bench/README.md).

For each algorithm (SPIN: ground truth against the model's sample; iterative DPO: K samples, the verifier
keeps a right against a wrong one) one round from the base model, twice:

(a) ours: `luigi --module pipeline Iterate --rounds 1` on a recipe this script writes from
    configs/smollm2_<algorithm>_cpu.yaml, scaled by the size options, in one process as a user runs it
    (through bench/round_clock.py, which only adds a clock to `pipeline`: per-task wall time and peak RSS);
(b) the baseline, bench/round_baseline.py: each step its own process, as people run the official code:
    greedy `generate` on the held-out prompts (the base), `generate` for the samples, the ranking, TRL's
    DPOTrainer (LoRA, reference log-probs precomputed), greedy `generate` on the held-out prompts again.

Both arms get the same model directory (a GGUF is de-quantised once, before any timing: BaseModel then only
records it), the same prompts (written by this script with our own selection, the round's window of the
training data and the first N held-out prompts), seed, sampling settings (temperature, top-p, K, new tokens),
generation batch, LoRA shape, learning rate and warm-up, batch, epochs, DPO sigmoid loss and beta, and the
same torch threads (SELFPLAY_CPU_THREADS). The recipe sets `data.validation: none` and `training.nll_weight: 0`,
since the baseline has neither; everything else is the shipped CPU recipe's.

The arms alternate (a, b, a, b, ...: `--reps` of each per algorithm), with the load average before and after
each; every ratio is reported as the median over the repetitions with its range. Then the loss check: TRL's
DPOTrainer is given the pairs our Judge wrote, the LoRA adapter is moved off its zero init (at init both
losses are log 2 whatever the pairs), and TRL's loss on the first batch is compared with ours computed by our
own encoding (models.train.trainer.encode_pairs) and forward; the token ids of both encodings are compared too.

What each arm's evaluation computes, the same held-out figures where they cost model time: the greedy
accuracy (same verifier) and length, one sample a prompt at temperature 1 (distinct-n; from round 1 KL to the
base, the sample scored under both), the ground truth's log-likelihood, and the held-out pairs the base's
evaluation fixes (ground truth against its sample), whose implicit reward round 1 reports. The baseline does it
the plain way (bench/round_baseline.py: `generate` twice, then a log-prob forward per sequence, the base loaded
again for KL); ours also reports win rates and standard errors, which cost no model time. Both arms' base
log-likelihood of the ground truth is recorded (`gt_logprob_base`): the same model scoring the same text, so
they must agree.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import machine, move_lora_off_zero  # noqa: E402

BASELINE = REPO / "bench" / "round_baseline.py"
DEMO_MODEL = REPO / "data" / "demo" / "base_model"
# Our tasks, grouped into the stages both arms have (a shard task and its merge are one stage).
STAGE_OF_TASK = {"RunSetup": "base model", "BaseModel": "base model", "EvaluateShard 0": "evaluate base", "Evaluate 0": "evaluate base",
                 "GenerateShard 1": "generate", "Generate 1": "generate", "JudgeShard 1": "judge", "Judge 1": "judge",
                 "Train 1": "train", "EvaluateShard 1": "evaluate round 1", "Evaluate 1": "evaluate round 1", "Report": "report"}
STAGES = ["start-up", "base model", "evaluate base", "generate", "judge", "train", "evaluate round 1", "report", "between tasks"]


def sizes(args) -> dict:
    """The scale of the round: the CPU recipes' own, or smaller by the options."""
    if args.tiny:
        return {"prompts": 4, "samples": 2, "new_tokens": 8, "eval_prompts": 4, "batch": 16, "train_batch": 2}
    return {"prompts": args.prompts, "samples": args.samples, "new_tokens": args.new_tokens, "eval_prompts": args.eval_prompts,
            "batch": args.generation_batch, "train_batch": args.train_batch}


def write_recipe(algorithm: str, model_dir: str, size: dict, out: Path) -> Path:
    import yaml

    recipe = yaml.safe_load((REPO / "configs" / f"smollm2_{algorithm}_cpu.yaml").read_text())
    recipe["model"]["base_model"] = model_dir
    recipe["data"].update(prompts_per_round=size["prompts"], validation="none")
    recipe["iterate"] = {"select": "last"}  # no validation split, so the run keeps its last round: the baseline has none
    recipe["generation"].update(max_new_tokens=size["new_tokens"], batch_size=size["batch"])
    if algorithm == "dpo":
        recipe["generation"]["num_samples"] = size["samples"]
    recipe["evaluation"].update(num_prompts=size["eval_prompts"], max_new_tokens=size["new_tokens"])
    recipe["training"].update(nll_weight=0.0, batch_size=size["train_batch"])
    path = out / f"bench_{algorithm}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def write_prompts(recipe_path: Path, out: Path) -> tuple[Path, Path]:
    """The round's training prompts and the held-out prompts, as our Generate and Evaluate select them, in JSONL."""
    from configs.recipe import load_recipe
    from data.prompts import load_prompts, round_prompts
    from data.validation import training_prompts
    from models.judge.judge_types import row_of
    from tasks.evaluate import eval_prompts

    recipe = load_recipe(str(recipe_path))
    train = load_prompts(recipe.data.train, recipe.data.train_split, recipe.data, require_reference=recipe.needs_reference)
    train = round_prompts(training_prompts(recipe, train), 1, recipe.data.prompts_per_round)
    paths = []
    for name, frame in (("train", train), ("heldout", eval_prompts(recipe))):
        rows = [{"prompt_id": r["prompt_id"], "prompt": r["prompt"], "system": r.get("system"), "reference": r.get("reference"),
                 "answer": r.get("answer"), "row": row_of(r.get("source_row"))} for r in frame.to_dict("records")]
        path = out / f"{recipe_path.stem}_{name}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        paths.append(path)
    return paths[0], paths[1]


def run_process(command: list[str], log: Path, env: dict) -> dict:
    """Wall and CPU seconds and peak RSS (ru_maxrss: the largest of the process and the children it waited for)."""
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    wall_start = time.time()
    with open(log, "a") as handle:
        handle.write(f"\n$ {' '.join(command)}\n")
        handle.flush()
        child = subprocess.Popen(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, env=env)
        _pid, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed (exit {os.waitstatus_to_exitcode(status)}); see {log}")
    return {"seconds": round(seconds, 2), "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
            "peak_rss_gb": round(usage.ru_maxrss / 1024**2, 3), "load_before": round(load_before, 2),
            "load_after": round(os.getloadavg()[0], 2), "wall_start": wall_start}


def child_env(args) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "SELFPLAY_CPU_THREADS": str(args.threads)}


def stage_times(events: list[dict], wall_start: float, total: float) -> dict:
    """Per-stage seconds and peak RSS of our one process, from bench/round_clock.py's lines: a stage's tasks' own
    time; start-up is the command's start to its first task (imports, the preflight, scheduling); the rest
    (Luigi's checks between tasks, Iterate itself, the process's exit) is `between tasks`."""
    starts: dict[str, float] = {}
    stages = {name: {"seconds": 0.0, "peak_rss_gb": 0.0} for name in STAGES}
    first = None
    for event in events:
        if event["event"] not in ("start", "end"):
            continue
        key = event["task"] + (f" {event['round']}" if event["round"] is not None else "")
        if event["event"] == "start":
            starts[key] = event["time"]
            first = event["time"] if first is None else min(first, event["time"])
            continue
        stage = STAGE_OF_TASK.get(key)
        if stage is None:  # Iterate: its run() only writes a line
            continue
        stages[stage]["seconds"] += event["time"] - starts[key]
        if event.get("peak_rss_kib"):
            stages[stage]["peak_rss_gb"] = max(stages[stage]["peak_rss_gb"], event["peak_rss_kib"] / 1024**2)
    stages["start-up"]["seconds"] = (first or wall_start) - wall_start
    stages["between tasks"]["seconds"] = total - sum(s["seconds"] for name, s in stages.items() if name != "between tasks")
    return {name: {"seconds": round(s["seconds"], 2), "peak_rss_gb": round(s["peak_rss_gb"], 3) or None}
            for name, s in stages.items()}


def run_ours(args, algorithm: str, recipe: Path, rep: int, work: Path) -> dict:
    runs_dir = work / "ours" / f"{algorithm}_{rep}"
    shutil.rmtree(runs_dir, ignore_errors=True)
    runs_dir.mkdir(parents=True)
    events = runs_dir / "events.jsonl"
    command = [sys.executable, "-m", "luigi", "--module", "bench.round_clock", "Iterate", "--rounds", "1",
               "--recipe", str(recipe), "--runs-dir", str(runs_dir)]
    record = run_process(command, work / f"ours_{algorithm}.log", {**child_env(args), "BENCH_ROUND_EVENTS": str(events)})
    lines = [json.loads(line) for line in events.read_text().splitlines()]
    record["stages"] = stage_times(lines, record.pop("wall_start"), record["seconds"])
    record["peak_rss_gb"] = peak_rss_gb(record)
    record["command"] = " ".join(command[1:])
    run = runs_dir / recipe.stem
    metrics = json.loads((run / "round_01" / "metrics.json").read_text())
    base = json.loads((run / "round_00" / "metrics.json").read_text())
    record["figures"] = {"accuracy_base": base["eval"].get("accuracy"), "accuracy_round_1": metrics["eval"].get("accuracy"),
                         "mean_length_round_1": metrics["eval"].get("mean_length"), "gt_logprob_base": base["eval"].get("gt_logprob"),
                         "kl_vs_base_round_1": metrics["eval"].get("kl_vs_base"), "pairs": metrics["judge"].get("pairs"),
                         "train_steps": metrics["train"]["stats"].get("steps"),
                         "train_loss_first": first_logged_loss(run / "round_01" / "checkpoint" / "training_log.json"),
                         "eval_figures": sorted(metrics["eval"])}
    record["run_dir"] = str(run)
    return record


def peak_rss_gb(run: dict) -> float:
    """The arm's peak RSS: the largest of its processes' ru_maxrss and, for ours, of its stages' peaks (the clock's
    reset of the peak at each task start resets what ru_maxrss reports at exit, so the stages' peaks are needed)."""
    return max([run["peak_rss_gb"]] + [s.get("peak_rss_gb") or 0.0 for s in run["stages"].values()])


def first_logged_loss(path: Path) -> float | None:
    history = json.loads(path.read_text()).get("history", []) if path.is_file() else []
    return history[0].get("loss") if history else None


def baseline_steps(args, algorithm: str, recipe: Path, prompts: tuple[Path, Path], out: Path) -> list[tuple[str, list[str]]]:
    from configs.recipe import load_recipe

    r = load_recipe(str(recipe))
    gen = r.generation
    model, (train_prompts, heldout) = args.model_dir, prompts
    run = [sys.executable, str(BASELINE)]
    evaluate = ["--prompts", str(heldout), "--verifier", r.judge.verifier, "--batch-size", str(gen.batch_size),
                "--max-new-tokens", str(r.evaluation.max_new_tokens), "--seed", str(r.seed), "--beta", str(r.training.beta)]
    return [
        ("evaluate base", run + ["evaluate", "--model", model, "--out", str(out / "eval_base.json")] + evaluate),
        ("generate", run + ["generate", "--model", model, "--prompts", str(train_prompts), "--out", str(out / "samples.jsonl"),
                            "--samples", str(gen.num_samples), "--batch-size", str(gen.batch_size), "--max-new-tokens",
                            str(gen.max_new_tokens), "--temperature", str(gen.temperature), "--top-p", str(gen.top_p),
                            "--seed", str(r.seed)]),
        ("judge", run + ["judge", "--algorithm", algorithm, "--samples-file", str(out / "samples.jsonl"), "--prompts",
                         str(train_prompts), "--verifier", r.judge.verifier, "--out", str(out / "pairs.jsonl")]),
        ("train", run + ["train", "--model", model, "--pairs", str(out / "pairs.jsonl"), "--out", str(out / "adapter")]
         + training_options(r)),
        ("evaluate round 1", run + ["evaluate", "--model", model, "--adapter", str(out / "adapter"), "--out",
                                    str(out / "eval_round_1.json"), "--base-eval", str(out / "eval_base.json")] + evaluate),
    ]


def training_options(r) -> list[str]:
    t = r.training
    return ["--batch-size", str(t.batch_size), "--epochs", str(t.epochs), "--learning-rate", str(t.learning_rate), "--beta",
            str(t.beta), "--max-length", str(t.max_length), "--warmup-ratio", str(t.warmup_ratio), "--lora-r", str(t.lora_r),
            "--lora-alpha", str(t.lora_alpha), "--lora-target-modules", t.lora_target_modules, "--seed", str(r.seed)]


def run_baseline(args, algorithm: str, recipe: Path, prompts: tuple[Path, Path], rep: int, work: Path) -> dict:
    out = work / "baseline" / f"{algorithm}_{rep}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    stages, commands = {}, []
    load_before = os.getloadavg()[0]
    for stage, command in baseline_steps(args, algorithm, recipe, prompts, out):
        stages[stage] = run_process(command, work / f"baseline_{algorithm}.log", child_env(args))
        stages[stage].pop("wall_start")
        commands.append(" ".join(command[1:]))
    base, trained = (json.loads((out / name).read_text()) for name in ("eval_base.json", "eval_round_1.json"))
    log = json.loads((out / "adapter" / "train_log.json").read_text())
    return {
        "seconds": round(sum(s["seconds"] for s in stages.values()), 2), "cpu_seconds": round(sum(s["cpu_seconds"] for s in stages.values()), 1),
        "peak_rss_gb": max(s["peak_rss_gb"] for s in stages.values()), "load_before": round(load_before, 2),
        "load_after": round(os.getloadavg()[0], 2), "stages": stages, "commands": commands,
        "figures": {"accuracy_base": base["accuracy"], "accuracy_round_1": trained["accuracy"], "mean_length_round_1": trained["mean_length"],
                    "gt_logprob_base": base["gt_logprob"], "kl_vs_base_round_1": trained["kl_vs_base"],
                    "pairs": log["pairs"], "train_steps": log["steps"], "train_loss_first": log["losses"][0] if log["losses"] else None,
                    "eval_figures": sorted(k for k in trained if k not in ("responses", "pair_rejected", "pair_logps"))},
        "out_dir": str(out),
    }


def loss_agreement(args, recipe: Path, run_dir: Path, work: Path) -> dict:
    """TRL's and our DPO loss on the first batch of the pairs our Judge wrote, with the adapter moved off zero."""
    import pandas as pd
    import torch

    from bench.round_baseline import add_training_options, dpo_trainer
    from configs.recipe import load_recipe
    from data.layout import RunLayout
    from models.load.loading import load_tokenizer
    from models.logps import collate_pairs, sequence_logps
    from models.train.losses import PreferenceBatch, dpo_sigmoid
    from models.train.trainer import encode_pairs

    r = load_recipe(str(recipe))
    pairs = pd.read_parquet(RunLayout(run_dir).pairs(1)).head(r.training.batch_size)
    parser = argparse.ArgumentParser()
    add_training_options(parser)
    options = parser.parse_args(training_options(r))  # the baseline's own training options, as its train step gets them
    trainer = dpo_trainer(args.model_dir, pairs.to_dict("records"), options, str(work / "loss_check"))
    model = trainer.model
    move_lora_off_zero(model)
    rows = [trainer.train_dataset[i] for i in range(len(pairs))]
    model.eval()
    tokenizer = load_tokenizer(args.model_dir, r.model)
    chosen, rejected = encode_pairs(tokenizer, pairs, r.training.max_length)
    ours_batch = collate_pairs(chosen, rejected, tokenizer.pad_token_id)
    with torch.no_grad():
        trl_loss = trainer.compute_loss(model, trainer.data_collator(rows)).item()
        trl_each = [trainer.compute_loss(model, trainer.data_collator([row])).item() for row in rows]
        policy, _ = sequence_logps(model, ours_batch)
        with model.disable_adapter():
            ref, _ = sequence_logps(model, ours_batch)
    n = len(pairs)
    ours_each = dpo_sigmoid(PreferenceBatch(policy[:n], policy[n:], ref[:n], ref[n:], r.training.beta))
    # Where the token ids differ, ours scores a sampled side as the ids it was sampled as (models.train.trainer.encode_pairs)
    # and TRL re-tokenizes its text: the same loss on other tokens. Where they are the same, the losses must agree.
    same = [row["prompt_ids"] + row["chosen_ids"] == c.prompt_ids + c.completion_ids
            and row["prompt_ids"] + row["rejected_ids"] == b.prompt_ids + b.completion_ids for row, c, b in zip(rows, chosen, rejected)]
    same_diffs = [abs(t - o) for t, o, keep in zip(trl_each, ours_each.tolist(), same) if keep]
    return {"pairs": n, "source": str(RunLayout(run_dir).pairs(1)), "trl_loss": trl_loss, "our_loss": ours_each.mean().item(),
            "abs_diff": abs(trl_loss - ours_each.mean().item()), "pairs_with_identical_token_ids": int(sum(same)),
            "max_abs_diff_identical_pairs": max(same_diffs) if same_diffs else None,
            "trl_loss_per_pair": trl_each, "our_loss_per_pair": ours_each.tolist(), "identical_token_ids": same,
            "at_zero_adapter": "both log 2 = 0.693147 whatever the pairs (policy = reference), so the adapter is moved first"}


def spread(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3), "max": round(max(values), 3), "n": len(values)}


def summarize(runs: list[dict]) -> dict:
    """Per algorithm and stage: each arm's seconds (median and range) and the ratio baseline / ours, taken per
    alternation (repetition i of ours against repetition i of the baseline), median and range."""
    out = {}
    for algorithm in sorted({run["algorithm"] for run in runs}):
        ours = [run for run in runs if run["algorithm"] == algorithm and run["arm"] == "ours"]
        base = [run for run in runs if run["algorithm"] == algorithm and run["arm"] == "baseline"]
        pairs = list(zip(ours, base))
        table = {}
        for stage in STAGES + ["total"]:
            def seconds(run):
                if stage == "total":
                    return run["seconds"]
                return run["stages"].get(stage, {}).get("seconds")
            if any(seconds(o) is None for o in ours):
                continue
            row = {"ours_s": spread([seconds(o) for o in ours])}
            if base and all(seconds(b) is not None for b in base):
                row["baseline_s"] = spread([seconds(b) for b in base])
                if all(seconds(o) for o, _ in pairs):
                    row["ratio_baseline_over_ours"] = spread([seconds(b) / seconds(o) for o, b in pairs])
            table[stage] = row
        if not pairs:
            out[algorithm] = table
            continue
        table["peak_rss_gb"] = {"ours": spread([peak_rss_gb(o) for o in ours]), "baseline": spread([peak_rss_gb(b) for b in base]),
                                "ratio_baseline_over_ours": spread([peak_rss_gb(b) / peak_rss_gb(o) for o, b in pairs])}
        out[algorithm] = table
    return out


def prepare_model(args) -> None:
    if args.tiny and not args.model:
        args.model_dir = str(DEMO_MODEL)
        return
    from bench.common import model_directory

    args.model_dir = model_directory(args.model or "cache:smollm2-135m-instruct")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a model directory, a .gguf file or cache:<name> (default cache:smollm2-135m-instruct; "
                        "with --tiny the shipped demo model)")
    parser.add_argument("--algorithms", default="spin,dpo")
    parser.add_argument("--reps", type=int, default=2, help="runs of each arm per algorithm, alternating a, b, a, b")
    parser.add_argument("--prompts", type=int, default=64, help="training prompts of the round (data.prompts_per_round)")
    parser.add_argument("--samples", type=int, default=8, help="K samples per prompt for iterative DPO")
    parser.add_argument("--new-tokens", type=int, default=32, help="max new tokens, sampling and evaluation")
    parser.add_argument("--eval-prompts", type=int, default=32, help="held-out prompts (evaluation.num_prompts)")
    parser.add_argument("--generation-batch", type=int, default=64, help="rows per generation batch, both arms")
    parser.add_argument("--train-batch", type=int, default=8, help="pairs per training step, both arms")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads in every process of both arms")
    parser.add_argument("--tiny", action="store_true", help="the smallest scale (4 prompts, 2 samples, 8 new tokens): checks the bench")
    parser.add_argument("--skip-loss-check", action="store_true")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/bench_round"))
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--loss-check", type=Path, help="only run the loss check again on this result file's runs (same --work-dir)")
    parser.add_argument("--summarize", type=Path, help="only recompute the summary and table of this result file's runs")
    args = parser.parse_args(argv)
    if args.loss_check:  # the loss check again, on the pairs of a finished result file's runs
        result = json.loads(args.loss_check.read_text())
        args.model_dir = result["model_dir"] if "model_dir" in result else args.model
        work = args.work_dir.resolve()
        result["loss_agreement"] = {a: loss_agreement(args, work / f"bench_{a}.yaml", Path(run["run_dir"]), work)
                                    for a in result["recipes"]
                                    for run in [next(r for r in result["runs"] if r["algorithm"] == a and r["arm"] == "ours")]}
        write(result, args.loss_check)
        print(json.dumps(result["loss_agreement"], indent=1))
        return result
    if args.summarize:
        result = json.loads(args.summarize.read_text())
        for run in result["runs"]:
            run["peak_rss_gb"] = peak_rss_gb(run)
        result["summary"] = summarize(result["runs"])
        write(result, args.summarize)
        print(table_text(result["summary"]))
        return result
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    prepare_model(args)
    size = sizes(args)
    algorithms = args.algorithms.split(",")
    recipes = {a: write_recipe(a, args.model_dir, size, work) for a in algorithms}
    prompts = {a: write_prompts(recipes[a], work) for a in algorithms}
    result = {"bench": "round", "machine": machine(), "model_dir": args.model_dir,
              "model": args.model or ("demo" if args.tiny else "cache:smollm2-135m-instruct"),
              "sizes": size, "threads": args.threads, "recipes": {a: recipes[a].read_text() for a in algorithms}, "runs": []}
    print(json.dumps({"machine": result["machine"], "sizes": size}), flush=True)
    for algorithm in algorithms:  # one algorithm's alternations in a row: a run stopped early still has some whole
        for rep in range(args.reps):
            for arm in ("ours", "baseline"):
                if arm == "ours":
                    record = run_ours(args, algorithm, recipes[algorithm], rep, work)
                else:
                    record = run_baseline(args, algorithm, recipes[algorithm], prompts[algorithm], rep, work)
                result["runs"].append({"algorithm": algorithm, "arm": arm, "rep": rep, **record})
                print(json.dumps({k: result["runs"][-1][k] for k in ("algorithm", "arm", "rep", "seconds", "peak_rss_gb", "load_before",
                                                                      "load_after")}), flush=True)
                result["summary"] = summarize(result["runs"])
                write(result, args.json)
    if not args.skip_loss_check:
        first = {a: next(r for r in result["runs"] if r["algorithm"] == a and r["arm"] == "ours") for a in algorithms}
        result["loss_agreement"] = {a: loss_agreement(args, recipes[a], Path(first[a]["run_dir"]), work) for a in algorithms}
        print(json.dumps({"loss_agreement": result["loss_agreement"]}, indent=1), flush=True)
    result["machine_after"] = machine()
    write(result, args.json)
    print(table_text(result["summary"]), flush=True)
    return result


def write(result: dict, path: Path | None) -> None:
    if path:
        tmp = Path(f"{path}.tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(path)


def table_text(summary: dict) -> str:
    """The summary as a markdown table: seconds as median (min-max), the ratio baseline / ours."""
    fmt = lambda s: f"{s['median']:.1f} ({s['min']:.1f}-{s['max']:.1f})"  # noqa: E731
    lines = []
    for algorithm, table in summary.items():
        lines += [f"\n{algorithm}", "| stage | ours s | baseline s | baseline / ours |", "|---|---|---|---|"]
        for stage, row in table.items():
            if stage == "peak_rss_gb":
                lines.append(f"| peak RSS GB | {fmt(row['ours'])} | {fmt(row['baseline'])} | {fmt(row['ratio_baseline_over_ours'])} |")
                continue
            base = fmt(row["baseline_s"]) if "baseline_s" in row else "-"
            ratio = f"{row['ratio_baseline_over_ours']['median']:.2f}x ({row['ratio_baseline_over_ours']['min']:.2f}-" \
                    f"{row['ratio_baseline_over_ours']['max']:.2f})" if "ratio_baseline_over_ours" in row else "-"
            lines.append(f"| {stage} | {fmt(row['ours_s'])} | {base} | {ratio} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

"""Does a real model improve? SmolLM2-135M-Instruct on the demo's verifiable tasks, on a CPU.

    python -m models.fetch smollm2-135m-instruct                                      # once
    python experiments/smollm2.py --base-only --out experiments/results/smollm2      # the base's pass@k
    python experiments/smollm2.py --out experiments/results/smollm2                  # the experiment

`--base-only` measures what the base can do, on training prompts only (the first `--base-prompts` of
each task kind in data/demo/train.jsonl; never a held-out one): greedy accuracy, and pass@1 and pass@8
of 8 samples at the recipes' temperature (0.7, top-p 0.9), each strict and lenient. A task where
pass@8 is well above pass@1 has partial skill, which preference rounds can sharpen; a task at 0 has
nothing to sharpen. It writes base_passk.md / base_passk.json and the samples (base_samples.jsonl).

The experiment, every method from the same converted base, on the tasks `--tasks` names (those where
the base has partial skill), with held-out prompts (data/demo/heldout.jsonl, no round trains on them):

1. SPIN (ground truth vs the model's own sample), iterative DPO (K = 8, the lenient verifier picks a
   right and a wrong sample), SPPO (K = 8, the verifier's win probabilities, beta 0.1), and the
   self-training family: ReST-EM (K = 8, the samples the verifier passes fitted by likelihood, each round
   from the base) and STaR (one sample, a hinted retry where it fails, every round's examples, each round
   from the base), `--rounds` rounds each through the pipeline itself (luigi.build on Iterate, as
   `luigi --module pipeline Iterate` runs it);
2. the control: the base fine-tuned on the ground truth (full fine-tuning) with as many training
   sequences per round as SPIN's round used (chosen + rejected of every pair, every epoch), evaluated
   after each round's share like a round;
3. results.md / results.json: held-out strict and lenient accuracy of greedy answers ± one standard
   error (n prompts) after every round, per task too, and each method's wall time.

Strict is `data.demo_tasks:check` (the bare answer: what a change of format alone can move); lenient
is `data.lenient:check` (the answer the sentence arrives at: the skill). The verifier judge of DPO
and SPPO uses the lenient check, so their pairs reward right answers, not the format.

Every run also scores its rounds on the validation split (data/demo/validation.jsonl, the same task
kinds, `iterate.validation_prompts` of them; never trained on, apart from the held-out prompts) and keeps
its best round there (iterate.select: best, by lenient accuracy).

    python experiments/smollm2.py --selection --out experiments/results/smollm2/selection

`--selection` is the experiment of the kept round: SPIN at each of `--spin-lrs` (the learning rate chosen
by the validation figure of each run's kept round, never by held-out), iterative DPO and SPPO, three
rounds each with selection on, and the supervised control (its round chosen on validation the same way);
selection.md / selection.json give each arm's kept round on the held-out prompts against its round 0 and
against the control, strict and lenient, paired, ± one standard error. `--unstable-demo` runs the demo
SPIN recipe at ten times its learning rates with `iterate.patience: 1` and says which rounds early
stopping saved and which round it kept.

`--scale tiny` runs the same steps on a tiny random Llama (tests/test_experiment.py keeps it working);
`--scale cpu` was sized for at most an hour per method on 2 idle CPU cores (see SCALES); with the static
backend and packed weights each method took 9-10 minutes (39 minutes for all four, 2026-12-02).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from configs.recipe import deep_merge  # noqa: E402
from data.stats import mean_se  # noqa: E402

STRICT = "data.demo_tasks:check"
LENIENT = "data.lenient:check"
DEMO_TRAIN = REPO / "data" / "demo" / "train.jsonl"
DEMO_HELDOUT = REPO / "data" / "demo" / "heldout.jsonl"
DEMO_VALIDATION = REPO / "data" / "demo" / "validation.jsonl"
PASS_AT = (1, 8)

# Settings common to every method; the per-scale sizes below go over them.
COMMON = {
    "seed": 0,
    "model": {"base_model": "cache:smollm2-135m-instruct", "precision": "fp32"},
    "data": {"max_prompt_tokens": 128},
    "generation": {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 32, "batch_size": 64, "backend": "static"},
    "judge": {"verifier": LENIENT, "unfinished": "keep"},
    "training": {"beta": 0.1, "learning_rate": 2.0e-4, "epochs": 2, "batch_size": 8, "max_length": 192,
                 "lora_r": 16, "lora_alpha": 32,
                 "lora_target_modules": "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", "save_steps": 8},
    "evaluation": {"max_new_tokens": 32, "kl_samples": 1, "report_prompts": 4},
    # The round kept: the best by lenient accuracy on the validation split (the recipes' verifier).
    "iterate": {"select": "best", "select_by": "accuracy", "min_gain": 1.0},
}
SCALES = {
    # Sized for at most an hour per method on 2 idle cores, from the stage times of one round of the
    # smollm2 recipes at a load of about 1 (bench/results/smollm2_cpu_2026-11-23.json): sampling
    # ~0.3 s per sequence of <= 32 tokens at batch 64 (DPO's Generate: 512 in 153 s), training ~1.5 s
    # per pair and epoch (SPIN: 64 pairs in 124 s with the reference pass), evaluation ~1 s per
    # held-out prompt at round 0 and ~2 s after (greedy, one sample, log-probs, the KL pass).
    # DPO / SPPO: 3 x (160 x 8 x 0.3 s + <= 160 pairs x 2 epochs x 1.5 s) <= 3 x 14 min, plus
    # 150 s + 3 x 300 s of evaluation: <= 60 min (pairs are fewer: only prompts with a right and a
    # wrong sample make one). SPIN: 3 x (48 s + 240 s) + 17.5 min = ~32 min. The control: 3 x
    # (320 sequences of full fine-tuning + 300 s) = ~25 min.
    "cpu": {"data": {"prompts_per_round": 160}, "evaluation": {"num_prompts": 150}, "iterate": {"validation_prompts": 150}},
    # For the test that keeps this script working: a tiny random Llama, seconds per round.
    "tiny": {"data": {"prompts_per_round": 8},
             "generation": {"max_new_tokens": 6, "batch_size": 32},
             "training": {"epochs": 1, "batch_size": 4, "lora_r": 4, "lora_alpha": 8,
                          "lora_target_modules": "all-linear", "save_steps": 2},
             "evaluation": {"num_prompts": 6, "max_new_tokens": 6}, "iterate": {"validation_prompts": 6}},
}
ALGORITHMS = {
    "spin": {"algorithm": "spin", "judge": {"name": "ground_truth"}, "generation": {"num_samples": 1},
             "training": {"loss": "dpo_sigmoid", "epochs": 1}},
    "dpo": {"algorithm": "dpo", "judge": {"name": "verifier"}, "generation": {"num_samples": 8},
            "training": {"loss": "dpo_sigmoid", "nll_weight": 1.0}},
    # beta 0.1 rather than SPPO's 0.001-0.01: eta = 1/beta asks log-ratios to move by eta (P - 1/2) nats,
    # and tens of nats made the small model of experiments/improvement.py lose accuracy.
    "sppo": {"algorithm": "sppo", "judge": {"name": "verifier"}, "generation": {"num_samples": 8},
             "training": {"loss": "sppo", "beta": 0.1}},
    # The self-training family (algorithm rest, loss nll): the samples the lenient verifier passes are fitted by
    # their likelihood, each round from a fresh adapter on the base (training.init: base). Samples cut at the
    # length limit are never kept (judge.unfinished: penalize): trained on, closed with the end of turn, they
    # would teach the model to stop mid-sentence.
    # ReST-EM (Singh et al. 2023): K = 8 as DPO and SPPO, at most 4 examples a prompt, distinct ones first.
    "rest_em": {"algorithm": "rest", "judge": {"name": "verifier", "unfinished": "penalize", "max_per_prompt": 4},
                "generation": {"num_samples": 8}, "training": {"init": "base"}},
    # STaR (Zelikman et al. 2022): one sample a prompt; where it is wrong, one more with the answer as a hint,
    # trained on without the hint if it passes; every round from the base on all the examples collected.
    "star": {"algorithm": "rest", "judge": {"name": "verifier", "unfinished": "penalize", "rationalize": True,
                                            "rationalize_samples": 1},
             "generation": {"num_samples": 1}, "training": {"init": "base", "accumulate": True}},
}
# The control's full fine-tuning: a small learning rate, as for continued supervised training of a
# chat model (LoRA's 2e-4 on all 135M weights would overwrite it).
CONTROL_LEARNING_RATE = 1.0e-5
CONTROL_BATCH_SIZE = 8


# --- scoring ------------------------------------------------------------------------------------

def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are right (Chen et al. 2021, Eq. 1): 1 - C(n-c, k) / C(n, k)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


def score_rows(rows: list[dict]) -> list[dict]:
    """Each row (prompt, response, task, answer) with its strict and lenient verdicts."""
    from models.judge.verifiers import load_verifier

    strict, lenient = load_verifier(STRICT), load_verifier(LENIENT)
    return [{**row, "strict": strict.score(row["prompt"], row["response"], row),
             "lenient": lenient.score(row["prompt"], row["response"], row)} for row in rows]


def accuracy_table(scored: list[dict]) -> dict:
    """Strict and lenient accuracy ± SE (n), over all rows and per task."""
    import pandas as pd

    frame = pd.DataFrame(scored)
    out = {}
    for name, group in [("all", frame), *sorted(frame.groupby("task"))]:
        entry = {"n": int(len(group))}
        for measure in ("strict", "lenient"):
            entry[measure], entry[f"{measure}_se"] = mean_se(group[measure])
        out[name] = entry
    return out


def change_vs_base(base: list[dict], scored: list[dict]) -> dict:
    """Strict and lenient accuracy minus the base's, paired over the held-out prompts both answered: ± one
    standard error of the per-prompt differences (each prompt's difficulty cancels), n."""
    import pandas as pd

    columns = ["prompt_id", "strict", "lenient"]
    both = pd.DataFrame(base)[columns].merge(pd.DataFrame(scored)[columns], on="prompt_id", suffixes=("_base", ""))
    out = {"n": int(len(both))}
    for measure in ("strict", "lenient"):
        out[measure], out[f"{measure}_se"] = mean_se(both[measure] - both[f"{measure}_base"])
    return out


def round_row(round_idx: int, scored: list[dict], base: list[dict]) -> dict:
    """One round's accuracy table, and from round 1 on its paired change from the base."""
    row = {"round": round_idx, **accuracy_table(scored)}
    if round_idx > 0:
        row["change_vs_base"] = change_vs_base(base, scored)
    return row


def scored_greedy(frame) -> list[dict]:
    """The greedy held-out answers of one eval frame with their strict and lenient verdicts."""
    greedy = frame.query("kind == 'greedy'")
    return score_rows(greedy[["prompt_id", "prompt", "response", "task", "answer"]].to_dict("records"))


# --- the base's pass@k --------------------------------------------------------------------------

def base_prompts(per_task: int, tasks: list[str] | None = None) -> list[dict]:
    """The first `per_task` training prompts of each task kind (training split only)."""
    rows = [json.loads(line) for line in DEMO_TRAIN.read_text().splitlines()]
    kinds = sorted({row["task"] for row in rows}) if tasks is None else tasks
    return [row for kind in kinds for row in [r for r in rows if r["task"] == kind][:per_task]]


def measure_base(base_path: str, recipe, rows: list[dict], samples: int) -> dict:
    """Greedy answers and `samples` samples per prompt from the base; strict and lenient pass@k per task."""
    from data.prompts import format_prompt
    from models.generate.generation import generate_texts
    from models.load.loading import load_policy, load_tokenizer
    from models.generate.sampling import SamplingSettings

    tokenizer = load_tokenizer(base_path, recipe.model)
    model = load_policy(base_path, recipe.model)
    texts = [format_prompt(tokenizer, row["prompt"]) for row in rows]
    gen = recipe.generation
    timings = {}
    start = time.time()
    greedy = generate_texts(model, tokenizer, texts, SamplingSettings(
        temperature=0.0, max_new_tokens=gen.max_new_tokens, batch_size=gen.batch_size, seed=recipe.seed, backend=gen.backend),
        "base greedy")
    timings["greedy_seconds"] = time.time() - start
    start = time.time()
    sampled = generate_texts(model, tokenizer, texts, SamplingSettings(
        num_samples=samples, temperature=gen.temperature, top_p=gen.top_p, max_new_tokens=gen.max_new_tokens,
        batch_size=gen.batch_size, seed=recipe.seed, backend=gen.backend), "base samples")
    timings["sample_seconds"] = time.time() - start
    timings["greedy_tokens"] = sum(g[0].num_tokens for g in greedy)
    timings["sample_tokens"] = sum(s.num_tokens for group in sampled for s in group)
    records = []
    for row, g, group in zip(rows, greedy, sampled):
        base = {k: row[k] for k in ("prompt_id", "prompt", "task", "answer")}
        records.append({**base, "kind": "greedy", "sample_index": 0, "response": g[0].text, "finished": g[0].finished})
        records += [{**base, "kind": "sample", "sample_index": k, "response": s.text, "finished": s.finished}
                    for k, s in enumerate(group)]
    return {"table": passk_table(records), "timings": timings, "records": score_rows(records)}


def chance_level(task: str, rows: list[dict]) -> float | None:
    """What guessing gets on these prompts: a uniform pick among the prompt's numbers for `extreme`,
    the training split's most frequent answer for `count` (most words hold a letter once); None for
    tasks where a guess is almost never right."""
    import numpy as np

    from data.answers import NUMBER_RE

    if task == "extreme":
        return float(np.mean([1 / len(NUMBER_RE.findall(row["prompt"])) for row in rows]))
    if task == "count":
        answers = [json.loads(line)["answer"] for line in DEMO_TRAIN.read_text().splitlines() if '"task": "count"' in line]
        modal = max(set(answers), key=answers.count)
        return float(np.mean([row["answer"] == modal for row in rows]))
    return None


def passk_table(records: list[dict]) -> dict:
    """Greedy accuracy and pass@k of the samples, strict and lenient, over all prompts and per task."""
    import pandas as pd

    scored = pd.DataFrame(score_rows(records))
    table = {}
    for task, group in [("all", scored), *sorted(scored.groupby("task"))]:
        greedy_rows = group[group.kind == "greedy"]
        sample_rows = group[group.kind == "sample"]
        entry = {"prompts": int(group.prompt_id.nunique()), "samples_cut": float((~sample_rows.finished.astype(bool)).mean()),
                 "chance": None if task == "all" else chance_level(task, greedy_rows.to_dict("records"))}
        for measure in ("strict", "lenient"):
            entry[f"greedy_{measure}"], entry[f"greedy_{measure}_se"] = mean_se(greedy_rows[measure])
            right = sample_rows.groupby("prompt_id")[measure].agg(["size", "sum"])
            for k in PASS_AT:
                per_prompt = [pass_at_k(int(n), int(c), k) for n, c in zip(right["size"], right["sum"])]
                entry[f"pass@{k}_{measure}"], entry[f"pass@{k}_{measure}_se"] = mean_se(per_prompt)
        table[task] = entry
    return table


def render_base(record: dict) -> str:
    lines = [f"Base pass@k of {record['model']}, {record['prompts_per_task']} training prompts per task, "
             f"{record['samples']} samples each at temperature {record['temperature']} (top-p {record['top_p']}), "
             f"{record['max_new_tokens']} new tokens; {record['hardware']}, {record['date']}.", "",
             "| task | greedy strict | greedy lenient | pass@1 strict | pass@8 strict | pass@1 lenient | pass@8 lenient "
             "| chance | samples cut |",
             "|---|---|---|---|---|---|---|---|---|"]
    for task, entry in record["table"].items():
        cells = [f"{entry[key]:.2f} ± {entry[key + '_se']:.2f}" for key in (
            "greedy_strict", "greedy_lenient", "pass@1_strict", "pass@8_strict", "pass@1_lenient", "pass@8_lenient")]
        chance = "-" if entry["chance"] is None else f"{entry['chance']:.2f}"
        lines.append(f"| {task} (n = {entry['prompts']}) | " + " | ".join(cells) + f" | {chance} | {entry['samples_cut']:.2f} |")
    t = record["timings"]
    lines += ["", f"Generation: {t['greedy_tokens']} greedy tokens in {t['greedy_seconds']:.0f} s, "
              f"{t['sample_tokens']} sampled tokens in {t['sample_seconds']:.0f} s (a shared machine: rough). "
              "Chance: a uniform guess among the prompt's numbers (extreme), the most frequent training answer (count). "
              f"Samples cut: the share that reached the {record['max_new_tokens']}-token limit."]
    return "\n".join(lines) + "\n"


# --- the experiment -----------------------------------------------------------------------------

def write_recipe(path: Path, data: dict) -> str:
    from common.atomic import atomic_write_bytes

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, yaml.safe_dump(data, sort_keys=False).encode())
    return str(path)


def write_split(source: Path, tasks: list[str], path: Path) -> str:
    """The rows of a demo split whose task kind is one of `tasks`, interleaved by kind as in the source."""
    from common.atomic import atomic_write_bytes

    rows = [line for line in source.read_text().splitlines() if json.loads(line)["task"] in tasks]
    if not rows:
        raise SystemExit(f"no rows of {source} have a task in {tasks}")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, ("\n".join(rows) + "\n").encode())
    return str(path.resolve())


def build(task) -> None:
    import luigi

    if not luigi.build([task], local_scheduler=True, log_level="WARNING"):
        raise SystemExit(f"{task} failed; see the log above")


def build_base(out: Path, common: dict) -> str:
    """The base model converted once (BaseModel: GGUF -> safetensors, or a tiny model's directory as is)."""
    import pipeline  # noqa: F401 - registers the tasks
    from tasks.base_model import BaseModel

    recipe_path = write_recipe(out / "recipes" / "base.yaml", deep_merge(common, {"name": "base", "algorithm": "spin",
                                                                                    "judge": {"name": "ground_truth"}}))
    task = BaseModel(recipe=recipe_path, runs_dir=str(out / "runs"))
    build(task)
    return str(Path(task.model_path).resolve())


def rescore_run(run_dir: Path, rounds: int) -> list[dict]:
    """Strict and lenient accuracy of every round's greedy held-out answers (eval.parquet), and each
    round's paired change from round 0."""
    from data.layout import RunLayout
    from data.schema import EVAL, read_artifact

    out, base = [], []
    for round_idx in range(rounds + 1):
        path = RunLayout(run_dir).eval(round_idx)
        if not path.exists():
            break
        scored = scored_greedy(read_artifact(path, EVAL))
        base = base or scored
        out.append(round_row(round_idx, scored, base))
    return out


def rescore_results(record: dict, out: Path) -> None:
    """Every method's rounds in `record` scored again from their saved evaluations, and its pipeline metrics
    read again (after an Evaluate rerun); the control keeps its sequence counts and times, and shares
    SPIN's round 0."""
    from data.layout import RunLayout, round_name
    from data.runs import Run
    from data.schema import EVAL, read_artifact

    for name in record["results"]:
        if name != "sft_control":
            record["results"][name] = rescore_run(out / "runs" / name, record["rounds"])
            record["pipeline_metrics"][name] = Run(out / "runs" / name).metrics().to_dict("records")
    control = record["results"].get("sft_control", [])
    base = scored_greedy(read_artifact(RunLayout(out / "runs" / "spin").eval(0), EVAL)) if control else []
    for i, row in enumerate(control):
        if row["round"] > 0:
            scored = scored_greedy(read_artifact(out / "control" / round_name(row["round"]) / "eval.parquet", EVAL))
            control[i] = {"sequences": row["sequences"], "seconds": row["seconds"], **round_row(row["round"], scored, base)}
        else:
            control[i] = {**row, **record["results"]["spin"][0]}


def run_control(base_path: str, recipe_path: str, spin_run: Path, out_dir: Path, rounds: int) -> list[dict]:
    """Supervised training on the ground truth instead of self-play: per round, as many training
    sequences as SPIN's round used, then the round's held-out evaluation. A round an earlier command
    finished (its control_round.json, written last) is read back, and the next one trains on from its
    checkpoint: each round starts a new optimiser from its own seed, so a resumed control is the same."""
    from common.atomic import atomic_write_json
    from configs.recipe import load_recipe
    from data.layout import RunLayout, round_name
    from data.prompts import load_prompts, round_prompts
    from data.schema import EVAL, read_artifact, write_parquet
    from models.evaluate.evaluation import evaluate_round
    from models.load.loading import load_causal_lm, load_tokenizer
    from models.train.sft import encode_examples, supervised_finetune

    recipe = load_recipe(recipe_path)
    train = load_prompts(recipe.data.train, recipe.data.train_split, recipe.data, require_reference=True)
    prompts = load_prompts(recipe.data.eval, recipe.data.eval_split, recipe.data).head(recipe.evaluation.num_prompts)
    base_eval = read_artifact(RunLayout(spin_run).eval(0), EVAL)
    base_scored = scored_greedy(base_eval)
    tokenizer = load_tokenizer(base_path, recipe.model)
    model, model_round = None, None
    previous, rows = base_eval, [{"round": 0, "sequences": 0, "seconds": 0.0}]
    # What a round was made from: one made from another recipe, base or SPIN run is made again.
    made_from = {"recipe": recipe.to_dict(), "base": base_path, "spin_run": str(spin_run)}
    for round_idx in range(1, rounds + 1):
        ckpt = out_dir / round_name(round_idx)
        done = ckpt / "control_round.json"
        log = json.loads(RunLayout(spin_run).training_log(round_idx).read_text())
        sequences = 2 * log["stats"]["pairs"] * recipe.training.epochs
        steps = max(1, math.ceil(sequences / CONTROL_BATCH_SIZE))  # at least as many sequences as SPIN's round
        made = json.loads(done.read_text()) if done.is_file() else None
        # Read back only while nothing before it was trained again: a round trains on from the one before.
        if made is not None and made["made_from"] == made_from and made["sequences"] == steps * CONTROL_BATCH_SIZE \
                and model_round is None:
            frame = read_artifact(ckpt / "eval.parquet", EVAL)
        else:
            if model_round != round_idx - 1:
                model = load_causal_lm(base_path if round_idx == 1 else str(out_dir / round_name(round_idx - 1)), recipe.model)
            # The same prompts SPIN's round trained on, their ground truth as the target.
            examples = encode_examples(tokenizer, round_prompts(train, round_idx, recipe.data.prompts_per_round).to_dict("records"),
                                       recipe.training.max_length)
            start = time.time()
            supervised_finetune(model, tokenizer, examples, steps, CONTROL_BATCH_SIZE, CONTROL_LEARNING_RATE,
                                recipe.seed + round_idx, next(model.parameters()).device)
            model_round = round_idx
            (ckpt / "validation.parquet").unlink(missing_ok=True)  # select_control scores the new model again
            model.save_pretrained(ckpt)
            tokenizer.save_pretrained(ckpt)
            frame, _metrics = evaluate_round(recipe, round_idx, str(ckpt), base_path, prompts, previous, base_eval)
            write_parquet(frame, ckpt / "eval.parquet", EVAL)
            made = {"sequences": steps * CONTROL_BATCH_SIZE, "seconds": time.time() - start, "made_from": made_from}
            atomic_write_json(done, made)
        previous = frame
        rows.append({"sequences": made["sequences"], "seconds": made["seconds"],
                     **round_row(round_idx, scored_greedy(frame), base_scored)})
    return rows


# --- the kept round (--selection) and early stopping (--unstable-demo) -------------------------------------

def selection_records(run_dir: Path) -> list[dict]:
    """Every round's selection.json of a run (rounds 0..k, as far as they go)."""
    from data.layout import RunLayout
    from data.selection import read_selection

    records = []
    while (record := read_selection(RunLayout(run_dir).selection(len(records)))) is not None:
        records.append(record)
    return records


def select_control(recipe_path: str, base_path: str, spin_run: Path, control_dir: Path, rounds: int) -> list[dict]:
    """The control's rounds scored on the validation split and selected by the pipeline's own rule
    (data.selection.decide): the same figure, min_gain and prompts as the self-play arms."""
    from configs.recipe import load_recipe
    from data.layout import RunLayout, round_name
    from data.schema import VALIDATION, read_artifact, write_parquet
    from data.selection import decide, paired_gain, round_figures
    from data.validation import validation_prompts
    from models.evaluate.selection import score_validation

    recipe = load_recipe(recipe_path)
    prompts = validation_prompts(recipe)
    frames = {0: read_artifact(RunLayout(spin_run).validation(0), VALIDATION)}  # the same base on the same prompts
    records = [decide(0, recipe.iterate, "accuracy", None, None, round_figures(frames[0]))]
    for round_idx in range(1, rounds + 1):
        path = control_dir / round_name(round_idx) / "validation.parquet"
        if not path.is_file():
            write_parquet(score_validation(recipe, round_idx, str(path.parent), base_path, prompts, "accuracy"), path, VALIDATION)
        frames[round_idx] = read_artifact(path, VALIDATION)
        gain = paired_gain("accuracy", frames[round_idx], frames[records[-1]["best_round"]])
        records.append(decide(round_idx, recipe.iterate, "accuracy", records[-1], gain, round_figures(frames[round_idx])))
    return records


def held_out_scored(run_dir: Path | None, control_dir: Path | None, round_idx: int, base_run: Path) -> list[dict]:
    """Strict and lenient verdicts of one round's greedy held-out answers (the control's round 0 is the base's)."""
    from data.layout import RunLayout, round_name
    from data.schema import EVAL, read_artifact

    if run_dir is None and round_idx > 0:
        path = control_dir / round_name(round_idx) / "eval.parquet"
    else:
        path = RunLayout(run_dir or base_run).eval(round_idx)
    return scored_greedy(read_artifact(path, EVAL))


def arm_summary(records: list[dict], scored: dict[int, list[dict]], control_kept: list[dict]) -> dict:
    """An arm's kept round: its validation figures by round, and on the held-out prompts its accuracy and its
    paired changes from round 0 and from the control's kept round."""
    kept = records[-1]["kept_round"]
    return {
        "kept_round": kept,
        "rounds_run": len(records) - 1,
        "stopped": bool(records[-1]["stop"]),
        "validation": [{"round": r["round"], **r["figures"]["accuracy"], "replaced": r["replaced"],
                        "gain": r["gain"]} for r in records],
        "held_out": accuracy_table(scored[kept])["all"],
        "vs_round_0": change_vs_base(scored[0], scored[kept]),
        "vs_control": change_vs_base(control_kept, scored[kept]),
    }


def in_se(change: dict, measure: str) -> float:
    se = change[f"{measure}_se"]
    return change[measure] / se if se and se > 0 else (0.0 if change[measure] == 0 else math.copysign(math.inf, change[measure]))


def render_selection(record: dict) -> str:
    arms = record["arms"]
    rounds = record["rounds"]
    control_rounds = record.get("control_rounds", rounds)
    control = (f" The supervised control ran {control_rounds} round{'' if control_rounds == 1 else 's'} (`--control-rounds`)."
               if control_rounds != rounds else "")
    lines = [f"SmolLM2-135M-Instruct, tasks {', '.join(record['tasks'])}, scale `{record['scale']}`, seed {record['seed']}, "
             f"{record['hardware']}, {record['date']}. Each arm ran {rounds} rounds with selection on (iterate.select: best, "
             f"by lenient accuracy on {record['validation_prompts']} validation prompts, min_gain {record['min_gain']:g} SE); "
             f"held-out: {record['heldout_prompts']} prompts no choice saw. SPIN's learning rate was chosen among "
             f"{', '.join(record['spin_candidates'])} by the validation figure of each run's kept round: "
             f"**{record['spin_chosen']}**." + control, "",
             "Validation accuracy (lenient) by round ± one standard error; * the round kept:", "",
             "| arm | " + " | ".join(f"round {r}" for r in range(rounds + 1)) + " |", "|---|" + "---|" * (rounds + 1)]
    for name, arm in arms.items():
        by_round = {row["round"]: row for row in arm["validation"]}
        cells = ["-" if r not in by_round else
                 f"{by_round[r]['mean']:.3f} ± {by_round[r]['se']:.3f}{' *' if r == arm['kept_round'] else ''}"
                 for r in range(rounds + 1)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "The kept round on the held-out prompts, strict / lenient ± one standard error; its change from round 0 "
              "and from the supervised control's kept round, paired over the same prompts (± the standard error of the "
              "per-prompt differences; in standard errors in brackets):", "",
              "| arm | kept | held-out accuracy | vs its round 0 | vs the control |", "|---|---|---|---|---|"]
    for name, arm in arms.items():
        acc, base, control = arm["held_out"], arm["vs_round_0"], arm["vs_control"]

        def change(c):
            return (f"{c['strict']:+.3f} ± {c['strict_se']:.3f} ({in_se(c, 'strict'):+.1f}) / "
                    f"{c['lenient']:+.3f} ± {c['lenient_se']:.3f} ({in_se(c, 'lenient'):+.1f})")

        lines.append(f"| {name} | {arm['kept_round']} | {acc['strict']:.3f} ± {acc['strict_se']:.3f} / "
                     f"{acc['lenient']:.3f} ± {acc['lenient_se']:.3f} | {change(base)} | {change(control)} |")
    goals = record["goals"]
    lines += ["", f"- No arm's kept model below its base: {goals['none_below_base']}.",
              f"- SPIN's kept model at least 2 standard errors above its base: {goals['spin_2se']}.",
              f"- SPIN within one standard error of the control: {goals['spin_near_control']}."]
    unstable = record.get("unstable")
    if unstable:
        lines += ["", render_unstable(unstable)]
    return "\n".join(lines) + "\n"


def goals(arms: dict, spin: str) -> dict:
    below = [f"{name} ({measure} {arm['vs_round_0'][measure]:+.3f})" for name, arm in arms.items()
             for measure in ("strict", "lenient") if arm["vs_round_0"][measure] < 0]
    spin_arm = arms[spin]
    spin_se = {m: in_se(spin_arm["vs_round_0"], m) for m in ("strict", "lenient")}
    near = {m: abs(in_se(spin_arm["vs_control"], m)) <= 1 for m in ("strict", "lenient")}
    return {
        "none_below_base": "met" if not below else "not met: " + ", ".join(below),
        "spin_2se": ("met" if min(spin_se.values()) >= 2 else "not met") +
                    f" (strict {spin_se['strict']:+.1f} SE, lenient {spin_se['lenient']:+.1f} SE)",
        "spin_near_control": ("met" if all(near.values()) else "not met") +
                             f" (lenient {spin_arm['vs_control']['lenient']:+.3f} ± {spin_arm['vs_control']['lenient_se']:.3f})",
    }


def selection_experiment(args, common: dict, tasks: list[str], base_path: str) -> dict:
    """SPIN at each of --spin-lrs, DPO and SPPO with selection on, the control selected the same way; the kept
    rounds on held-out against round 0 and against the control."""
    import pipeline  # noqa: F401 - registers the tasks
    from tasks.iterate import Iterate

    runs = args.out / "runs"
    algorithms = args.algorithms.split(",")
    arms, run_dirs, timings = {}, {}, {}
    names = []
    for name in algorithms:
        variants = ([(f"spin_lr{lr}", {"training": {"learning_rate": float(lr)}}) for lr in args.spin_lrs.split(",")]
                    if name == "spin" else [(name, {})])
        for arm, overrides in variants:
            recipe = deep_merge(deep_merge(deep_merge(common, ALGORITHMS[name]), overrides),
                                {"name": arm, "model": {"base_model": base_path}})
            recipe_path = write_recipe(args.out / "recipes" / f"{arm}.yaml", recipe)
            start = time.time()
            build(Iterate(recipe=recipe_path, runs_dir=str(runs), rounds=args.rounds))
            timings[arm] = time.time() - start
            run_dirs[arm] = runs / arm
            names.append(arm)
    spin_arms = [n for n in names if n.startswith("spin_")]
    records = {name: selection_records(run_dirs[name]) for name in names}

    def kept_accuracy(name):  # the validation accuracy of the round the run keeps
        return records[name][records[name][-1]["kept_round"]]["figures"]["accuracy"]["mean"]

    # SPIN's learning rate, chosen on validation only.
    spin = max(spin_arms, key=kept_accuracy) if spin_arms else None
    base_run = run_dirs[names[0]]
    control_dir = args.out / "control"
    control_records = None
    control_rounds = args.rounds if args.control_rounds is None else args.control_rounds
    if spin is not None:
        start = time.time()
        run_control(base_path, str(args.out / "recipes" / f"{spin}.yaml"), run_dirs[spin], control_dir, control_rounds)
        control_records = select_control(str(args.out / "recipes" / f"{spin}.yaml"), base_path, run_dirs[spin], control_dir,
                                         control_rounds)
        timings["sft_control"] = time.time() - start
    control_kept = control_records[-1]["kept_round"] if control_records else 0
    control_scored = held_out_scored(None, control_dir, control_kept, base_run)
    for name in names:
        scored = {r: held_out_scored(run_dirs[name], None, r, base_run) for r in range(len(records[name]))}
        arms[name] = arm_summary(records[name], scored, control_scored)
    if control_records:
        scored = {r: held_out_scored(None, control_dir, r, run_dirs[spin]) for r in range(control_rounds + 1)}
        arms["sft_control"] = arm_summary(control_records, scored, control_scored)
    record = {"scale": args.scale, "seed": args.seed, "rounds": args.rounds, "control_rounds": control_rounds,
              "tasks": tasks, "hardware": hardware(),
              "date": time.strftime("%Y-%m-%d"), "overrides": args.set, "validation_prompts": common["iterate"]["validation_prompts"],
              "min_gain": common["iterate"]["min_gain"],
              "heldout_prompts": common["evaluation"]["num_prompts"], "spin_candidates": spin_arms, "spin_chosen": spin,
              "arms": arms, "timings_seconds": timings}
    record["goals"] = goals({n: a for n, a in arms.items() if n in names and (not n.startswith("spin_") or n == spin)},
                            spin) if spin else {}
    return record


def render_unstable(record: dict) -> str:
    lines = [f"Early stopping: `{record['recipe']}` (the demo's SPIN recipe at ten times its learning rates, "
             f"{', '.join(f'{lr:g}' for lr in record['learning_rates'])}) with iterate.patience 1 and --rounds "
             f"{record['rounds_requested']}: it ran {record['rounds_run']} round(s) in {record['seconds']:.0f} s and saved "
             f"{record['rounds_saved']} (about {record['seconds_saved']:.0f} s at its own pace), and kept round "
             f"{record['kept_round']}. {record['stop_line']}.", "",
             "| round | validation accuracy | held-out accuracy |", "|---|---|---|"]
    for row in record["rounds"]:
        lines.append(f"| {row['round']} | {row['validation']:.3f} ± {row['validation_se']:.3f} | "
                     f"{row['held_out']:.3f} ± {row['held_out_se']:.3f} |")
    return "\n".join(lines)


def unstable_demo(out: Path, rounds: int) -> dict:
    """The demo SPIN recipe at ten times its learning rates, with patience 1: the rounds early stopping saved."""
    import pipeline  # noqa: F401 - registers the tasks
    from configs.recipe import CONFIG_DIR
    from data.layout import RunLayout
    from data.runs import Run
    from data.selection import read_best, stop_line
    from tasks.iterate import Iterate

    recipe = yaml.safe_load((CONFIG_DIR / "demo_spin.yaml").read_text())
    recipe["training"]["learning_rate"] *= 10
    for entry in recipe.get("rounds", []):
        if "learning_rate" in entry.get("training", {}):
            entry["training"]["learning_rate"] *= 10
    recipe = deep_merge(recipe, {"name": "demo_spin_lr10x", "iterate": {"patience": 1}})
    recipe_path = write_recipe(out / "recipes" / "demo_spin_lr10x.yaml", recipe)
    start = time.time()
    build(Iterate(recipe=recipe_path, runs_dir=str(out / "runs"), rounds=rounds))
    seconds = time.time() - start
    run_dir = out / "runs" / "demo_spin_lr10x"
    records = selection_records(run_dir)
    metrics = Run(run_dir).metrics().set_index("round")
    ran = len(records) - 1
    learning_rates = [recipe["training"]["learning_rate"]] + [e["training"]["learning_rate"] for e in recipe["rounds"]
                                                               if "learning_rate" in e.get("training", {})]
    return {"recipe": "demo_spin_lr10x", "learning_rates": learning_rates, "rounds_requested": rounds, "rounds_run": ran,
            "rounds_saved": rounds - ran, "seconds": seconds, "seconds_saved": seconds / max(ran, 1) * (rounds - ran),
            "kept_round": read_best(RunLayout(run_dir))["round"],
            "stop_line": stop_line(records, rounds) if records[-1]["stop"] else "it did not stop early",
            "rounds": [{"round": r["round"], "validation": r["figures"]["accuracy"]["mean"],
                        "validation_se": r["figures"]["accuracy"]["se"], "held_out": metrics.loc[r["round"], "accuracy"],
                        "held_out_se": metrics.loc[r["round"], "accuracy_se"]} for r in records]}


def render(record: dict) -> str:
    rounds = record["rounds"]
    lines = [f"SmolLM2-135M-Instruct, tasks {', '.join(record['tasks'])}, scale `{record['scale']}`, seed {record['seed']}, "
             f"{record['hardware']}, {record['date']}; held-out accuracy of greedy answers, strict / lenient, "
             f"± one standard error (n = {record.get('heldout_prompts', '?')} held-out prompts).", "",
             "| method | " + " | ".join(f"round {r}" for r in range(rounds + 1)) + " | wall time |",
             "|---|" + "---|" * (rounds + 2)]
    for name, rows in record["results"].items():
        by_round = {row["round"]: row for row in rows}
        cells = []
        for r in range(rounds + 1):
            entry = by_round.get(r, {}).get("all")
            cells.append("-" if entry is None else
                         f"{entry['strict']:.3f} ± {entry['strict_se']:.3f} / {entry['lenient']:.3f} ± {entry['lenient_se']:.3f}")
        seconds = record["timings_seconds"].get(name)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {'-' if seconds is None else f'{seconds:.0f} s'} |")
    lines += ["", "Change from the base (round 0), paired over the same held-out prompts, strict / lenient, "
              "± one standard error of the per-prompt differences:", "",
              "| method | " + " | ".join(f"round {r}" for r in range(1, rounds + 1)) + " |",
              "|---|" + "---|" * rounds]
    for name, rows in record["results"].items():
        by_round = {row["round"]: row for row in rows}
        cells = []
        for r in range(1, rounds + 1):
            change = by_round.get(r, {}).get("change_vs_base")
            cells.append("-" if change is None else f"{change['strict']:+.3f} ± {change['strict_se']:.3f} / "
                                                    f"{change['lenient']:+.3f} ± {change['lenient_se']:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += last_round_by_task(record)
    lines += ["", "Per task, lenient accuracy by round:", "",
              "| method | task | " + " | ".join(f"round {r}" for r in range(rounds + 1)) + " |",
              "|---|---|" + "---|" * (rounds + 1)]
    for name, rows in record["results"].items():
        by_round = {row["round"]: row for row in rows}
        for task in record["tasks"]:
            cells = ["-" if task not in by_round.get(r, {}) else f"{by_round[r][task]['lenient']:.2f}" for r in range(rounds + 1)]
            lines.append(f"| {name} | {task} | " + " | ".join(cells) + " |")
    measured = record.get("measured") or {}
    if len({(m["date"], m["hardware"]) for m in measured.values()}) > 1:
        days = {}
        for name, m in measured.items():
            days.setdefault((m["date"], m["hardware"]), []).append(name)
        lines += ["", "Methods measured in different runs of this script (the same settings, prompts and base): " + "; ".join(
            f"{', '.join(names)} on {date} ({where})" for (date, where), names in days.items()) + "."]
        same = record.get("round_0_matches") or {}
        if same:
            lines.append("Round 0 (the base, evaluated again by each run) gave the same greedy answers' figures as before: "
                         + ", ".join(f"{name} {'yes' if ok else 'NO'}" for name, ok in same.items()) + ".")
    return "\n".join(lines) + "\n"


def last_round_by_task(record: dict) -> list[str]:
    """The last round of every method by task: lenient / strict accuracy ± one standard error (n per task)."""
    rounds, tasks = record["rounds"], record["tasks"]
    lines = ["", f"Round {rounds} by task, lenient / strict accuracy ± one standard error of the lenient (n prompts "
             "per task); round 0, the base, first:", "", "| method | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    names = list(record["results"])
    for name, r in [(names[0], 0)] + [(n, rounds) for n in names] if names else []:
        by_round = {row["round"]: row for row in record["results"][name]}
        cells = ["-" if task not in by_round.get(r, {}) else
                 "{lenient:.2f} ± {lenient_se:.2f} / {strict:.2f} (n = {n})".format(**by_round[r][task]) for task in tasks]
        lines.append(f"| {'base' if r == 0 else name} | " + " | ".join(cells) + " |")
    return lines


def keep_earlier_results(record: dict, out: Path, running: list[str]) -> None:
    """--keep-results: the methods of an earlier results.json in `out` that this command does not run, put in
    `record` as they were measured (each with its date and machine in `measured`), first."""
    path = out / "results.json"
    if not path.is_file():
        return
    earlier = json.loads(path.read_text())
    for key in ("scale", "seed", "rounds", "tasks", "heldout_prompts", "overrides"):
        if earlier.get(key) != record.get(key):
            raise SystemExit(f"--keep-results: {path} was measured with {key} {earlier.get(key)!r}, this run has "
                             f"{record.get(key)!r}; the methods would not be comparable")
    redone = set(running) | ({"sft_control"} if "spin" in running else set())
    kept = [name for name in earlier["results"] if name not in redone]
    for name in kept:
        record["results"][name] = earlier["results"][name]
        record["pipeline_metrics"][name] = earlier.get("pipeline_metrics", {}).get(name, [])
        record["timings_seconds"][name] = earlier["timings_seconds"].get(name)
        record["measured"][name] = (earlier.get("measured") or {}).get(name) or {"date": earlier["date"],
                                                                                  "hardware": earlier["hardware"]}


def same_round_0(record: dict, name: str) -> bool | None:
    """Whether `name`'s round 0 has the figures of the first other method's round 0 (every method starts from the same
    base, evaluated again by each run): None when there is no other method."""
    others = [n for n in record["results"] if n != name and n != "sft_control"]
    if not others:
        return None
    strip = lambda row: {k: v for k, v in row.items() if k != "round"}  # noqa: E731
    return strip(record["results"][name][0]) == strip(record["results"][others[0]][0])


def save(record: dict, out: Path, stem: str, text: str) -> None:
    from common.atomic import atomic_write_bytes

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / f"{stem}.json", (json.dumps(record, indent=2, default=float) + "\n").encode())
    atomic_write_bytes(out / f"{stem}.md", text.encode())


def hardware() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    parser.add_argument("--base-model", help="a model directory or GGUF spec instead of cache:smollm2-135m-instruct "
                                             "(the tiny scale's test passes a tiny random Llama)")
    parser.add_argument("--base-only", action="store_true", help="measure the base's pass@k on training prompts and stop")
    parser.add_argument("--base-prompts", type=int, default=16, help="training prompts per task for --base-only")
    parser.add_argument("--samples", type=int, default=8, help="samples per prompt for --base-only")
    parser.add_argument("--rescore", action="store_true",
                        help="recompute results.md/json from the saved runs/ and control/ evaluations (after a change of a check, or an Evaluate rerun)")
    parser.add_argument("--rescore-base", action="store_true",
                        help="recompute base_passk.md/json from the saved base_samples.jsonl (after a change of a check)")
    parser.add_argument("--tasks", default="add,count,extreme,sort,subtract",
                        help="task kinds of the experiment (those where the base has partial skill)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--algorithms", default="spin,dpo,sppo,rest_em,star",
                        help="comma-separated; the control runs when spin does")
    parser.add_argument("--keep-results", action="store_true",
                        help="add the methods run now to the results.json in --out, keeping the methods it holds that "
                             "this command does not run, as they were measured (the same settings are required)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("experiments/results/smollm2"))
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a recipe value for every method, e.g. --set data.prompts_per_round=64")
    parser.add_argument("--selection", action="store_true",
                        help="the kept-round experiment: selection.md/json (see the module docstring)")
    parser.add_argument("--spin-lrs", default="2e-4,2e-5", help="SPIN's candidate learning rates for --selection")
    parser.add_argument("--control-rounds", type=int, metavar="ROUNDS",
                        help="with --selection: the supervised control's rounds (default --rounds)")
    parser.add_argument("--unstable-demo", type=int, default=0, metavar="ROUNDS",
                        help="with --selection: also run the demo SPIN recipe at 10x its learning rates with patience 1 "
                             "for up to ROUNDS rounds")
    args = parser.parse_args(argv)

    if args.rescore_base:
        from common.atomic import atomic_write_bytes

        record = json.loads((args.out / "base_passk.json").read_text())
        records = [json.loads(line) for line in (args.out / "base_samples.jsonl").read_text().splitlines()]
        record["table"] = passk_table(records)
        atomic_write_bytes(args.out / "base_samples.jsonl", "".join(json.dumps(row, default=float) + "\n" for row in score_rows(records)).encode())
        save(record, args.out, "base_passk", render_base(record))
        print(render_base(record))
        return
    if args.rescore:
        record = json.loads((args.out / "results.json").read_text())
        rescore_results(record, args.out)
        save(record, args.out, "results", render(record))
        print(render(record))
        return
    common = deep_merge(deep_merge(COMMON, SCALES[args.scale]), {"seed": args.seed})
    if args.base_model:
        common = deep_merge(common, {"model": {"base_model": args.base_model}})
    for assignment in args.set:
        key, value = assignment.split("=", 1)
        section, name = key.split(".", 1)
        common = deep_merge(common, {section: {name: yaml.safe_load(value)}})
    tasks = args.tasks.split(",")
    unknown = sorted(set(tasks) - {"add", "subtract", "sort", "reverse", "count", "extreme"})
    if unknown:
        raise SystemExit(f"--tasks: unknown task kinds {unknown}")
    common = deep_merge(common, {"data": {"train": write_split(DEMO_TRAIN, tasks, args.out / "data" / "train.jsonl"),
                                          "eval": write_split(DEMO_HELDOUT, tasks, args.out / "data" / "heldout.jsonl"),
                                          "validation": write_split(DEMO_VALIDATION, tasks, args.out / "data" / "validation.jsonl")}})

    start = time.time()
    base_path = build_base(args.out, common)
    base_seconds = time.time() - start
    if args.base_only:
        from common.atomic import atomic_write_bytes
        from configs.recipe import load_recipe

        recipe = load_recipe(str(args.out / "recipes" / "base.yaml"))
        measured = measure_base(base_path, recipe, base_prompts(args.base_prompts), args.samples)
        gen = recipe.generation
        record = {"model": common["model"]["base_model"], "prompts_per_task": args.base_prompts, "samples": args.samples,
                  "temperature": gen.temperature, "top_p": gen.top_p, "max_new_tokens": gen.max_new_tokens,
                  "hardware": hardware(), "date": time.strftime("%Y-%m-%d"), "split": "train",
                  "table": measured["table"], "timings": measured["timings"]}
        save(record, args.out, "base_passk", render_base(record))
        atomic_write_bytes(args.out / "base_samples.jsonl",
                           "".join(json.dumps(row, default=float) + "\n" for row in measured["records"]).encode())
        print(render_base(record))
        return

    if args.selection:
        record = selection_experiment(args, common, tasks, base_path)
        if args.unstable_demo:
            record["unstable"] = unstable_demo(args.out, args.unstable_demo)
        save(record, args.out, "selection", render_selection(record))
        print(render_selection(record))
        return

    import pipeline  # noqa: F401 - registers the tasks
    from data.runs import Run
    from tasks.iterate import Iterate

    runs = args.out / "runs"
    heldout = sum(1 for _ in open(common["data"]["eval"]))
    record = {"scale": args.scale, "seed": args.seed, "rounds": args.rounds, "tasks": tasks, "hardware": hardware(),
              "date": time.strftime("%Y-%m-%d"), "overrides": args.set,
              "heldout_prompts": min(heldout, common["evaluation"].get("num_prompts", heldout)),
              "strict": STRICT, "lenient": LENIENT, "timings_seconds": {"base_model": base_seconds}, "results": {},
              "pipeline_metrics": {}, "measured": {}}
    if args.keep_results:
        keep_earlier_results(record, args.out, args.algorithms.split(","))
    for name in args.algorithms.split(","):
        recipe = deep_merge(deep_merge(common, ALGORITHMS[name]), {"name": name, "model": {"base_model": base_path}})
        recipe_path = write_recipe(args.out / "recipes" / f"{name}.yaml", recipe)
        start = time.time()
        build(Iterate(recipe=recipe_path, runs_dir=str(runs), rounds=args.rounds))
        record["timings_seconds"][name] = time.time() - start
        record["results"][name] = rescore_run(runs / name, args.rounds)
        record["pipeline_metrics"][name] = Run(runs / name).metrics().to_dict("records")
        record["measured"][name] = {"date": record["date"], "hardware": record["hardware"]}
        if args.keep_results and same_round_0(record, name) is not None:
            record.setdefault("round_0_matches", {})[name] = same_round_0(record, name)
        if name == "spin":  # the control right after SPIN, whose round sizes it copies
            start = time.time()
            control = run_control(base_path, recipe_path, runs / "spin", args.out / "control", args.rounds)
            control[0].update({k: v for k, v in record["results"]["spin"][0].items() if k != "round"})  # the same base
            record["timings_seconds"]["sft_control"] = time.time() - start
            record["results"]["sft_control"] = control
            record["measured"]["sft_control"] = record["measured"][name]
        save(record, args.out, "results", render(record))  # after every method, so a cut-off run keeps its table
    print(render(record))


if __name__ == "__main__":
    main()

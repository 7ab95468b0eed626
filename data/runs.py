"""Readers for a run directory: what the report and the notebooks look at.

    from data.runs import Run
    run = Run("runs/demo_spin")
    run.metrics()          # one row per evaluated round (0 = base): accuracy, win rates, KL, length...,
                           # with `<figure>_se` (standard error) and `prompts` (n) where measured, and per task kind
    run.figure_sources()   # which verifier and which judge measured accuracy and win rates, per round
    run.loss_curves()      # round, step, loss, rewards/accuracy, ... of every training step
    run.evals()            # every round's eval.parquet, stacked
    run.pairs()            # every round's pairs.parquet, stacked
    run.selected()         # every round's selected.parquet (algorithm rest's examples), stacked
    run.generations()      # every round's generations.parquet, stacked
    run.benchmarks()       # one row per round, lm-eval benchmark, task and metric: value, se (lm-eval's), n, versions
    run.judge_stats()      # one row per judged round: pairs made, ties and identical pairs skipped
    run.matrix_spread()    # one row per pair that kept its judge's win-probability matrix (SPPO, DPO)
    run.selections()       # one row per selected round: its validation figure, the gain over the best, kept, parent
    run.best()             # best.json: the round the run keeps and why (None before the first selection)
    stack_metrics([run_a, run_b])  # several runs' metrics() stacked, with a `run` column

Files are validated against data/schema.py as they are read.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from common.errors import DataError
from data.layout import RunLayout
from data.schema import EVAL, GENERATIONS, PAIRS, SELECTED, ArtifactSchema, read_artifact

FIGURES = (
    "accuracy", "win_rate_vs_previous", "win_rate_vs_base", "kl_vs_base", "implicit_reward_accuracy",
    "implicit_reward_margin", "mean_length", "length_p50", "length_p90", "distinct_1", "distinct_2",
    "gt_logprob", "gt_logprob_vs_base",
)
# Figures that are means over held-out prompts (or pairs) also record `<figure>_se`, their standard error.
WITH_SE = ("accuracy", "win_rate_vs_previous", "win_rate_vs_base", "kl_vs_base", "implicit_reward_accuracy",
           "implicit_reward_margin", "gt_logprob", "gt_logprob_vs_base")
COUNTS = ("prompts", "implicit_reward_pairs")
# Beside each win rate: its length-controlled rate and both sides' mean length; a training judge's rates and
# its agreement with the referee, where one judged apart from it (data/comparisons.py). Each with `_se`.
COMPARISON_FIGURES = tuple(
    f"{figure}_vs_{label}{suffix}"
    for label in ("previous", "base")
    for figure, suffixes in (("win_rate", ("_lc", "_lc_se", "_chars_ours", "_chars_theirs")),
                             ("train_judge_win_rate", ("", "_se", "_lc", "_lc_se")),
                             ("judge_agreement", ("", "_se")), ("judge_kappa", ("", "_se")))
    for suffix in suffixes
)


class Run:
    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir)
        self.layout = RunLayout(self.dir)
        if not self.dir.is_dir():
            raise DataError(f"{self.dir}: no such run directory")

    @property
    def name(self) -> str:
        return self.dir.name

    @cached_property
    def config(self) -> dict:
        path = self.layout.run_yaml
        return yaml.safe_load(path.read_text()) if path.is_file() else {}

    @property
    def recipe(self) -> dict:
        """The resolved recipe recorded in run.yaml ({} when the run has none yet)."""
        return self.config.get("recipe") or {}

    @property
    def algorithm(self) -> str | None:
        return self.recipe.get("algorithm")

    def rounds(self) -> list[int]:
        return self.layout.rounds()

    def round_dir(self, round_idx: int) -> Path:
        return self.layout.round_dir(round_idx)

    def round_metrics(self, round_idx: int) -> dict | None:
        path = self.layout.metrics(round_idx)
        return json.loads(path.read_text()) if path.is_file() else None

    def metrics(self) -> pd.DataFrame:
        rows = []
        for round_idx in self.rounds():
            report = self.round_metrics(round_idx)
            if report is None:
                continue
            ev = report["eval"]
            row = {"round": round_idx, **{k: ev.get(k) for k in FIGURES}}
            row.update({f"{k}_se": ev.get(f"{k}_se") for k in WITH_SE})
            row.update({k: ev.get(k) for k in COUNTS})
            row.update({k: ev[k] for k in COMPARISON_FIGURES if k in ev})
            row.update({f"accuracy/{task}": acc for task, acc in (ev.get("accuracy_by_task") or {}).items()})
            for label in ("previous", "base"):
                by_task = ev.get(f"win_rate_vs_{label}_by_task") or {}
                row.update({f"win_rate_vs_{label}/{task}": rate for task, rate in by_task.items()})
            train = (report.get("train") or {}).get("stats") or {}
            row["train_final_loss"] = train.get("final_loss")
            row["train_reward_accuracy"] = train.get("final_reward_accuracy")
            row["pairs"] = (report.get("judge") or {}).get("pairs")
            rows.append(row)
        return pd.DataFrame(rows)

    def figure_sources(self) -> pd.DataFrame:
        """One row per evaluated round: the verifier behind `accuracy` (and the field its answers came
        from) and the judge behind the win rates (with its verifier or model), from metrics.json."""
        rows = []
        for round_idx in self.rounds():
            ev = (self.round_metrics(round_idx) or {}).get("eval")
            if ev is not None:
                rows.append({"round": round_idx, "verifier": ev.get("verifier"), "verifier_answers": ev.get("verifier_answers"),
                             "eval_judge": ev.get("eval_judge"), "eval_judge_detail": ev.get("eval_judge_detail")})
        return pd.DataFrame(rows, columns=["round", "verifier", "verifier_answers", "eval_judge", "eval_judge_detail"])

    def benchmarks(self) -> pd.DataFrame:
        """One row per round, benchmark, lm-eval task and metric (value, se, n, num_fewshot, task_version,
        lm_eval_version), as Benchmark wrote them into metrics.json; empty when no round has any."""
        rows = [{"round": round_idx, **row} for round_idx in self.rounds()
                for row in (self.round_metrics(round_idx) or {}).get("benchmarks") or []]
        return pd.DataFrame(rows, columns=["round", *BENCHMARK_COLUMNS])

    def judges(self) -> dict:
        """{round: (referee, its detail, training judge, its detail)} for rounds where a training judge judged
        the held-out comparisons apart from the referee."""
        found = {}
        for round_idx in self.rounds():
            ev = (self.round_metrics(round_idx) or {}).get("eval") or {}
            if ev.get("train_judge"):
                found[round_idx] = (ev.get("eval_judge"), ev.get("eval_judge_detail"), ev["train_judge"], ev.get("train_judge_detail"))
        return found

    def loss_curves(self) -> pd.DataFrame:
        frames = []
        for round_idx in self.rounds():
            report = self.round_metrics(round_idx) or {}
            history = (report.get("train") or {}).get("history") or []
            if history:
                frames.append(pd.DataFrame(history).assign(round=round_idx))
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["round", "step", "loss"])

    def _stack(self, path_of, schema: ArtifactSchema) -> pd.DataFrame:
        """Every round's file at `path_of(round_idx)` (a RunLayout method), read and stacked."""
        frames = [read_artifact(path_of(r), schema) for r in self.rounds() if path_of(r).is_file()]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(schema.columns))

    def evals(self) -> pd.DataFrame:
        return self._stack(self.layout.eval, EVAL)

    def pairs(self) -> pd.DataFrame:
        return self._stack(self.layout.pairs, PAIRS)

    def selected(self) -> pd.DataFrame:
        return self._stack(self.layout.selected, SELECTED)

    def generations(self) -> pd.DataFrame:
        return self._stack(self.layout.generations, GENERATIONS)

    def side_by_side(self, num_prompts: int = 4) -> pd.DataFrame:
        """Greedy responses to the first held-out prompts, one column per round."""
        evals = self.evals()
        greedy = evals[evals.kind == "greedy"]
        prompt_ids = list(dict.fromkeys(greedy.prompt_id))[:num_prompts]
        table = greedy[greedy.prompt_id.isin(prompt_ids)].pivot(index="prompt_id", columns="round", values="response")
        prompts = greedy.drop_duplicates("prompt_id").set_index("prompt_id").prompt
        table.insert(0, "prompt", prompts.loc[table.index])
        return table.loc[prompt_ids]

    def selections(self) -> pd.DataFrame:
        """One row per round with a selection.json (data/selection.py): select_by, its validation figure ± SE
        (n), the paired gain over the best round so far (diff, se, z), whether it replaced it, the best and
        kept round after it, whether the run stopped there, and the round it continued (parent)."""
        from data.selection import read_selection, recorded_parents

        parents = recorded_parents(self.layout)
        rows = []
        for round_idx in self.rounds():
            record = read_selection(self.layout.selection(round_idx))
            if record is None:
                continue
            figure = (record.get("figures") or {}).get(record["select_by"]) or {}
            gain = record.get("gain") or {}
            rows.append({"round": round_idx, "select_by": record["select_by"], "figure": figure.get("mean"),
                         "figure_se": figure.get("se"), "figure_n": figure.get("n"), "gain": gain.get("diff"),
                         "gain_se": gain.get("se"), "gain_z": gain.get("z"), "compared_with": record.get("compared_with"),
                         "replaced": record["replaced"], "best_round": record["best_round"],
                         "kept_round": record["kept_round"], "stop": record["stop"], "why": record.get("why"),
                         "parent": parents.get(round_idx, None if round_idx == 0 else round_idx - 1),
                         **{f"validation_{name}": value.get("mean") for name, value in (record.get("figures") or {}).items()},
                         **{f"validation_{name}_se": value.get("se") for name, value in (record.get("figures") or {}).items()}})
        return pd.DataFrame(rows)

    def best(self) -> dict | None:
        from data.selection import read_best

        return read_best(self.layout)

    def judge_stats(self) -> pd.DataFrame:
        """One row per round with a judge_meta.json: prompts, pairs, skipped_ties, skipped_identical, ..."""
        rows = []
        for round_idx in self.rounds():
            path = self.layout.judge_meta(round_idx)
            if path.is_file():
                rows.append({"round": round_idx, **json.loads(path.read_text())})
        return pd.DataFrame(rows) if rows else pd.DataFrame(columns=list(JUDGE_STATS))

    def matrix_spread(self) -> pd.DataFrame:
        """Spread of the judge's K x K win-probability matrix behind every pair that kept one.

        One row per pair: round, prompt_id, k (samples judged), score_gap (chosen_score - rejected_score),
        win_prob_gap (the same for the mean win probabilities, where recorded), matrix_std (std of the
        off-diagonal entries: 0 when the judge saw only ties) and decisiveness (mean |P - 1/2| off the
        diagonal: 0 = all ties, 0.5 = every comparison certain). Empty (with these columns) for SPIN,
        whose pairs have no judge and no matrix.
        """
        pairs = self.pairs()
        if "prob_matrix" not in pairs.columns:
            return pd.DataFrame(columns=list(MATRIX_SPREAD))
        rows = []
        for rec in pairs.to_dict("records"):
            matrix = rec.get("prob_matrix")
            if matrix is None or len(matrix) < 2:
                continue
            m = np.array([np.asarray(row, dtype=float) for row in matrix])
            off = m[~np.eye(len(m), dtype=bool)]
            rows.append({
                "round": int(rec["round"]),
                "prompt_id": rec["prompt_id"],
                "k": len(m),
                "score_gap": rec["chosen_score"] - rec["rejected_score"],
                "win_prob_gap": (rec.get("chosen_win_prob", np.nan) - rec.get("rejected_win_prob", np.nan)),
                "matrix_std": float(off.std()),
                "decisiveness": float(np.abs(off - 0.5).mean()),
            })
        return pd.DataFrame(rows, columns=list(MATRIX_SPREAD))


BENCHMARK_COLUMNS = ("benchmark", "task", "metric", "value", "se", "n", "num_fewshot", "task_version", "lm_eval_version")
JUDGE_STATS = ("round", "prompts", "pairs", "skipped_ties", "skipped_identical", "unparsed_judgements")
MATRIX_SPREAD = ("round", "prompt_id", "k", "score_gap", "win_prob_gap", "matrix_std", "decisiveness")


def stack_metrics(runs: list[Run]) -> pd.DataFrame:
    """metrics() of several runs stacked, with `run` (its name, made unique) and `algorithm` columns first."""
    labels = run_labels(runs)
    frames = [run.metrics().assign(run=label, algorithm=run.algorithm) for run, label in zip(runs, labels)]
    frames = [f for f in frames if not f.empty]
    if not frames:
        return pd.DataFrame(columns=["run", "algorithm", "round"])
    stacked = pd.concat(frames, ignore_index=True)
    for column in stacked.columns.drop(["run", "algorithm"]):  # figures a run never measured are None: make them NaN
        stacked[column] = pd.to_numeric(stacked[column], errors="coerce")
    return stacked[["run", "algorithm", *[c for c in stacked.columns if c not in ("run", "algorithm")]]]


def run_labels(runs: list[Run]) -> list[str]:
    """A short unique label per run: its directory name, with its parent's name where two names clash."""
    names = [run.name for run in runs]
    labels = [f"{run.dir.resolve().parent.name}/{run.name}" if names.count(run.name) > 1 else run.name for run in runs]
    return [f"{label}#{i}" if labels.count(label) > 1 else label for i, label in enumerate(labels)]

"""report.md and its plots for one run: a table of figures per round and the drift across rounds.

    from data.report import write_report
    write_report("runs/demo_spin", out_md="runs/demo_spin/report.md")

Every mean over held-out prompts is shown with its standard error and n. Plots (PNG, in the run
directory's plots/): verifier accuracy and win rates (0..1 axes, error bars, the 0.5 line for win rates),
KL to the base and response length (axes from 0), implicit-reward accuracy, and the training loss of
every round.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from data.runs import Run

TABLE = [
    ("round", "round", "{:d}"),
    ("accuracy", "accuracy", "{:.3f}"),
    ("win_rate_vs_previous", "win vs prev", "{:.3f}"),
    ("win_rate_vs_base", "win vs base", "{:.3f}"),
    ("kl_vs_base", "KL vs base (nats)", "{:.3f}"),
    ("implicit_reward_accuracy", "implicit-reward acc", "{:.3f}"),
    ("implicit_reward_margin", "implicit-reward margin", "{:.3f}"),
    ("mean_length", "mean tokens", "{:.1f}"),
    ("distinct_2", "distinct-2", "{:.3f}"),
    ("pairs", "pairs", "{:.0f}"),
    ("train_final_loss", "final train loss", "{:.4f}"),
    ("gt_logprob", "GT log-lik/token", "{:.3f}"),
]
# What each plotted figure is drawn against: probabilities on 0..1 (with the chance line where there is one);
# the others from 0, so that a change of a few hundredths is not drawn as a cliff.
PROBABILITIES = {"accuracy": None, "win_rate_vs_previous": 0.5, "win_rate_vs_base": 0.5, "implicit_reward_accuracy": 0.5,
                 "train_reward_accuracy": 0.5, "distinct_1": None, "distinct_2": None, "win_rate_vs_best": 0.5}


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _cell(value, fmt: str, se=None) -> str:
    if _missing(value):
        return "-"
    text = fmt.format(int(value) if fmt == "{:d}" else value)
    return text if _missing(se) else f"{text} ± {fmt.format(se)}"


def metrics_table(metrics: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(title for _, title, _ in TABLE) + " |", "|" + "---|" * len(TABLE)]
    for row in metrics.to_dict("records"):
        lines.append("| " + " | ".join(_cell(row.get(key), fmt, row.get(f"{key}_se")) for key, _, fmt in TABLE) + " |")
    return "\n".join(lines)


def sample_sizes(metrics: pd.DataFrame) -> str:
    """One sentence: what ± means here and over how many prompts and pairs the figures were measured."""
    def counts(column: str) -> str:
        values = sorted({int(v) for v in metrics[column].dropna()}) if column in metrics else []
        return " / ".join(map(str, values)) or "?"

    text = f"± is one standard error of the mean over n = {counts('prompts')} held-out prompts"
    if "implicit_reward_pairs" in metrics and metrics["implicit_reward_pairs"].notna().any():
        text += f" (implicit reward: {counts('implicit_reward_pairs')} held-out pairs)"
    return text + "; a difference of one or two standard errors between rounds is within noise."


def accuracy_change_vs_base(evals: pd.DataFrame) -> pd.DataFrame:
    """Per round, greedy accuracy minus the base's on the same held-out prompts, with the standard error
    of the per-prompt differences (paired: each prompt's difficulty cancels, so this SE is smaller than
    the two rounds' SEs combined) and n, the prompts both rounds answered."""
    from data.stats import mean_se

    if "correct" not in evals:  # no verifier, or no round evaluated yet
        return pd.DataFrame()
    greedy = evals[(evals.kind == "greedy") & evals.correct.notna()]
    correct = greedy.pivot_table(index="prompt_id", columns="round", values="correct", aggfunc="first")
    if 0 not in correct.columns:
        return pd.DataFrame()
    rows = []
    for round_idx in sorted(c for c in correct.columns if c != 0):
        both = correct[[0, round_idx]].dropna()
        change, se = mean_se(both[round_idx].astype(float) - both[0].astype(float))
        rows.append({"round": int(round_idx), "change": change, "change_se": se, "n": len(both)})
    return pd.DataFrame(rows)


def accuracy_change_section(run: Run) -> list[str]:
    changes = accuracy_change_vs_base(run.evals())
    if changes.empty:
        return []
    lines = ["Accuracy change from the base, paired over the same held-out prompts (± one standard error of the "
             "per-prompt differences):", "", "| round | change vs round 0 | in standard errors | n |", "|---|---|---|---|"]
    for row in changes.to_dict("records"):
        ratio = row["change"] / row["change_se"] if row["change_se"] > 0 else float("nan")
        lines.append(f"| {row['round']} | {row['change']:+.3f} ± {row['change_se']:.3f} | "
                     f"{'-' if _missing(ratio) else f'{ratio:+.1f}'} | {row['n']} |")
    return lines + [""]


def gt_logprob_change_section(metrics: pd.DataFrame) -> list[str]:
    """The held-out ground truth's mean per-token log-likelihood, each round minus the base, paired: a figure
    no judge enters (models.evaluation.ground_truth_logprobs)."""
    if "gt_logprob_vs_base" not in metrics or not metrics["gt_logprob_vs_base"].notna().any():
        return []
    lines = ["Ground-truth log-likelihood per token (held-out, judge-free), change from the base, paired over the same "
             "prompts (± one standard error of the per-prompt differences):", "",
             "| round | GT log-lik/token | change vs round 0 | in standard errors |", "|---|---|---|---|"]
    for row in metrics[metrics["gt_logprob_vs_base"].notna()].to_dict("records"):
        change, se = row["gt_logprob_vs_base"], row.get("gt_logprob_vs_base_se")
        ratio = change / se if not _missing(se) and se > 0 else float("nan")
        lines.append(f"| {int(row['round'])} | {_cell(row.get('gt_logprob'), '{:.3f}', row.get('gt_logprob_se'))} | "
                     f"{change:+.3f} ± {'-' if _missing(se) else f'{se:.3f}'} | {'-' if _missing(ratio) else f'{ratio:+.1f}'} |")
    return lines + [""]


def selection_section(run: Run, requested_rounds: int | None = None) -> list[str]:
    """Which round the run keeps and why, each round's validation figure and parent, and an early stop."""
    selections = run.selections()
    if selections.empty:
        return []
    best = run.best()
    figure = selections.select_by.iloc[-1]
    lines = ["## The round kept", ""]
    if best is not None:
        lines += [f"**Round {best['round']}** is kept in `best/` (`best.json`; iterate.select: {best['select']}, "
                  f"by validation `{figure}`): {best['why']}.", ""]
    lines += ["Every round is scored on the validation split (never trained on, apart from the held-out prompts, "
              "which choose nothing); a round replaces the best when its paired gain exceeds iterate.min_gain "
              "standard errors.", "",
              f"| round | parent | validation {figure} | gain vs best so far | best after | kept |", "|---|---|---|---|---|---|"]
    for row in selections.to_dict("records"):
        gain = "-" if _missing(row["gain"]) else (f"{row['gain']:+.3f} ± {row['gain_se']:.3f} vs round "
                                                  f"{int(row['compared_with'])} ({row['gain_z']:+.1f} SE)")
        parent = "-" if _missing(row["parent"]) else str(int(row["parent"]))
        lines.append(f"| {int(row['round'])}{' (stop)' if row['stop'] else ''} | {parent} | "
                     f"{_cell(row['figure'], '{:.3f}', row['figure_se'])} | {gain} | {int(row['best_round'])} | "
                     f"{int(row['kept_round'])} |")
    stopped = selections[selections.stop]
    if not stopped.empty and int(stopped["round"].iloc[-1]) == int(selections["round"].max()):
        from data.selection import read_selection, stop_line

        records = [read_selection(run.layout.selection(int(r))) for r in selections["round"]]
        last = int(selections["round"].max())
        lines += ["", "The run " + stop_line(records, max(requested_rounds or last, last)) + "."]
    return lines + [""]


def draw_per_round(ax, metrics: pd.DataFrame, column: str, label: str | None = None, **style) -> bool:
    """`column` against round, with one-standard-error bars where recorded, on an axis that does not
    magnify noise: 0..1 for probabilities (chance line at 0.5 for win rates), else from 0. The report and
    the notebooks draw every per-round figure with it."""
    if column not in metrics or not metrics[column].notna().any():
        return False
    rows = metrics[metrics[column].notna()]
    se = rows.get(f"{column}_se")
    ax.errorbar(rows["round"], rows[column], yerr=None if se is None else se.fillna(0).to_numpy(dtype=float),
                **{"marker": "o", "capsize": 3, **style}, label=label or column)
    ax.set_xticks(sorted(metrics["round"]))
    ax.set_xlabel("round (0 = base)")
    if column in PROBABILITIES:
        ax.set_ylim(-0.02, 1.02)
        if PROBABILITIES[column] is not None:
            ax.axhline(PROBABILITIES[column], color="gray", lw=1, ls=":")
    else:  # a line at 0 widens the autoscaled axis to reach it, and later series still rescale it
        ax.axhline(0, color="gray", lw=1)
    return True


def plot_run(run: Run, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    metrics, curves = run.metrics(), run.loss_curves()
    panels = [
        ("quality.png", "Held-out quality by round (bars: one standard error)", ["accuracy", "win_rate_vs_previous", "win_rate_vs_base"]),
        ("drift.png", "Drift from the base model", ["kl_vs_base", "mean_length", "distinct_2"]),
        ("implicit_reward.png", "Implicit reward on held-out pairs", ["implicit_reward_accuracy", "implicit_reward_margin"]),
    ]
    written = []
    for file_name, title, columns in panels:
        present = [c for c in columns if c in metrics and metrics[c].notna().any()]
        if not present:
            continue
        fig, axes = plt.subplots(1, len(present), figsize=(4 * len(present), 3.2), squeeze=False)
        for ax, column in zip(axes[0], present):
            draw_per_round(ax, metrics, column)
            ax.set_title(column)
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(out_dir / file_name, dpi=100)
        plt.close(fig)
        written.append(out_dir / file_name)
    if not curves.empty:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        for round_idx, curve in curves.groupby("round"):
            ax.plot(curve["step"], curve["loss"], label=f"round {round_idx}")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title("Training loss")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / "train_loss.png", dpi=100)
        plt.close(fig)
        written.append(out_dir / "train_loss.png")
    return written


def _quote(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")[:120] if isinstance(text, str) else "-"


def _by_round(descriptions: dict[int, str | None]) -> str | None:
    """'X', or 'X (rounds 0, 1); Y (round 2)' when rounds differ (a judge may change between rounds)."""
    groups: dict[str, list[int]] = {}
    for round_idx, text in descriptions.items():
        if text:
            groups.setdefault(text, []).append(round_idx)
    if len(groups) <= 1:
        return next(iter(groups), None)
    return "; ".join(f"{text} (round{'s' if len(r) > 1 else ''} {', '.join(map(str, r))})" for text, r in groups.items())


def _accuracy_source(sources: pd.DataFrame) -> str:
    def describe(row) -> str | None:
        if not row["verifier"]:
            return None
        answers = f" against field `{row['verifier_answers']}`" if row.get("verifier_answers") else ""
        return f"verifier `{row['verifier']}`{answers}"

    text = _by_round({int(r["round"]): describe(r) for r in sources.to_dict("records")})
    return text or "not measured: no verifier could score the held-out prompts (no answers in them)"


def _judge_source(sources: pd.DataFrame) -> str:
    def describe(row) -> str | None:
        if not row["eval_judge"]:
            return None
        name, detail = row["eval_judge"], row.get("eval_judge_detail")
        if not detail:
            return f"judge `{name}`"
        if name == "verifier":
            return f"judge `verifier` with verifier `{detail}`"
        return f"judge `{name}` (`{detail}`)" if name in ("pairrm", "reward_model") else f"judge `{name}` ({detail})"

    text = _by_round({int(r["round"]): describe(r) for r in sources.to_dict("records") if r["round"] > 0})
    return text or "not measured (no evaluation judge)"


# What each round's judge_meta.json counts, as the pairing table shows it (a column appears when some
# round recorded it: the options that add them are off in most runs).
PAIRING = [
    ("prompts", "prompts"), ("pairs", "pairs"), ("skipped_ties", "all tied"), ("skipped_small_margin", "margin too small"),
    ("unparsed_judgements", "unreadable verdicts"), ("pairs_chosen_dataset", "dataset's answer chosen"),
    ("refinements_tried", "refinements tried"), ("refinements_passed", "refinements passed"),
    # algorithm rest (models/self_training.py): what passed the judge and became a supervised example
    ("samples", "samples"), ("samples_passed", "passed"), ("pass_rate", "pass rate"), ("prompts_passed", "prompts with a pass"),
    ("examples", "examples kept"), ("skipped_over_cap", "over max_per_prompt"), ("rationalizations_tried", "rationalized"),
    ("rationalizations_passed", "rationalizations passed"), ("rationalized_examples", "rationalized examples"),
]
PAIRING_FORMAT = {"pass_rate": "{:.3f}"}  # the others are counts


def judge_description(judge: dict) -> str | None:
    """Who judged the pairs, in one sentence, where the recipe's judge is the model itself."""
    if judge.get("name") != "self":
        return None
    how = ("the additive 5-point rubric, pointwise" if judge.get("self_mode", "pointwise") == "pointwise"
           else "pairwise, both orders")
    if judge.get("self_model", "policy") == "policy":
        return ("Pairs are judged by **the current policy**: round r's samples are scored by the model after "
                f"round r-1, the model that generated them (Self-Rewarding LMs, Yuan et al. 2024; {how}).")
    return f"Pairs are judged by **the base model**, the same fixed judge every round (`judge.self_model: base`; {how})."


def pairing_section(run: Run) -> list[str]:
    """How each round's pairs were made: who judged them, and what pairing made and skipped."""
    if run.algorithm == "spin":
        return []
    lines = ["## Examples kept" if run.algorithm == "rest" else "## Pairing", ""]
    described = judge_description(run.recipe.get("judge") or {})
    if described:
        lines += [described, ""]
    stats = run.judge_stats()
    if stats.empty:
        return lines
    columns = [(key, title) for key, title in PAIRING if key in stats and stats[key].notna().any()]
    if "judge_is_generator" in stats:
        columns.append(("judge_is_generator", "judge"))
    lines += ["| round | " + " | ".join(title for _, title in columns) + " |", "|" + "---|" * (len(columns) + 1)]
    for row in stats.to_dict("records"):
        cells = []
        for key, _ in columns:
            value = row.get(key)
            if key == "judge_is_generator":
                cells.append("-" if _missing(value) else ("the generator (round r-1)" if value else "the base model"))
            else:
                cells.append(_cell(value, PAIRING_FORMAT.get(key, "{:.0f}")))
        lines.append(f"| {int(row['round'])} | " + " | ".join(cells) + " |")
    if "examples" in stats:
        empty = [int(r) for r, n in zip(stats["round"], stats["examples"]) if n == 0]
        if empty:
            lines += ["", f"Nothing passed the judge in round{'s' if len(empty) > 1 else ''} {', '.join(map(str, empty))}: "
                          "nothing was trained there, and the round's model is its parent's."]
    return lines + [""]


def render_report(run: Run, plots: list[Path], num_prompts: int = 4, requested_rounds: int | None = None) -> str:
    metrics = run.metrics()
    config = run.config.get("recipe", {})
    lines = [
        f"# selfplay run `{run.name}`",
        "",
        f"Algorithm **{config.get('algorithm', '?')}**, judge **{config.get('judge', {}).get('name', '?')}**, "
        f"loss **{config.get('training', {}).get('loss') or 'default'}**, base model "
        f"`{config.get('model', {}).get('base_model') or 'demo (built in place)'}`, seed {run.config.get('seed', '?')}, "
        f"commit `{run.config.get('git_commit', '?')}`.",
        "",
        "Round 0 is the base model. Every figure is measured on held-out prompts that no round trains on.",
        "",
        metrics_table(metrics),
        "",
        sample_sizes(metrics),
        "",
    ]
    sources = run.figure_sources()
    accuracy_by, judge_by = _accuracy_source(sources), _judge_source(sources)
    lines += [f"- accuracy: {accuracy_by}", f"- win vs prev, win vs base: {judge_by}", ""]
    lines += accuracy_change_section(run)
    lines += gt_logprob_change_section(metrics)
    lines += selection_section(run, requested_rounds)
    for prefix, title in (("accuracy/", f"Accuracy by task kind ({accuracy_by})"),
                          ("win_rate_vs_base/", f"Win rate vs base by task kind ({judge_by})")):
        by_task = [c for c in metrics.columns if c.startswith(prefix)]
        if by_task:
            lines += [f"{title}:", "", "| round | " + " | ".join(c.split("/", 1)[1] for c in by_task) + " |",
                      "|" + "---|" * (len(by_task) + 1)]
            lines += [f"| {int(r['round'])} | " + " | ".join(_cell(r[c], "{:.2f}") for c in by_task) + " |"
                      for r in metrics.to_dict("records")]
            lines.append("")
    lines += pairing_section(run)
    lines += [f"![{p.stem}]({p.relative_to(run.dir).as_posix()})" for p in plots]
    table = run.side_by_side(num_prompts)
    if not table.empty:
        rounds = [c for c in table.columns if c != "prompt"]
        lines += ["", "## The same prompts across rounds (greedy)", "",
                  "| prompt | " + " | ".join(f"round {r}" for r in rounds) + " |", "|" + "---|" * (len(rounds) + 1)]
        lines += ["| " + " | ".join(_quote(row[c]) for c in ["prompt", *rounds]) + " |" for _, row in table.iterrows()]
    return "\n".join(lines) + "\n"


def write_report(run_dir: str | Path, out_md: str | Path, num_prompts: int = 4, requested_rounds: int | None = None) -> None:
    run = Run(run_dir)
    plots = plot_run(run, run.layout.plots)
    Path(out_md).write_text(render_report(run, plots, num_prompts, requested_rounds))

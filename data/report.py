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
    the two rounds' SEs combined) and n, the prompts both rounds answered.

    Accuracy is the accuracy column's: the mean verifier score (partial credit counts as given, not
    rounded to right/wrong), or the right/wrong `correct` of eval files written before scores were kept."""
    from data.stats import mean_se

    column = "verifier_score" if "verifier_score" in evals else "correct"
    if column not in evals:  # no verifier, or no round evaluated yet
        return pd.DataFrame()
    greedy = evals[(evals.kind == "greedy") & evals[column].notna()]
    scores = greedy.pivot_table(index="prompt_id", columns="round", values=column, aggfunc="first")
    if 0 not in scores.columns:
        return pd.DataFrame()
    rows = []
    for round_idx in sorted(c for c in scores.columns if c != 0):
        both = scores[[0, round_idx]].dropna()
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


def quantization_section(run: Run) -> list[str]:
    """QLoRA: round 0 is the base in nf4. What the quantisation alone costs, against the base in full precision
    (models.evaluate.evaluation.quantization_cost), from round 0's metrics.json."""
    cost = ((run.round_metrics(0) or {}).get("eval") or {}).get("quantization")
    if not cost:
        return []
    lines = ["## Quantisation (QLoRA)", "",
             "Round 0 is the base model quantised to nf4 (bitsandbytes, double quantisation), the weights every round "
             "trains an adapter on; here it is set beside the same base in full precision, on the same held-out prompts:", "",
             f"- KL(nf4 || full precision): {_cell(cost['kl_vs_full_precision'], '{:.3f}', cost.get('kl_vs_full_precision_se'))} "
             f"nats per answer, {cost['kl_per_token_vs_full_precision']:.3f} per token ({cost['samples']} samples of the nf4 "
             f"base, {cost['sample_tokens']} tokens, scored under both);",
             f"- greedy answers the same in both: {cost['same_greedy_answers']} of {cost['prompts']} prompts;"]
    if "full_precision_accuracy" in cost:
        lines.append(f"- accuracy: full precision {_cell(cost['full_precision_accuracy'], '{:.3f}', cost.get('full_precision_accuracy_se'))}, "
                     f"nf4 (round 0 above) {cost['accuracy_change'] + cost['full_precision_accuracy']:.3f}; change "
                     f"{cost['accuracy_change']:+.3f} ± {cost.get('accuracy_change_se', float('nan')):.3f} (paired over the same "
                     f"{cost['prompts']} prompts).")
    return lines + [""]


def gt_logprob_change_section(metrics: pd.DataFrame) -> list[str]:
    """The held-out ground truth's mean per-token log-likelihood, each round minus the base, paired: a figure
    no judge enters (models.evaluate.evaluation.ground_truth_logprobs)."""
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
    # algorithm rest (models/judge/self_training.py): what passed the judge and became a supervised example
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


def loss_description(config: dict) -> str:
    """The loss the rounds trained with, named even when the recipe left it to the algorithm's default,
    with the NLL anchor when one was added."""
    from configs.recipe import recipe_from_dict

    training = config.get("training", {})
    try:
        name = recipe_from_dict(config, "run.yaml").loss
    except Exception:  # a run.yaml from an older recipe: say what it recorded
        name = training.get("loss") or "?"
    text = f"**{name}**" + ("" if training.get("loss") else f" (the default for {config.get('algorithm', '?')})")
    nll = training.get("nll_weight") or 0
    return text + (f" + {nll:g} x the chosen response's per-token NLL" if nll else "")


def base_description(run: Run, config: dict) -> str:
    """Which base model round 0 is: a named one, the shipped demo base copied in, or a demo model built here."""
    import json

    from data.layout import BASE_MODEL_INFO

    named = config.get("model", {}).get("base_model")
    if named and named != "demo":
        return f"`{named}`"
    try:
        info = json.loads((run.layout.base_model / BASE_MODEL_INFO).read_text())
    except (OSError, ValueError):
        info = {}
    if info.get("copied_from"):
        return "the shipped demo base (`data/demo/base_model`, copied)"
    steps = info.get("sft_steps")
    train = config.get("data", {}).get("train", "?")
    return f"a demo model built in place ({steps} supervised steps on `{train}`)" if steps else "a demo model built in place"


def reading_notes(metrics: pd.DataFrame, config: dict) -> list[str]:
    """What two figures mean where a reader would otherwise be puzzled by them."""
    notes = []
    if "kl_vs_base" in metrics and metrics["kl_vs_base"].notna().any():
        negative = (metrics["kl_vs_base"] < 0).any()
        notes.append("KL vs base is a Monte-Carlo estimate: the mean over held-out prompts of log pi_r(y) - log pi_base(y) "
                     "for answers y sampled from round r (evaluation.kl_samples per prompt). The true KL is never negative, "
                     "but the estimate can be when round r is close to the base" + (", as here: a value within two standard "
                     "errors of 0 means no drift was measured." if negative else "."))
    training = config.get("training", {})
    if (training.get("nll_weight") or 0) and "train_final_loss" in metrics:
        notes.append(f"The final train loss includes the NLL anchor ({training['nll_weight']:g} x the chosen response's "
                     "per-token negative log-likelihood), so it can stay above ln 2 = 0.693, the pairwise loss of a pair the "
                     "policy does not yet separate: it is not a pairwise loss that went up.")
    return [f"- {note}" for note in notes] + ([""] if notes else [])


def _has(metrics: pd.DataFrame, column: str) -> bool:
    return column in metrics and metrics[column].notna().any()


def length_control_section(metrics: pd.DataFrame) -> list[str]:
    """Each round's win rates beside their length-controlled rates and the mean length of both sides."""
    labels = [(label, title) for label, title in (("previous", "prev"), ("base", "base")) if _has(metrics, f"win_rate_vs_{label}_lc")]
    if not labels:
        return []
    lines = ["## Win rates controlled for length", "",
             "Length-controlled (LC) win rates as AlpacaEval 2 defines them (Dubois et al. 2024): the judge's preference "
             "fitted as a logistic function of a model term and the length difference, and the rate it predicts at equal "
             "length (data/comparisons.py); ± one standard error (bootstrap over prompts for LC). Lengths are the mean "
             "characters of the round's greedy answers and of the other side's. A raw rate well above its LC rate is a "
             "gain length explains.", "",
             "| round | " + " | ".join(f"win vs {title} | LC win vs {title} | chars (ours / {title})" for _, title in labels) + " |",
             "|" + "---|" * (1 + 3 * len(labels))]
    for row in metrics[metrics[f"win_rate_vs_{labels[0][0]}_lc"].notna()].to_dict("records"):
        cells = []
        for label, _ in labels:
            name = f"win_rate_vs_{label}"
            cells += [_cell(row.get(name), "{:.3f}", row.get(f"{name}_se")), _cell(row.get(f"{name}_lc"), "{:.3f}", row.get(f"{name}_lc_se")),
                      f"{_cell(row.get(f'{name}_chars_ours'), '{:.0f}')} / {_cell(row.get(f'{name}_chars_theirs'), '{:.0f}')}"]
        lines.append(f"| {int(row['round'])} | " + " | ".join(cells) + " |")
    return lines + [""]


def _judge_name(name, detail) -> str:
    return f"`{name}`" + (f" ({detail})" if detail else "")


def referee_section(run: Run, metrics: pd.DataFrame) -> list[str]:
    """Who judged the held-out comparisons besides the referee, how often the two agree, and a one-line flag
    for rounds where the training judge sees a gain the referee does not."""
    from data.comparisons import reward_hacking_rounds

    judges = run.judges()
    if not judges:
        return []
    referee = _by_round({r: _judge_name(j[0], j[1]) for r, j in judges.items()})
    training = _by_round({r: _judge_name(j[2], j[3]) for r, j in judges.items()})
    lines = ["## Referee and training judge", "",
             f"The win rates above are the referee's: {referee}. The training pairs were judged by {training}, which judged "
             "the same held-out comparisons too. Agreement: the share of comparisons where both gave the same verdict "
             "(ours / tie / theirs) and Cohen's kappa (agreement beyond chance), ± one standard error.", "",
             "| round | training judge: win vs base | referee: win vs base | agreement vs base | kappa vs base | "
             "agreement vs prev | kappa vs prev |", "|---|---|---|---|---|---|---|"]
    rows = metrics[metrics["round"].isin(list(judges))].to_dict("records")
    for row in rows:
        cells = [_cell(row.get(k), "{:.3f}", row.get(f"{k}_se")) for k in (
            "train_judge_win_rate_vs_base", "win_rate_vs_base", "judge_agreement_vs_base", "judge_kappa_vs_base",
            "judge_agreement_vs_previous", "judge_kappa_vs_previous")]
        lines.append(f"| {int(row['round'])} | " + " | ".join(cells) + " |")
    flagged = reward_hacking_rounds(rows)
    if flagged:
        lines += ["", f"**Flag: round{'s' if len(flagged) > 1 else ''} {', '.join(map(str, flagged))}: the training judge's "
                      "win rate vs base is more than two standard errors above 1/2 while the referee's is not: the policy may "
                      "be learning what its training judge rewards rather than what the referee prefers (reward hacking).**"]
    return lines + [""]


def benchmarks_section(run: Run) -> list[str]:
    """lm-eval's figures of every round, ± its standard errors, with the versions they depend on."""
    table = run.benchmarks()
    if table.empty:
        return []
    rounds = sorted(table["round"].unique())
    versions = ", ".join(sorted({str(v) for v in table.lm_eval_version.dropna()}))
    lines = ["## Benchmarks (lm-evaluation-harness)", "",
             f"lm-eval {versions}, run on each round's policy (round 0: the base); ± lm-eval's own standard error "
             "(- where it gives none); n: documents scored. Results move between lm-eval and task versions: compare "
             "figures of the same versions only.", "",
             "| benchmark | task | metric | " + " | ".join(f"round {r}" for r in rounds) + " | n | task version |",
             "|" + "---|" * (5 + len(rounds))]
    for (benchmark, task, metric), rows in table.groupby(["benchmark", "task", "metric"], sort=False):
        by_round = rows.set_index("round")
        cells = [_cell(by_round["value"].get(r), "{:.4f}", by_round["se"].get(r)) for r in rounds]
        n = "/".join(str(int(v)) for v in sorted(rows.n.dropna().unique())) or "-"
        task_versions = "/".join(sorted({str(v) for v in rows.task_version.dropna()})) or "-"
        lines.append(f"| {_quote(benchmark)} | {task} | {metric} | " + " | ".join(cells) + f" | {n} | {task_versions} |")
    return lines + [""]


def render_report(run: Run, plots: list[Path], num_prompts: int = 4, requested_rounds: int | None = None) -> str:
    metrics = run.metrics()
    config = run.config.get("recipe", {})
    lines = [
        f"# selfplay run `{run.name}`",
        "",
        f"Algorithm **{config.get('algorithm', '?')}**, judge **{config.get('judge', {}).get('name', '?')}**, "
        f"loss {loss_description(config)}, base model {base_description(run, config)}, seed {run.config.get('seed', '?')}, "
        f"commit `{run.config.get('git_commit', '?')}`.",
        "",
        "Round 0 is the base model. Every figure is measured on held-out prompts that no round trains on.",
        "",
        metrics_table(metrics),
        "",
        sample_sizes(metrics),
        "",
    ]
    lines += reading_notes(metrics, config)
    sources = run.figure_sources()
    accuracy_by, judge_by = _accuracy_source(sources), _judge_source(sources)
    lines += [f"- accuracy: {accuracy_by}", f"- win vs prev, win vs base: {judge_by}", ""]
    lines += accuracy_change_section(run)
    lines += quantization_section(run)
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
    lines += length_control_section(metrics) + referee_section(run, metrics) + benchmarks_section(run)
    lines += pairing_section(run)
    lines += [f"![{p.stem}]({p.relative_to(run.dir).as_posix()})" for p in plots]
    table = run.side_by_side(num_prompts)
    if not table.empty:
        rounds = [c for c in table.columns if c != "prompt"]
        lines += ["", "## The same prompts across rounds (greedy)", "",
                  "| prompt | " + " | ".join(f"round {r}" for r in rounds) + " |", "|" + "---|" * (len(rounds) + 1)]
        lines += ["| " + " | ".join(_quote(row[c]) for c in ["prompt", *rounds]) + " |" for _, row in table.iterrows()]
    return "\n".join(lines) + "\n"


# The last line of report.md: the rounds it covers (tasks/report.py tells a report of fewer rounds by it).
REPORT_OF = "<!-- selfplay report of rounds 0-{rounds} -->"


def report_rounds(path: str | Path) -> int | None:
    """The last round a report.md covers, or None for one written before reports said so."""
    lines = Path(path).read_text().rstrip().splitlines()
    prefix, suffix = REPORT_OF.split("{rounds}")
    last = lines[-1] if lines else ""
    if last.startswith(prefix) and last.endswith(suffix) and last[len(prefix):-len(suffix)].isdigit():
        return int(last[len(prefix):-len(suffix)])
    return None


def write_report(run_dir: str | Path, out_md: str | Path, num_prompts: int = 4, requested_rounds: int | None = None,
                 rounds: int | None = None) -> None:
    run = Run(run_dir)
    plots = plot_run(run, run.layout.plots)
    text = render_report(run, plots, num_prompts, requested_rounds)
    if rounds is not None:
        text += "\n" + REPORT_OF.format(rounds=rounds) + "\n"
    Path(out_md).write_text(text)

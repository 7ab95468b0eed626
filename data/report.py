"""report.md and its plots for one run: a table of figures per round and the drift across rounds.

    from data.report import write_report
    write_report("runs/demo_spin", out_md="runs/demo_spin/report.md")

Plots (PNG, in the run directory's plots/): verifier accuracy and win rates, KL to the base and
response length, implicit-reward accuracy, and the training loss of every round.
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
    ("kl_vs_base", "KL(pi_r||base)", "{:.3f}"),
    ("implicit_reward_accuracy", "implicit-reward acc", "{:.3f}"),
    ("implicit_reward_margin", "implicit-reward margin", "{:.3f}"),
    ("mean_length", "mean tokens", "{:.1f}"),
    ("distinct_2", "distinct-2", "{:.3f}"),
    ("pairs", "pairs", "{:.0f}"),
    ("train_final_loss", "final train loss", "{:.4f}"),
]


def _cell(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return fmt.format(int(value) if fmt == "{:d}" else value)


def metrics_table(metrics: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(title for _, title, _ in TABLE) + " |", "|" + "---|" * len(TABLE)]
    for row in metrics.to_dict("records"):
        lines.append("| " + " | ".join(_cell(row.get(key), fmt) for key, _, fmt in TABLE) + " |")
    return "\n".join(lines)


def plot_run(run: Run, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    metrics, curves = run.metrics(), run.loss_curves()
    panels = [
        ("quality.png", "Held-out quality by round", ["accuracy", "win_rate_vs_previous", "win_rate_vs_base"]),
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
            ax.plot(metrics["round"], metrics[column], marker="o")
            ax.set_title(column)
            ax.set_xlabel("round")
            ax.set_xticks(metrics["round"])
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


def render_report(run: Run, plots: list[Path], num_prompts: int = 4) -> str:
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
    ]
    by_task = [c for c in metrics.columns if c.startswith("accuracy/")]
    if by_task:
        lines += ["Accuracy by task:", "", "| round | " + " | ".join(c.split("/", 1)[1] for c in by_task) + " |",
                  "|" + "---|" * (len(by_task) + 1)]
        lines += [f"| {int(r['round'])} | " + " | ".join(_cell(r[c], "{:.2f}") for c in by_task) + " |"
                  for r in metrics.to_dict("records")]
        lines.append("")
    lines += [f"![{p.stem}]({p.relative_to(run.dir).as_posix()})" for p in plots]
    table = run.side_by_side(num_prompts)
    if not table.empty:
        rounds = [c for c in table.columns if c != "prompt"]
        lines += ["", "## The same prompts across rounds (greedy)", "",
                  "| prompt | " + " | ".join(f"round {r}" for r in rounds) + " |", "|" + "---|" * (len(rounds) + 1)]
        lines += ["| " + " | ".join(_quote(row[c]) for c in ["prompt", *rounds]) + " |" for _, row in table.iterrows()]
    return "\n".join(lines) + "\n"


def write_report(run_dir: str | Path, out_md: str | Path, num_prompts: int = 4) -> None:
    run = Run(run_dir)
    plots = plot_run(run, run.dir / "plots")
    Path(out_md).write_text(render_report(run, plots, num_prompts))

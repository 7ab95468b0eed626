"""The pictures in README.md and docs/, made from committed results only.

    python docs/make_figures.py                          # every figure, docs/figures/figures.json, docs/figures/README.md
    python docs/make_figures.py --check                  # exit 1 when the committed figures no longer match their sources
    python docs/make_figures.py --collect runs/demo_spin --command "luigi --module pipeline Iterate --rounds 3" \
        --wall-seconds 497 --hardware "2-core x86_64 VM shared with other jobs, SELFPLAY_CPU_THREADS=1"

Sources: docs/results/<run>/ (the small files of a finished run, copied there by --collect: run.yaml,
report.md, best.json, every round's metrics.json and judge_meta.json, and the greedy answers' per-prompt
verifier scores from eval.parquet; never a checkpoint), and experiments/results/smollm2/results.json.

Every change from the base is paired over the same held-out prompts: for a collected run it is computed from the
per-prompt scores by data.report.accuracy_change_vs_base (the mean per-prompt difference and the standard error of
those differences), for the SmolLM2 experiment it is results.json's `change_vs_base` (computed the same way by
experiments/smollm2.py). The bars are ± 2 standard errors; rates are drawn from 0, changes on an axis symmetric
around 0, so noise is not drawn as movement.

figures.json holds every number each figure draws and where it came from; `--check` (and tests/test_docs.py)
recomputes them from the sources, so a figure left behind by a change of its results is caught.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"
FIGURES = ROOT / "docs" / "figures"
SMOLLM2 = ROOT / "experiments" / "results" / "smollm2" / "results.json"
DEMO_RUNS = {"demo_spin": "SPIN", "demo_dpo": "iterative DPO", "demo_sppo": "SPPO"}
SMOLLM2_ARMS = {"spin": "SPIN", "dpo": "iterative DPO, verifier", "sppo": "SPPO, verifier", "sft_control": "supervised control"}
RUN_FILES = ["run.yaml", "report.md", "best.json"]
ROUND_FILES = ["metrics.json", "judge_meta.json", "selection.json"]

if str(ROOT) not in sys.path:  # run as a script from a checkout: the project's own readers
    sys.path.insert(0, str(ROOT))


def collect(run_dir: Path, command: str, wall_seconds: float | None, hardware: str) -> Path:
    """Copy a finished run's small files into docs/results/<run>/, with the greedy answers' per-prompt scores
    (the rows a paired change needs) and what made the run: its command, wall time and machine."""
    from data.runs import Run

    run = Run(run_dir)
    out = RESULTS / run_dir.name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for name in RUN_FILES:
        if (run_dir / name).is_file():
            shutil.copyfile(run_dir / name, out / name)
    for round_idx in run.rounds():
        for name in ROUND_FILES:
            source = run.round_dir(round_idx) / name
            if source.is_file():
                (out / source.parent.name).mkdir(exist_ok=True)
                shutil.copyfile(source, out / source.parent.name / name)
    evals = run.evals()
    greedy = evals[evals.kind == "greedy"][["round", "prompt_id", "task", "kind", "verifier_score"]]
    greedy.reset_index(drop=True).to_parquet(out / "greedy_scores.parquet", index=False)
    made = {"command": command, "wall_seconds": wall_seconds, "hardware": hardware,
            "machine": f"{platform.machine()}, {_cpu_name()}"}
    (out / "provenance.json").write_text(json.dumps(made, indent=1) + "\n")
    return out


def _cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def _git_commit_of(path: Path) -> str:
    """The commit that last changed a committed results file (where its figures were recorded)."""
    out = subprocess.run(["git", "log", "-1", "--format=%h", "--", str(path)], cwd=ROOT, capture_output=True, text=True)
    return out.stdout.strip() or "uncommitted"


def demo_run_data(name: str) -> dict:
    """A collected run's figures by round: accuracy and KL (± 1 SE), the paired change from round 0 (± SE, n),
    the training loss by step, and where they came from."""
    import pandas as pd
    import yaml

    from data.report import accuracy_change_vs_base
    from data.runs import Run

    directory = RESULTS / name
    run = Run(directory)
    metrics = run.metrics()
    changes = accuracy_change_vs_base(pd.read_parquet(directory / "greedy_scores.parquet"))
    setup = yaml.safe_load((directory / "run.yaml").read_text())
    made = json.loads((directory / "provenance.json").read_text())
    curves = run.loss_curves()
    return {
        "label": DEMO_RUNS.get(name, name),
        "recipe": f"configs/{setup['recipe']['name']}.yaml",
        "commit": setup["git_commit"][:7], "date": setup["created"][:10], **made,
        "rounds": [int(r) for r in metrics["round"]],
        "accuracy": _floats(metrics["accuracy"]), "accuracy_se": _floats(metrics["accuracy_se"]),
        "kl_vs_base": _floats(metrics["kl_vs_base"]), "kl_vs_base_se": _floats(metrics["kl_vs_base_se"]),
        "prompts": [int(n) for n in metrics["prompts"]],
        "change": {int(row["round"]): [round(row["change"], 6), round(row["change_se"], 6), int(row["n"])]
                   for row in changes.to_dict("records")},
        "loss": {int(r): _floats(group.sort_values("step")["loss"]) for r, group in curves.groupby("round")},
    }


def smollm2_data() -> dict:
    """The SmolLM2 experiment's lenient accuracy by round (± 1 SE) and its paired change from the base (± SE, n)."""
    results = json.loads(SMOLLM2.read_text())
    arms = {}
    for arm, rounds in results["results"].items():
        arms[arm] = {
            "accuracy": [round(r["all"]["lenient"], 6) for r in rounds],
            "accuracy_se": [round(r["all"]["lenient_se"], 6) for r in rounds],
            "change": {int(r["round"]): [round(r["change_vs_base"]["lenient"], 6), round(r["change_vs_base"]["lenient_se"], 6),
                                         int(r["change_vs_base"]["n"])] for r in rounds if "change_vs_base" in r},
        }
    return {"source": str(SMOLLM2.relative_to(ROOT)), "results_commit": _git_commit_of(SMOLLM2), "date": results["date"],
            "hardware": results["hardware"], "seed": results["seed"], "heldout_prompts": results["heldout_prompts"],
            "command": "python experiments/smollm2.py --out experiments/results/smollm2", "arms": arms}


def _floats(values) -> list[float | None]:
    return [None if v is None or v != v else round(float(v), 6) for v in values]


def figure_data() -> dict:
    """Every number the figures draw, from the committed sources."""
    runs = {name: demo_run_data(name) for name in DEMO_RUNS if (RESULTS / name / "run.yaml").is_file()}
    return {"demo_runs": runs, "smollm2": smollm2_data()}


def _change_axes(axis, series: dict, title: str, ylabel: str):
    """Each method's paired change from the base by round, ± 2 standard errors, on an axis symmetric around 0."""
    width = 0.8 / max(len(series), 1)
    extent = 0.0
    for i, (label, change) in enumerate(series.items()):
        rounds = sorted(change)
        means = [change[r][0] for r in rounds]
        twice_se = [2 * change[r][1] for r in rounds]
        positions = [r + (i - (len(series) - 1) / 2) * width for r in rounds]
        axis.errorbar(positions, means, yerr=twice_se, fmt="o", capsize=4, label=label)
        extent = max([extent] + [abs(m) + e for m, e in zip(means, twice_se)])
    axis.axhline(0, color="black", linewidth=0.8)
    extent = max(extent * 1.15, 0.05)
    axis.set_ylim(-extent, extent)
    axis.set_xticks(sorted({r for change in series.values() for r in change}))
    axis.set_xlabel("round")
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.legend(loc="upper left", fontsize=8)


def plot_demo_change(data: dict, path: Path):
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 3.8))
    series = {run["label"]: run["change"] for run in data["demo_runs"].values()}
    n = sorted({c[2] for run in data["demo_runs"].values() for c in run["change"].values()})
    _change_axes(axis, series, f"Demo: held-out accuracy change from the base (paired, n = {', '.join(map(str, n))})",
                 "accuracy - base's (± 2 SE)")
    _save(figure, path)


def plot_demo_rounds(run: dict, path: Path):
    import matplotlib.pyplot as plt

    figure, (left, middle, right) = plt.subplots(1, 3, figsize=(12.5, 3.4))
    left.errorbar(run["rounds"], run["accuracy"], yerr=run["accuracy_se"], fmt="o-", capsize=4)
    left.set_ylim(0, 1)
    left.set_title(f"held-out accuracy (± 1 SE, n = {run['prompts'][0]})")
    kl_se = [0.0 if s is None else s for s in run["kl_vs_base_se"]]
    middle.errorbar(run["rounds"], run["kl_vs_base"], yerr=kl_se, fmt="o-", capsize=4, color="tab:orange")
    middle.set_ylim(0, max(k + s for k, s in zip(run["kl_vs_base"], kl_se)) * 1.2 or 1)
    middle.set_title("KL from the base, nats (± 1 SE)")
    window = max(1, max(len(v) for v in run["loss"].values()) // 40)  # a step's loss is one batch's: noisy
    for round_idx, losses in run["loss"].items():
        smooth = [sum(losses[max(0, i - window + 1): i + 1]) / len(losses[max(0, i - window + 1): i + 1])
                  for i in range(len(losses))]
        right.plot(range(1, len(losses) + 1), smooth, label=f"round {round_idx}")
    right.set_ylim(0, max(max(v) for v in run["loss"].values()) * 1.1)
    right.axhline(0.6931, color="grey", linewidth=0.8, linestyle=":")
    right.set_title(f"train loss, mean of {window} steps (dotted: ln 2)" if window > 1
                    else "training loss by step (dotted: ln 2)")
    right.legend(fontsize=8)
    for axis in (left, middle):
        axis.set_xticks(run["rounds"])
        axis.set_xlabel("round")
    right.set_xlabel("step")
    _save(figure, path)


def plot_smollm2(data: dict, accuracy_path: Path, change_path: Path):
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 3.8))
    for arm, label in SMOLLM2_ARMS.items():
        values = data["arms"][arm]
        axis.errorbar(range(len(values["accuracy"])), values["accuracy"], yerr=values["accuracy_se"], fmt="o-",
                      capsize=4, label=label)
    axis.set_ylim(0, 1)
    axis.set_xticks(range(len(values["accuracy"])))
    axis.set_xlabel("round")
    axis.set_ylabel("held-out accuracy, lenient (± 1 SE)")
    axis.set_title(f"SmolLM2-135M-Instruct, n = {data['heldout_prompts']} held-out prompts")
    axis.legend(fontsize=8)
    _save(figure, accuracy_path)
    figure, axis = plt.subplots(figsize=(6.4, 3.8))
    _change_axes(axis, {label: data["arms"][arm]["change"] for arm, label in SMOLLM2_ARMS.items()},
                 f"SmolLM2-135M: accuracy change from the base (paired, n = {data['heldout_prompts']})",
                 "lenient accuracy - base's (± 2 SE)")
    _save(figure, change_path)


def _save(figure, path: Path):
    import matplotlib.pyplot as plt

    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def figures_readme(data: dict) -> str:
    """docs/figures/README.md: each picture, what it draws, and what made its numbers."""
    lines = ["# Figures", "", "Made by `python docs/make_figures.py` from committed results; the numbers each one draws are in",
             "figures.json, which `python docs/make_figures.py --check` (and tests/test_docs.py) recompute from the sources.", ""]
    for name, run in data["demo_runs"].items():
        lines += [f"- `{name}_rounds.png`: {_run_caption(run)}; source `docs/results/{name}/`."]
    if data["demo_runs"]:
        lines += ["- `demo_change.png`: the paired change from the base of each run above (± 2 standard errors), "
                  "from each run's per-prompt greedy scores (`greedy_scores.parquet`)."]
    s = data["smollm2"]
    lines += [f"- `smollm2_accuracy.png`, `smollm2_change.png`: {_smollm2_caption(s)}; source `{s['source']}`."]
    return "\n".join(lines) + "\n"


def _run_caption(run: dict) -> str:
    wall = f", {run['wall_seconds'] / 60:.0f} min" if run.get("wall_seconds") else ""
    return (f"{run['label']}, `{run['recipe']}`, `{run['command']}`, commit {run['commit']}, {run['date']}, "
            f"{run['hardware']} ({run['machine']}){wall}; n = {run['prompts'][0]} held-out prompts")


def _smollm2_caption(s: dict) -> str:
    return (f"`{s['command']}`, seed {s['seed']}, {s['date']}, {s['hardware']}, results committed in {s['results_commit']}; "
            f"n = {s['heldout_prompts']} held-out prompts")


def make_all() -> dict:
    import matplotlib

    matplotlib.use("Agg")
    data = figure_data()
    FIGURES.mkdir(exist_ok=True)
    for name, run in data["demo_runs"].items():
        plot_demo_rounds(run, FIGURES / f"{name}_rounds.png")
    if data["demo_runs"]:
        plot_demo_change(data, FIGURES / "demo_change.png")
    plot_smollm2(data["smollm2"], FIGURES / "smollm2_accuracy.png", FIGURES / "smollm2_change.png")
    (FIGURES / "figures.json").write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    (FIGURES / "README.md").write_text(figures_readme(data))
    return data


def stale_figures() -> list[str]:
    """What differs between the committed figures.json and the numbers the sources give now."""
    committed = json.loads((FIGURES / "figures.json").read_text())
    current = json.loads(json.dumps(figure_data(), sort_keys=True))
    # The commit of a results file changes when it is committed with its figures; its numbers are what matter.
    committed["smollm2"].pop("results_commit", None)
    current["smollm2"].pop("results_commit", None)
    return [key for key in sorted(set(committed) | set(current)) if committed.get(key) != current.get(key)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when figures.json no longer matches its sources")
    parser.add_argument("--collect", type=Path, help="a finished run directory to copy into docs/results/")
    parser.add_argument("--command", default="", help="with --collect: the command that made the run")
    parser.add_argument("--wall-seconds", type=float, help="with --collect: the run's wall time")
    parser.add_argument("--hardware", default="", help="with --collect: the machine, in words")
    args = parser.parse_args(argv)
    if args.collect:
        print(collect(args.collect, args.command, args.wall_seconds, args.hardware))
        return 0
    if args.check:
        stale = stale_figures()
        print("figures up to date" if not stale else f"stale: {', '.join(stale)}; rerun python docs/make_figures.py")
        return 1 if stale else 0
    make_all()
    print(f"wrote {FIGURES}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

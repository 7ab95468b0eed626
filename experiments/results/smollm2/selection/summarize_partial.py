"""The kept-round experiment as far as it ran, summarized from its run directories with the script's own functions.

    python experiments/results/smollm2/selection/summarize_partial.py   # writes partial.md and partial.json here

`experiments/smollm2.py --selection --algorithms spin,dpo,sppo` was stopped for time: both SPIN arms and
iterative DPO made their three rounds, SPPO two of its three (its round 3 did not finish), the supervised
control one of its three. This builds the record `--selection` would write from what finished: each arm's
rounds that have a selection and a held-out evaluation, the round its run kept after them, and the control's
kept round chosen on validation among the rounds it made, by the pipeline's own rule (the script's
select_control). partial.md is the table selection.md would show, its columns of rounds not made left blank.
The runs/ and control/ directories are not committed (they hold checkpoints); partial.md and partial.json are.
"""

import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[3]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "experiments"))
import smollm2 as experiment  # noqa: E402
from data.layout import RunLayout  # noqa: E402

RUNS, CONTROL = HERE / "runs", HERE / "control"
ARMS, SPIN_ARMS, ROUNDS = ("spin_lr2e-4", "spin_lr2e-5", "dpo", "sppo"), ("spin_lr2e-4", "spin_lr2e-5"), 3


def made(run_dir: Path) -> list[dict]:
    """The run's selection records of the rounds that also have their held-out evaluation."""
    records = experiment.selection_records(run_dir)
    while records and not RunLayout(run_dir).eval(len(records) - 1).is_file():
        records.pop()
    return records


def control_rounds_made() -> int:
    count = 0
    while (CONTROL / f"round_{count + 1:02d}" / "control_round.json").is_file():
        count += 1
    return count


def main() -> None:
    records = {arm: made(RUNS / arm) for arm in ARMS}
    spin = max(SPIN_ARMS, key=lambda a: records[a][records[a][-1]["kept_round"]]["figures"]["accuracy"]["mean"])
    recipe, base = str(HERE / "recipes" / f"{spin}.yaml"), str(RUNS / "base" / "base_model")
    rounds = control_rounds_made()
    control_records = experiment.select_control(recipe, base, RUNS / spin, CONTROL, rounds)
    base_run = RUNS / ARMS[0]
    control_scored = experiment.held_out_scored(None, CONTROL, control_records[-1]["kept_round"], base_run)
    arms = {}
    for arm in ARMS:
        scored = {r: experiment.held_out_scored(RUNS / arm, None, r, base_run) for r in range(len(records[arm]))}
        arms[arm] = experiment.arm_summary(records[arm], scored, control_scored)
    scored = {r: experiment.held_out_scored(None, CONTROL, r, RUNS / spin) for r in range(rounds + 1)}
    arms["sft_control"] = experiment.arm_summary(control_records, scored, control_scored)
    record = {"scale": "cpu", "seed": 0, "rounds": ROUNDS, "control_rounds": rounds,
              "tasks": ["add", "count", "extreme", "sort", "subtract"], "hardware": experiment.hardware(),
              "date": time.strftime("%Y-%m-%d"), "overrides": [], "validation_prompts": 150, "min_gain": 1.0,
              "heldout_prompts": 150, "spin_candidates": list(SPIN_ARMS), "spin_chosen": spin, "arms": arms,
              "rounds_made": {arm: summary["rounds_run"] for arm, summary in arms.items()}}
    record["goals"] = experiment.goals({a: arms[a] for a in ARMS if a not in SPIN_ARMS or a == spin}, spin)
    (HERE / "partial.json").write_text(json.dumps(record, indent=2, default=float) + "\n")
    made_line = ", ".join(f"{arm} {n}" for arm, n in record["rounds_made"].items())
    (HERE / "partial.md").write_text(f"Stopped for time: rounds made of {ROUNDS} — {made_line}.\n\n"
                                     + experiment.render_selection(record))
    print((HERE / "partial.md").read_text())


if __name__ == "__main__":
    main()

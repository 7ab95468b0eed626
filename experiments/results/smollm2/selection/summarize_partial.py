"""The kept-round experiment's arms that finished, summarized from their run directories.

    python experiments/results/smollm2/selection/summarize_partial.py   # writes partial.json beside this file

`experiments/smollm2.py --selection` was stopped after its two SPIN arms (lr 2e-4 and 2e-5, three rounds each,
selection on) and two of iterative DPO's three rounds, before SPPO and the supervised control. This reads what
finished, with the script's own functions: each SPIN arm's validation figures by round, its kept round, and on
the held-out prompts the kept round's accuracy and its change from round 0, paired; DPO's validation figures.
The runs/ directories are not committed (they hold checkpoints); partial.json is.
"""

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))
import smollm2 as experiment  # noqa: E402

RUNS = HERE / "runs"


def spin_arm(arm: str) -> dict:
    records = experiment.selection_records(RUNS / arm)
    scored = {r: experiment.held_out_scored(RUNS / arm, None, r, RUNS / arm) for r in range(len(records))}
    summary = experiment.arm_summary(records, scored, scored[0])
    summary.pop("vs_control")  # the control did not run
    summary["held_out_by_round"] = {r: experiment.accuracy_table(scored[r])["all"] for r in scored}
    return summary


def main() -> None:
    arms = {arm: spin_arm(arm) for arm in ("spin_lr2e-4", "spin_lr2e-5")}
    dpo = experiment.selection_records(RUNS / "dpo")
    record = {"spin": arms, "spin_chosen": max(arms, key=lambda a: arms[a]["validation"][arms[a]["kept_round"]]["mean"]),
              "dpo_validation": [{"round": r["round"], **r["figures"]["accuracy"]} for r in dpo],
              "dpo_kept_so_far": dpo[-1]["kept_round"]}
    (HERE / "partial.json").write_text(json.dumps(record, indent=2, default=float) + "\n")
    print(json.dumps({a: {"kept": s["kept_round"], "vs_round_0": s["vs_round_0"]} for a, s in arms.items()}, indent=1))


if __name__ == "__main__":
    main()

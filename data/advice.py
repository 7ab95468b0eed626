"""Why a round trained nothing, and what to change: the warning a command ends with when a round made no pairs.

A round with no preference pairs leaves the policy as its parent was; the run is still complete (exit 0),
so the command says so in one line per such round, from what the round's judge_meta.json counted.

    from data.advice import untrained_rounds
    for line in untrained_rounds("runs/mine", rounds=3): print(line)
"""

from __future__ import annotations

import json
from pathlib import Path

from data.layout import RunLayout

# Why pairs were skipped (judge_meta.json's counts), and what a user can change about it, largest count first.
REASONS = {
    "skipped_identical": ("the model's sample equals the data's response (it already answers them)",
                          "use prompts the model gets wrong (harder data, or a base that has not been trained on "
                          "data.train: model.base_model names one, `demo` the shipped demo base), or judge.keep_identical: true"),
    "skipped_ties": ("all samples of the prompt scored the same (all right or all wrong)",
                     "raise generation.num_samples or generation.temperature, or use prompts nearer the model's level"),
    "skipped_unfinished": ("samples were cut at generation.max_new_tokens and judge.unfinished is drop",
                           "raise generation.max_new_tokens, or set judge.unfinished: penalize or keep"),
    "skipped_small_margin": ("the best and worst differed by no more than judge.min_margin", "lower judge.min_margin"),
    "unparsed_judgements": ("the judge's verdicts could not be read", "use a stronger judge model or judge.self_mode: pairwise"),
    "skipped_empty": ("samples were empty", "check the chat template and generation.max_new_tokens"),
}


def untrained_round(run_dir: str | Path, round_idx: int) -> str | None:
    """One line on round `round_idx` when it trained on no pair, else None."""
    layout = RunLayout(run_dir)
    try:
        stats = json.loads(layout.training_log(round_idx).read_text())["stats"]
    except (OSError, ValueError, KeyError):
        return None
    if stats.get("steps"):
        return None
    try:
        counts = json.loads(layout.judge_meta(round_idx).read_text())
    except (OSError, ValueError):
        counts = {}
    prompts = counts.get("prompts", "?")
    found = sorted(((counts.get(key) or 0, key) for key in REASONS), reverse=True)
    if not found or found[0][0] == 0:
        return f"round {round_idx} trained nothing: 0 pairs from {prompts} prompts; its policy equals its parent's"
    count, key = found[0]
    why, change = REASONS[key]
    return (f"round {round_idx} trained nothing: 0 pairs from {prompts} prompts ({count} skipped: {why}); "
            f"its policy equals its parent's. To change it: {change}")


def untrained_rounds(run_dir: str | Path, rounds: int) -> list[str]:
    return [line for r in range(1, rounds + 1) if (line := untrained_round(run_dir, r))]

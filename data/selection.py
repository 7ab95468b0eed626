"""Which round a run keeps and when it stops: each round's decision, its record, the lines of rounds, and best/.

    from data.selection import decide, paired_gain, read_selection, parent_round, lineage, publish_best, read_best

Every round r (0 = the base) is scored on the validation split (models/evaluate/selection.py writes one row per
prompt to round_NN/validation.parquet). Select(r) compares round r with the best round so far on the same
prompts, paired (`paired_gain`: the mean per-prompt difference and its standard error, so each prompt's
difficulty cancels), by the recipe's `iterate.select_by`:

- accuracy: the verifier's score of the greedy answer, round r minus the best round;
- gt_logprob: the mean per-token log-likelihood of the ground truth, round r minus the best round;
- win_rate_vs_best: the evaluation judge's P(round r's answer beats the best round's) minus 1/2.

Round r replaces the best when that difference exceeds `iterate.min_gain` standard errors (`decide`).
DNO's practical algorithm returns "the best of pi_1..pi_T+1 on the validation data" (Rosset et al. 2024,
arXiv:2404.03715, Algorithm 2, line 9); requiring a margin in standard errors keeps noise from replacing
it. `iterate.patience` rounds in a row without a replacement stop the run; with `iterate.on_regress:
restart_from_best` the next round continues the best round instead of the last (`parent_round`).
The decision is written to round_NN/selection.json, which later rounds read: a round's parent is fixed
once the round before it was selected, and never changes while its files stand.

best/ is the kept round's model, loadable with from_pretrained, and best.json says which round and why.
Both switch together in one rename (`publish_best`): `best` is a symbolic link to one complete copy in
best.copies/ (hard links to the round's files where the filesystem allows), and best.json a link to
best/best.json, so a reader, or a command killed at any point, sees the old best or the new one whole.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import pandas as pd

from common.atomic import atomic_path, atomic_write_json, temporary_sibling
from common.errors import DataError
from data.layout import BEST_JSON, BEST_STORE, RunLayout, round_name
from data.stats import mean_se

SELECT_BY = ("accuracy", "win_rate_vs_best", "gt_logprob")
# The per-prompt column of validation.parquet each figure is the mean of.
COLUMN = {"accuracy": "verifier_score", "gt_logprob": "gt_logprob"}
SUCCESS = "_SUCCESS"


def summary(values) -> dict:
    """{"mean", "se", "n"} of per-prompt values (missing ones left out)."""
    values = pd.Series(values, dtype=float).dropna()
    mean, se = mean_se(values) if len(values) else (float("nan"), float("nan"))
    return {"mean": mean, "se": se, "n": int(len(values))}


def round_figures(frame: pd.DataFrame) -> dict:
    """Each per-prompt figure validation.parquet holds, summarised ({"accuracy": {...}, "gt_logprob": {...}})."""
    return {name: summary(frame[column]) for name, column in COLUMN.items()
            if column in frame and frame[column].notna().any()}


def paired_gain(select_by: str, current: pd.DataFrame, best: pd.DataFrame | None = None, win_probs=None) -> dict:
    """How much better the round is than the best round on the same validation prompts: {"diff", "se", "n", "z"}.

    accuracy and gt_logprob: the mean over prompts of (round's value - best round's value), and the standard
    error of those differences; win_rate_vs_best: the mean of P(round beats best) - 1/2 over prompts, with
    the standard error of the win probabilities. z = diff / se (inf when every difference is the same
    positive number)."""
    if select_by == "win_rate_vs_best":
        diffs = pd.Series(np.asarray(win_probs, dtype=float) - 0.5)
    else:
        column = COLUMN[select_by]
        both = current[["prompt_id", column]].merge(best[["prompt_id", column]], on="prompt_id", suffixes=("", "_best"))
        diffs = (both[column] - both[f"{column}_best"]).dropna()
    if diffs.empty:
        raise DataError(f"iterate.select_by {select_by}: no validation prompt has a value for both rounds")
    diff, se = mean_se(diffs)
    z = diff / se if se > 0 else (math.inf if diff > 0 else -math.inf if diff < 0 else 0.0)
    return {"diff": diff, "se": se, "n": int(len(diffs)), "z": z}


def decide(round_idx: int, iterate, select_by: str, previous: dict | None, gain: dict | None, figures: dict) -> dict:
    """Round `round_idx`'s selection record, from the round before it's (`previous`; None for round 0) and
    its paired gain over the best round so far (`gain`; None for round 0)."""
    record = {"round": round_idx, "select_by": select_by, "select": iterate.select, "min_gain": iterate.min_gain,
              "patience": iterate.patience, "on_regress": iterate.on_regress, "figures": figures}
    if previous is None:  # round 0, the base: the first best
        record.update(compared_with=None, gain=None, replaced=True, best_round=0, rounds_without_gain=0,
                      why="round 0 (the base) is the first best")
    else:
        best_before = previous["best_round"]
        # NaN (n < 2) never replaces: one prompt tells nothing of noise.
        replaced = gain["diff"] > 0 and gain["z"] > iterate.min_gain
        record.update(compared_with=best_before, gain=gain, replaced=replaced,
                      best_round=round_idx if replaced else best_before,
                      rounds_without_gain=0 if replaced else previous["rounds_without_gain"] + 1)
        verb = f"replaced round {best_before} as best" if replaced else f"did not replace round {best_before}"
        record["why"] = (f"round {round_idx} {verb}: {describe_gain(select_by, gain)} on validation, "
                         f"{'above' if replaced else 'not above'} iterate.min_gain {iterate.min_gain:g} standard errors")
    record["kept_round"] = record["best_round"] if iterate.select == "best" else round_idx
    record["stop"] = iterate.patience is not None and record["rounds_without_gain"] >= iterate.patience
    restart = iterate.on_regress == "restart_from_best"
    record["parent_of_next"] = record["best_round"] if restart else round_idx
    return record


def describe_gain(select_by: str, gain: dict) -> str:
    z = gain["z"]
    z_text = "n < 2" if z != z else f"{z:+.1f} SE"
    name = "win rate vs best - 1/2" if select_by == "win_rate_vs_best" else select_by
    return f"{name} {gain['diff']:+.3f} ± {gain['se']:.3f} ({z_text}, n = {gain['n']})"


RECORD_KEYS = ("round", "select_by", "best_round", "kept_round", "rounds_without_gain", "stop", "parent_of_next", "figures")


def read_selection(path: str | Path) -> dict | None:
    """A round's selection.json (None when there is none); one that is not a selection record is a DataError."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except ValueError:
        record = None
    if not isinstance(record, dict) or not set(RECORD_KEYS) <= set(record):
        raise DataError(f"{path}: not a selection record (edited by hand?); delete it and the run makes it again")
    return record


def parent_round(recipe, layout: RunLayout, round_idx: int) -> int:
    """The round whose model round `round_idx` continues: round_idx - 1, or with iterate.on_regress:
    restart_from_best the round the selection after round_idx - 1 named (it must be there)."""
    if round_idx <= 1 or recipe.iterate.on_regress == "continue":
        return round_idx - 1
    record = read_selection(layout.selection(round_idx - 1))
    if record is None:
        raise DataError(f"{layout.selection(round_idx - 1)} is missing: round {round_idx}'s parent is not chosen yet")
    return int(record["parent_of_next"])


def lineage(recipe, layout: RunLayout, round_idx: int) -> list[int]:
    """The trained rounds round `round_idx` descends from, nearest first (its parent, the parent's parent, ...)."""
    rounds, current = [], round_idx
    while current > 1:
        current = parent_round(recipe, layout, current)
        if current == 0:
            break
        rounds.append(current)
    return rounds


def recorded_parents(layout: RunLayout) -> dict[int, int]:
    """Each trained round's parent as its training recorded it (training_log.json; older runs: round - 1)."""
    parents = {}
    for round_idx in layout.rounds():
        path = layout.training_log(round_idx)
        if round_idx > 0 and path.is_file():
            stats = json.loads(path.read_text()).get("stats") or {}
            parents[round_idx] = int(stats.get("parent_round", round_idx - 1))
    return parents


def stop_line(records: list[dict], rounds: int) -> str:
    """One line saying why the run stopped after the last of `records` (rounds 0..k), and what was not run."""
    last = records[-1]
    k, patience = last["round"], last["patience"]
    failed = records[len(records) - last["rounds_without_gain"]:]
    figures = "; ".join(f"round {r['round']} {describe_gain(r['select_by'], r['gain'])}" for r in failed)
    left = "" if k >= rounds else (f"; round {k + 1} not run" if k + 1 == rounds else f"; rounds {k + 1}-{rounds} not run")
    return (f"stopped early after round {k}: {last['rounds_without_gain']} round(s) in a row did not beat round "
            f"{last['best_round']} on validation {last['select_by']} by more than {last['min_gain']:g} standard errors "
            f"(iterate.patience {patience}): {figures}{left}")


def best_record(record: dict, layout: RunLayout) -> dict:
    """best.json after the selection `record`: the kept round, its validation figure and why it is kept. The
    same while the kept round stays, so best/ is not rewritten when a later round fails to replace it."""
    kept = record["kept_round"]
    made = record if kept == record["round"] else read_selection(layout.selection(kept))
    why = (f"iterate.select: last keeps the last round run (round {kept})" if record["select"] == "last"
           else made["why"])
    return {"round": kept, "select": record["select"], "select_by": record["select_by"],
            "figure": made["figures"].get(record["select_by"]), "why": why}


def record_parents(layout: RunLayout) -> None:
    """run.yaml's `parents`: each trained round and the round it continued, as its training recorded it."""
    import yaml

    from common.atomic import atomic_write_bytes

    record = yaml.safe_load(layout.run_yaml.read_text())
    parents = recorded_parents(layout)
    if record.get("parents") != parents:
        record["parents"] = parents
        atomic_write_bytes(layout.run_yaml, yaml.safe_dump(record, sort_keys=False).encode())


# --- best/ and best.json ------------------------------------------------------------------------------

def read_best(layout: RunLayout) -> dict | None:
    """best.json (through best/), or None when the run has kept no round yet."""
    try:
        return json.loads(layout.best_json.read_text())
    except FileNotFoundError:
        return None


def _source_stamp(source: Path) -> str:
    marker = source / SUCCESS
    return marker.read_text().strip() if marker.is_file() else str(source.resolve())


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # the round's files are written once and replaced whole, never edited in place
    except OSError:
        shutil.copy2(src, dst)


def _switch_link(link: Path, target: str) -> None:
    """Point the symbolic link `link` at `target` in one rename (a new link, renamed over the old one)."""
    tmp = temporary_sibling(link)
    os.symlink(target, tmp)
    try:
        os.replace(tmp, link)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def publish_best(layout: RunLayout, record: dict, source: str | Path) -> bool:
    """Make best/ the model in `source` (a round's checkpoint or the base model's directory) and best.json
    `record`, switched together in one rename. Nothing changes when best/ already holds this source and
    record. Returns whether it switched."""
    source = Path(source)
    record = {**record, "source": str(source), "source_stamp": _source_stamp(source)}
    if read_best(layout) == record:
        _tidy(layout, Path(os.readlink(layout.best)).name)
        return False
    best = layout.best
    if best.exists() and not best.is_symlink():
        raise DataError(f"{best} is not the link selfplay writes (made by hand?); move it away and rerun")
    name = f"{round_name(record['round'])}-{uuid.uuid4().hex[:12]}"
    with atomic_path(layout.best_store / name, directory=True) as tmp:  # removed on any failure
        shutil.copytree(source, tmp, copy_function=_link_or_copy, dirs_exist_ok=True)
        if not (tmp / "config.json").is_file() and (tmp / "adapter" / "adapter_config.json").is_file():
            # No merged export (training.save_merged: false): the adapter at the top level, which
            # from_pretrained loads on its base (peft), beside the tokenizer.
            for item in (tmp / "adapter").iterdir():
                _link_or_copy(str(item), str(tmp / item.name))
        # The copy's files are hard links to the round's own: a file written here is unlinked first, so
        # writing it never writes into the round's file.
        for written in (BEST_JSON, SUCCESS):
            (tmp / written).unlink(missing_ok=True)
        atomic_write_json(tmp / BEST_JSON, record)
        (tmp / SUCCESS).write_text(record["source_stamp"] + "\n")
    if not layout.best_json.is_symlink():  # fixed once: best.json is always the record inside best/
        layout.best_json.unlink(missing_ok=True)
        _switch_link(layout.best_json, f"{best.name}/{BEST_JSON}")
    _switch_link(best, f"{BEST_STORE}/{name}")
    _tidy(layout, name)
    return True


def _tidy(layout: RunLayout, current: str) -> None:
    """Remove every copy but the one best/ links to: earlier ones, and those a killed command left half
    made (one command writes a run at a time: tasks/lock.py)."""
    for old in layout.best_store.iterdir():
        if old.name != current:
            shutil.rmtree(old, ignore_errors=True)


def mixed_share(frame: pd.DataFrame, share: float, seed: tuple) -> pd.DataFrame:
    """`share` of `frame`'s rows (at most: the count rounds down), drawn without replacement, the same for
    the same seed; share 1 is the whole frame in its order."""
    if share >= 1:
        return frame
    count = int(share * len(frame) + 1e-9)
    order = np.random.default_rng(list(seed)).permutation(len(frame))[:count]
    return frame.iloc[np.sort(order)].reset_index(drop=True)


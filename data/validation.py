"""The validation split: prompts every round is scored on to choose the round the run keeps and to stop early.

    from data.validation import validation_prompts, training_prompts
    validation = validation_prompts(recipe)      # the first iterate.validation_prompts rows; None without a split
    train = training_prompts(recipe, frame)      # the training prompts a round may sample: never a validation one

Where the split comes from (`data.validation`):

- a source of its own: `demo:<split>`, a .parquet / .jsonl / .json file, or a hub dataset's
  `data.validation_split`;
- null: the demo's own `demo:validation` when the training data is a demo split, a hub training
  dataset's `data.validation_split` when it has one, else `data.validation_fraction` of the training
  prompts, set aside by a stable hash of the prompt id (the same prompts on every rerun and every round,
  whatever `data.prompts_per_round` is), which no round then samples; those that are also held-out
  prompts are left out of the split. Training data that is also the held-out data (the same file), or
  so small that nothing is set aside, has no validation split: the run then keeps its last round;
- none: no validation split (iterate.select must then be last, with no patience and no restart).

A validation split is apart from both the training and the held-out prompts: one that shares a prompt
with either (by prompt id or by text) is refused in one line naming `data.validation`, before any
compute. The held-out prompts are never used to choose anything.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path

import pandas as pd

from common.errors import DataError
from data.prompts import DEMO_PREFIX, load_prompts

DEMO_VALIDATION = "demo:validation"
LOCAL_SUFFIXES = (".parquet", ".jsonl", ".json")


def _is_hub(source: str) -> bool:
    return not source.startswith(DEMO_PREFIX) and not source.endswith(LOCAL_SUFFIXES)


@functools.lru_cache(maxsize=8)
def _hub_has_split(source: str, split: str) -> bool:
    """Whether the hub dataset `source` has `split` (asked once per process)."""
    try:
        import datasets

        return split in datasets.get_dataset_split_names(source)
    except Exception:  # offline, unknown dataset: no split we can use; loading the training data says why
        return False


def validation_plan(data) -> tuple[str, str | None]:
    """('source', where) for a split of its own, ('fraction', None) for prompts set aside from the training
    data, or ('none', None)."""
    if data.validation == "none":
        return "none", None
    if data.validation is not None:
        return "source", data.validation
    if data.train.startswith(DEMO_PREFIX):
        return "source", DEMO_VALIDATION
    if _is_hub(data.train) and _hub_has_split(data.train, data.validation_split):
        return "source", data.train
    held_out_is_training = (data.train, data.train_split) == (data.eval, data.eval_split)
    return ("fraction", None) if data.validation_fraction > 0 and not held_out_is_training else ("none", None)


_SPLIT_CACHE: dict[str, bool] = {}


def has_validation(recipe) -> bool:
    """Whether the run has a validation split. With data.validation_fraction on local files, only when it sets
    aside a prompt that is not held out (and leaves one to train on): a handful of training prompts, or
    training data that is also the held-out data, has none, and the run keeps its last round (asked once
    per version of the files)."""
    kind, _ = validation_plan(recipe.data)
    if kind != "fraction" or _is_hub(recipe.data.train):
        return kind != "none"
    data = recipe.data
    stamps = [(p, Path(p).expanduser().stat().st_mtime_ns) for p in (data.train, data.eval)
              if not p.startswith(DEMO_PREFIX) and Path(p).expanduser().is_file()]
    key = json.dumps([dataclasses.asdict(data), stamps], default=str)
    if key not in _SPLIT_CACHE:
        train = load_prompts(data.train, data.train_split, data)
        rest, validation = _split_off(train, data.validation_fraction)
        validation = _apart(validation, load_prompts(data.eval, data.eval_split, data))
        _SPLIT_CACHE[key] = not validation.empty and not rest.empty
    return _SPLIT_CACHE[key]


def set_aside(prompt_ids, fraction: float) -> list[bool]:
    """Which prompts the validation split takes from the training data: those whose id hashes below
    `fraction` (sha256 of the id; stable across runs, machines and Python versions)."""
    def unit(prompt_id) -> float:
        return int(hashlib.sha256(f"validation:{prompt_id}".encode()).hexdigest()[:15], 16) / 16 ** 15

    return [unit(prompt_id) < fraction for prompt_id in prompt_ids]


def _normalized(texts) -> list[str]:
    return [" ".join(str(t).split()) for t in texts]


def _split_off(frame: pd.DataFrame, fraction: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(training prompts, validation prompts) of data set aside by `fraction`: a training row whose text is
    a validation prompt's (under another id) goes too, so no prompt is in both."""
    taken = set_aside(frame.prompt_id, fraction)
    validation = frame[taken].reset_index(drop=True)
    texts = set(_normalized(validation.prompt))
    kept = [not t and text not in texts for t, text in zip(taken, _normalized(frame.prompt))]
    return frame[kept].reset_index(drop=True), validation


def _apart(validation: pd.DataFrame, held_out: pd.DataFrame) -> pd.DataFrame:
    """The prompts of `validation` that are not held-out prompts (by id or text)."""
    texts, ids = set(_normalized(held_out.prompt)), set(held_out.prompt_id)
    keep = [pid not in ids and text not in texts for pid, text in zip(validation.prompt_id, _normalized(validation.prompt))]
    return validation[keep].reset_index(drop=True)


def training_prompts(recipe, frame: pd.DataFrame) -> pd.DataFrame:
    """The training prompts without those the validation split set aside (data.validation_fraction)."""
    if validation_plan(recipe.data)[0] != "fraction" or not has_validation(recipe):
        return frame
    return _split_off(frame, recipe.data.validation_fraction)[0]


def check_apart(validation: pd.DataFrame, other: pd.DataFrame, what: str) -> None:
    """Refuse, in one line naming data.validation, a validation prompt that is also one of `other`'s."""
    shared_ids = set(validation.prompt_id) & set(other.prompt_id)
    if shared_ids:
        prompt_id = next(pid for pid in validation.prompt_id if pid in shared_ids)
        raise DataError(f"data.validation: prompt id {prompt_id!r} is also in {what}; a validation split must share no "
                        "prompt with the training or held-out prompts (by id or text)")
    texts = set(_normalized(other.prompt))
    for prompt_id, text in zip(validation.prompt_id, _normalized(validation.prompt)):
        if text in texts:
            raise DataError(f"data.validation: prompt {text[:60]!r} (id {prompt_id!r}) is also in {what}; a validation "
                            "split must share no prompt with the training or held-out prompts (by id or text)")


def load_validation(recipe, train: pd.DataFrame | None = None, held_out: pd.DataFrame | None = None) -> pd.DataFrame | None:
    """The whole validation split (None when there is none), checked apart from the training prompts and the
    held-out prompts (read here unless given)."""
    data = recipe.data
    kind, source = validation_plan(data)
    if not has_validation(recipe):
        return None
    if train is None:
        train = load_prompts(data.train, data.train_split, data, require_reference=recipe.needs_reference)
    if held_out is None:
        held_out = load_prompts(data.eval, data.eval_split, data)
    if kind == "fraction":
        # Set aside from training, less any prompt that is also held out (the held-out prompts choose nothing).
        validation = _apart(_split_off(train, data.validation_fraction)[1], held_out)
    else:
        split = data.validation_split if _is_hub(source) else data.train_split
        # Whether the rows hold what iterate.select_by needs is said by models.evaluate.selection.selection_figure.
        validation = load_prompts(source, split, data)
        check_apart(validation, train, f"the training prompts ({data.train})")
    check_apart(validation, held_out, f"the held-out prompts ({data.eval})")
    return validation


def validation_prompts(recipe, **known) -> pd.DataFrame | None:
    """The validation prompts every round is scored on: the first iterate.validation_prompts of the split."""
    validation = load_validation(recipe, **known)
    return None if validation is None else validation.head(recipe.iterate.validation_prompts).reset_index(drop=True)

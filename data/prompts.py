"""Prompt datasets in, chat-formatted text out.

`load_prompts` reads the demo splits (`demo:train`), a local Parquet or JSONL file, or a hub dataset
through `datasets`, in either layout:

- prompt_response: a `prompt` column and, for SPIN, a ground-truth `response` column;
- messages: a list of {role, content} turns (UltraChat / UltraFeedback style); the first user turn is
  the prompt, the assistant turn after it the ground truth, a leading system turn the system prompt.

It returns one frame with `prompt_id, prompt, reference, system`, plus what verifiers and the
evaluation read: `answer` (the `data.answer_field` column, else the ground-truth response), `task`
(the `data.task_field` column, else a `task` column when there is one) and `source_row` (the row's
scalar columns other than the prompt, as JSON: the `row` a user's verifier is given). It checks every
row: a bad one is a DataError naming file, row, field.

`format_prompt` and `format_completion` are the only places text meets the chat template, and both
generation and training call them, so the model is trained on exactly the text it generates from.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd

from common.errors import DataError
from configs.recipe import DataConfig

log = logging.getLogger("selfplay")

DEMO_PREFIX = "demo:"
DEFAULT_ANSWER_FIELD = DataConfig.answer_field
DEFAULT_TASK_FIELD = "task"  # used when data.task_field is unset and the data has this column


def _read_table(source: str, split: str) -> pd.DataFrame:
    if source.startswith(DEMO_PREFIX):
        from data.demo_tasks import DEMO_DIR

        path = DEMO_DIR / f"{source[len(DEMO_PREFIX):]}.jsonl"
        if not path.is_file():
            raise DataError(f"{source}: no such demo split (have {', '.join(p.stem for p in DEMO_DIR.glob('*.jsonl'))})")
        return _read_jsonl(path, source)
    path = Path(source).expanduser()
    if path.suffix in (".parquet", ".jsonl", ".json"):
        if not path.is_file():
            raise DataError(f"{source}: no such file")
        if path.stat().st_size == 0:
            raise DataError(f"{source}: the file is empty")
        if path.suffix == ".jsonl":
            return _read_jsonl(path, source)
        try:
            if path.suffix == ".parquet":
                return pd.read_parquet(path)
            return _read_json(path, source)
        except (ValueError, OSError) as exc:
            raise DataError(f"{source}: cannot read: {str(exc).splitlines()[0]}") from None
    import datasets

    try:
        return datasets.load_dataset(source, split=split).to_pandas()
    except Exception as exc:  # datasets raises many types; the user needs one line either way
        raise DataError(f"{source}: cannot load dataset split {split!r}: {str(exc).splitlines()[0]}") from None


def _read_jsonl(path: Path, source: str) -> pd.DataFrame:
    """One JSON object per line (blank lines skipped); a bad line is named by its line number."""
    records = []
    with open(path, encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as exc:
                raise DataError(f"{source}: line {line_number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(record, dict):
                raise DataError(f"{source}: line {line_number}: expected a JSON object, got {type(record).__name__}")
            records.append(record)
    if not records:
        raise DataError(f"{source}: the file is empty (no JSON lines)")
    return pd.DataFrame.from_records(records)


def _read_json(path: Path, source: str) -> pd.DataFrame:
    """A .json file: a list of objects (or pandas' column layouts); a syntax error is named by line."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{source}: line {exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if data in ([], {}):
        raise DataError(f"{source}: the file is empty (no rows)")
    return pd.DataFrame.from_records(data) if isinstance(data, list) else pd.read_json(path, dtype=False)


def _messages_row(messages, source: str, row: int, field: str) -> tuple[str, str | None, str | None]:
    if hasattr(messages, "tolist"):
        messages = messages.tolist()
    if isinstance(messages, str):
        messages = json.loads(messages)
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise DataError(f"{source}: row {row}: field '{field}' must be a list of {{role, content}} turns")
    system = next((m.get("content") for m in messages[:1] if m.get("role") == "system"), None)
    for i, turn in enumerate(messages):
        if turn.get("role") == "user":
            following = messages[i + 1] if i + 1 < len(messages) else {}
            reference = following.get("content") if following.get("role") == "assistant" else None
            return turn.get("content"), reference, system
    raise DataError(f"{source}: row {row}: field '{field}' has no user turn")


def _is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA or value is pd.NaT


def _as_text(value) -> str | None:
    """A column value as the text verifiers compare with: 42, 42.0 and '42' all become '42'."""
    if _is_missing(value):
        return None
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value.item() if isinstance(value, np.generic) else value)


def _scalar_columns(record: dict, skip: set[str]) -> str:
    """The row's scalar columns as JSON; lists and nested columns (chat turns, say) are left out."""
    row = {}
    for key, value in record.items():
        if key in skip:
            continue
        if isinstance(value, np.generic):
            value = value.item()
        if _is_missing(value):
            row[str(key)] = None
        elif isinstance(value, (str, bool, int, float)):
            row[str(key)] = value
        elif isinstance(value, (pd.Timestamp, datetime.date)):
            row[str(key)] = value.isoformat()
    return json.dumps(row, ensure_ascii=False)


def _stable_id(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def load_prompts(source: str, split: str, cfg: DataConfig, require_reference: bool = False) -> pd.DataFrame:
    """Read and check a prompt dataset; see the module docstring for the layouts."""
    raw = _read_table(source, split)
    layout = cfg.layout
    if layout == "auto":
        layout = "messages" if cfg.messages_field in raw.columns and cfg.prompt_field not in raw.columns else "prompt_response"
    needed = [cfg.messages_field] if layout == "messages" else [cfg.prompt_field]
    if require_reference and layout == "prompt_response":
        needed.append(cfg.response_field)
    missing = [c for c in needed if c not in raw.columns]
    if missing:
        raise DataError(f"{source}: missing column(s) {', '.join(missing)} (columns: {', '.join(map(str, raw.columns))})")
    for key, name in (("data.task_field", cfg.task_field), ("data.answer_field", cfg.answer_field)):
        # An answer column named by the user must exist; only the default may fall back to the ground truth.
        if name and name not in raw.columns and (key == "data.task_field" or name != DEFAULT_ANSWER_FIELD):
            raise DataError(f"{source}: missing column {name} ({key}) (columns: {', '.join(map(str, raw.columns))})")
    task_field = cfg.task_field or (DEFAULT_TASK_FIELD if DEFAULT_TASK_FIELD in raw.columns else None)
    answer_field = cfg.answer_field if cfg.answer_field in raw.columns else None
    not_row = {cfg.prompt_field, cfg.messages_field}

    rows = []
    for row_idx, record in enumerate(raw.to_dict("records")):
        if layout == "messages":
            prompt, reference, system = _messages_row(record[cfg.messages_field], source, row_idx, cfg.messages_field)
        else:
            prompt, reference = record[cfg.prompt_field], record.get(cfg.response_field)
            system = None
        for field, value in ((cfg.prompt_field, prompt), (cfg.response_field, reference)):
            if value is not None and not isinstance(value, str) and not pd.isna(value):
                raise DataError(f"{source}: row {row_idx}: field '{field}' must be text, got {type(value).__name__}")
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(f"{source}: row {row_idx}: field '{cfg.prompt_field}' is empty")
        if require_reference and (not isinstance(reference, str) or not reference.strip()):
            raise DataError(f"{source}: row {row_idx}: field '{cfg.response_field}' (the ground truth) is empty")
        given_id = record.get(cfg.id_field)
        out = {
            "prompt_id": str(given_id) if given_id is not None and not pd.isna(given_id) else _stable_id(prompt),
            "prompt": prompt,
            "reference": clean_response(reference) if isinstance(reference, str) else None,
            "system": system or cfg.system_prompt,
        }
        out["answer"] = _as_text(record.get(answer_field)) if answer_field else out["reference"]
        if task_field:
            out["task"] = _as_text(record.get(task_field))
        out["source_row"] = _scalar_columns(record, not_row)
        rows.append(out)
    frame = pd.DataFrame(rows)
    if frame.empty:
        raise DataError(f"{source}: no rows")
    if frame["answer"].isna().all():  # nothing to check answers against: no column for it
        frame = frame.drop(columns="answer")
    dup = frame.duplicated("prompt_id")
    if dup.any():
        if cfg.id_field in raw.columns:
            row = int(dup.to_numpy().nonzero()[0][0])
            raise DataError(f"{source}: row {row}: duplicate {cfg.id_field} {frame.prompt_id.iloc[row]!r}")
        log.info("%s: dropped %d repeated prompts", source, int(dup.sum()))
        frame = frame[~dup].reset_index(drop=True)
    # Which field the answers came from, for messages about them (tasks/requirements.py).
    frame.attrs["answer_from"] = answer_field or (cfg.response_field if layout == "prompt_response" else cfg.messages_field)
    frame.attrs["answer_field"] = cfg.answer_field
    return frame


def round_prompts(frame: pd.DataFrame, round_idx: int, per_round: int | None) -> pd.DataFrame:
    """The prompts of one round: a window that rotates through the data set, so rounds see new prompts."""
    if per_round is None or per_round >= len(frame):
        return frame
    start = ((round_idx - 1) * per_round) % len(frame)
    idx = [(start + i) % len(frame) for i in range(per_round)]
    return frame.iloc[idx].reset_index(drop=True)


def clean_response(text: str) -> str:
    """The one normalisation every response gets, sampled or ground truth: surrounding whitespace removed.

    Samples are decoded up to their end-of-turn token and stripped; a reference must be treated the
    same way, or SPIN's chosen side (the dataset's answer, often ending in a newline in UltraChat) and
    rejected side (a stripped sample) differ in whitespace alone, which the model can learn instead of
    the content.
    """
    return text.strip()


def _messages(prompt: str, system: str | None) -> list[dict]:
    turns = [{"role": "system", "content": system}] if system else []
    return turns + [{"role": "user", "content": prompt}]


def format_prompt(tokenizer, prompt: str, system: str | None = None) -> str:
    """The prompt as the model sees it: the tokenizer's chat template with the assistant turn opened."""
    return tokenizer.apply_chat_template(_messages(prompt, system), tokenize=False, add_generation_prompt=True)


def format_completion(tokenizer, prompt: str, response: str, system: str | None = None) -> str:
    """The text the model should write after `format_prompt(...)`: the response and its end-of-turn marker.

    Taken from the template itself (full conversation minus the prompt), so the end-of-turn tokens the
    model is trained on are those generation stops at. It ends at the eos token: what a template puts
    after it (ChatML's newline after `<|im_end|>`) is never sampled, since generation stops at eos,
    so training on it would score tokens the policy does not produce.
    """
    prompt_text = format_prompt(tokenizer, prompt, system)
    full = tokenizer.apply_chat_template(
        _messages(prompt, system) + [{"role": "assistant", "content": response}], tokenize=False
    )
    if not full.startswith(prompt_text):
        return response + (tokenizer.eos_token or "")
    completion = full[len(prompt_text):]
    eos = tokenizer.eos_token
    end = completion.rfind(eos) if eos else -1
    return completion[: end + len(eos)] if end >= 0 else completion


def filter_overlong(frame: pd.DataFrame, tokenizer, max_tokens: int, policy: str, source: str,
                    limit_name: str = "data.max_prompt_tokens") -> tuple[pd.DataFrame, int]:
    """Drop (policy 'filter') or refuse (policy 'error') prompts longer than `max_tokens` once formatted;
    `limit_name` says in messages where the limit comes from."""
    lengths = [
        len(tokenizer(format_prompt(tokenizer, p, s), add_special_tokens=False).input_ids)
        for p, s in zip(frame.prompt, frame.system)
    ]
    too_long = [n > max_tokens for n in lengths]
    if any(too_long) and policy == "error":
        row = too_long.index(True)
        raise DataError(
            f"{source}: row {row}: field 'prompt' is {lengths[row]} tokens, over {limit_name}={max_tokens}"
        )
    kept = frame[[not t for t in too_long]].reset_index(drop=True)
    if kept.empty:
        raise DataError(f"{source}: every prompt is longer than {limit_name}={max_tokens}")
    return kept, sum(too_long)

"""Parquet schemas of the round artifacts, with atomic writers and validating readers.

The columns below are the contract of ../shared/DESIGN.md that notebooks and external checks rely on:
add columns freely, never rename these. `write_artifact` validates, then writes to a temporary file and
renames it into place, so a reader never sees half a file; `read_artifact` validates what it reads and
names the file, row and field of the first problem.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import DataError

PROB_MATRIX = pa.list_(pa.list_(pa.float64()))


@dataclass(frozen=True)
class ArtifactSchema:
    name: str
    columns: dict[str, pa.DataType]  # required columns and their types
    non_empty: tuple[str, ...] = ()  # string columns that may not be empty or null
    unique: tuple[str, ...] = ()  # columns that together identify a row
    optional: tuple[tuple[str, pa.DataType], ...] = ()  # typed when present, may be missing

    @property
    def types(self) -> dict[str, pa.DataType]:
        return {**self.columns, **dict(self.optional)}


GENERATIONS = ArtifactSchema(
    "generations",
    {
        "prompt_id": pa.string(),
        "prompt": pa.string(),
        "response": pa.string(),
        "sample_index": pa.int64(),
        "round": pa.int64(),
        "num_tokens": pa.int64(),
    },
    non_empty=("prompt_id", "prompt"),
    unique=("prompt_id", "sample_index"),
    optional=(("reference", pa.string()), ("task", pa.string()), ("answer", pa.string()), ("source_row", pa.string()),
              ("finished", pa.bool_()), ("token_ids", pa.list_(pa.int64()))),
)

PAIRS = ArtifactSchema(
    "pairs",
    {
        "prompt_id": pa.string(),
        "prompt": pa.string(),
        "chosen": pa.string(),
        "rejected": pa.string(),
        "chosen_score": pa.float64(),
        "rejected_score": pa.float64(),
        "round": pa.int64(),
        "judge": pa.string(),
    },
    non_empty=("prompt_id", "prompt", "chosen"),
    unique=("prompt_id",),
    optional=(("chosen_index", pa.int64()), ("rejected_index", pa.int64()), ("prob_matrix", PROB_MATRIX),
              ("chosen_finished", pa.bool_()), ("rejected_finished", pa.bool_())),
)

EVAL = ArtifactSchema(
    "eval",
    {
        "prompt_id": pa.string(),
        "prompt": pa.string(),
        "response": pa.string(),
        "kind": pa.string(),  # greedy | sample | pair_chosen | pair_rejected
        "sample_index": pa.int64(),
        "round": pa.int64(),
        "num_tokens": pa.int64(),
        "logp": pa.float64(),  # sum log-prob of the response under this round's model
    },
    non_empty=("prompt_id", "prompt"),
    unique=("prompt_id", "kind", "sample_index"),
    optional=(("correct", pa.bool_()), ("verifier_score", pa.float64()), ("base_logp", pa.float64()), ("finished", pa.bool_()),
              ("token_ids", pa.list_(pa.int64()))),
)


def _check_type(series: pd.Series, dtype: pa.DataType) -> bool:
    try:
        pa.array(series, type=dtype, from_pandas=True)
        return True
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError):
        return False


def validate(df: pd.DataFrame, schema: ArtifactSchema, path: str | Path) -> None:
    """Raise DataError naming the file, column and first bad row; return None when `df` fits `schema`."""
    missing = [col for col in schema.columns if col not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)} (a {schema.name} file needs {', '.join(schema.columns)})")
    for col, dtype in schema.types.items():
        if col in df.columns and not _check_type(df[col], dtype):
            bad = _first_bad_row(df[col], dtype)
            raise DataError(f"{path}: row {bad}: field '{col}' must be {dtype}, got {df[col].iloc[bad]!r}")
    for col in schema.non_empty:
        empty = df[col].isna() | (df[col].astype(str).str.strip() == "")
        if empty.any():
            raise DataError(f"{path}: row {int(empty.to_numpy().nonzero()[0][0])}: field '{col}' is empty")
    if schema.unique and len(df):
        dup = df.duplicated(list(schema.unique))
        if dup.any():
            row = int(dup.to_numpy().nonzero()[0][0])
            key = ", ".join(f"{c}={df[c].tolist()[row]!r}" for c in schema.unique)
            raise DataError(f"{path}: row {row}: duplicate {key}")


def _first_bad_row(series: pd.Series, dtype: pa.DataType) -> int:
    for i, value in enumerate(series):
        if not _check_type(pd.Series([value], dtype=object), dtype):
            return i
    return 0


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def write_parquet(df: pd.DataFrame, path: str | Path, schema: ArtifactSchema | None = None) -> None:
    """Validate against `schema` (if given), then write atomically."""
    table = pa.Table.from_pandas(df.reset_index(drop=True), preserve_index=False)
    if schema is not None:
        validate(df, schema, path)
        table = table.cast(pa.schema([pa.field(f.name, schema.types.get(f.name, f.type)) for f in table.schema]))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_artifact(path: str | Path, schema: ArtifactSchema) -> pd.DataFrame:
    """Read a Parquet artifact and validate it; a broken or foreign file is a one-line DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such {schema.name} file")
    try:
        df = pq.read_table(path).to_pandas()
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    validate(df, schema, path)
    return df

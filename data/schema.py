"""Parquet schemas of the round artifacts, with atomic writers and validating readers.

The columns below are the contract (README: Run the demo) that notebooks and external checks rely on:
add columns freely, never rename these. `write_parquet` validates, then writes atomically
(common/atomic.py): a reader never sees half a file, and a full disk leaves no file and one line;
`read_artifact` validates what it reads and names the file, row and field of the first problem.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from common.atomic import atomic_path
from common.errors import DataError
from data.layout import EVAL_FILE, GENERATIONS_FILE, PAIRS_FILE, SELECTED_FILE, VALIDATION_FILE

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
              ("chosen_finished", pa.bool_()), ("rejected_finished", pa.bool_()),
              # the ids a sampled side was generated as (null for ground truth): training scores these
              ("chosen_token_ids", pa.list_(pa.int64())), ("rejected_token_ids", pa.list_(pa.int64())),
              # where each side came from: sample (this round's), dataset (the data's response), refinement
              ("chosen_source", pa.string()), ("rejected_source", pa.string())),
)

# round_NN/selected.parquet (algorithm rest): the round's supervised examples, the samples that passed the judge
# (and STaR's rationalizations). The generations' contract columns, so what reads generations reads these, plus
# the judge's `score` and name; `source` says which sampling an example came from: `sample` (the round's own,
# `sample_index` its index in generations.parquet) or `rationalization` (sampled with the answer as a hint in
# `hinted_prompt`; `sample_index` its index among those hinted samples). `prompt` is the prompt trained on,
# never the hinted one. A prompt has as many rows as examples kept (judge.max_per_prompt at most).
SELECTED = ArtifactSchema(
    "selected",
    {**GENERATIONS.columns, "score": pa.float64(), "judge": pa.string(), "source": pa.string()},
    non_empty=("prompt_id", "prompt", "response"),
    unique=("prompt_id", "source", "sample_index"),
    optional=(("reference", pa.string()), ("task", pa.string()), ("answer", pa.string()), ("system", pa.string()),
              ("finished", pa.bool_()), ("token_ids", pa.list_(pa.int64())), ("hinted_prompt", pa.string())),
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
              ("token_ids", pa.list_(pa.int64())), ("gt_logprob", pa.float64())),
)

# round_NN/validation.parquet: one row per validation prompt, what models/evaluate/selection.py measured of the round.
VALIDATION = ArtifactSchema(
    "validation",
    {"prompt_id": pa.string(), "round": pa.int64()},
    non_empty=("prompt_id",),
    unique=("prompt_id",),
    optional=(("prompt", pa.string()), ("response", pa.string()), ("num_tokens", pa.int64()), ("finished", pa.bool_()),
              ("verifier_score", pa.float64()), ("gt_logprob", pa.float64()), ("gt_tokens", pa.float64())),
)


def token_ids_or_none(value) -> list[int] | None:
    """A token-id cell read from Parquet (an array, a list, or null) as a list of ints, or None."""
    if value is None or (isinstance(value, float) and value != value):  # null, or NaN from a missing cell
        return None
    return [int(i) for i in value]


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


def write_parquet(df: pd.DataFrame, path: str | Path, schema: ArtifactSchema | None = None) -> None:
    """Validate against `schema` (if given), then write atomically."""
    table = pa.Table.from_pandas(df.reset_index(drop=True), preserve_index=False)
    if schema is not None:
        validate(df, schema, path)
        table = table.cast(pa.schema([pa.field(f.name, schema.types.get(f.name, f.type)) for f in table.schema]))
    # The in-memory size of the table is the estimate of the space the file needs.
    with atomic_path(path, needed_bytes=table.nbytes) as tmp:
        pq.write_table(table, tmp)


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


ARTIFACT_SCHEMAS = {GENERATIONS_FILE: GENERATIONS, PAIRS_FILE: PAIRS, SELECTED_FILE: SELECTED, EVAL_FILE: EVAL,
                    VALIDATION_FILE: VALIDATION}


def _same_kind(found: pa.DataType, wanted: pa.DataType) -> bool:
    kinds = (pa.types.is_integer, pa.types.is_floating, pa.types.is_boolean,
             lambda t: pa.types.is_string(t) or pa.types.is_large_string(t),
             lambda t: pa.types.is_list(t) or pa.types.is_large_list(t))
    return found == wanted or pa.types.is_null(found) or any(kind(found) and kind(wanted) for kind in kinds)


def check_artifact_schema(path: str | Path, schema: ArtifactSchema) -> None:
    """Check a Parquet artifact's columns and types from its footer alone (no rows are read); a file
    that is not one this pipeline wrote is a one-line DataError."""
    remake = "delete it and the run makes it again"
    try:
        found = pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0]}); {remake}") from None
    missing = [col for col in schema.columns if col not in found.names]
    if missing:
        raise DataError(f"{path}: not a {schema.name} file: missing column(s) {', '.join(missing)}; {remake}")
    for col, wanted in schema.types.items():
        if col in found.names and not _same_kind(found.field(col).type, wanted):
            raise DataError(f"{path}: not a {schema.name} file: column '{col}' is {found.field(col).type}, "
                            f"not {wanted}; {remake}")

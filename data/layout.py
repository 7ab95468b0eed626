"""The run directory's layout, named once: every task writes, and every reader finds, its files here.

    runs/<run_name>/run.yaml                       RUN_YAML
    runs/<run_name>/base_model/                    BASE_MODEL (base_model.json inside: BASE_MODEL_INFO)
    runs/<run_name>/round_<NN>/                    round_dir(run_dir, round_idx)
        generations.parquet, generate_meta.json    GENERATIONS_FILE, GENERATE_META
        pairs.parquet, judge_meta.json             PAIRS_FILE, JUDGE_META
        selected.parquet                           SELECTED_FILE: algorithm rest's supervised examples, in the
                                                   place of pairs.parquet (its judging shards: pairs.shards/)
        checkpoint/                                CHECKPOINT (training_log.json inside: TRAINING_LOG)
        eval.parquet, metrics.json                 EVAL_FILE, METRICS
        benchmarks.json                            BENCHMARKS (lm-eval's results, when evaluation.benchmarks is set)
        validation.parquet, selection.json         VALIDATION_FILE, SELECTION: the round scored on the validation
                                                   split, and what that decided (the kept round, early stopping)
        generate_work/, train_work/                GENERATE_WORK, TRAIN_WORK (resumable parts; not artifacts)
        generations.shards/, pairs.shards/,        GENERATIONS_SHARDS, PAIRS_SHARDS, EVAL_SHARDS: shard-NNNNN.parquet
        eval.shards/                               and shard-NNNNN.json per shard task (merged into the files above)
    runs/<run_name>/report.md, plots/              REPORT, PLOTS
    runs/<run_name>/best/, best.json               BEST, BEST_JSON: the kept round's model (from_pretrained-able) and
                                                   why; `best` links to one complete copy in best.copies/ (BEST_STORE),
                                                   switched in one rename, and best.json links to best/best.json

These names are the contract that notebooks and external checks rely on (the README's "Run the demo"):
never rename them. `RunLayout(run_dir)` spells the paths of one run.
"""

from __future__ import annotations

import re
from pathlib import Path

RUN_YAML = "run.yaml"
BASE_MODEL = "base_model"
BASE_MODEL_INFO = "base_model.json"
GENERATIONS_FILE = "generations.parquet"
GENERATE_META = "generate_meta.json"
GENERATE_WORK = "generate_work"
PAIRS_FILE = "pairs.parquet"
SELECTED_FILE = "selected.parquet"
JUDGE_META = "judge_meta.json"
GENERATIONS_SHARDS = "generations.shards"
PAIRS_SHARDS = "pairs.shards"
EVAL_SHARDS = "eval.shards"
CHECKPOINT = "checkpoint"
TRAINING_LOG = "training_log.json"
TRAIN_WORK = "train_work"
EVAL_FILE = "eval.parquet"
METRICS = "metrics.json"
BENCHMARKS = "benchmarks.json"
REPORT = "report.md"
PLOTS = "plots"
VALIDATION_FILE = "validation.parquet"
SELECTION = "selection.json"
BEST = "best"
BEST_JSON = "best.json"
BEST_STORE = "best.copies"
ROUND_DIR = re.compile(r"^round_(\d+)$")


def shard_range(count: int, shard_idx: int, shards: int) -> range:
    """Which of `count` items (parts, prompts) shard `shard_idx` of `shards` takes: a contiguous block, the
    blocks in order and as even as can be. Fixed by the counts alone, never by who runs the shard."""
    return range(shard_idx * count // shards, (shard_idx + 1) * count // shards)


def shard_name(shard_idx: int) -> str:
    return f"shard-{shard_idx:05d}"


def round_name(round_idx: int) -> str:
    """`round_01` for round 1: two digits, so round directories sort in order up to round 99."""
    return f"round_{round_idx:02d}"


def round_dir(run_dir: str | Path, round_idx: int) -> Path:
    return Path(run_dir) / round_name(round_idx)


def rounds_on_disk(run_dir: str | Path) -> list[int]:
    """The rounds that have a directory in `run_dir`, in order (none when it does not exist)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted(int(m.group(1)) for p in run_dir.iterdir() if (m := ROUND_DIR.match(p.name)) and p.is_dir())


class RunLayout:
    """The paths of one run directory."""

    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir)

    @property
    def run_yaml(self) -> Path:
        return self.dir / RUN_YAML

    @property
    def base_model(self) -> Path:
        return self.dir / BASE_MODEL

    @property
    def report(self) -> Path:
        return self.dir / REPORT

    @property
    def plots(self) -> Path:
        return self.dir / PLOTS

    def round_dir(self, round_idx: int) -> Path:
        return round_dir(self.dir, round_idx)

    def rounds(self) -> list[int]:
        return rounds_on_disk(self.dir)

    def generations(self, round_idx: int) -> Path:
        return self.round_dir(round_idx) / GENERATIONS_FILE

    def generate_meta(self, round_idx: int) -> Path:
        return self.round_dir(round_idx) / GENERATE_META

    def generate_work(self, round_idx: int) -> Path:
        return self.round_dir(round_idx) / GENERATE_WORK

    def generation_shard(self, round_idx: int, shard_idx: int) -> tuple[Path, Path]:
        """(Parquet part, stats JSON) written by generation shard `shard_idx` of round `round_idx`."""
        base = self.round_dir(round_idx) / GENERATIONS_SHARDS / shard_name(shard_idx)
        return base.with_suffix(".parquet"), base.with_suffix(".json")

    def pairs_shard(self, round_idx: int, shard_idx: int) -> tuple[Path, Path]:
        """(Parquet part, stats JSON) written by judging shard `shard_idx` of round `round_idx`."""
        base = self.round_dir(round_idx) / PAIRS_SHARDS / shard_name(shard_idx)
        return base.with_suffix(".parquet"), base.with_suffix(".json")

    def eval_shard(self, round_idx: int, shard_idx: int) -> tuple[Path, Path]:
        """(Parquet part, judgements JSON) written by evaluation shard `shard_idx` of round `round_idx`."""
        base = self.round_dir(round_idx) / EVAL_SHARDS / shard_name(shard_idx)
        return base.with_suffix(".parquet"), base.with_suffix(".json")

    def pairs(self, round_idx: int) -> Path:
        return self.round_dir(round_idx) / PAIRS_FILE

    def selected(self, round_idx: int) -> Path:
        return self.round_dir(round_idx) / SELECTED_FILE

    def judge_meta(self, round_idx: int) -> Path:
        return self.round_dir(round_idx) / JUDGE_META

    def checkpoint(self, round_idx: int) -> Path:
        return self.round_dir(round_idx) / CHECKPOINT

    def training_log(self, round_idx: int) -> Path:
        return self.checkpoint(round_idx) / TRAINING_LOG

    def train_work(self, round_idx: int) -> Path:
        return self.round_dir(round_idx) / TRAIN_WORK

    def eval(self, round_idx: int) -> Path:
        return self.round_dir(round_idx) / EVAL_FILE

    def metrics(self, round_idx: int) -> Path:
        return self.round_dir(round_idx) / METRICS

    def benchmarks(self, round_idx: int) -> Path:
        return self.round_dir(round_idx) / BENCHMARKS

    def validation(self, round_idx: int) -> Path:
        return self.round_dir(round_idx) / VALIDATION_FILE

    def selection(self, round_idx: int) -> Path:
        return self.round_dir(round_idx) / SELECTION

    @property
    def best(self) -> Path:
        return self.dir / BEST

    @property
    def best_json(self) -> Path:
        return self.dir / BEST_JSON

    @property
    def best_store(self) -> Path:
        return self.dir / BEST_STORE

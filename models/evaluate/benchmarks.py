"""lm-evaluation-harness on a round's policy: the Benchmark stage.

    from models.evaluate.benchmarks import check_benchmarks, run_benchmarks
    check_benchmarks(specs)                           # before any compute: lm-eval installed, names exist, files parse
    records = run_benchmarks(specs, model, tokenizer) # one record per configs.evaluation.BenchmarkSpec

The papers this tool reproduces report standard benchmarks per iteration through lm-eval (SPIN: the Open
LLM Leaderboard tasks). This runs lm-eval's own Python API (`lm_eval.simple_evaluate`) on the policy
exactly as the pipeline uses it: the loaded model object (the base weights plus the round's LoRA adapter,
unmerged, from models.load.loading.load_policy) is handed to lm-eval's `HFLM(pretrained=model,
tokenizer=tokenizer)`, so lm-eval scores the trained policy itself, not a merged export reloaded by path;
with the adapter left unmerged that is what lm-eval computes itself with
`--model hf --model_args pretrained=<base>,peft=<round>/checkpoint/adapter` (tests/stages/evaluate/test_benchmarks.py
compares the two).

Chat template: off unless a benchmark sets `apply_chat_template: true`. Off is lm-eval's default and how
the Open LLM Leaderboard (v1) scored the models whose figures SPIN reports, so figures compare with
theirs; on, every request is wrapped in the tokenizer's chat template (the one the pipeline generates and
trains with: the tokenizer's own, or the plain User/Assistant template models.load.loading gives a tokenizer
that has none), which suits chat models on generative tasks. Few-shot examples then go in as turns of
the conversation (lm-eval's `fewshot_as_multiturn`, its default).

A local task YAML is loaded with lm-eval's own loader (its `!function` tags and `include:` resolved
beside the file) and handed to lm-eval as a config; a relative `dataset_kwargs.data_files` path is
taken from the YAML's own directory when the file is there (lm-eval alone would look for it where it
runs), so a task and its data can live together and be named from any directory.

Each record keeps lm-eval's figures with their standard errors (its `<metric>_stderr`), the task's
version, the lm-eval version, n (the documents scored) and the settings, so that a result is reused only
for the same settings, task content and model (tasks/benchmark.py).
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import time
from pathlib import Path

from common.errors import RecipeError

log = logging.getLogger("selfplay")

INSTALL = "pip install -e '.[eval]' (lm-evaluation-harness; or pip install 'lm-eval>=0.4.13,<0.5')"


def require_lm_eval():
    """The lm_eval module, or a RecipeError that says how to install it."""
    try:
        import lm_eval
    except ImportError:
        raise RecipeError(f"evaluation.benchmarks needs lm-evaluation-harness, which is not installed: {INSTALL}") from None
    return lm_eval


def lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def _where(index: int) -> str:
    return f"evaluation.benchmarks[{index}]"


def task_file_config(spec, index: int = 0) -> dict:
    """A local task YAML as the config lm-eval builds the task from, or a RecipeError naming the file."""
    require_lm_eval()
    from lm_eval.tasks._yaml_loader import load_yaml

    path = Path(spec.task).expanduser()
    if not path.is_file():
        raise RecipeError(f"{_where(index)}: task file {spec.task} does not exist (a path relative to where the command runs)")
    try:
        config = load_yaml(path, resolve_func=True)
    except Exception as exc:  # YAML syntax, a missing include, a !function that does not import: all lm-eval's own errors
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RecipeError(f"{_where(index)}: {spec.task} is not a task file lm-eval can read: {first}") from None
    if not isinstance(config.get("task") or config.get("group"), str):
        raise RecipeError(f"{_where(index)}: {spec.task} names no 'task' (or 'group'): not an lm-eval task file")
    kwargs = config.get("dataset_kwargs")
    if isinstance(kwargs, dict) and kwargs.get("data_files") is not None:
        kwargs["data_files"] = _beside(path.parent, kwargs["data_files"], spec.task, index)
    return config


def _beside(directory: Path, data_files, task_file: str, index: int):
    """`data_files` (a path, a list, or a split -> path(s) mapping) with relative paths found beside the YAML."""
    if isinstance(data_files, dict):
        return {split: _beside(directory, files, task_file, index) for split, files in data_files.items()}
    if isinstance(data_files, list):
        return [_beside(directory, files, task_file, index) for files in data_files]
    path = Path(str(data_files)).expanduser()
    if "://" in str(data_files) or any(c in str(data_files) for c in "*?["):
        return data_files  # a URL or a glob: left to datasets
    if not path.is_absolute() and (directory / path).is_file():
        return str((directory / path).resolve())
    if not path.is_file():
        raise RecipeError(f"{_where(index)}: {task_file}: data file {data_files} not found (beside the task file, or from "
                          "where the command runs)")
    return str(path.resolve())


def task_content_hash(spec) -> str | None:
    """sha256 of a local task file and the local data files it reads (None for a task named in lm-eval):
    a result is reused only while these are unchanged."""
    if not spec.is_file:
        return None
    digest = hashlib.sha256(Path(spec.task).expanduser().read_bytes())
    kwargs = task_file_config(spec).get("dataset_kwargs") or {}
    for file in sorted(_local_files(kwargs.get("data_files"))):
        digest.update(Path(file).read_bytes())
    return digest.hexdigest()


def _local_files(data_files) -> list[str]:
    if isinstance(data_files, dict):
        return [f for files in data_files.values() for f in _local_files(files)]
    if isinstance(data_files, list):
        return [f for files in data_files for f in _local_files(files)]
    return [str(data_files)] if data_files is not None and Path(str(data_files)).is_file() else []


def _task_manager(specs):
    """lm-eval's task index: its built-in tasks only when a benchmark names one (indexing them all takes seconds)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=any(not spec.is_file for spec in specs))


def check_benchmarks(specs) -> None:
    """Before any compute: lm-eval is installed, every task name exists in it, every task file parses and
    its local data files are there. One RecipeError naming the entry at fault."""
    if not specs:
        return
    require_lm_eval()
    for index, spec in enumerate(specs):
        if spec.is_file:
            task_file_config(spec, index)
    named = [(index, spec) for index, spec in enumerate(specs) if not spec.is_file]
    if named:
        known = set(_task_manager(specs).all_tasks)
        for index, spec in named:
            if spec.task not in known:
                close = difflib.get_close_matches(spec.task, sorted(known), n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise RecipeError(f"{_where(index)}: lm-eval {lm_eval_version()} has no task, group or tag named "
                                  f"'{spec.task}'{hint}; a task file must end in .yaml")


def _metric_name(key: str) -> str:
    """lm-eval's 'acc,none' as 'acc', and 'exact_match,strict-match' as 'exact_match (strict-match)'."""
    metric, _, filter_name = key.partition(",")
    return metric if filter_name in ("", "none") else f"{metric} ({filter_name})"


def _number(value):
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def results_record(output: dict) -> dict:
    """What one simple_evaluate call's output says, per lm-eval task (and group) it ran: each metric with its
    standard error, the task's version, n and the shots."""
    tasks = {}
    n_samples = output.get("n-samples") or {}
    for name, entries in {**(output.get("results") or {}), **(output.get("groups") or {})}.items():
        metrics = {}
        for key, value in entries.items():
            if key == "alias" or key.startswith("sample_len") or "_stderr," in key or _number(value) is None:
                continue
            metric, _, filter_name = key.partition(",")
            stderr = entries.get(f"{metric}_stderr,{filter_name}")
            metrics[_metric_name(key)] = {"value": float(value), "stderr": _number(stderr)}
        tasks[name] = {
            "metrics": metrics,
            "version": (output.get("versions") or {}).get(name),
            "n": (n_samples.get(name) or {}).get("effective"),
            "num_fewshot": (output.get("n-shot") or {}).get(name),
            "higher_is_better": (output.get("higher_is_better") or {}).get(name),
        }
    return tasks


def run_benchmark(spec, model, tokenizer, task_manager) -> dict:
    """lm-eval's simple_evaluate of one benchmark on `model` (already loaded: the round's policy)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    task = task_file_config(spec) if spec.is_file else spec.task
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=spec.batch_size)
    started = time.time()
    output = lm_eval.simple_evaluate(
        model=lm, tasks=[task], num_fewshot=spec.num_fewshot, limit=spec.limit,
        apply_chat_template=spec.apply_chat_template, task_manager=task_manager, log_samples=False,
    )
    return {"tasks": results_record(output), "seconds": round(time.time() - started, 1),
            "seeds": {key: output["config"].get(key) for key in ("random_seed", "numpy_seed", "torch_seed", "fewshot_seed")}}


def run_benchmarks(specs, model, tokenizer) -> list[dict]:
    """One record per spec: lm-eval's results on `model`, with the settings and versions they depend on."""
    require_lm_eval()
    task_manager = _task_manager(specs)
    version = lm_eval_version()
    records = []
    for spec in specs:
        log.info("lm-eval %s: %s", version, spec.label)
        records.append({"label": spec.label, "settings": spec.settings(), "content_sha256": task_content_hash(spec),
                        "lm_eval_version": version, **run_benchmark(spec, model, tokenizer, task_manager)})
    return records


def spec_key(spec) -> tuple:
    """What a result depends on besides the model: the settings and a local task's content."""
    return (tuple(sorted(spec.settings().items(), key=lambda kv: kv[0])), task_content_hash(spec))


def _record_key(record: dict) -> tuple:
    return (tuple(sorted(record["settings"].items(), key=lambda kv: kv[0])), record.get("content_sha256"))


def still_valid(records: list[dict], specs, model_stamp: str) -> list[dict | None]:
    """For each of `specs`, its record in `records` if one was made from this model, else None."""
    by_key = {_record_key(record): record for record in records if record.get("model_stamp") == model_stamp}
    return [by_key.get(spec_key(spec)) for spec in specs]


def metrics_rows(records: list[dict]) -> list[dict]:
    """The records as metrics.json's flat rows: one per benchmark, lm-eval task and metric, value ± stderr."""
    rows = []
    for record in records:
        for task, result in record["tasks"].items():
            for metric, figure in result["metrics"].items():
                rows.append({"benchmark": record["label"], "task": task, "metric": metric, "value": figure["value"],
                             "se": figure["stderr"], "n": result.get("n"), "num_fewshot": result.get("num_fewshot"),
                             "task_version": result.get("version"), "lm_eval_version": record["lm_eval_version"]})
    return rows

"""The evaluation settings that go beyond the held-out prompts: lm-eval benchmarks and a referee judge.

    from configs.evaluation import benchmark_specs
    specs = benchmark_specs(recipe.evaluation.benchmarks, "configs/my.yaml")   # [BenchmarkSpec, ...]

`evaluation.benchmarks` is a list; each entry is an lm-evaluation-harness task, a task name (`gsm8k`)
or a local task YAML (`my_tasks/sums_mc.yaml`, a path relative to where the command runs), written
as a string or as a mapping with optional settings:

    evaluation:
      benchmarks:
        - gsm8k
        - {task: gsm8k, num_fewshot: 5, limit: 200}
        - {task: data/fixtures/lm_eval/sums_mc.yaml, batch_size: 16}

`evaluation.judge_model` names the referee's model when `evaluation.judge` is a model judge or the
self-judge, so the figures can be judged apart from the judge that made the training pairs.

These checks run when the recipe loads (Recipe.__post_init__ calls `check_evaluation`); whether a task
name exists in lm-eval and whether a task file parses are checked before any compute by
tasks/requirements.py, which needs lm-eval installed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from common.errors import RecipeError

TASK_FILE_SUFFIXES = (".yaml", ".yml")
MODEL_REFEREES = ("pairrm", "reward_model", "self")


@dataclass(frozen=True)
class BenchmarkSpec:
    """One entry of evaluation.benchmarks."""

    task: str = field(metadata={"help": "An lm-eval task, group or tag name, or a local task YAML file."})
    num_fewshot: int | None = field(default=None, metadata={"help": "Few-shot examples; null: the task's own default (0 when it has none)."})
    limit: int | float | None = field(
        default=None, metadata={"help": "At most this many documents (a fraction below 1: that share); null: all."}
    )
    batch_size: int = field(default=8, metadata={"help": "Sequences lm-eval runs together (does not change the results)."})
    apply_chat_template: bool = field(
        default=False,
        metadata={"help": "Wrap each request in the tokenizer's chat template (lm-eval's apply_chat_template); false, "
                          "lm-eval's default, scores the raw text as the Open LLM Leaderboard (v1) did for SPIN."},
    )

    @property
    def is_file(self) -> bool:
        return self.task.endswith(TASK_FILE_SUFFIXES)

    @property
    def label(self) -> str:
        """How report.md names it: the task, and the settings that differ from the defaults."""
        parts = [self.task]
        if self.num_fewshot is not None:
            parts.append(f"{self.num_fewshot}-shot")
        if self.limit is not None:
            parts.append(f"limit {self.limit:g}")
        if self.apply_chat_template:
            parts.append("chat template")
        return " ".join(parts)

    def settings(self) -> dict:
        """What changes the results (batch size does not): the identity of a result, with the task's content."""
        return {"task": self.task, "num_fewshot": self.num_fewshot, "limit": self.limit,
                "apply_chat_template": self.apply_chat_template}


BENCHMARK_KEYS = [f.name for f in dataclasses.fields(BenchmarkSpec)]


def benchmark_specs(entries: list, where: str) -> list[BenchmarkSpec]:
    """evaluation.benchmarks as specs, or a RecipeError naming the entry and key at fault."""
    specs = []
    for i, entry in enumerate(entries):
        key = f"evaluation.benchmarks[{i}]"
        if isinstance(entry, str):
            entry = {"task": entry}
        if not isinstance(entry, dict):
            raise RecipeError(f"{where}: {key} must be a task name, a task file or a mapping with 'task', got {entry!r}")
        unknown = sorted(set(entry) - set(BENCHMARK_KEYS))
        if unknown:
            raise RecipeError(f"{where}: unknown key '{key}.{unknown[0]}' (known: {', '.join(BENCHMARK_KEYS)})")
        task = entry.get("task")
        if not isinstance(task, str) or not task.strip():
            raise RecipeError(f"{where}: {key}.task must be an lm-eval task name or a task YAML file, got {task!r}")
        checks = {
            "num_fewshot": lambda v: v is None or (_is_int(v) and v >= 0),
            "limit": lambda v: v is None or (_is_number(v) and v > 0 and (_is_int(v) or v < 1)),
            "batch_size": lambda v: _is_int(v) and v > 0,
            "apply_chat_template": lambda v: isinstance(v, bool),
        }
        wants = {"num_fewshot": "a count >= 0", "limit": "a positive count, or a fraction below 1",
                 "batch_size": "a positive count", "apply_chat_template": "true or false"}
        for name, ok in checks.items():
            if name in entry and not ok(entry[name]):
                raise RecipeError(f"{where}: {key}.{name} must be {wants[name]}, got {entry[name]!r}")
        specs.append(BenchmarkSpec(**{**entry, "task": task.strip()}))
    seen: dict[tuple, int] = {}
    for i, spec in enumerate(specs):
        identity = tuple(spec.settings().values())
        if identity in seen:
            raise RecipeError(f"{where}: evaluation.benchmarks[{i}] repeats evaluation.benchmarks[{seen[identity]}]")
        seen[identity] = i
    return specs


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_evaluation(recipe, where: str) -> None:
    """The evaluation keys that must agree with each other, checked when the recipe loads."""
    ev = recipe.evaluation
    benchmark_specs(ev.benchmarks, where)
    if ev.judge_model is not None and ev.judge not in MODEL_REFEREES:
        raise RecipeError(f"{where}: evaluation.judge_model needs evaluation.judge set to one of {', '.join(MODEL_REFEREES)} "
                          f"(the referee it names), not {ev.judge}")
    if ev.judge in ("pairrm", "reward_model") and not (ev.judge_model or recipe.judge.model):
        raise RecipeError(f"{where}: evaluation.judge {ev.judge} needs evaluation.judge_model (or judge.model): a model path or hub id")
    for i, entry in enumerate(recipe.rounds):
        # Every round is compared on the same benchmarks, and one Benchmark task per round runs the run's list.
        if isinstance(entry, dict) and isinstance(entry.get("evaluation"), dict) and "benchmarks" in entry["evaluation"]:
            raise RecipeError(f"{where}: rounds[{i}].evaluation.benchmarks cannot change between rounds "
                              "(every round is measured on the same benchmarks; set them once under evaluation:)")

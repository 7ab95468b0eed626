"""A run directory edited by hand, found before any compute and said in one line each.

`check_run_state(iterate, evaluate_task)` walks the rounds' tasks (up to `--rounds`, or the last round on disk if
that is further) and looks at what is on disk:

- an artifact replaced by a file of another kind (a Parquet file without its columns, JSON that does
  not parse) is refused: delete it and the run makes it again;
- a file that is missing while files made from it remain (say `round_01/` deleted, `round_02/` kept)
  is said, with the rounds that will run again and replace those files; if some of them lie beyond
  `--rounds`, where this command would leave them made from the old files, it is refused;
- a directory output (a checkpoint, base_model) without `_SUCCESS` is said: it is incomplete or was
  edited, and will be remade.

run.yaml itself is checked when the recipe is loaded (tasks/base.py check_run_dir): an edited
recipe, YAML that does not parse, or a file without a recipe is refused.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import luigi

from common.errors import DataError
from data.layout import round_name, rounds_on_disk
from tasks.base import SUCCESS, DirTarget, ShardTask

log = logging.getLogger("selfplay")


def _tasks(roots) -> list:
    seen, order, stack = set(), [], list(roots)
    while stack:
        task = stack.pop()
        if task.task_id in seen:
            continue
        seen.add(task.task_id)
        order.append(task)
        stack.extend(luigi.task.flatten(task.requires()))
    return order


def _outputs(task) -> list:
    return luigi.task.flatten(task.output())


def _present(task) -> bool:
    return task.outputs_present()


def _check_kind(path: Path) -> None:
    from data.schema import ARTIFACT_SCHEMAS, check_artifact_schema

    if path.name in ARTIFACT_SCHEMAS and path.is_file():
        check_artifact_schema(path, ARTIFACT_SCHEMAS[path.name])
    elif path.suffix == ".json" and path.is_file():
        try:
            json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise DataError(f"{path}: not valid JSON ({exc}); delete it and the run makes it again") from None


def _rounds_text(rounds) -> str:
    rounds = sorted(rounds)
    return ("round " if len(rounds) == 1 else "rounds ") + ", ".join(map(str, rounds))


def check_run_state(iterate, evaluate_task: Callable[[int], luigi.Task]) -> list[str]:
    """Log (and return) one line per hand edit that makes rounds run again; raise DataError for one
    this command cannot repair. `evaluate_task(r)` is round r's last task (or a list of its last tasks:
    Evaluate and Select): every task of the rounds is reached from it."""
    run_dir: Path = iterate.run_dir
    if not run_dir.is_dir():
        return []
    last = max([iterate.rounds, *rounds_on_disk(run_dir)])
    tasks = _tasks(luigi.task.flatten([evaluate_task(r) for r in range(last + 1)]))

    for task in tasks:
        for target in _outputs(task):
            _check_kind(Path(target.path))

    present = {task.task_id: _present(task) for task in tasks}
    upstream: dict[str, set[str]] = {}  # every task a task is made from, directly or not

    def made_from(task) -> set[str]:
        if task.task_id not in upstream:
            deps = luigi.task.flatten(task.requires())
            upstream[task.task_id] = set().union(*({d.task_id} | made_from(d) for d in deps)) if deps else set()
        return upstream[task.task_id]

    by_id = {task.task_id: task for task in tasks}
    lines = []
    # A "gap": a task whose outputs are missing although everything it is made from is there; what it
    # will make anew replaces whatever downstream of it is still on disk.
    gaps = [t for t in tasks if _outputs(t) and not present[t.task_id] and all(present[u] for u in made_from(t))]
    for gap in sorted(gaps, key=lambda t: (getattr(t, "round_idx", 0), t.task_family)):
        downstream = [by_id[i] for i in by_id if gap.task_id in made_from(by_id[i])]
        kept = [t for t in downstream if _outputs(t) and present[t.task_id]]
        # A missing shard is said as its stage's artifact: the file a user knows, and one line for all shards.
        named = gap.clone(gap.merge_family) if isinstance(gap, ShardTask) else gap
        first = next(Path(t.path) for t in _outputs(named) if not t.exists())
        unfinished = [Path(t.path) for t in _outputs(gap) if isinstance(t, DirTarget) and Path(t.path).is_dir()]
        if not kept and not unfinished:
            continue  # an ordinary unfinished run: resuming it is what the command does anyway
        what = (f"{unfinished[0]} has no {SUCCESS} (incomplete, or edited by hand)" if unfinished
                else f"{first} is missing")
        if not kept:
            lines.append(f"{what}: {named.short_name} will run again and replace it")
            continue
        beyond = sorted({t.round_idx for t in kept if getattr(t, "round_idx", 0) > iterate.rounds})
        kept_rounds = sorted({t.round_idx for t in kept if getattr(t, "round_idx", None) is not None})
        if beyond:
            raise DataError(
                f"{what} while files made from it remain in {_rounds_text(kept_rounds)}; {_rounds_text(beyond)} "
                f"lie beyond --rounds {iterate.rounds} and would be left made from the old files: "
                f"run with --rounds {max(beyond)}, or delete {', '.join(round_name(r) for r in beyond)}"
            )
        rerun = {t.round_idx for t in [gap, *downstream] if getattr(t, "round_idx", None)}
        lines.append(f"{what} while files made from it remain in {_rounds_text(kept_rounds)}: "
                     f"{_rounds_text(rerun)} will run again and replace them")
    lines = list(dict.fromkeys(lines))
    for line in lines:
        log.warning("%s", line)
    return lines

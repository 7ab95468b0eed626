"""How long Luigi takes to decide that nothing is left to do, for an N-round run that is already complete.

    python bench/bench_scheduling.py --rounds 10
    python bench/bench_scheduling.py --rounds 3 --shards 8   # Generate, Judge, Evaluate in 8 shard tasks each

Every output of an N-round run is faked (empty files, `_SUCCESS` in directory outputs, a real run.yaml),
then the completeness of every round's Evaluate and Select and of the Report is timed and the checks of
outputs are counted: with
completeness re-walked through every dependency path this grows about 3^N (Train(r) reaches Train(r-1)
by three paths); with it computed once per task per check it grows linearly.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def fake_complete_run(task) -> None:
    """Create every output of `task` and of everything it requires, as empty placeholders."""
    import luigi
    import yaml

    import pyarrow as pa
    import pyarrow.parquet as pq

    from data.layout import RUN_YAML, SELECTION
    from data.schema import ARTIFACT_SCHEMAS
    from tasks.base import DirTarget

    seen, todo = set(), [task]
    while todo:
        current = todo.pop()
        if current.task_id in seen:
            continue
        seen.add(current.task_id)
        for target in luigi.task.flatten(current.output()):
            path = Path(target.path)
            if isinstance(target, DirTarget):
                path.mkdir(parents=True, exist_ok=True)
                (path / "_SUCCESS").write_text("faked\n")
            elif path.name == RUN_YAML:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(yaml.safe_dump({"recipe": current.config.to_dict()}))
            elif path.name in ARTIFACT_SCHEMAS:  # the preflight reads artifacts' footers: an empty table of its columns
                path.parent.mkdir(parents=True, exist_ok=True)
                columns = ARTIFACT_SCHEMAS[path.name].columns
                pq.write_table(pa.table({name: pa.array([], type=kind) for name, kind in columns.items()}), path)
            elif path.name == SELECTION:  # the record Iterate reads to decide which rounds to hand out
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(fake_selection(current.round_idx)))
            elif path.suffix == ".json":
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("{}")
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()
        todo.extend(luigi.task.flatten(current.requires()))


DEMO_RECIPE = Path(__file__).resolve().parents[1] / "configs" / "demo_spin.yaml"


def fake_selection(round_idx: int) -> dict:
    """A selection record of a run whose rounds never beat the base (data.selection.decide)."""
    from configs.recipe import IterateConfig
    from data.selection import decide

    figures = {"accuracy": {"mean": 0.0, "se": 0.0, "n": 1}}
    record = decide(0, IterateConfig(), "accuracy", None, None, figures)
    for r in range(1, round_idx + 1):
        record = decide(r, IterateConfig(), "accuracy", record, {"diff": 0.0, "se": 0.0, "n": 1, "z": 0.0}, figures)
    return record


def sharded_recipe(shards: int, directory: Path) -> str:
    """The demo recipe with its three sharded stages split into `shards` tasks each (the demo's own: 1)."""
    import yaml

    if shards == 1:
        return str(DEMO_RECIPE)
    recipe = yaml.safe_load(DEMO_RECIPE.read_text())
    for section in ("generation", "judge", "evaluation"):
        recipe.setdefault(section, {})["shards"] = shards
    recipe["name"] = "demo_spin"
    path = directory / f"demo_spin_{shards}_shards.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def measure(rounds: int, runs_dir: Path, recipe: str = str(DEMO_RECIPE)) -> tuple[float, int]:
    """(seconds, output-existence checks) of one Iterate(rounds).complete() on a complete run."""
    import luigi

    import pipeline  # noqa: F401 - registers the tasks
    from tasks.evaluate import Evaluate
    from tasks.report import Report

    from tasks.rounds import Select

    tasks = [Evaluate(recipe=recipe, runs_dir=str(runs_dir), round_idx=r) for r in range(1, rounds + 1)]
    tasks += [Select(recipe=recipe, runs_dir=str(runs_dir), round_idx=r) for r in range(rounds + 1)]
    tasks.append(Report(recipe=recipe, runs_dir=str(runs_dir), rounds=rounds))
    for task in tasks:
        fake_complete_run(task)
    checks = [0]
    original = luigi.LocalTarget.exists

    def counted(self):
        checks[0] += 1
        return original(self)

    luigi.LocalTarget.exists = counted
    try:
        start = time.perf_counter()
        assert all(task.complete() for task in tasks)
        return time.perf_counter() - start, checks[0]
    finally:
        luigi.LocalTarget.exists = original


def build_seconds(rounds: int, runs_dir: Path, recipe: str = str(DEMO_RECIPE)) -> float:
    """Wall time of luigi.build([Iterate(rounds)]) on the faked complete run: scheduling alone."""
    import luigi

    from tasks.iterate import Iterate

    start = time.perf_counter()
    assert luigi.build([Iterate(recipe=recipe, runs_dir=str(runs_dir), rounds=rounds)], local_scheduler=True, log_level="ERROR")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--shards", type=int, default=1, help="shard tasks of Generate, Judge and Evaluate (default 1)")
    args = parser.parse_args()
    for rounds in range(1, args.rounds + 1):
        with tempfile.TemporaryDirectory() as tmp:
            recipe = sharded_recipe(args.shards, Path(tmp))
            seconds, checks = measure(rounds, Path(tmp), recipe)
            line = f"rounds {rounds:2d}: Evaluate(1..N), Select(0..N) and Report complete(): {checks:8d} output checks, {seconds:8.3f} s"
            if rounds == args.rounds:
                line += f"; luigi.build(Iterate) with nothing to run: {build_seconds(rounds, Path(tmp), recipe):.2f} s"
        print(line, flush=True)


if __name__ == "__main__":
    main()

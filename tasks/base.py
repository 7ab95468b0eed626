"""What every selfplay task shares: the run directory, the recipe, atomic outputs and completeness.

- `RunTask` carries the three parameters every task has (`--recipe`, `--run-name`, `--runs-dir`),
  loads the recipe once, and refuses a run directory whose run.yaml was written by another recipe.
- A task is complete only when its outputs exist *and* everything it requires is complete, so
  deleting one round's outputs reruns that round and every round after it, nothing before.
- `FileTarget` and `DirTarget` write atomically (common/atomic.py): into a temporary sibling, then one
  rename. A directory output is complete only once `_SUCCESS` is inside it, and `_SUCCESS` is written last.
- One writer per run directory: making a task takes the run's lock (tasks/lock.py), and every
  task's run() is guarded by it and by the SIGTERM/SIGINT handling of common/interrupt.py.
- A write that fills the disk leaves no temporary behind and fails in one line (common/disk.py).
- One log line per finished task: its outputs and its wall time.
- Importing it (every task module does) sets up logging: the `selfplay` logger prints one line per
  event, and errors a user caused (common.errors.SelfplayError) are logged as one line, not a
  traceback. It also gives Luigi the package's own settings (LUIGI_DEFAULTS) wherever the user's
  configuration has none, so the command behaves the same from any directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import inspect
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import uuid
from functools import cached_property
from pathlib import Path

import luigi
import luigi.cmdline_parser
import luigi.worker
import yaml

from common import interrupt
from common.atomic import atomic_path, atomic_write_json
from common.errors import DataError, ModelError, RecipeError, RunLockedError, SelfplayError
from common.quiet import quiet_library_noise
from configs.recipe import CONFIG_DIR, load_recipe, recipe_from_dict
from data.layout import RunLayout
from tasks import lock

DEFAULT_RECIPE = CONFIG_DIR / "demo_spin.yaml"

log = logging.getLogger("selfplay")

# transformers draws a progress bar for every weight load; a round loads several models.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


class _OneLineUserErrors(logging.Filter):
    """Luigi logs task failures with their traceback; for a user's mistake the message is enough."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], SelfplayError):
            record.msg = f"{record.getMessage()}: selfplay: {record.exc_info[1]}"
            record.args = ()
            record.exc_info = None
            record.exc_text = None
        return True


def _setup_logging() -> None:
    quiet_library_noise()
    logging.getLogger("luigi-interface").addFilter(_OneLineUserErrors())
    log = logging.getLogger("selfplay")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("selfplay: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


_setup_logging()

# The settings of the shipped luigi.cfg. Luigi reads luigi.cfg from the working directory only (or
# /etc/luigi, or LUIGI_CONFIG_PATH): run from anywhere else, the command would wait for a remote
# scheduler and a failed run would exit 0. `luigi` imports --module before it reads [retcode] or
# builds its scheduler, so values set here at import time apply; an option the user's configuration
# sets is never overridden. (A central scheduler: set `[core] local_scheduler = false` there.)
LUIGI_DEFAULTS = {
    # Luigi's own INFO lines (scheduling chatter, the execution summary) behind `--log-level INFO`: by default a
    # command prints our one line per finished task, progress bars, warnings and errors.
    "core": {"local_scheduler": True, "log_level": "WARNING"},
    "worker": {"check_complete_on_run": True, "keep_alive": False},
    "resources": {"gpu": 1},  # every task that holds the GPU asks for gpu=1: two never share it
    "retcode": {  # any failure exits non-zero
        "already_running": 10, "missing_data": 20, "not_run": 25, "task_failed": 30,
        "scheduling_error": 35, "unhandled_exception": 40,
    },
}


def _apply_luigi_defaults() -> None:
    import luigi.configuration
    from luigi.configuration import LuigiTomlParser

    config = luigi.configuration.get_config()
    typed = isinstance(config, LuigiTomlParser)  # TOML keeps values typed; the .cfg parser holds text
    for section, options in LUIGI_DEFAULTS.items():
        for option, value in options.items():
            if not config.has_option(section, option):
                text = str(value).lower() if isinstance(value, bool) else str(value)
                config.set(section, option, value if typed else text)


_apply_luigi_defaults()

SUCCESS = "_SUCCESS"
PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "datasets", "luigi", "pandas", "pyarrow")


class FileTarget(luigi.LocalTarget):
    """A file written through `temporary_path()`: readers see the old file, or the whole new one."""

    @contextlib.contextmanager
    def temporary_path(self):
        with atomic_path(self.path) as tmp:
            yield str(tmp)


class DirTarget(luigi.LocalTarget):
    """A directory that exists, for Luigi, only once `_SUCCESS` is in it."""

    def exists(self) -> bool:
        return (Path(self.path) / SUCCESS).is_file()

    @contextlib.contextmanager
    def temporary_path(self):
        # An existing copy is replaced whole: it is incomplete (no _SUCCESS) or being redone.
        with atomic_path(self.path, directory=True) as tmp:
            yield str(tmp)
            # A unique stamp: work directories downstream compare it to notice their inputs were redone.
            (tmp / SUCCESS).write_text(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {uuid.uuid4().hex}\n")


def input_stamp(target: luigi.LocalTarget) -> str:
    path = Path(target.path)
    if isinstance(target, DirTarget):
        return (path / SUCCESS).read_text().strip()
    stat = path.stat()
    return f"{stat.st_mtime_ns}-{stat.st_size}"


def prepare_work_dir(work_dir: Path, inputs: list[luigi.LocalTarget]) -> Path:
    """A task's scratch space for resuming (parts, trainer checkpoints). It is kept across a kill, and
    wiped when the task's inputs were rewritten since it was made, so stale parts are never reused."""
    stamps = {target.path: input_stamp(target) for target in inputs}
    record = work_dir / "inputs.json"
    if work_dir.exists() and _read_json(record) != stamps:
        shutil.rmtree(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(record, stamps)
    return work_dir


def prepare_shared_work_dir(work_dir: Path, inputs: list[luigi.LocalTarget]) -> Path:
    """prepare_work_dir for a work directory several shard tasks share (each writes parts of its own in
    it): under an flock of the directory that holds it, so two shards starting together never both
    wipe a stale one, nor one wipe the parts the other has begun."""
    parent = Path(work_dir).parent
    parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(parent, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return prepare_work_dir(work_dir, inputs)
    finally:
        os.close(fd)  # closing the last descriptor drops the lock


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # missing, or damaged: either way the work directory is not to be trusted
        return None


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def check_run_dir(run_dir: Path, recipe) -> None:
    """A run directory belongs to one recipe: rerunning it with a changed recipe is refused."""
    run_yaml = RunLayout(run_dir).run_yaml
    if not run_yaml.is_file():
        return
    start_over = "restore it, or delete the run directory to start over"
    try:
        record = yaml.safe_load(run_yaml.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise RecipeError(f"{run_yaml}: not valid YAML{where} (edited by hand?); {start_over}") from None
    if not isinstance(record, dict) or not isinstance(record.get("recipe"), dict):
        raise RecipeError(f"{run_yaml}: has no 'recipe' mapping (edited by hand?); {start_over}")
    recorded = record["recipe"]
    try:  # a key the recipe gained after the run was made counts as its default, not as a change
        recorded = recipe_from_dict(recorded, str(run_yaml)).to_dict()
    except RecipeError:  # a key since removed or renamed: compared as recorded, so it shows as changed
        pass
    current = recipe.to_dict()
    # Tracking changes nothing the run computes: a run may start or stop logging to a tracker between commands.
    # Benchmarks only add outputs (a Benchmark task per round; nothing a round computes depends on them), so
    # a finished run may gain or lose some: Iterate records the new list in run.yaml (record_benchmarks).
    changed = sorted(key for key in _diff_keys(recorded, current) if not key.startswith("tracking") and key not in MAY_CHANGE)
    if changed:
        raise RecipeError(
            f"{run_yaml} was made by a different recipe (changed: {', '.join(changed[:5])}); "
            "use another --run-name, or delete the run directory to start over"
        )


MAY_CHANGE = ("evaluation.benchmarks",)


def record_benchmarks(run_dir: Path, recipe) -> None:
    """run.yaml's recipe with the benchmarks `recipe` asks for now, where they changed since it was written
    (check_run_dir lets them): run.yaml stays the record of what the run's outputs were made by."""
    run_yaml = RunLayout(run_dir).run_yaml
    if not run_yaml.is_file():
        return
    record = yaml.safe_load(run_yaml.read_text())
    evaluation = record["recipe"].setdefault("evaluation", {})
    if evaluation.get("benchmarks", []) == recipe.evaluation.benchmarks:
        return
    log.info("%s: evaluation.benchmarks changed; the Benchmark tasks run what is new", run_yaml)
    evaluation["benchmarks"] = recipe.evaluation.benchmarks
    with atomic_path(run_yaml) as tmp:
        tmp.write_text(yaml.safe_dump(record, sort_keys=False))


def _diff_keys(old, new, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = set(old) | set(new)
        return [d for k in keys for d in _diff_keys(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [prefix.rstrip(".")]


def predates_selection(run_dir: Path) -> bool:
    """Whether the run directory was made before recipes had an `iterate` section (validation, selection)."""
    run_yaml = RunLayout(run_dir).run_yaml
    if not run_yaml.is_file():
        return False
    record = yaml.safe_load(run_yaml.read_text())
    return isinstance(record, dict) and isinstance(record.get("recipe"), dict) and "iterate" not in record["recipe"]


def as_before_selection(run_dir: Path, recipe):
    """A run directory made before validation and selection existed runs as it did: no validation split (so
    no training prompt is set aside mid-run), the last round kept, no early stopping. check_run_dir has
    already refused a recipe that sets any of those keys otherwise."""
    if not predates_selection(run_dir):
        return recipe
    data = recipe.to_dict()
    data["data"]["validation"] = "none"
    data["iterate"].update(select="last", patience=None, on_regress="continue")
    return recipe_from_dict(data, recipe.name)


def set_cpu_threads() -> None:
    """SELFPLAY_CPU_THREADS caps torch's CPU threads (useful when other jobs share the machine)."""
    import torch

    if os.environ.get("SELFPLAY_CPU_THREADS"):
        torch.set_num_threads(int(os.environ["SELFPLAY_CPU_THREADS"]))


class RunTask(luigi.Task):
    recipe = luigi.Parameter(default=str(DEFAULT_RECIPE), description="A recipe file, or a shipped recipe by name "
                             "(`python -m configs.recipe --list`; configs/NAME.yaml works from any directory).")
    run_name = luigi.Parameter(default="", description="Run directory name; default: the recipe's name.")
    runs_dir = luigi.Parameter(default="runs", description="Where run directories live.")
    wait_for_lock = luigi.BoolParameter(
        default=False, significant=False,
        description="When another command is writing the run directory, wait for it to end instead of refusing.",
    )
    shared_run = luigi.BoolParameter(
        default=False, significant=False,
        description="Several commands (one per box, runs/ on a shared filesystem) work on this run under one central "
                    "luigid, which hands each task to one of them: take no run-directory lock.",
    )

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if in_command_line() and _command["started"] is None:  # the command line makes its own task first
            _command["started"] = time.time()
        # One writer per run directory: the command takes the lock when its first task is made, which
        # the luigi command line does before it schedules anything (tasks/lock.py).
        with refused_in_command_line():
            self.took_lock = self.lock_run_dir()

    def lock_run_dir(self) -> bool:
        command_line = in_command_line()
        if self.shared_run:  # luigid, not the lock, keeps two commands from running one task (README: several boxes)
            if command_line:
                interrupt.install()
            return False
        try:
            took = lock.acquire(self.run_dir, wait=self.wait_for_lock)
        except RunLockedError as exc:
            if command_line:
                # The luigi command line is making its task: refuse in one line, with our own exit status
                # (luigi would log a traceback and exit with its unhandled_exception code).
                log.error("%s", exc)
                raise SystemExit(lock.EXIT_CODE) from None
            raise
        if command_line:  # from here on SIGTERM/SIGINT stop at the next saved point (common/interrupt.py)
            interrupt.install()
        return took

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        run = cls.__dict__.get("run")
        if run is not None and not getattr(run, "guarded", False):
            cls.run = _guarded_run(run)

    @property
    def short_name(self) -> str:
        round_idx, shard_idx = getattr(self, "round_idx", None), getattr(self, "shard_idx", None)
        return (self.task_family + (f" {shard_idx}" if shard_idx is not None else "")
                + (f" of round {round_idx}" if round_idx is not None else ""))

    @cached_property
    def config(self):
        """The validated recipe (configs.recipe.Recipe), as the run directory runs it (as_before_selection)."""
        recipe = load_recipe(self.recipe)
        check_run_dir(self.run_dir_for(recipe), recipe)
        return as_before_selection(self.run_dir_for(recipe), recipe)

    def run_dir_for(self, recipe) -> Path:
        return Path(self.runs_dir) / (self.run_name or recipe.name)

    @property
    def run_dir(self) -> Path:
        return self.run_dir_for(self.config)

    @property
    def layout(self) -> RunLayout:
        """Where each file of the run directory lives (data/layout.py)."""
        return RunLayout(self.run_dir)

    def complete(self) -> bool:
        # Outputs alone are not enough: a task whose inputs are being redone is redone too.
        return self._complete({})

    def _complete(self, known: dict[str, bool]) -> bool:
        """complete(), with every task in the graph checked once per call: Train(r) reaches Train(r-1) by
        three paths, and walking each path anew made one check cost about 3^r."""
        if self.task_id not in known:
            known[self.task_id] = self.outputs_present() and all(
                dep._complete(known) if isinstance(dep, RunTask) else dep.complete()
                for dep in luigi.task.flatten(self.requires())
            )
        return known[self.task_id]

    def outputs_present(self) -> bool:
        """Whether this task's own outputs are there (its inputs aside)."""
        return all(target.exists() for target in luigi.task.flatten(self.output()))

    def nothing_to_do(self) -> str:
        """What the command says when this, its task, was complete already."""
        return f"{self.short_name} of run '{self.run_dir.name}' is complete"

    def on_failure(self, exception):
        if isinstance(exception, SelfplayError):
            return f"selfplay: {exception}"
        return super().on_failure(exception)


def in_command_line() -> bool:
    """Whether the `luigi` command line is running (not luigi.build from Python: a test, a notebook)."""
    return luigi.cmdline_parser.CmdlineParser.get_instance() is not None


@contextlib.contextmanager
def refused_in_command_line():
    """A mistake in the user's input (recipe, data, model path), found while the command line makes its task,
    before anything is scheduled: printed as our one line and exit USER_ERROR_EXIT, where Luigi would log
    "Uncaught exception in luigi" and exit with its unhandled_exception code. From Python it is raised."""
    try:
        yield
    except USER_ERRORS as exc:
        if not in_command_line():
            raise
        log.error("%s", exc)
        raise SystemExit(USER_ERROR_EXIT) from None


# The exit status of a command refused because its input is wrong: 2, as for a misspelled option (the
# command line's own usage error). Luigi's codes ([retcode]) are 10 to 40; tasks/lock.py's is 11.
USER_ERROR_EXIT = 2
USER_ERRORS = (RecipeError, DataError, ModelError)
_command: dict = {"started": None}


def _guarded_run(run):
    """Every task's run(): under its command's lock (taken again if an earlier build in this process gave
    it back), not started once a stop was asked for, and stopped by a signal as common/interrupt.py says.
    A run() that yields dynamic dependencies (Iterate) stays a generator, guarded while it runs."""

    if inspect.isgeneratorfunction(run):
        @functools.wraps(run)
        def guarded(self):
            self.lock_run_dir()
            interrupt.install()
            with interrupt.task_running(self.short_name):
                return (yield from run(self))
    else:
        @functools.wraps(run)
        def guarded(self):
            self.lock_run_dir()
            interrupt.install()  # until the worker stops: luigi.build in a notebook or test gets its handlers back
            with interrupt.task_running(self.short_name):
                return run(self)

    guarded.guarded = True
    return guarded


def _give_back_when_the_worker_stops() -> None:
    """A command's lock lasts as long as its Luigi worker: luigi.build and the command line both end
    with the worker's __exit__, the one place every way of running tasks passes through."""
    from luigi.worker import Worker

    original = Worker.__exit__
    if getattr(original, "gives_back_run_locks", False):
        return

    @functools.wraps(original)
    def __exit__(self, *exc_info):
        try:
            return original(self, *exc_info)
        finally:
            lock.release_all()
            interrupt.restore()
            if in_command_line():
                _say_why_the_command_stopped(self)

    __exit__.gives_back_run_locks = True
    Worker.__exit__ = __exit__


_give_back_when_the_worker_stops()


def _say_why_the_command_stopped(worker) -> None:
    """The command's last line when a task failed: how long it ran and the first failure's reason (a stop by
    SIGINT/SIGTERM says what was saved and to rerun the same command), after Luigi's own error lines. When
    nothing had to run, a line that says so (with Luigi's INFO lines hidden, the command would print nothing)."""
    history = worker._add_task_history
    failed = [task for task, status, _ in history if status == "FAILED" and isinstance(task, RunTask)]
    if not failed:
        root = history[0][0] if history else None  # the command's task is scheduled first
        if isinstance(root, RunTask) and [status for task, status, _ in history if task is root] == ["DONE"]:
            log.info("nothing to do: %s", root.nothing_to_do())
        return
    reasons = [_failure_reason(worker, task) for task in failed]
    # Tasks the worker handed out after a SIGINT/SIGTERM are refused before they start: not failures.
    others = sum(1 for reason in reasons[1:] if " not started; " not in reason)
    seconds = time.time() - _command["started"] if _command["started"] else None
    took = f" after {seconds:.0f}s" if seconds is not None else ""
    more = f" ({others} more task{'s' if others > 1 else ''} failed)" if others else ""
    log.error("stopped%s: %s: %s%s", took, failed[0].short_name, reasons[0], more)


def _failure_reason(worker, task) -> str:
    """The reason `task`'s process gave (on_failure), as the scheduler keeps it (workers may be forked)."""
    try:
        reason = json.loads(worker._scheduler.fetch_error(task.task_id)["error"])
    except Exception:  # the line is a courtesy: never let it hide the failure itself
        reason = None
    if not (isinstance(reason, str) and reason.startswith("selfplay: ")):
        return "failed with the error above"
    return reason.removeprefix("selfplay: ")


class ShardTask(RunTask):
    """One shard of a stage whose `merge_family` task puts the shards' parts together. Once that merged
    artifact is written the parts are not needed: a shard counts as done while the merge's outputs are
    there, so deleting `*.shards/` (or a run directory from before shards) reruns nothing."""

    merge_family: type

    def outputs_present(self) -> bool:
        return super().outputs_present() or self.clone(self.merge_family).outputs_present()

    def write_part(self, frame, record: dict) -> None:
        """The shard's outputs: its Parquet part (`part`) and the JSON record beside it (its other output),
        each written atomically, the record last."""
        from data.schema import write_parquet

        outputs = self.output()
        write_parquet(frame, outputs["part"].path)
        with _record_target(outputs).temporary_path() as tmp:
            atomic_write_json(tmp, record)


def _record_target(shard_outputs: dict):
    (record,) = [target for key, target in shard_outputs.items() if key != "part"]
    return record


def read_shard_parts(shard_outputs: list[dict]) -> tuple[list, list[dict]]:
    """What ShardTask.write_part wrote for each shard, in shard order: the parts that have rows (the first
    part when none has: a shard with nothing to do writes an empty one), and every shard's JSON record."""
    import pandas as pd

    frames = [pd.read_parquet(outputs["part"].path) for outputs in shard_outputs]
    records = [json.loads(Path(_record_target(outputs).path).read_text()) for outputs in shard_outputs]
    return [frame for frame in frames if len(frame)] or frames[:1], records


class GpuTask(RunTask):
    """A task that holds a GPU: it asks Luigi for `gpu: 1` (`[resources] gpu=N` in luigi.cfg caps how many
    run at once), and its run() holds its own GPU(s) with `hold_gpus` (common/gpu_slot.py), so two tasks
    running side by side never share one."""

    resources = {"gpu": 1}

    def hold_gpus(self, count: int):
        from common.gpu_slot import gpu_slot

        return gpu_slot(count, what=self.short_name)


@RunTask.event_handler(luigi.Event.PROCESSING_TIME)
def _log_task_time(task, seconds):
    outputs = ", ".join(t.path for t in luigi.task.flatten(task.output()))
    if outputs:  # a task without outputs (Iterate) ends the command with a line of its own
        log.info("%s done in %.1fs -> %s", task.task_family, seconds, outputs)

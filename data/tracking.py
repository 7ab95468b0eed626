"""Experiment trackers: one tracker run per selfplay run, across rounds, resumes and processes.

    tracking: {backends: [tensorboard, mlflow], project: selfplay}     # in a recipe; default: none

What is logged, to each backend the recipe names (tensorboard, mlflow, wandb, trackio):

- every training step, live, from the trainer (models/train/trainer.py calls `step_logger`): `train/loss`,
  `train/rewards/accuracy`, `train/rewards/margin`, `train/learning_rate`, `train/grad_norm`, ... at a
  global step that continues across rounds (round r's steps follow round r-1's);
- every round's held-out figures from its metrics.json (`eval/<figure>`, with `eval/<figure>_se` and the
  counts `eval/prompts`), and the round's pairing counts (`pairs/pairs`, `pairs/skipped_ties`, ...), at
  step = round (0 = the base);
- the recipe as the run's config, once; the report's side-by-side greedy answers as a table (wandb,
  trackio, MLflow's log_table; a markdown table in TensorBoard's text tab).

One tracker run per selfplay run: `runs/<run>/tracking.json` keeps each backend's run id (MLflow's run,
wandb's id; TensorBoard and trackio go by the run's name) and what it was sent, and every process that
logs (a Luigi worker, forked or not; the main process of `accelerate launch`) opens that same run.
What is sent is first marked pending there, then sent, then confirmed. A resumed trainer recomputes the
steps after its last checkpoint and only those not confirmed are sent; a send that a kill interrupted is
settled by asking the tracker which of its steps arrived (TensorBoard's event files, MLflow's store,
trackio's; wandb's offline files cannot be asked, so there such a step is taken as sent: never twice, at
worst one missing; training_log.json keeps every step). The trainer's steps go in batches at most every
`tracking.send_seconds`; steps a killed process still held were never marked, and go with the resumed
run's first batch (the hook gets the round's whole history). Figures are sent only when a task runs, so a
command that has nothing to do sends nothing.

Offline by default: TensorBoard event files, an MLflow SQLite store, wandb in offline mode (sync later with
`wandb sync --id <id> <dir>/wandb/wandb/offline-run-*-<id>`), trackio's local store, all under
`tracking.dir` (default <runs-dir>/tracking). MLFLOW_TRACKING_URI, WANDB_MODE=online and TRACKIO_DIR
point a client elsewhere.

The clients are the trackers' own (torch's SummaryWriter, MlflowClient, wandb, trackio), not accelerate's
tracker API: that API needs an Accelerator in every logging process (Evaluate and Report have none), starts
a new MLflow run through the global fluent API on each start, flushes TensorBoard only when closed, and
logs tables to wandb only. A tracker that cannot start (not installed, a directory that cannot be written)
is refused before anything is scheduled (`check_trackers`); one that fails during a run is warned about
once and dropped for the rest of the process, and the run goes on.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import io
import json
import logging
import math
import os
import uuid
from pathlib import Path

from common.errors import RecipeError
from data.layout import RunLayout

log = logging.getLogger("selfplay")

LEDGER = "tracking.json"
LEDGER_LOCK = ".tracking.lock"
# What each backend needs importable, and how to install it.
REQUIRES = {
    "tensorboard": (("tensorboard",), "tensorboard"),
    "mlflow": (("mlflow", "sqlalchemy", "alembic"), "mlflow-skinny sqlalchemy alembic"),
    "wandb": (("wandb",), "wandb"),
    "trackio": (("trackio",), "trackio"),
}
# The training figures of a step (models/train/trainer.py's history entry) that go to the tracker.
STEP_FIGURES = ("loss", "rewards/accuracy", "rewards/margin", "rewards/chosen", "rewards/rejected", "logps/chosen",
                "logps/rejected", "learning_rate", "grad_norm", "epoch")


def tracking_dir(settings, run_dir: Path) -> Path:
    return Path(settings.dir).expanduser() if settings.dir else Path(run_dir).parent / "tracking"


def tracker_run_name(settings, run_dir: Path) -> str:
    return settings.run_name or Path(run_dir).name


def check_trackers(settings, run_dir: Path) -> None:
    """Before anything is scheduled: every backend is installed and the tracking directory can be written."""
    for name in settings.backends:
        modules, install = REQUIRES[name]
        if name == "mlflow" and os.environ.get("MLFLOW_TRACKING_URI"):
            modules = ("mlflow",)  # a tracking server: the local SQLite store's packages are not needed
        missing = [m for m in modules if importlib.util.find_spec(m) is None]
        if missing:
            raise RecipeError(f"tracking.backends: {name} needs {', '.join(missing)}, not installed here "
                              f"(pip install -e \".[tracking]\", or pip install {install})")
    if not settings.backends:
        return
    where = tracking_dir(settings, run_dir)
    try:
        where.mkdir(parents=True, exist_ok=True)
        probe = where / f".write-probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise RecipeError(f"tracking.dir: cannot write {where} ({exc.strerror or exc}); set tracking.dir to a writable "
                          "directory, or leave tracking.backends empty") from None


# ---------------------------------------------------------------- what was logged: runs/<run>/tracking.json


@contextlib.contextmanager
def _ledger(run_dir: Path):
    """tracking.json, read and written back under an flock: several processes may log to one run at once."""
    run_dir = Path(run_dir)
    fd = os.open(run_dir / LEDGER_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        path = run_dir / LEDGER
        try:
            ledger = json.loads(path.read_text())
        except (OSError, ValueError):
            ledger = {}
        before = json.dumps(ledger, indent=2, sort_keys=True)
        yield ledger
        text = json.dumps(ledger, indent=2, sort_keys=True)
        if text != before:
            # Replaced whole under the lock (a reader sees the old file or the new one). Not fsynced: a killed process
            # loses nothing the kernel has, and at every step of a training run a sync costs more than the step's logging.
            tmp = run_dir / f".{LEDGER}.tmp"
            tmp.write_text(text + "\n")
            os.replace(tmp, path)
    finally:
        os.close(fd)


def _stamp(value) -> str:
    return hashlib.sha1(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- the backends, each through its own client


class _Backend:
    """One tracker run. `open` returns the id kept in tracking.json (the same id reopens the same run)."""

    name = ""

    def __init__(self, settings, run_dir: Path):
        self.dir = tracking_dir(settings, run_dir)
        self.project = settings.project
        self.run_name = tracker_run_name(settings, run_dir)

    def open(self, run_id: str | None) -> str:
        raise NotImplementedError

    def metrics(self, values: dict[str, float], step: int, axis: str) -> None:
        """`axis` is 'train/global_step' for training steps, 'round' for a round's figures."""
        raise NotImplementedError

    def many(self, rows: list[tuple[dict[str, float], int]], axis: str) -> None:
        """Several steps' figures at once: (values, step) each."""
        for values, step in rows:
            self.metrics(values, step, axis)

    def config(self, flat: dict[str, str], text: str) -> None:
        raise NotImplementedError

    def table(self, key: str, frame, step: int) -> None:
        raise NotImplementedError

    def has_step(self, key: str, step: int) -> bool:
        """Whether the tracker holds `key` at `step` (to settle a send a kill interrupted); True where the
        tracker cannot be asked, so a step is never sent twice."""
        return True

    def close(self) -> None:
        pass


class _TensorBoard(_Backend):
    name = "tensorboard"

    def open(self, run_id):
        from torch.utils.tensorboard import SummaryWriter

        # Every process that logs writes an event file of its own into the run's directory; TensorBoard reads them all.
        self.writer = SummaryWriter(str(self.dir / "tensorboard" / self.run_name))
        return self.run_name

    def metrics(self, values, step, axis):
        self.many([(values, step)], axis)

    def many(self, rows, axis):
        for values, step in rows:
            for key, value in values.items():
                self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()  # a killed process loses nothing it was told to log

    def config(self, flat, text):
        self.writer.add_text("recipe", "```yaml\n" + text + "\n```")
        self.writer.flush()

    def table(self, key, frame, step):
        self.writer.add_text(key, _markdown(frame), global_step=step)
        self.writer.flush()

    def has_step(self, key, step):
        from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

        self.writer.flush()
        for path in Path(self.writer.log_dir).glob("events.out.tfevents.*"):
            if any(event.step == step and any(v.tag == key for v in event.summary.value) for event in EventFileLoader(str(path)).Load()):
                return True
        return False

    def close(self):
        self.writer.close()


class _MLflow(_Backend):
    name = "mlflow"

    def open(self, run_id):
        from mlflow import MlflowClient

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # its INFO lines (creating the store's tables) are not ours
        self.dir.mkdir(parents=True, exist_ok=True)
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(self.dir / 'mlflow.db').resolve()}"
        self.client = MlflowClient(tracking_uri=uri)
        if run_id is None:
            experiment = self.client.get_experiment_by_name(self.project)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(
                self.project, artifact_location=(self.dir / "mlflow-artifacts").resolve().as_uri())
            run_id = self.client.create_run(experiment_id, run_name=self.run_name).info.run_id
        self.run_id = run_id
        return run_id

    def metrics(self, values, step, axis):
        self.many([(values, step)], axis)

    def many(self, rows, axis):
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, step) for values, step in rows for key, value in values.items()]
        for start in range(0, len(metrics), 1000):  # one transaction per batch, at most 1,000 metrics a call
            self.client.log_batch(self.run_id, metrics=metrics[start:start + 1000])

    def has_step(self, key, step):
        return any(metric.step == step for metric in self.client.get_metric_history(self.run_id, key))

    def config(self, flat, text):
        from mlflow.entities import Param

        params = [Param(key, value[:6000]) for key, value in flat.items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 parameters a call
            self.client.log_batch(self.run_id, params=params[start:start + 100])
        self.client.log_text(self.run_id, text, "recipe.yaml")

    def table(self, key, frame, step):
        self.client.log_table(self.run_id, data=frame, artifact_file=f"{key}/round_{step:02d}.json")


class _WandB(_Backend):
    name = "wandb"

    def open(self, run_id):
        import wandb

        run_id = run_id or uuid.uuid4().hex[:8]
        (self.dir / "wandb").mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=self.project, name=self.run_name, id=run_id, resume="allow", dir=str(self.dir / "wandb"),
                              mode=os.environ.get("WANDB_MODE", "offline"), settings=wandb.Settings(silent=True))
        # Two x-axes: training steps, and rounds for the held-out figures and the pairing counts.
        self.run.define_metric("train/global_step")
        self.run.define_metric("train/*", step_metric="train/global_step")
        self.run.define_metric("round")
        for prefix in ("eval/*", "pairs/*"):
            self.run.define_metric(prefix, step_metric="round")
        return run_id

    def metrics(self, values, step, axis):
        self.run.log({**values, axis: step})

    def config(self, flat, text):
        self.run.config.update(flat, allow_val_change=True)

    def table(self, key, frame, step):
        import wandb

        self.run.log({key: wandb.Table(dataframe=frame), "round": step})

    def close(self):
        self.run.finish()


class _Trackio(_Backend):
    name = "trackio"

    def open(self, run_id):
        os.environ.setdefault("TRACKIO_DIR", str(self.dir / "trackio"))  # read when trackio is first imported
        import trackio

        with contextlib.redirect_stdout(io.StringIO()):  # trackio prints where it logs on every init
            self.run = trackio.init(project=self.project, name=self.run_name, resume="allow", auto_log_cpu=False,
                                    auto_log_gpu=False)
        return self.run_name

    def metrics(self, values, step, axis):
        self.run.log(values, step=step)

    def has_step(self, key, step):
        from trackio.sqlite_storage import SQLiteStorage

        return any(row.get("step") == step and key in row for row in SQLiteStorage.get_logs(self.project, self.run_name))

    def config(self, flat, text):
        self.run.config.update(flat)

    def table(self, key, frame, step):
        import trackio

        self.run.log({key: trackio.Table(dataframe=frame)}, step=step)

    def close(self):
        import trackio

        with contextlib.redirect_stdout(io.StringIO()):
            self.run.finish()
        # trackio finishes its current run again at exit, printing again; this one is finished.
        with contextlib.suppress(Exception):
            trackio.context_vars.current_run.set(None)


BACKENDS = {cls.name: cls for cls in (_TensorBoard, _MLflow, _WandB, _Trackio)}


def _markdown(frame) -> str:
    rows = [" | ".join(str(c) for c in frame.columns)] + ["---|" * len(frame.columns)]
    rows += [" | ".join(str(v).replace("|", "\\|").replace("\n", " ") for v in row) for row in frame.itertuples(index=False)]
    return "\n".join(f"| {row} |" if not row.startswith("---") else f"|{row}" for row in rows)


# ---------------------------------------------------------------- one selfplay run's tracker runs, in this process


class RunTracker:
    """The tracker runs of one selfplay run, opened in this process when something is first sent."""

    def __init__(self, settings, run_dir: Path):
        self.settings, self.run_dir = settings, Path(run_dir)
        self.opened: dict[str, _Backend] = {}
        self.failed: set[str] = set()

    def _open(self, name: str, entry: dict) -> _Backend:
        if name not in self.opened:
            backend = BACKENDS[name](self.settings, self.run_dir)
            entry["run_id"] = backend.open(entry.get("run_id"))
            self.opened[name] = backend
        return self.opened[name]

    def send(self, section: str, key: str, decide, send, resolve=None) -> None:
        """For every backend: `decide(mark)` gets what tracking.json says was sent under section/key and returns
        (new mark, what to send), or None when nothing is new. The new mark is first written as pending, then
        sent, then confirmed; a failed send takes it back. A mark left pending by a process killed while
        sending is settled first: `resolve(backend, pending, mark)` asks the tracker what arrived and returns
        the mark to keep (without it, the pending send is assumed lost and done again). A failing backend is
        warned about once and left alone from then on."""
        slot = f"{section}/{key}"
        for name in self.settings.backends:
            if name in self.failed:
                continue
            try:
                with _ledger(self.run_dir) as ledger:
                    entry = ledger.setdefault(name, {})
                    marks, pending = entry.setdefault(section, {}), entry.setdefault("pending", {})
                    if slot in pending:  # a process was killed while sending this
                        settled = resolve(self._open(name, entry), pending.pop(slot), marks.get(key)) if resolve else None
                        if settled is not None:
                            marks[key] = settled
                    decided = decide(marks.get(key))
                    if decided is None:  # nothing new: the tracker run is not even opened
                        continue
                    backend = self._open(name, entry)
                    pending[slot], what = decided
                sent = False
                try:
                    send(backend, what)
                    sent = True
                finally:  # sent: confirmed; failed: taken back
                    with _ledger(self.run_dir) as ledger:
                        entry = ledger.setdefault(name, {})
                        if entry.get("pending", {}).pop(slot, None) == decided[0] and sent:
                            entry.setdefault(section, {})[key] = decided[0]
            except Exception as exc:  # a tracker never fails the run
                self.failed.add(name)
                log.warning("tracking: %s failed (%s: %s); the run goes on without it", name, type(exc).__name__,
                            str(exc).splitlines()[0] if str(exc) else "")

    def close(self) -> None:
        for name, backend in self.opened.items():
            try:
                backend.close()
            except Exception as exc:
                log.warning("tracking: closing %s failed (%s: %s)", name, type(exc).__name__, exc)
        self.opened.clear()

    # -- what a selfplay run sends

    def steps(self, round_idx: int, entries: list[dict], offset: int) -> None:
        """Training steps of round `round_idx` (history entries), at global step offset + step; only steps
        past the round's mark (those not sent before, in this process or a killed one)."""
        def decide(old):
            new = [e for e in entries if e["step"] > (old or 0)]
            return (max(e["step"] for e in new), new) if new else None

        def send(backend, new):
            rows = [({**{f"train/{k}": e[k] for k in STEP_FIGURES if _number(e.get(k))}, "train/round": round_idx}, offset + e["step"])
                    for e in new]
            backend.many(rows, "train/global_step")

        def resolve(backend, pending: int, mark: int | None):
            """The last step of a killed send that the tracker has: the steps after it are sent again."""
            for step in range(pending, mark or 0, -1):
                if backend.has_step("train/round", offset + step):
                    return step
            return mark

        self.send("train", str(round_idx), decide, send, resolve)

    def round_figures(self, round_idx: int, report: dict) -> None:
        """A round's metrics.json: its held-out figures (with their standard errors and n) and pairing counts."""
        values = {**_numbers(report.get("eval") or {}, "eval/"), **_numbers(report.get("judge") or {}, "pairs/")}
        if values:
            stamp = _stamp(values)
            self.send("rounds", str(round_idx), lambda old: None if old == stamp else (stamp, values),
                      lambda backend, figures: backend.metrics(figures, round_idx, "round"))

    def config(self, recipe: dict) -> None:
        import yaml

        flat, text = _flatten(recipe), yaml.safe_dump(recipe, sort_keys=False)
        stamp = _stamp(flat)
        self.send("config", "recipe", lambda old: None if old == stamp else (stamp, flat),
                  lambda backend, values: backend.config(values, text))

    def answers(self, frame, round_idx: int) -> None:
        """The report's greedy answers to the same prompts, one column per round, as a table."""
        frame = frame.reset_index(drop=True).rename(columns=lambda c: c if c == "prompt" else f"round {c}").astype(str)
        stamp = _stamp(frame.to_dict("list"))
        self.send("tables", "greedy_answers", lambda old: None if old == stamp else (stamp, frame),
                  lambda backend, table: backend.table("eval/greedy_answers", table, round_idx))


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _numbers(record: dict, prefix: str) -> dict[str, float]:
    """The numbers of a metrics.json section, nested ones (per task kind) as prefix/key/sub."""
    found = {}
    for key, value in record.items():
        if _number(value):
            found[f"{prefix}{key}"] = float(value)
        elif isinstance(value, dict):
            found.update(_numbers(value, f"{prefix}{key}/"))
    return found


def _flatten(record: dict, prefix: str = "") -> dict[str, str]:
    flat = {}
    for key, value in record.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, (list, type(None))) else str(value)
    return flat


def step_offset(run_dir: Path, round_idx: int) -> int:
    """Optimizer steps of the rounds before `round_idx`: where round `round_idx`'s global steps start."""
    layout, offset = RunLayout(run_dir), 0
    for earlier in range(1, round_idx):
        try:
            offset += int(json.loads(layout.training_log(earlier).read_text())["stats"]["steps"])
        except (OSError, ValueError, KeyError):
            pass  # a round without its training log yet counts no steps
    return offset


class StepLogger:
    """The trainer's per-step hook (models/train/trainer.py): sends round `round_idx`'s finished steps, live, in batches
    at most every `tracking.send_seconds` (a tracker's write costs milliseconds, a small model's step not much
    more). It gets the round's whole history each time, steps restored from a trainer checkpoint included, and
    sends those past the round's mark: steps a killed process held unsent go with the resumed run's first batch."""

    def __init__(self, settings, run_dir: Path, round_idx: int):
        import time

        self.tracker, self.every, self.clock = RunTracker(settings, run_dir), settings.send_seconds, time.monotonic
        self.round_idx, self.offset = round_idx, step_offset(run_dir, round_idx)
        self.history: list[dict] = []
        self.sent_at = self.clock()

    def __call__(self, history: list[dict]) -> None:
        self.history = history
        if self.clock() - self.sent_at >= self.every:
            self.flush()

    def flush(self) -> None:
        if self.history:
            self.tracker.steps(self.round_idx, self.history, self.offset)
        self.sent_at = self.clock()

    def close(self) -> None:
        self.flush()
        self.tracker.close()


def step_logger(recipe, run_dir: str | Path | None, round_idx: int) -> StepLogger | None:
    """The hook for round `round_idx`'s training, or None when the recipe logs to no tracker."""
    if run_dir is None or not recipe.tracking.backends:
        return None
    return StepLogger(recipe.tracking, Path(run_dir), round_idx)


def track_run(recipe, run_dir: str | Path, answers_rounds: int | None = None, answer_prompts: int = 4) -> None:
    """Send what the run directory holds and the trackers have not had yet: the recipe, every round's training
    steps (those the live hook missed) and metrics.json, and with `answers_rounds` the report's greedy answers.
    Called by Evaluate and Report when they finish."""
    if not recipe.tracking.backends:
        return
    from data.runs import Run

    run = Run(run_dir)
    tracker = RunTracker(recipe.tracking, run.dir)
    try:
        tracker.config(recipe.to_dict())
        for round_idx in run.rounds():
            report = run.round_metrics(round_idx) or {}
            history = (report.get("train") or {}).get("history") or []
            if history:
                tracker.steps(round_idx, history, step_offset(run.dir, round_idx))
            if report:
                tracker.round_figures(round_idx, report)
        if answers_rounds is not None:
            table = run.side_by_side(answer_prompts)
            if not table.empty:
                tracker.answers(table, answers_rounds)
    finally:
        tracker.close()

"""Experiment trackers (data/tracking.py): what a run logs, read back from TensorBoard's event files and the
MLflow store and compared with metrics.json and training_log.json; one tracker run across rounds, a
resume after SIGKILL that logs no step twice, a rerun that logs nothing; trackers that cannot start are
refused before any compute, and one that fails during a run never fails it."""

import json
import logging
import math
from collections import defaultdict
from pathlib import Path

import luigi
import pandas as pd
import pytest
import yaml

import pipeline  # noqa: F401 - registers the tasks
from common.errors import RecipeError
from configs.recipe import load_recipe
from data import tracking
from data.layout import RunLayout
from tasks.base import check_run_dir
from tasks.iterate import Iterate
from test_reliability import assert_one_line_failure, kill_when, run_cli, start

BACKENDS = ["tensorboard", "mlflow"]


def tensorboard_scalars(tracking_dir: Path, run_name: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar event in every event file of the run's TensorBoard directory, duplicates included."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util

    scalars = defaultdict(list)
    for path in sorted((tracking_dir / "tensorboard" / run_name).glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    scalars[value.tag].append((event.step, value.simple_value))
                elif value.metadata.plugin_data.plugin_name == "scalars":
                    scalars[value.tag].append((event.step, float(tensor_util.make_ndarray(value.tensor))))
    return scalars


def mlflow_run(tracking_dir: Path, run_dir: Path):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{(tracking_dir / 'mlflow.db').resolve()}")
    run_id = json.loads((run_dir / tracking.LEDGER).read_text())["mlflow"]["run_id"]
    return client, run_id


def mlflow_history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def expected_steps(run_dir: Path, rounds: int) -> dict[int, dict]:
    """global step -> the step's entry in its round's training_log.json, the global steps counted across rounds."""
    steps, offset = {}, 0
    for round_idx in range(1, rounds + 1):
        log = json.loads(RunLayout(run_dir).training_log(round_idx).read_text())
        for entry in log["history"]:
            steps[offset + entry["step"]] = {**entry, "round": round_idx}
        offset += log["stats"]["steps"]
    return steps


def assert_steps_logged_once(scalars_by_key, steps: dict[int, dict], rel: float) -> None:
    for key, figure in (("train/loss", "loss"), ("train/rewards/accuracy", "rewards/accuracy"),
                        ("train/rewards/margin", "rewards/margin"), ("train/learning_rate", "learning_rate"),
                        ("train/grad_norm", "grad_norm"), ("train/round", "round")):
        logged = scalars_by_key(key)
        assert [step for step, _ in logged] == sorted(steps), f"{key}: steps {[s for s, _ in logged]}"
        for step, value in logged:
            assert math.isclose(value, steps[step][figure], rel_tol=rel, abs_tol=1e-6), (key, step, value, steps[step][figure])


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """A two-round tiny SPIN run logged to TensorBoard and MLflow, then the same command again."""
    from conftest import ALGORITHMS, TINY
    from configs.recipe import deep_merge

    directory = tmp_path_factory.mktemp("tracked")
    recipe = directory / "tracked.yaml"
    recipe.write_text(yaml.safe_dump(deep_merge(deep_merge(TINY, ALGORITHMS["spin"]),
                                                {"name": "tracked", "tracking": {"backends": BACKENDS, "project": "tests"}})))
    runs = directory / "runs"
    assert luigi.build([Iterate(recipe=str(recipe), runs_dir=str(runs), rounds=2)], local_scheduler=True, log_level="WARNING")
    return recipe, runs, runs / "tracked", runs / "tracking"


def test_every_step_at_a_global_step_across_rounds_and_every_rounds_figures(tracked_run):
    recipe, runs, run_dir, where = tracked_run
    steps = expected_steps(run_dir, 2)
    assert len(steps) == 12 and sorted(steps) == list(range(1, 13))  # 4 steps in round 1, then 8: steps 5..12

    scalars = tensorboard_scalars(where, "tracked")
    assert_steps_logged_once(lambda key: scalars[key], steps, rel=1e-6)  # TensorBoard stores float32
    client, run_id = mlflow_run(where, run_dir)
    assert_steps_logged_once(lambda key: mlflow_history(client, run_id, key), steps, rel=1e-12)

    for round_idx in range(3):
        report = json.loads(RunLayout(run_dir).metrics(round_idx).read_text())
        figures = {f"eval/{k}": report["eval"][k] for k in ("accuracy", "accuracy_se", "prompts", "kl_vs_base", "mean_length")}
        if round_idx:
            figures.update({"eval/win_rate_vs_base": report["eval"]["win_rate_vs_base"],
                            "eval/win_rate_vs_base_se": report["eval"]["win_rate_vs_base_se"],
                            "pairs/pairs": report["judge"]["pairs"], "pairs/prompts": report["judge"]["prompts"]})
        for key, value in figures.items():
            assert [v for s, v in mlflow_history(client, run_id, key) if s == round_idx] == [pytest.approx(value)], key
            assert [v for s, v in scalars[key] if s == round_idx] == [pytest.approx(value, rel=1e-6)], key

    run = client.get_run(run_id)
    assert run.info.run_name == "tracked" and client.get_experiment(run.info.experiment_id).name == "tests"
    assert run.data.params["training.learning_rate"] == str(load_recipe(recipe).training.learning_rate)
    assert run.data.params["algorithm"] == "spin"
    answers = [a.path for a in client.list_artifacts(run_id, "eval/greedy_answers")]
    assert answers == ["eval/greedy_answers/round_02.json"]
    table = json.loads(Path(client.download_artifacts(run_id, answers[0], str(where / "downloaded"))).read_text())
    assert table["columns"] == ["prompt", "round 0", "round 1", "round 2"] and len(table["data"]) == 2


def test_a_rerun_that_does_nothing_logs_nothing(tracked_run):
    recipe, runs, run_dir, where = tracked_run
    ledger = (run_dir / tracking.LEDGER).read_text()
    events = {p: p.stat().st_size for p in (where / "tensorboard" / "tracked").iterdir()}
    client, run_id = mlflow_run(where, run_dir)
    losses = mlflow_history(client, run_id, "train/loss")
    assert luigi.build([Iterate(recipe=str(recipe), runs_dir=str(runs), rounds=2)], local_scheduler=True, log_level="WARNING")
    assert (run_dir / tracking.LEDGER).read_text() == ledger
    assert {p: p.stat().st_size for p in (where / "tensorboard" / "tracked").iterdir()} == events  # not even a new file
    assert mlflow_history(client, run_id, "train/loss") == losses


def test_killed_mid_training_then_resumed_logs_every_step_once(tiny_recipe, tmp_path):
    # Trainer checkpoints every 4 steps; the kill comes once step 5 was sent, so the resumed trainer recomputes
    # steps 5.. from checkpoint-4, and the trackers must not get them twice.
    recipe = tiny_recipe("spin", name="killed", demo_model={"sft_steps": 10}, training={"epochs": 3, "save_steps": 4},
                         tracking={"backends": BACKENDS, "send_seconds": 0})  # each step as it ends
    runs = tmp_path / "runs"
    run_dir = runs / "killed"

    def sent_steps() -> int:
        try:
            return json.loads((run_dir / tracking.LEDGER).read_text())["mlflow"]["train"]["1"]
        except (OSError, ValueError, KeyError):
            return 0

    proc, _ = start(tmp_path, recipe, runs, delay=1.0)
    kill_when(proc, lambda: sent_steps() >= 5)
    checkpoints = sorted(int(p.name.split("-")[1]) for p in (run_dir / "round_01" / "train_work").glob("checkpoint-*"))
    assert checkpoints and max(checkpoints) < sent_steps(), (checkpoints, sent_steps())  # steps to redo were sent

    proc, log_path = start(tmp_path, recipe, runs, delay=0.0)
    assert proc.wait(timeout=600) == 0, Path(log_path).read_text()[-3000:]
    steps = expected_steps(run_dir, 1)
    assert sorted(steps) == list(range(1, 13))
    scalars = tensorboard_scalars(runs / "tracking", "killed")
    assert_steps_logged_once(lambda key: scalars[key], steps, rel=1e-5)
    client, run_id = mlflow_run(runs / "tracking", run_dir)
    assert_steps_logged_once(lambda key: mlflow_history(client, run_id, key), steps, rel=1e-5)


def test_unknown_or_repeated_backends_are_refused_and_tracking_may_change_between_commands(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("tracking: {backends: [tensorbord]}\n")
    with pytest.raises(RecipeError, match="tracking.backends: unknown tracker 'tensorbord' .known: tensorboard, mlflow"):
        load_recipe(bad)
    bad.write_text("tracking: {backends: [mlflow, mlflow]}\n")
    with pytest.raises(RecipeError, match="names a tracker twice"):
        load_recipe(bad)
    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    plain = tmp_path / "r.yaml"
    plain.write_text("seed: 0\n")
    (run_dir / "run.yaml").write_text(yaml.safe_dump({"recipe": load_recipe(plain).to_dict()}))
    plain.write_text("seed: 0\ntracking: {backends: [tensorboard], project: p}\n")
    check_run_dir(run_dir, load_recipe(plain))  # tracking added to a run: not another recipe
    plain.write_text("seed: 1\n")
    with pytest.raises(RecipeError, match="changed: seed"):
        check_run_dir(run_dir, load_recipe(plain))


def test_a_tracker_that_cannot_start_is_one_line_before_any_compute(tiny_recipe, tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    recipe = tiny_recipe("spin", name="untracked", tracking={"backends": ["tensorboard"], "dir": str(blocker / "tracking")})
    result = run_cli(tmp_path, "Iterate", "--rounds", "1", "--recipe", recipe)
    assert result.returncode == 2
    assert_one_line_failure(result, "tracking.dir: cannot write", str(blocker / "tracking"))
    assert not (tmp_path / "runs" / "untracked").exists()  # nothing ran, nothing was made

    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    with pytest.raises(RecipeError, match=r'tracking.backends: wandb needs wandb, not installed here \(pip install -e ".\[tracking\]"'):
        tracking.check_trackers(load_recipe(tiny_recipe("spin", tracking={"backends": ["wandb"]})).tracking, tmp_path / "runs" / "x")


def test_a_tracker_failing_during_a_run_warns_once_and_the_rest_goes_on(tmp_path, monkeypatch, caplog):
    settings = load_recipe(_recipe(tmp_path, ["tensorboard", "mlflow"])).tracking
    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)

    def broken(self, rows, axis):
        raise OSError("disk quota exceeded")

    monkeypatch.setattr(tracking._TensorBoard, "many", broken)
    tracker = tracking.RunTracker(settings, run_dir)
    entries = [{"step": s, "loss": 0.5, "learning_rate": 1e-3} for s in (1, 2, 3)]
    with caplog.at_level(logging.WARNING, logger="selfplay"):
        for entry in entries:
            tracker.steps(1, [entry], offset=0)  # as the trainer's hook sends them
    tracker.close()
    warnings = [r.getMessage() for r in caplog.records if "tracking:" in r.getMessage()]
    assert warnings == ["tracking: tensorboard failed (OSError: disk quota exceeded); the run goes on without it"]
    ledger = json.loads((run_dir / tracking.LEDGER).read_text())
    assert not ledger["tensorboard"].get("train") and ledger["mlflow"]["train"] == {"1": 3}  # the failed send is not marked
    client, run_id = mlflow_run(tmp_path / "runs" / "tracking", run_dir)
    assert [s for s, _ in mlflow_history(client, run_id, "train/loss")] == [1, 2, 3]


def _recipe(tmp_path: Path, backends: list[str]) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"tracking": {"backends": backends}}))
    return path


def test_wandb_offline_and_trackio_local_get_the_same_figures(tmp_path, monkeypatch):
    """The two trackers the tests cannot read back through a store of their own: trackio's local SQLite is
    read with its own reader; wandb's offline run is checked to be there, one per process that logged."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    settings = load_recipe(_recipe(tmp_path, ["wandb", "trackio"])).tracking
    run_dir = tmp_path / "runs" / "r"
    (run_dir / "round_01").mkdir(parents=True)
    (run_dir / "round_01" / "metrics.json").write_text(json.dumps({"eval": {"accuracy": 0.25, "accuracy_se": 0.1, "prompts": 4},
                                                                   "judge": {"pairs": 3}}))
    for entries in ([{"step": 1, "loss": 0.7}], [{"step": 1, "loss": 0.7}, {"step": 2, "loss": 0.6}]):  # two processes
        tracker = tracking.RunTracker(settings, run_dir)
        tracker.steps(1, entries, offset=0)
        tracker.round_figures(1, json.loads((run_dir / "round_01" / "metrics.json").read_text()))
        tracker.answers(pd.DataFrame({"prompt": ["p"], 0: ["a"], 1: ["b"]}), 1)
        tracker.close()

    from trackio.sqlite_storage import SQLiteStorage

    logs = SQLiteStorage.get_logs("selfplay", "r")
    assert [(row["step"], row["train/loss"]) for row in logs if "train/loss" in row] == [(1, 0.7), (2, 0.6)]
    assert [(row["step"], row["eval/accuracy"], row["pairs/pairs"]) for row in logs if "eval/accuracy" in row] == [(1, 0.25, 3)]
    run_id = json.loads((run_dir / tracking.LEDGER).read_text())["wandb"]["run_id"]
    offline = sorted((tmp_path / "runs" / "tracking" / "wandb" / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(offline) == 2 and all((d / f"run-{run_id}.wandb").stat().st_size > 0 for d in offline)


def test_steps_a_killed_trainer_held_unsent_go_with_the_resumed_runs_first_batch(tmp_path):
    settings = load_recipe(_recipe(tmp_path, ["tensorboard"])).tracking
    settings.send_seconds = 3600  # batches: nothing is sent until the logger is flushed or closed
    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    history = [{"step": s, "loss": 1.0 / s} for s in range(1, 9)]
    killed = tracking.StepLogger(settings, run_dir, 1)
    killed(history[:4])
    killed.flush()  # steps 1-4 sent; 5-8 held when the process is killed, after its checkpoint at step 8
    for step in range(5, 9):
        killed(history[:step])
    resumed = tracking.StepLogger(settings, run_dir, 1)
    resumed(history + [{"step": 9, "loss": 1.0 / 9}])  # the trainer resumed from checkpoint-8: its history holds 1-8
    resumed.close()
    logged = tensorboard_scalars(tmp_path / "runs" / "tracking", "r")["train/loss"]
    assert [step for step, _ in logged] == list(range(1, 10))

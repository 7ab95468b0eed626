"""Concurrency and faults: one writer per run directory, SIGTERM/SIGINT, a full disk, hand-edited run
directories, input files with a bad line, and a soak test of random SIGKILLs.

The slow tests compare what a disturbed run ends with against one uninterrupted run of the same recipe
(the module's `clean_run`, three rounds, made once).
"""

import errno
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import luigi
import pandas as pd
import pytest
import torch
import yaml

import pipeline  # noqa: F401 - registers the tasks
from common import interrupt
from common.errors import DataError, DiskFullError, Interrupted, RecipeError, RunLockedError
from configs.recipe import deep_merge
from data.schema import EVAL, GENERATIONS, PAIRS, read_artifact, write_parquet
from tasks import lock
from tasks.iterate import Iterate
from conftest import ALGORITHMS, REPO, TINY
from test_reliability import assert_one_line_failure, run_cli

NAME = "faults"
# The tiny SPIN recipe with four generation parts per round and twelve training steps, trainer
# checkpoints only at the end (so a checkpoint in between can only come from a signal), and a short
# warm start: SPIN pairs the ground truth with any sample, so the base need not be any good.
FAULTS = deep_merge(deep_merge(TINY, ALGORITHMS["spin"]), {
    "name": NAME, "demo_model": {"sft_steps": 10}, "generation": {"shard_size": 8},
    "training": {"epochs": 3, "save_steps": 100},
})
ROUNDS = 3
TASK_FAILED = 30  # luigi.cfg [retcode]


def write_recipe(directory: Path) -> str:
    path = directory / f"{NAME}.yaml"
    path.write_text(yaml.safe_dump(FAULTS))
    return str(path)


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    """An uninterrupted three-round run of FAULTS, in this process."""
    directory = tmp_path_factory.mktemp("clean")
    recipe = write_recipe(directory)
    assert luigi.build([Iterate(recipe=recipe, runs_dir=str(directory / "runs"), rounds=ROUNDS)],
                       local_scheduler=True, log_level="WARNING")
    return directory / "runs" / NAME


def assert_same_rounds(run_dir: Path, clean_dir: Path, rounds) -> None:
    from safetensors.torch import load_file

    for r in rounds:
        got, want = run_dir / f"round_{r:02d}", clean_dir / f"round_{r:02d}"
        for name, schema in (("generations.parquet", GENERATIONS), ("pairs.parquet", PAIRS), ("eval.parquet", EVAL)):
            pd.testing.assert_frame_equal(read_artifact(got / name, schema), read_artifact(want / name, schema))
        resumed = load_file(got / "checkpoint" / "adapter" / "adapter_model.safetensors")
        clean = load_file(want / "checkpoint" / "adapter" / "adapter_model.safetensors")
        assert resumed.keys() == clean.keys()
        assert all(torch.allclose(resumed[k], clean[k], atol=1e-6) for k in resumed), f"round {r}'s adapter differs"


def no_temporaries(directory: Path) -> list[Path]:
    return [p for p in directory.rglob(".*") if ".tmp" in p.name]


class Failures(list):
    """The exceptions of the tasks that fail during a build in this process."""

    def __enter__(self):
        luigi.Task.event_handler(luigi.Event.FAILURE)(self._record)
        return self

    def _record(self, task, exception):
        self.append(exception)

    def __exit__(self, *exc):
        luigi.Task._event_callbacks[luigi.Task][luigi.Event.FAILURE].discard(self._record)


def wait_for(proc, condition, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        if proc.poll() is not None:
            pytest.fail("the run ended before the moment the test waited for")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail("timed out")


# --- one writer per run directory ---------------------------------------------------------------------

# Another command holding a run directory: takes the lock, then gives it back when a line comes on its
# stdin (or after `seconds`), as a command does when it ends.
HOLDER = """
import select, sys
from tasks import lock
lock.acquire(sys.argv[1])
print("locked", flush=True)
select.select([sys.stdin], [], [], float(sys.argv[2]))
lock.release(sys.argv[1])
"""


def hold_lock(tmp_path, run_dir: Path, seconds: float = 300) -> subprocess.Popen:
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    proc = subprocess.Popen([sys.executable, str(script), str(run_dir), str(seconds)], cwd=REPO, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_command_on_the_same_run_is_refused_naming_the_holder(tmp_path):
    recipe = write_recipe(tmp_path)
    run_dir = tmp_path / "runs" / NAME
    holder = hold_lock(tmp_path, run_dir)
    try:
        result = run_cli(tmp_path, "Iterate", "--rounds", "2", "--recipe", recipe)
        assert result.returncode == lock.EXIT_CODE, result.stderr[-2000:]
        assert_one_line_failure(result, f"{run_dir} is in use by pid {holder.pid}", "holder.py", "--wait-for-lock")
        assert not (run_dir / "run.yaml").exists()  # nothing ran
        result = run_cli(tmp_path, "Generate", "--round-idx", "1", "--recipe", recipe)  # a single task too
        assert result.returncode == lock.EXIT_CODE
    finally:
        holder.kill()
        holder.wait()


def test_wait_for_lock_waits_for_the_holder_then_runs(tmp_path):
    recipe = write_recipe(tmp_path)
    run_dir = tmp_path / "runs" / NAME
    holder = hold_lock(tmp_path, run_dir)
    command = [sys.executable, "-m", "luigi", "--module", "pipeline", "RunSetup", "--recipe", recipe,
               "--runs-dir", str(tmp_path / "runs"), "--wait-for-lock"]
    waiting = subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
    first = waiting.stderr.readline()
    while "selfplay:" not in first and first:
        first = waiting.stderr.readline()
    assert f"waiting for {run_dir / lock.LOCK_NAME}, held by pid {holder.pid}" in first
    time.sleep(2)
    assert waiting.poll() is None and not (run_dir / "run.yaml").exists()  # still waiting, nothing written
    holder.communicate("done\n")  # the holder ends and gives the lock back
    rest = waiting.communicate(timeout=120)[1]
    assert waiting.returncode == 0, rest[-2000:]
    assert "taking over" not in rest and (run_dir / "run.yaml").is_file() and not (run_dir / lock.LOCK_NAME).exists()


def test_a_lock_left_by_a_killed_command_is_taken_over_with_a_warning(tmp_path, caplog):
    run_dir = tmp_path / "runs" / NAME
    holder = hold_lock(tmp_path, run_dir)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert json.loads((run_dir / lock.LOCK_NAME).read_text())["pid"] == holder.pid  # left behind
    with caplog.at_level("WARNING", logger="selfplay"):
        assert lock.acquire(run_dir)
    try:
        assert f"taking over the lock left by pid {holder.pid}" in caplog.text and "no longer running" in caplog.text
        assert json.loads((run_dir / lock.LOCK_NAME).read_text())["pid"] == os.getpid()
        assert not lock.acquire(run_dir)  # re-entrant: this process holds it already
    finally:
        lock.release(run_dir)
    assert not (run_dir / lock.LOCK_NAME).exists()


def test_in_process_builds_hold_the_lock_while_tasks_run_and_give_it_back(tmp_path):
    from tasks.base_model import RunSetup

    recipe = write_recipe(tmp_path)
    run_dir = tmp_path / "runs" / NAME
    seen = []

    def record(task):  # a task has just run: under whose lock?
        seen.append(json.loads((run_dir / lock.LOCK_NAME).read_text())["pid"])

    luigi.Task.event_handler(luigi.Event.SUCCESS)(record)
    try:
        for _ in range(2):  # a second build of the same (cached) task takes the lock again
            assert luigi.build([RunSetup(recipe=recipe, runs_dir=str(tmp_path / "runs"))], local_scheduler=True,
                               log_level="WARNING")
            assert not lock.holds(run_dir) and not (run_dir / lock.LOCK_NAME).exists()
            (run_dir / "run.yaml").unlink()
    finally:
        luigi.Task._event_callbacks[luigi.Task][luigi.Event.SUCCESS].discard(record)
    assert seen == [os.getpid(), os.getpid()]
    # Given back: another process can take it at once.
    hold_lock(tmp_path, run_dir, 0).wait()


def test_a_task_refuses_to_run_while_another_process_holds_the_run(tmp_path):
    from tasks.base_model import RunSetup

    recipe = write_recipe(tmp_path)
    run_dir = tmp_path / "runs" / NAME
    task = RunSetup(recipe=recipe, runs_dir=str(tmp_path / "runs"))  # made while the run was free
    luigi.task_register.Register.clear_instance_cache()
    lock.release_all()
    holder = hold_lock(tmp_path, run_dir)
    try:
        with Failures() as failures:
            assert not luigi.build([task], local_scheduler=True, log_level="WARNING")
    finally:
        holder.kill()
        holder.wait()
    assert len(failures) == 1 and isinstance(failures[0], RunLockedError), failures
    assert not (run_dir / "run.yaml").exists()


@pytest.mark.slow
def test_workers_of_one_command_under_luigid_share_its_lock(tmp_path):
    # Under the central scheduler, with two workers, tasks run in forked processes: they inherit the
    # command's lock, and luigid hands each task to one worker as it always does.
    import socket
    import urllib.parse
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    luigid = subprocess.Popen([sys.executable, "-c", "from luigi.cmdline import luigid; luigid()", "--port", str(port),
                               "--address", "127.0.0.1", "--state-path", str(tmp_path / "state.pickle"),
                               "--logdir", str(tmp_path)], cwd=tmp_path, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.2)
        recipe = write_recipe(tmp_path)
        central = tmp_path / "central.cfg"  # read after the repository's luigi.cfg, so it wins
        central.write_text(f"[core]\nlocal_scheduler = false\nscheduler_host = 127.0.0.1\nscheduler_port = {port}\n")
        result = subprocess.run([sys.executable, "-m", "luigi", "--module", "pipeline", "BaseModel", "--recipe", recipe,
                                 "--runs-dir", str(tmp_path / "runs"), "--workers", "2"], cwd=REPO, capture_output=True,
                                text=True, env={**os.environ, "PYTHONPATH": str(REPO), "LUIGI_CONFIG_PATH": str(central)},
                                timeout=600)
        query = urllib.parse.quote(json.dumps({"status": "DONE", "upstream_status": "", "search": ""}))
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/task_list?data={query}", timeout=30) as reply:
            done = json.loads(reply.read())["response"]
    finally:
        luigid.terminate()
        luigid.wait()
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(task["name"] for task in done.values()) == ["BaseModel", "RunSetup"]  # scheduled by luigid
    run_dir = tmp_path / "runs" / NAME
    assert (run_dir / "base_model" / "_SUCCESS").is_file() and not (run_dir / lock.LOCK_NAME).exists()


# --- SIGTERM and SIGINT -------------------------------------------------------------------------------

# The luigi command line in a child, with generation and training slowed down so that a signal lands in
# the middle of either, and files that mark where it is: "generate r1 part 2" when that part starts,
# "training" at the first training step. As in test_reliability.py, the slowing is done here by
# wrapping two functions; no test hook lives in the product.
DRIVER = """
import sys, time
from pathlib import Path
import luigi.cmdline
import models.generate.generation as generation
import models.train.trainer as trainer

delay, marks = float(sys.argv[1]), Path(sys.argv[2])
_generate, _logps = generation.generate_texts, trainer.sequence_logps

def slow_generate(*args, **kwargs):
    if kwargs.get("progress"):
        (marks / kwargs["progress"]).touch()
    time.sleep(delay)
    return _generate(*args, **kwargs)

def slow_logps(*args, **kwargs):
    (marks / "training").touch()
    time.sleep(delay / 4)
    return _logps(*args, **kwargs)

generation.generate_texts, trainer.sequence_logps = slow_generate, slow_logps
luigi.cmdline.luigi_run(sys.argv[3:])
"""


def start(tmp_path, recipe, runs, delay, rounds):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    marks = tmp_path / "marks"
    shutil.rmtree(marks, ignore_errors=True)
    marks.mkdir()
    args = [sys.executable, str(driver), str(delay), str(marks), "--module", "pipeline", "Iterate",
            "--rounds", str(rounds), "--recipe", recipe, "--runs-dir", str(runs)]
    log_path = tmp_path / f"run-{time.time_ns()}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(args, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True)
    return proc, log_path

def interrupt_generation(tmp_path, recipe, runs, round_idx: int, signum: int) -> None:
    """Signal a run in the middle of round `round_idx`'s generation: the part being generated is finished
    and saved, then the command stops, non-zero."""
    round_dir = runs / NAME / f"round_{round_idx:02d}"
    work = round_dir / "generate_work"
    proc, log_path = start(tmp_path, recipe, runs, delay=1.0, rounds=round_idx)
    wait_for(proc, lambda: (tmp_path / "marks" / f"generate r{round_idx} part 1").exists())  # part 1 under way
    os.kill(proc.pid, signum)  # to the process alone, as Kubernetes does
    sent = time.time()
    assert proc.wait(timeout=120) == TASK_FAILED
    assert time.time() - sent < 60, "stopping took longer than a part"
    output = log_path.read_text()
    name = signal.Signals(signum).name
    assert f"{name}: generation of round {round_idx} stopped with 2 of 4 parts saved" in output, output[-3000:]
    assert sorted(p.name for p in work.glob("part-*.parquet")) == ["part-00000.parquet", "part-00001.parquet"]
    assert not (round_dir / "generations.parquet").exists() and not no_temporaries(runs)
    assert not (runs / NAME / lock.LOCK_NAME).exists()


def interrupt_training(tmp_path, recipe, runs, round_idx: int, signum: int, clean_dir: Path) -> Path:
    """Signal a run in the middle of round `round_idx`'s training: the step under way finishes, a trainer
    checkpoint is saved there (the recipe saves none of its own before the end), then it stops."""
    round_dir = runs / NAME / f"round_{round_idx:02d}"
    proc, log_path = start(tmp_path, recipe, runs, delay=1.0, rounds=round_idx)
    wait_for(proc, lambda: (tmp_path / "marks" / "training").exists())  # the first training step is under way
    os.kill(proc.pid, signum)
    assert proc.wait(timeout=120) == TASK_FAILED
    output = log_path.read_text()
    assert f"{signal.Signals(signum).name}: training of round {round_idx} stopped after step" in output, output[-3000:]
    # The command's last line says how long it ran, what stopped, what was saved and what to do.
    last = output.strip().splitlines()[-1]
    assert last.startswith("selfplay: stopped after ") and f"Train of round {round_idx}: {signal.Signals(signum).name}: " \
        f"training of round {round_idx} stopped after step" in last and last.endswith("rerun the same command to resume"), last
    checkpoints = list((round_dir / "train_work").glob("checkpoint-*/state.pt"))
    total = json.loads((clean_dir / round_dir.name / "checkpoint" / "training_log.json").read_text())["stats"]["steps"]
    assert len(checkpoints) == 1 and 0 < int(checkpoints[0].parent.name.split("-")[1]) < total
    assert not (round_dir / "checkpoint").exists() and not no_temporaries(runs)
    return checkpoints[0].parent


@pytest.mark.slow
def test_sigterm_and_sigint_save_the_current_part_or_step_and_the_next_command_resumes(tmp_path, clean_run):
    # Each signal in each stage: round 1 gets SIGTERM in generation and SIGINT in training, round 2 the other way round.
    recipe = write_recipe(tmp_path)
    runs = tmp_path / "runs"
    for round_idx, (in_generation, in_training) in ((1, (signal.SIGTERM, signal.SIGINT)), (2, (signal.SIGINT, signal.SIGTERM))):
        interrupt_generation(tmp_path, recipe, runs, round_idx, in_generation)
        checkpoint = interrupt_training(tmp_path, recipe, runs, round_idx, in_training, clean_run)
        proc, log_path = start(tmp_path, recipe, runs, delay=0.0, rounds=round_idx)
        assert proc.wait(timeout=600) == 0, log_path.read_text()[-3000:]
        assert f"resuming from {checkpoint}" in log_path.read_text()
    assert_same_rounds(runs / NAME, clean_run, [1, 2])


def test_a_second_signal_or_one_outside_a_saving_loop_stops_at_once():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    interrupt.install()
    try:
        with interrupt.task_running("Judge of round 1"):
            with pytest.raises(Interrupted, match="SIGTERM: Judge of round 1 stopped"):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # the handler raises before this ends
        interrupt.restore()
        interrupt.install()
        with interrupt.task_running("Generate of round 1"), interrupt.safe_points("generation part"):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
            assert interrupt.received() == "SIGINT"  # recorded, and the loop goes on to its saved point
            with pytest.raises(Interrupted, match="SIGINT again: stopped at once"):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)
        with pytest.raises(Interrupted, match="SIGINT: Train of round 1 not started"):
            with interrupt.task_running("Train of round 1"):
                pass
    finally:
        interrupt.restore()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


CHILD = """
import signal, sys, time
from pathlib import Path
def stop(signum, frame):
    time.sleep(0.5)  # the step under way
    Path(sys.argv[1]).write_text("saved")
    sys.exit(3)
signal.signal(signal.SIGTERM, stop)
print("ready", flush=True)
time.sleep(60)
"""


def test_training_under_a_launcher_gets_the_signal_and_is_waited_for(tmp_path):
    # The accelerate launcher path of Train: the signal goes to the training process group, which saves.
    import threading

    script = tmp_path / "child.py"
    script.write_text(CHILD)
    saved = tmp_path / "saved"
    interrupt.install()
    try:
        threading.Timer(3.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
        with interrupt.task_running("Train of round 1"):
            status = interrupt.run_forwarding_signals([sys.executable, str(script), str(saved)])
        assert interrupt.received() == "SIGTERM"
    finally:
        interrupt.restore()
    assert status == 3 and saved.read_text() == "saved"


# --- a full disk --------------------------------------------------------------------------------------

def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_leaves_no_file_and_names_the_path_and_size(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    from common.atomic import atomic_write_json

    frame = pd.DataFrame({"prompt_id": ["a", "b"], "prompt": ["x" * 1000, "y"], "response": ["r", "s"],
                          "sample_index": [0, 0], "round": [1, 1], "num_tokens": [1, 1]})
    monkeypatch.setattr(pq, "write_table", enospc)
    target = tmp_path / "round_01" / "generations.parquet"
    with pytest.raises(DiskFullError, match=rf"{target}: no space left on device; it needs about 1\.\d KiB, .* free"):
        write_parquet(frame, target, GENERATIONS)
    monkeypatch.setattr(os, "fsync", enospc)
    with pytest.raises(DiskFullError, match=r"meta.json: no space left on device; it needs about 1[0-9] bytes"):
        atomic_write_json(tmp_path / "meta.json", {"a": 1})
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == []


def test_a_full_disk_while_saving_a_trainer_checkpoint(tmp_path, monkeypatch):
    import common.disk
    import models.train.trainer as trainer

    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)

    def torch_save_on_a_full_disk(obj, path):
        Path(path).write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(trainer.torch, "save", torch_save_on_a_full_disk)
    monkeypatch.setattr(common.disk, "free_bytes", lambda path: 10)
    needed = common.disk.human(4 * (16 + 4) + torch.get_rng_state().numel())  # the weights and the RNG state
    with pytest.raises(DiskFullError, match=rf"checkpoint-3: no space left on device; it needs about {needed}, 10 bytes free"):
        trainer._save_trainer_checkpoint(tmp_path, 3, {"adapter": model.state_dict(), "optimizer": optimizer.state_dict()}, scheduler, [])
    assert list(tmp_path.iterdir()) == []  # no half checkpoint to resume from
    monkeypatch.setattr(common.disk, "free_bytes", lambda path: 10**12)
    with pytest.raises(RuntimeError, match="unexpected pos"):  # with room left, the error is not a full disk
        trainer._save_trainer_checkpoint(tmp_path, 3, {"adapter": model.state_dict(), "optimizer": optimizer.state_dict()}, scheduler, [])


@pytest.mark.slow
def test_a_full_disk_in_a_run_then_the_same_command_completes_with_the_same_result(tmp_path, clean_run, monkeypatch):
    import pyarrow.parquet as pq

    import models.load.loading

    recipe = write_recipe(tmp_path)
    runs = tmp_path / "runs"
    round_dir = runs / NAME / "round_01"
    def build():
        luigi.task_register.Register.clear_instance_cache()
        return luigi.build([Iterate(recipe=recipe, runs_dir=str(runs), rounds=1)], local_scheduler=True,
                           log_level="WARNING")

    real_write_table, real_save_checkpoint = pq.write_table, models.load.loading.save_checkpoint

    def write_table(table, where, *args, **kwargs):
        if "generations.parquet" in str(where):
            enospc()
        return real_write_table(table, where, *args, **kwargs)

    def save_checkpoint(model, tokenizer, out_dir, **kwargs):
        (Path(out_dir) / "model.safetensors").write_bytes(b"\0" * 4096)  # how far it got
        raise Exception("Error while serializing: I/O error: No space left on device (os error 28)")  # safetensors' words

    with Failures() as failures:
        monkeypatch.setattr(pq, "write_table", write_table)
        assert not build()
        assert isinstance(failures[-1], DiskFullError)
        assert str(failures[-1]).startswith(f"{round_dir / 'generations.parquet'}: no space left on device; it needs about")
        assert not (round_dir / "generations.parquet").exists() and not no_temporaries(runs)
        assert len(list((round_dir / "generate_work").glob("part-*.parquet"))) == 4  # the parts are kept

        monkeypatch.setattr(pq, "write_table", real_write_table)
        monkeypatch.setattr(models.load.loading, "save_checkpoint", save_checkpoint)
        assert not build()
        assert isinstance(failures[-1], DiskFullError)
        assert str(failures[-1]).startswith(f"{round_dir / 'checkpoint'}: no space left on device; it needs about")
        assert not (round_dir / "checkpoint").exists() and not no_temporaries(runs)

        monkeypatch.setattr(models.load.loading, "save_checkpoint", real_save_checkpoint)  # space freed
        assert build()
    assert_same_rounds(runs / NAME, clean_run, [1])


@pytest.mark.slow
def test_a_real_full_disk_on_a_small_tmpfs(tmp_path, clean_run):
    """The same, with no injection: the run directory is a tmpfs too small for one round (mounted in a
    user and mount namespace of its own, where that is allowed), then made larger, as freeing space is."""

    probe = tmp_path / "probe"
    probe.mkdir()
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-rm", "mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)], capture_output=True).returncode:
        pytest.skip("no tmpfs can be mounted in a user namespace here")
    recipe = write_recipe(tmp_path)
    runs, out = tmp_path / "runs", tmp_path / "out"
    runs.mkdir()
    out.mkdir()
    command = f"{sys.executable} -m luigi --module pipeline Iterate --rounds 1 --recipe {recipe} --runs-dir {runs}"
    # 384 KiB holds the base model, round 0 and round 1 up to its trainer checkpoint, not the round's final checkpoint.
    script = f"""
mount -t tmpfs -o size=384k tmpfs {runs}
{command} > {out}/full.log 2>&1; echo $? > {out}/full.rc
find {runs} -name '.*' > {out}/hidden.txt
mount -o remount,size=64m {runs}
{command} > {out}/freed.log 2>&1; echo $? > {out}/freed.rc
cp -r {runs}/{NAME} {out}/
"""
    subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                   timeout=1200, check=True)
    full = (out / "full.log").read_text()
    assert (out / "full.rc").read_text().strip() == str(TASK_FAILED), full[-3000:]
    lines = [line for line in full.splitlines() if "no space left on device" in line]
    assert lines and f"selfplay: {runs / NAME / 'round_01' / 'checkpoint'}: no space left on device; it needs about" in lines[0]
    assert (out / "hidden.txt").read_text().split() == []  # no temporary, and the lock given back
    assert (out / "freed.rc").read_text().strip() == "0", (out / "freed.log").read_text()[-3000:]
    assert_same_rounds(out / NAME, clean_run, [1])


# --- hand-edited run directories ----------------------------------------------------------------------

def fake_run(tmp_path, rounds: int) -> tuple[str, Path]:
    """A run directory with every file of `rounds` finished rounds, written without any compute."""
    from configs.recipe import load_recipe

    recipe = write_recipe(tmp_path)
    run_dir = tmp_path / "runs" / NAME
    run_dir.mkdir(parents=True)
    (run_dir / "run.yaml").write_text(yaml.safe_dump({"recipe": load_recipe(recipe).to_dict()}))
    base = run_dir / "base_model"
    base.mkdir()
    (base / "_SUCCESS").write_text("x\n")
    row = {"prompt_id": "p", "prompt": "q", "response": "r", "sample_index": 0, "num_tokens": 1}
    for r in range(rounds + 1):
        rd = run_dir / f"round_{r:02d}"
        write_parquet(pd.DataFrame([{**row, "round": r, "kind": "greedy", "logp": -1.0}]), rd / "eval.parquet", EVAL)
        (rd / "metrics.json").write_text("{}")
        if r == 0:
            continue
        write_parquet(pd.DataFrame([{**row, "round": r}]), rd / "generations.parquet", GENERATIONS)
        write_parquet(pd.DataFrame([{"prompt_id": "p", "prompt": "q", "chosen": "a", "rejected": "b", "chosen_score": 1.0,
                                     "rejected_score": 0.0, "round": r, "judge": "ground_truth"}]), rd / "pairs.parquet", PAIRS)
        for meta in ("generate_meta.json", "judge_meta.json"):
            (rd / meta).write_text("{}")
        (rd / "checkpoint").mkdir()
        (rd / "checkpoint" / "_SUCCESS").write_text("x\n")
    return recipe, run_dir


def check(recipe, tmp_path, rounds, caplog) -> list[str]:
    luigi.task_register.Register.clear_instance_cache()
    caplog.clear()
    with caplog.at_level("WARNING", logger="selfplay"):
        Iterate(recipe=recipe, runs_dir=str(tmp_path / "runs"), rounds=rounds)
    lock.release_all()
    return [r.getMessage() for r in caplog.records if r.name == "selfplay"]


def test_an_intact_or_merely_unfinished_run_says_nothing(tmp_path, caplog):
    recipe, run_dir = fake_run(tmp_path, 2)
    assert check(recipe, tmp_path, 2, caplog) == []
    assert check(recipe, tmp_path, 3, caplog) == []  # one more round asked for
    for name in ("eval.parquet", "metrics.json", "pairs.parquet", "judge_meta.json"):  # killed in round 2
        (run_dir / "round_02" / name).unlink()
    shutil.rmtree(run_dir / "round_02" / "checkpoint")
    assert check(recipe, tmp_path, 2, caplog) == []


def test_a_round_removed_while_later_rounds_remain_says_which_rounds_rerun(tmp_path, caplog):
    recipe, run_dir = fake_run(tmp_path, 3)
    shutil.rmtree(run_dir / "round_01")
    assert check(recipe, tmp_path, 3, caplog) == [
        f"{run_dir / 'round_01' / 'generations.parquet'} is missing while files made from it remain in rounds 2, 3: "
        "rounds 1, 2, 3 will run again and replace them"
    ]
    # Asked for fewer rounds, round 3 would be left made from the old round 1: refused.
    luigi.task_register.Register.clear_instance_cache()
    with pytest.raises(DataError, match=r"rounds 2, 3 lie beyond --rounds 1 .*run with --rounds 3, or delete round_02, round_03"):
        Iterate(recipe=recipe, runs_dir=str(tmp_path / "runs"), rounds=1)
    assert not lock.holds(run_dir)  # refused: the lock is given back at once


def test_a_checkpoint_without_success_is_said(tmp_path, caplog):
    recipe, run_dir = fake_run(tmp_path, 2)
    (run_dir / "round_02" / "checkpoint" / "_SUCCESS").unlink()
    (run_dir / "round_02" / "checkpoint" / "model.safetensors").write_text("copied in by hand")
    assert check(recipe, tmp_path, 2, caplog) == [
        f"{run_dir / 'round_02' / 'checkpoint'} has no _SUCCESS (incomplete, or edited by hand) while files made from it "
        "remain in round 2: round 2 will run again and replace them"
    ]
    (run_dir / "round_02" / "eval.parquet").unlink()
    (run_dir / "round_02" / "metrics.json").unlink()
    assert check(recipe, tmp_path, 2, caplog) == [
        f"{run_dir / 'round_02' / 'checkpoint'} has no _SUCCESS (incomplete, or edited by hand): "
        "Train of round 2 will run again and replace it"
    ]


@pytest.mark.parametrize("name, content, message", [
    ("pairs.parquet", pd.DataFrame({"prompt_id": ["p"], "prompt": ["q"]}), "not a pairs file: missing column(s) chosen, rejected"),
    ("generations.parquet", pd.DataFrame({"prompt_id": ["p"], "prompt": ["q"], "response": ["r"], "sample_index": ["0"],
                                          "round": [1], "num_tokens": [1]}),
     "not a generations file: column 'sample_index' is large_string, not int64"),
    ("eval.parquet", b"PAR1 not really", "not a readable Parquet file"),
    ("metrics.json", b"{'round': 1", "not valid JSON"),
])
def test_an_artifact_replaced_by_another_kind_of_file_is_refused(tmp_path, caplog, name, content, message):
    recipe, run_dir = fake_run(tmp_path, 2)
    path = run_dir / "round_01" / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        content.to_parquet(path)
    luigi.task_register.Register.clear_instance_cache()
    with pytest.raises(DataError) as raised:
        Iterate(recipe=recipe, runs_dir=str(tmp_path / "runs"), rounds=2)
    assert str(raised.value).startswith(f"{path}: {message}") and "delete it and the run makes it again" in str(raised.value)


@pytest.mark.parametrize("edit, message", [
    (lambda text: text.replace("recipe:", "recipe: [", 1), r"run.yaml: not valid YAML at line \d+ \(edited by hand\?\)"),
    (lambda text: "- just a list\n", "has no 'recipe' mapping"),
    (lambda text: text.replace("beta: 0.1", "beta: 0.5"), r"was made by a different recipe \(changed: training.beta"),
])
def test_a_run_yaml_edited_by_hand_is_refused(tmp_path, edit, message):
    recipe, run_dir = fake_run(tmp_path, 1)
    run_yaml = run_dir / "run.yaml"
    run_yaml.write_text(edit(run_yaml.read_text()))
    luigi.task_register.Register.clear_instance_cache()
    with pytest.raises(RecipeError, match=message):
        Iterate(recipe=recipe, runs_dir=str(tmp_path / "runs"), rounds=1)


def test_cli_an_artifact_of_the_wrong_kind_is_one_line_before_any_compute(tmp_path):
    recipe, run_dir = fake_run(tmp_path, 1)
    pd.DataFrame({"prompt": ["q"]}).to_parquet(run_dir / "round_01" / "pairs.parquet")
    result = run_cli(tmp_path, "Iterate", "--rounds", "2", "--recipe", recipe)
    assert_one_line_failure(result, str(run_dir / "round_01" / "pairs.parquet"), "not a pairs file")
    assert not (run_dir / "round_02").exists() and not (run_dir / lock.LOCK_NAME).exists()


# --- input files name the place -----------------------------------------------------------------------

@pytest.mark.parametrize("text, message", [
    ('{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": "d"}\n{"prompt": "e", "response": \n',
     "line 3: not valid JSON (Expecting value at column 29)"),
    ('{"prompt": "a", "response": "b"}\n\n["c", "d"]\n', "line 3: expected a JSON object, got list"),
    ("", "the file is empty"),
    ("\n  \n", "the file is empty"),
])
def test_a_bad_jsonl_line_or_an_empty_file_is_named(tmp_path, text, message):
    from configs.recipe import load_recipe
    from data.prompts import load_prompts

    data = tmp_path / "train.jsonl"
    data.write_text(text)
    with pytest.raises(DataError) as raised:
        load_prompts(str(data), "train", load_recipe(write_recipe(tmp_path)).data, require_reference=True)
    assert str(raised.value).startswith(f"{data}: {message}")


def test_cli_a_malformed_jsonl_line_is_named_by_its_line_number(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"p{i}", "response": "r"}) + "\n" for i in range(40)) + "{oops\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"data": {"train": str(data)}}))
    assert_one_line_failure(run_cli(tmp_path, "Iterate", "--recipe", str(recipe)), str(data), "line 41: not valid JSON")


# --- soak: random SIGKILLs ----------------------------------------------------------------------------

SOAK_KILLS = int(os.environ.get("SELFPLAY_SOAK_KILLS", "5"))


@pytest.mark.slow
def test_soak_random_sigkills_then_the_same_result(tmp_path, clean_run):
    """SELFPLAY_SOAK_KILLS (default 5, README: 20) SIGKILLs at random moments of a three-round run, each
    followed by a rerun (which the next kill may hit); the last rerun ends with the uninterrupted run's result."""
    rng = random.Random(int(os.environ.get("SELFPLAY_SOAK_SEED", "0")))
    recipe = write_recipe(tmp_path)
    runs = tmp_path / "runs"
    run_dir = runs / NAME
    command = [sys.executable, "-m", "luigi", "--module", "pipeline", "Iterate", "--rounds", str(ROUNDS),
               "--recipe", recipe, "--runs-dir", str(runs)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # Each run is killed a random time after its first task starts (start-up, the same every time, is left
    # out); the fewer kills, the longer that time may be, so that kills spread over the whole run (each
    # rerun resumes where the last was killed) and the last still lands before its end.
    longest = min(40.0, max(10.0, 300.0 / SOAK_KILLS))
    survived, finished_early, killed_in = 0, False, []
    for kill in range(SOAK_KILLS):
        log_path = tmp_path / f"run-{kill}.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            deadline = time.time() + 300
            while proc.poll() is None and " running " not in log_path.read_text() and time.time() < deadline:
                time.sleep(0.05)
            try:
                proc.wait(timeout=rng.uniform(0.0, longest))
                finished_early = True  # the run was over before its kill: nothing left to kill
                assert proc.returncode == 0, log_path.read_text()[-3000:]
                break
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        survived += 1
        running = re.findall(r"running\s+(\w+)\(.*?(?:round_idx=(\d+))?\)$", log_path.read_text(), re.M)
        killed_in.append(f"{running[-1][0]}{running[-1][1]}" if running else "start-up")
        # Whatever a kill leaves, every finished artifact is whole.
        for path in run_dir.rglob("*.parquet"):
            if not path.name.startswith(".") and path.parent.name != "generate_work":
                read_artifact(path, {"generations": GENERATIONS, "pairs": PAIRS, "eval": EVAL}[path.stem]) \
                    if path.stem in ("generations", "pairs", "eval") else pd.read_parquet(path)
    final = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env, timeout=900)
    assert final.returncode == 0, final.stderr[-3000:]
    ended = f" (the run ended before kill {survived + 1} of {SOAK_KILLS})" if finished_early else ""
    print(f"soak: {survived} SIGKILLs survived{ended}; killed in: {', '.join(killed_in)}")
    assert_same_rounds(run_dir, clean_run, range(1, ROUNDS + 1))
    assert not no_temporaries(runs) and not (run_dir / lock.LOCK_NAME).exists()

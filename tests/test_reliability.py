"""Interrupted runs resume, bad inputs fail in one line with a non-zero exit, faults are contained."""

import json
import logging
import os
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
from common.errors import ModelError, TrainingError
from data.schema import EVAL, GENERATIONS, PAIRS, read_artifact
from models.generate.generation import run_with_oom_backoff
from tasks.base import DirTarget
from tasks.iterate import Iterate
from tasks.rounds import Generate
from conftest import REPO

# Runs the luigi command line in a child, with generation and training slowed down so the test can
# kill it in the middle of either. The slowing is done here, by wrapping two functions; no test hook
# lives in the product.
DRIVER = """
import sys, time
import luigi.cmdline
import models.generate.generation as generation
import models.train.trainer as trainer

delay = float(sys.argv[1])
_generate, _logps = generation.generate_texts, trainer.sequence_logps

def slow_generate(*args, **kwargs):
    time.sleep(delay)
    return _generate(*args, **kwargs)

def slow_logps(*args, **kwargs):
    time.sleep(delay / 4)
    return _logps(*args, **kwargs)

generation.generate_texts, trainer.sequence_logps = slow_generate, slow_logps
luigi.cmdline.luigi_run(sys.argv[2:])
"""


def start(tmp_path, recipe, runs, delay, rounds=1):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    args = [sys.executable, str(driver), str(delay), "--module", "pipeline", "Iterate", "--rounds", str(rounds),
            "--recipe", recipe, "--runs-dir", str(runs)]
    log = open(tmp_path / f"run-{time.time_ns()}.log", "w")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(args, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True), log.name


def kill_when(proc, condition, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return
        if proc.poll() is not None:
            pytest.fail("the run ended before it could be killed")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail("timed out waiting to kill the run")


@pytest.mark.slow
def test_killed_mid_generation_and_mid_training_resumes_to_the_same_result(tiny_recipe, tmp_path):
    recipe = tiny_recipe("spin", generation={"shard_size": 8}, training={"epochs": 3, "save_steps": 2})
    runs = tmp_path / "runs"
    round_dir = runs / "tiny_spin" / "round_01"

    proc, _ = start(tmp_path, recipe, runs, delay=1.0)
    kill_when(proc, lambda: (round_dir / "generate_work" / "part-00001.parquet").exists())
    assert not (round_dir / "generations.parquet").exists()
    kept = {p.name: p.stat().st_mtime_ns for p in (round_dir / "generate_work").glob("part-*.parquet")}

    proc, _ = start(tmp_path, recipe, runs, delay=1.0)
    kill_when(proc, lambda: any((round_dir / "train_work").glob("checkpoint-*/state.pt")))
    assert not (round_dir / "checkpoint" / "_SUCCESS").exists()
    for name, mtime in kept.items():  # parts written before the first kill were reused, not redone
        assert (round_dir / "generate_work" / name).stat().st_mtime_ns == mtime

    proc, log_path = start(tmp_path, recipe, runs, delay=0.0)
    assert proc.wait(timeout=600) == 0, Path(log_path).read_text()[-3000:]
    assert "resuming from" in Path(log_path).read_text()

    # An uninterrupted run of the same recipe gives the same samples and the same trained weights.
    assert luigi.build([Iterate(recipe=recipe, runs_dir=str(tmp_path / "clean"), rounds=1)], local_scheduler=True)
    clean_dir = tmp_path / "clean" / "tiny_spin" / "round_01"
    pd.testing.assert_frame_equal(read_artifact(round_dir / "generations.parquet", GENERATIONS),
                                  read_artifact(clean_dir / "generations.parquet", GENERATIONS))
    read_artifact(round_dir / "pairs.parquet", PAIRS)
    read_artifact(round_dir / "eval.parquet", EVAL)
    from safetensors.torch import load_file

    resumed = load_file(round_dir / "checkpoint" / "adapter" / "adapter_model.safetensors")
    clean = load_file(clean_dir / "checkpoint" / "adapter" / "adapter_model.safetensors")
    assert resumed.keys() == clean.keys()
    # LoRA's B starts at zero: equal adapters would prove nothing if training left them there. Every B
    # moved, by far more than the tolerance the two runs are compared with.
    lora_b = [k for k in clean if "lora_B" in k]
    assert lora_b and min(clean[k].abs().max().item() for k in lora_b) > 1e-4
    assert all(torch.allclose(resumed[k], clean[k], rtol=0, atol=1e-6) for k in resumed)
    history = json.loads((round_dir / "checkpoint" / "training_log.json").read_text())["history"]
    clean_history = json.loads((clean_dir / "checkpoint" / "training_log.json").read_text())["history"]
    # Every step, the ones before the kill kept, as many as the uninterrupted run took.
    assert [h["step"] for h in history] == [h["step"] for h in clean_history] == list(range(1, len(clean_history) + 1))


def run_cli(tmp_path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "luigi", "--module", "pipeline", *args, "--runs-dir", str(tmp_path / "runs")],
                          cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=600)


def assert_one_line_failure(result, *fragments):
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output[-2000:]
    lines = [line for line in output.splitlines() if "selfplay:" in line and "done in" not in line]
    assert lines and all(f in lines[0] for f in fragments), output[-2000:]


def test_cli_misspelled_recipe_key_is_one_line_and_nonzero(tmp_path):
    from tasks.base import USER_ERROR_EXIT

    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  learnig_rate: 0.1\n")
    result = run_cli(tmp_path, "Iterate", "--recipe", str(bad))
    assert_one_line_failure(result, str(bad), "training.learnig_rate")
    # Our own message and exit code for "your input is wrong", not Luigi's for an exception it did not expect.
    assert result.returncode == USER_ERROR_EXIT == 2
    assert (result.stdout + result.stderr).strip().splitlines() == [
        f"selfplay: {bad}: unknown key 'training.learnig_rate' (did you mean 'training.learning_rate'?)"]


def test_cli_base_model_that_is_not_a_model(tmp_path):
    empty = tmp_path / "not_a_model"
    empty.mkdir()
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"model:\n  base_model: {empty}\n")
    assert_one_line_failure(run_cli(tmp_path, "Iterate", "--recipe", str(bad)), str(empty), "no config.json")


@pytest.mark.parametrize(
    "rows, fragment",
    [
        ([{"prompt": "a"}], "missing column(s) response"),  # SPIN needs ground truth
        ([{"prompt": "a", "response": "b"}, {"prompt": 7, "response": "c"}], "row 1: field 'prompt' must be text"),
        ([{"prompt_id": "x", "prompt": "a", "response": "b"}, {"prompt_id": "x", "prompt": "c", "response": "d"}],
         "row 1: duplicate prompt_id 'x'"),
    ],
)
def test_cli_bad_dataset_rows(tmp_path, rows, fragment):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"data": {"train": str(data)}}))
    assert_one_line_failure(run_cli(tmp_path, "Iterate", "--recipe", str(recipe)), str(data), fragment)


def test_checkpoint_of_another_base_is_refused(tmp_path):
    from models.load.loading import CHECKPOINT_INFO, check_same_root

    (tmp_path / CHECKPOINT_INFO).write_text(json.dumps({"root_model": "org/other-model"}))
    with pytest.raises(ModelError, match="descends from org/other-model, not from this run's base org/mine"):
        check_same_root(tmp_path, "org/mine")
    check_same_root(tmp_path, "org/other-model")


def test_directory_outputs_appear_whole_or_not_at_all(tmp_path):
    target = DirTarget(str(tmp_path / "checkpoint"))
    with pytest.raises(RuntimeError):
        with target.temporary_path() as tmp:
            (Path(tmp) / "weights").write_text("half")
            raise RuntimeError("killed while writing")
    assert not target.exists() and not (tmp_path / "checkpoint").exists()
    with target.temporary_path() as tmp:  # the next attempt clears the stale temporary and succeeds
        (Path(tmp) / "weights").write_text("whole")
    assert target.exists() and (tmp_path / "checkpoint" / "weights").read_text() == "whole"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tiny_recipe, tmp_path, monkeypatch):
    import models.train.trainer as trainer
    from configs.recipe import load_recipe
    from models.train.sft import build_demo_model

    recipe = load_recipe(tiny_recipe("spin", training={"save_steps": 1, "epochs": 2}, demo_model={"sft_steps": 2}))
    build_demo_model(recipe.demo_model, [{"prompt": "What is 1 + 1?", "reference": "2"}], tmp_path / "base", 0)
    pairs = pd.DataFrame({"prompt_id": [str(i) for i in range(16)], "prompt": ["What is 1 + 1?"] * 16, "chosen": ["2"] * 16,
                          "rejected": ["3"] * 16})
    calls = {"n": 0}
    real = trainer.LOSSES["dpo_sigmoid"]

    def poisoned(batch):
        calls["n"] += 1
        loss = real(batch)
        return loss * float("nan") if calls["n"] > 2 else loss

    monkeypatch.setitem(trainer.LOSSES, "dpo_sigmoid", poisoned)
    with pytest.raises(TrainingError, match=r"loss became nan at step 3; last good trainer checkpoint: .*checkpoint-2"):
        trainer.train_round(recipe, str(tmp_path / "base"), pairs, tmp_path / "work", tmp_path / "out", 1, "demo")
    assert (tmp_path / "work" / "checkpoint-2" / "state.pt").is_file() and not (tmp_path / "out").exists()


def test_cuda_oom_halves_the_batch_and_goes_on(caplog):
    seen = []

    def work(batch):
        seen.append(len(batch))
        if len(batch) > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [x * 2 for x in batch]

    with caplog.at_level(logging.WARNING, logger="selfplay"):
        assert run_with_oom_backoff(work, list(range(10)), 8, "generation") == [x * 2 for x in range(10)]
    assert seen[:3] == [8, 4, 2] and "retrying with batch size 4" in caplog.text


def test_other_runtime_errors_are_not_swallowed():
    def work(batch):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_with_oom_backoff(work, [1, 2], 2, "generation")


@pytest.mark.slow
def test_same_seed_same_generations(tiny_recipe, tmp_path):
    recipe = tiny_recipe("sppo")
    for name in ("a", "b"):
        assert luigi.build([Generate(recipe=recipe, runs_dir=str(tmp_path), run_name=name, round_idx=1)],
                           local_scheduler=True)
    first, second = (pd.read_parquet(tmp_path / n / "round_01" / "generations.parquet") for n in ("a", "b"))
    pd.testing.assert_frame_equal(first, second)
    assert first.response.nunique() > 1

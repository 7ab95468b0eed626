"""FSDP with LoRA (models/train/fsdp.py) on the CPU: `accelerate launch` with the shipped FSDP config starts two
processes (gloo) that shard a tiny random Llama and train one round; the adapter, the reference
log-probs and every step's logged figures equal one process accumulating the same micro-batches.
With 7 pairs the processes take 4 and 3 in the reference pass (the shorter share padded), and each
epoch ends with a short micro-batch.

Tolerance: 1e-5 absolute on fp32 (the two runs add the same gradients in a different order). Measured:
0 for the adapter, the losses and the reference log-probs, at most 6e-8 for a step's gradient norm.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

import models.train.trainer as trainer
from configs.recipe import recipe_from_dict
from data.schema import write_parquet
from conftest import save_tiny_llama_root

REPO = Path(__file__).resolve().parents[3]
FSDP_CONFIG = "configs/accelerate/fsdp_lora.yaml"
TOLERANCE = 1e-5


def recipe_dict(root_path: str, grad_accum_steps: int, **training) -> dict:
    return {
        "algorithm": "dpo", "judge": {"name": "verifier"}, "generation": {"num_samples": 2},
        "model": {"base_model": root_path, "precision": "fp32"},
        "training": {"epochs": 2, "batch_size": 2, "grad_accum_steps": grad_accum_steps, "max_length": 96, "learning_rate": 5e-3,
                     "lora_r": 4, "lora_alpha": 8, "save_steps": 1, "warmup_ratio": 0.0, "save_merged": True, **training},
    }


def make_pairs(n: int = 7) -> pd.DataFrame:
    return pd.DataFrame({
        "prompt_id": [str(i) for i in range(n)], "prompt": [f"q{i} {i * 7}" + " x" * i for i in range(n)],
        "chosen": [f"a{i * 3}" for i in range(n)], "rejected": [f"b{i}x" + "y" * i for i in range(n)],
        "chosen_score": 1.0, "rejected_score": 0.0, "round": 1, "judge": "verifier",
        "chosen_win_prob": 0.8, "rejected_win_prob": 0.2,
    })


def job(root_path: str, pair_file: Path, run_dir: Path, recipe: dict) -> dict:
    return {"recipe": recipe_from_dict(recipe).to_dict(), "parent": root_path, "pair_files": [[str(pair_file), 1.0, 1]],
            "work_dir": str(run_dir / "work"), "out_dir": str(run_dir / "out"), "round_idx": 1, "root_model": root_path,
            "root_path": root_path}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process accumulating 2 micro-batches per step, and FSDP over 2 processes taking one each."""
    tmp = tmp_path_factory.mktemp("fsdp")
    root_path = save_tiny_llama_root(tmp / "root")[0]
    pair_file = tmp / "pairs.parquet"
    write_parquet(make_pairs(), pair_file)

    trainer.run_job(job(root_path, pair_file, tmp / "one", recipe_dict(root_path, grad_accum_steps=2)))

    output = launch_fsdp(job(root_path, pair_file, tmp / "fsdp", recipe_dict(root_path, grad_accum_steps=1)))
    return tmp / "one", tmp / "fsdp", output


def launch_fsdp(sharded_job: dict) -> str:
    """`accelerate launch` with the shipped FSDP config, 2 processes, on the job; returns the output."""
    job_file = Path(sharded_job["work_dir"]).parent / "job.json"
    job_file.parent.mkdir(parents=True, exist_ok=True)
    job_file.write_text(json.dumps(sharded_job))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", FSDP_CONFIG, "--num_processes", "2",
               "-m", "models.train.trainer", str(job_file)]
    with subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as done:
        try:
            stdout, stderr = done.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            # The launcher starts each process in a session of its own: processes left waiting on each other
            # are killed one by one, or they would hold the pipes open.
            import psutil  # accelerate's dependency

            launcher = psutil.Process(done.pid)
            for process in [*launcher.children(recursive=True), launcher]:
                process.kill()
            stdout, stderr = done.communicate()
            pytest.fail("the FSDP processes were still running after 300 s:\n" + stderr[-3000:])
    assert done.returncode == 0, stdout[-3000:] + stderr[-6000:]
    return stdout + stderr


def test_fsdp_run_sharded_the_policy_over_two_processes(runs):
    _, _, output = runs
    held = {int(rank): (int(mine), int(whole)) for rank, mine, whole in
            re.findall(r"FSDP2 over 2 processes; process (\d) holds (\d+) of its (\d+) weights", output)}
    assert set(held) == {0, 1}
    (mine0, whole), (mine1, whole1) = held[0], held[1]
    assert whole == whole1 and mine0 + mine1 == whole and max(mine0, mine1) < 0.6 * whole  # about half each


def test_fsdp_adapter_equals_one_process(runs):
    one, sharded, _ = runs
    expected, got = (load_file(run / "out" / "adapter" / "adapter_model.safetensors") for run in (one, sharded))
    assert set(got) == set(expected) and len(got) > 0
    for name in expected:
        assert not torch.equal(expected[name], torch.zeros_like(expected[name])), name  # the adapter was trained
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=TOLERANCE, msg=name)
    merged_one, merged_fsdp = (load_file(run / "out" / "model.safetensors") for run in (one, sharded))
    for name in merged_one:
        torch.testing.assert_close(merged_fsdp[name], merged_one[name], rtol=0, atol=TOLERANCE, msg=name)


def test_fsdp_losses_and_reference_logps_equal_one_process(runs):
    one, sharded, _ = runs
    expected, got = (json.loads((run / "out" / "training_log.json").read_text()) for run in (one, sharded))
    assert got["stats"]["steps"] == expected["stats"]["steps"] == 4
    for want, have in zip(expected["history"], got["history"], strict=True):
        for key in (*trainer.PREFERENCE_LOG_KEYS, "grad_norm", "learning_rate"):
            assert have[key] == pytest.approx(want[key], rel=0, abs=TOLERANCE), (have["step"], key)
        assert (have["tokens"], have["tokens_run"]) == (want["tokens"], want["tokens_run"])
    pd.testing.assert_frame_equal(pd.read_parquet(sharded / "work" / "ref_logps.parquet"),
                                  pd.read_parquet(one / "work" / "ref_logps.parquet"), rtol=0, atol=TOLERANCE)


def test_fsdp_trainer_checkpoint_holds_the_whole_adapter(runs):
    one, sharded, _ = runs
    expected, got = (torch.load(trainer._latest_checkpoint(run / "work") / "state.pt", weights_only=True) for run in (one, sharded))
    assert got["fsdp"] and got["step"] == expected["step"]
    for name, value in expected["adapter"].items():
        torch.testing.assert_close(got["adapter"][name], value, rtol=0, atol=TOLERANCE, msg=name)


def test_fsdp_run_resumed_from_a_trainer_checkpoint_ends_as_the_uninterrupted_run(runs):
    # The sharded run's work directory as a run killed after step 3 leaves it: checkpoint-3 (and 2) only.
    one, sharded, _ = runs
    resumed = sharded.parent / "resumed"
    shutil.copytree(sharded / "work", resumed / "work")
    shutil.rmtree(resumed / "work" / "checkpoint-4")
    sharded_job = json.loads((sharded / "job.json").read_text())
    output = launch_fsdp({**sharded_job, "work_dir": str(resumed / "work"), "out_dir": str(resumed / "out")})
    assert "resuming from" in output and "(step 3 of 4)" in output
    expected, got = (load_file(run / "out" / "adapter" / "adapter_model.safetensors") for run in (one, resumed))
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=TOLERANCE, msg=name)
    history = json.loads((resumed / "out" / "training_log.json").read_text())["history"]
    want = json.loads((one / "out" / "training_log.json").read_text())["history"]
    assert [h["loss"] for h in history] == pytest.approx([h["loss"] for h in want], rel=0, abs=TOLERANCE)


def test_fsdp_without_the_shared_prompt_runs_as_many_forwards_on_every_process(runs):
    """training.shared_prompt: false. The reference pass then runs each side as its own sequence, in
    batches of the same size on both processes: grouped by prompt, the shares of 4 and 3 pairs (the shorter
    padded with its last pair, a prompt then holding four rows) made 2 and 3 batches here, and the process
    with fewer forwards left the other waiting for ever in FSDP's all-gather."""
    one, _, _ = runs
    tmp = one.parent
    root_path, pair_file = str(tmp / "root"), tmp / "unshared_pairs.parquet"
    pairs = make_pairs()
    pairs.loc[3, "prompt"] += " long" * 6  # process 1 takes pairs 1, 3, 5 and 5: by length p1, p5, p3
    write_parquet(pairs, pair_file)
    trainer.run_job(job(root_path, pair_file, tmp / "one_unshared", recipe_dict(root_path, grad_accum_steps=2, shared_prompt=False)))
    launch_fsdp(job(root_path, pair_file, tmp / "fsdp_unshared", recipe_dict(root_path, grad_accum_steps=1, shared_prompt=False)))
    expected, got = (pd.read_parquet(tmp / run / "work" / "ref_logps.parquet") for run in ("one_unshared", "fsdp_unshared"))
    pd.testing.assert_frame_equal(got, expected, rtol=0, atol=TOLERANCE)
    expected, got = (load_file(tmp / run / "out" / "adapter" / "adapter_model.safetensors") for run in ("one_unshared", "fsdp_unshared"))
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=TOLERANCE, msg=name)


def test_fsdp_fits_supervised_examples_as_one_process(tmp_path):
    # algorithm rest (loss nll): examples, no reference, no rejected side; FSDP over 2 equals one process.
    from data.schema import SELECTED

    root_path = save_tiny_llama_root(tmp_path / "root")[0]
    examples = pd.DataFrame({"prompt_id": [str(i) for i in range(7)], "prompt": [f"q{i} {i * 7}" + " x" * i for i in range(7)],
                             "response": [f"a{i * 3}" + "y" * i for i in range(7)], "sample_index": 0, "round": 1,
                             "num_tokens": 2, "score": 1.0, "judge": "verifier", "source": "sample"})
    example_file = tmp_path / "selected.parquet"
    write_parquet(examples, example_file, SELECTED)
    rest = {"algorithm": "rest", "generation": {"num_samples": 1}}
    trainer.run_job(job(root_path, example_file, tmp_path / "one", {**recipe_dict(root_path, grad_accum_steps=2), **rest}))
    launch_fsdp(job(root_path, example_file, tmp_path / "fsdp", {**recipe_dict(root_path, grad_accum_steps=1), **rest}))
    expected, got = (json.loads((tmp_path / run / "out" / "training_log.json").read_text()) for run in ("one", "fsdp"))
    assert got["stats"]["loss"] == "nll" and got["stats"]["examples"] == 7 and got["stats"]["steps"] == 4
    for want, have in zip(expected["history"], got["history"], strict=True):
        for key in ("loss", "logps/response", "tokens/response", "grad_norm"):
            assert have[key] == pytest.approx(want[key], rel=0, abs=TOLERANCE), (have["step"], key)
    one, sharded = (load_file(tmp_path / run / "out" / "adapter" / "adapter_model.safetensors") for run in ("one", "fsdp"))
    for name in one:
        torch.testing.assert_close(sharded[name], one[name], rtol=0, atol=TOLERANCE, msg=name)


@pytest.mark.parametrize("setting, message", [
    ({"quantized": True}, r"model.quantization: 4bit cannot be trained under FSDP"),
    ({"FSDP_VERSION": "1"}, r"fsdp_version is 1; the trainer shards with FSDP2: set fsdp_version: 2"),
    ({"FSDP_OFFLOAD_PARAMS": "true"}, r"fsdp_offload_params is true"),
    ({"FSDP_CPU_RAM_EFFICIENT_LOADING": "true"}, r"fsdp_cpu_ram_efficient_loading is true"),
])
def test_fsdp_settings_it_does_not_implement_are_one_line_errors(monkeypatch, setting, message):
    from common.errors import RecipeError
    from models.train.fsdp import check_fsdp

    for key in ("FSDP_VERSION", "FSDP_OFFLOAD_PARAMS", "FSDP_CPU_RAM_EFFICIENT_LOADING"):
        monkeypatch.delenv(key, raising=False)
    shipped = yaml.safe_load((REPO / FSDP_CONFIG).read_text())
    assert shipped["distributed_type"] == "FSDP" and shipped["fsdp_config"]["fsdp_version"] == 2
    assert not shipped["fsdp_config"]["fsdp_offload_params"] and not shipped["fsdp_config"]["fsdp_cpu_ram_efficient_loading"]
    check_fsdp(quantized=False)  # the shipped config's settings pass
    setting = dict(setting)
    quantized = setting.pop("quantized", False)
    for key, value in setting.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(RecipeError, match=message):
        check_fsdp(quantized=quantized)

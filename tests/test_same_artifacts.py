"""bench/same_artifacts.py, the check that a change left a run's results alone: equal runs pass, a difference
in any compared artifact fails, and what differs by nature (wall times) is left out."""

import json
import shutil
import sys

import pandas as pd
import torch
from safetensors.torch import save_file

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
from same_artifacts import compare  # noqa: E402


def make_run(runs_dir, adapter_value=0.25, loss=0.6931, seconds=1.0, response="12", logp=-3.5, num_tokens=4):
    run = runs_dir / "demo_spin"
    checkpoint = run / "round_01" / "checkpoint" / "adapter"
    checkpoint.mkdir(parents=True)
    (run / "run.yaml").write_text("name: demo_spin\n")
    pd.DataFrame({"prompt_id": [0, 1], "response": [response, "7"], "logp": [logp, -2.0], "num_tokens": [num_tokens, 3]}).to_parquet(
        run / "round_01" / "generations.parquet")
    save_file({"lora_A": torch.full((2, 3), adapter_value)}, str(checkpoint / "adapter_model.safetensors"))
    metrics = {"train": {"final_loss": loss, "reference_seconds": seconds, "train_tokens_per_second": 100 / seconds}}
    (run / "round_01" / "metrics.json").write_text(json.dumps(metrics))
    return runs_dir


def test_equal_runs_pass_and_wall_times_are_left_out(tmp_path, capsys):
    before = make_run(tmp_path / "before")
    after = make_run(tmp_path / "after", seconds=3.0)
    assert compare(before, after) == 0
    out = capsys.readouterr().out
    assert "SAME" in out and "metrics.json.train.reference_seconds" in out


def test_a_moved_adapter_weight_a_changed_response_or_figure_fails(tmp_path):
    before = make_run(tmp_path / "before")
    assert compare(before, make_run(tmp_path / "weights", adapter_value=0.25 + 1e-4)) == 1
    assert compare(before, make_run(tmp_path / "response", response="13")) == 1
    assert compare(before, make_run(tmp_path / "loss", loss=0.6932)) == 1
    # within fp32 rounding (the tolerance the script states) is equal
    assert compare(before, make_run(tmp_path / "rounding", adapter_value=0.25 * (1 + 1e-7))) == 0


def test_parquet_floats_are_compared_within_fp32_rounding_and_the_rest_exactly(tmp_path):
    """A log-prob computed another way (another batch shape) differs in its last bits: equal. A log-prob that moved,
    or a count off by one, is not."""
    before = make_run(tmp_path / "before")
    assert compare(before, make_run(tmp_path / "rounding", logp=-3.5 * (1 + 4e-6))) == 0
    assert compare(before, make_run(tmp_path / "moved", logp=-3.5 * (1 + 1e-3))) == 1
    # an integer is never "within rounding": one more in a million still differs
    big = make_run(tmp_path / "big", num_tokens=1_000_000)
    assert compare(big, make_run(tmp_path / "count", num_tokens=1_000_001)) == 1


def test_a_missing_round_or_artifact_fails(tmp_path):
    before = make_run(tmp_path / "before")
    after = make_run(tmp_path / "after")
    (after / "demo_spin" / "round_01" / "generations.parquet").unlink()
    assert compare(before, after) == 1
    shutil.rmtree(after / "demo_spin" / "round_01")
    assert compare(before, after) == 1
    assert compare(before, after, up_to_round=0) == 0

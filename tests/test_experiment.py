"""The improvement experiment's script still runs end to end (at its tiny scale)."""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_improvement_experiment_runs_at_tiny_scale(tmp_path):
    out = tmp_path / "exp"
    result = subprocess.run(
        [sys.executable, "experiments/improvement.py", "--scale", "tiny", "--rounds", "1", "--algorithms", "spin,dpo",
         "--out", str(out), "--set", "training.nll_weight=0.5"],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((out / "results.json").read_text())
    assert set(record["results"]) == {"spin", "dpo", "sft_control"}
    for rows in record["results"].values():
        assert [row["round"] for row in rows] == [0, 1] and all(0 <= row["accuracy"] <= 1 for row in rows)
    recipe = (out / "recipes" / "dpo.yaml").read_text()
    assert "nll_weight: 0.5" in recipe
    assert "| sft_control |" in (out / "results.md").read_text()

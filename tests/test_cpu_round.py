"""bench/cpu_round.py on a tiny recipe: each stage its own command, and `--stages` measuring some stages of a
round again while the JSON keeps the others' figures."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "cpu_round.py"


def cpu_round(*args, cwd):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_stages_run_again_keep_the_stages_measured_before(tiny_recipe, tmp_path):
    recipe = tiny_recipe("spin")
    runs, result = tmp_path / "runs", tmp_path / "stages.json"
    first = cpu_round(recipe, "--runs-dir", str(runs), "--json", str(result),
                      "--stages", "BaseModel,Evaluate 0,Generate 1,Judge 1,Train 1", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    before = json.loads(result.read_text())["recipes"]["tiny_spin"]
    assert [s["stage"] for s in before["stages"]] == ["BaseModel", "Evaluate 0", "Generate 1", "Judge 1", "Train 1"]
    assert "round_1" not in before and not (runs / "tiny_spin" / "round_01" / "eval.parquet").exists()

    second = cpu_round(recipe, "--runs-dir", str(runs), "--json", str(result), "--stages", "Evaluate 1,Report", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    after = json.loads(result.read_text())["recipes"]["tiny_spin"]
    assert [s["stage"] for s in after["stages"]] == ["BaseModel", "Evaluate 0", "Generate 1", "Judge 1", "Train 1",
                                                     "Evaluate 1", "Report"]
    assert after["stages"][:5] == before["stages"]  # measured once, kept as measured
    assert (runs / "tiny_spin" / "round_01" / "eval.parquet").exists() and after["round_1"]["round"] == 1
    assert after["total_seconds"] == pytest.approx(sum(s["seconds"] for s in after["stages"]), abs=0.1)


def test_stages_that_name_no_stage_are_refused_in_one_line(tmp_path):
    result = cpu_round("any.yaml", "--stages", "Evaluate 2", cwd=tmp_path)
    assert result.returncode == 2
    assert "--stages 'Evaluate 2' names none of BaseModel, Evaluate 0, Generate 1" in result.stderr

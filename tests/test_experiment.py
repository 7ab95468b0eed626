"""The improvement experiment's script still runs end to end (at its tiny scale), and its table holds
the figures of the runs it made."""

import json
import subprocess
import sys

import pytest

from data.layout import RunLayout
from data.schema import EVAL, read_artifact
from conftest import REPO


@pytest.mark.slow
def test_improvement_experiment_runs_at_tiny_scale_and_reports_its_runs_figures(tmp_path):
    out = tmp_path / "exp"
    result = subprocess.run(
        [sys.executable, "experiments/improvement.py", "--scale", "tiny", "--rounds", "1", "--algorithms", "spin,dpo",
         "--out", str(out), "--set", "training.nll_weight=0.5"],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((out / "results.json").read_text())
    assert set(record["results"]) == {"spin", "dpo", "sft_control"}
    table = (out / "results.md").read_text()
    for name in ("spin", "dpo"):
        rows = record["results"][name]
        assert [row["round"] for row in rows] == [0, 1]
        run = RunLayout(out / "runs" / name)
        greedy = {r: read_artifact(run.eval(r), EVAL).query("kind == 'greedy'").set_index("prompt_id") for r in (0, 1)}
        # Accuracy: the mean verifier score of the greedy answers in the round's eval.parquet.
        for row in rows:
            assert row["accuracy"] == pytest.approx(greedy[row["round"]].verifier_score.mean(), abs=1e-12)
        # Win rate against the base by the verifier judge: P = 1/2 + (s_round - s_base) / 2 per prompt.
        base_scores = greedy[0].verifier_score.loc[greedy[1].index]
        expected_win = (0.5 + 0.5 * (greedy[1].verifier_score - base_scores)).mean()
        assert rows[1]["win_rate_vs_base"] == pytest.approx(expected_win, abs=1e-12)
        assert f"| {name} | {rows[0]['accuracy']:.3f} | {rows[1]['accuracy']:.3f} / {expected_win:.3f} |" in table
    # The control starts from the same base, so its round 0 is SPIN's.
    control = record["results"]["sft_control"]
    assert [row["round"] for row in control] == [0, 1]
    assert control[0]["accuracy"] == record["results"]["spin"][0]["accuracy"]
    recipe = (out / "recipes" / "dpo.yaml").read_text()
    assert "nll_weight: 0.5" in recipe
    assert "| sft_control |" in table

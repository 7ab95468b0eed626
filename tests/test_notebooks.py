"""The notebooks, executed headless on tiny SPIN and SPPO runs, and the run readers they use.

The notebooks are committed without outputs; the slow tests build two 2-round runs (the SPPO run reuses
the SPIN run's demo base model, so the base is trained once) and execute every cell of each notebook
with nbclient, from the repository root and from notebooks/. Any cell error fails the test.
"""

import shutil
from pathlib import Path

import luigi
import nbformat
import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import ALGORITHMS, REPO, TINY
from luigi.execution_summary import LuigiStatusCode

import pipeline  # noqa: F401 - registers the tasks
from common.atomic import atomic_write_json
from configs.recipe import deep_merge
from data.runs import Run, run_labels, stack_metrics
from data.schema import PAIRS, write_parquet
from tasks.iterate import Iterate

NOTEBOOKS = REPO / "notebooks"
DRIFT = NOTEBOOKS / "iteration_drift.ipynb"
COMPARE = NOTEBOOKS / "compare_runs.ipynb"
CELL_TIMEOUT = 120  # seconds per cell


# ---------------------------------------------------------------- the notebooks as committed


@pytest.mark.parametrize("path", [DRIFT, COMPARE], ids=lambda p: p.name)
def test_notebook_is_committed_stripped_with_a_parameters_cell(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code, f"{path.name} has no code cell"
    for i, cell in enumerate(code):
        assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: code cell {i} has outputs"
    assert "parameters" in code[0].metadata.get("tags", []), f"{path.name}: the first code cell is not tagged 'parameters'"
    assert not [c for c in code[1:] if "parameters" in c.metadata.get("tags", [])]
    defaults = {}
    exec(code[0].source, {}, defaults)  # the parameters cell is plain assignments
    expected = {"run_dir": "runs/demo_spin"} if path == DRIFT else {"run_dirs": ["runs/demo_spin", "runs/demo_sppo"]}
    assert expected.items() <= defaults.items()


# ---------------------------------------------------------------- read helpers added for the notebooks


def _fake_run(root: Path, name: str, algorithm: str, pairs: list[dict] | None = None, judged: bool = True) -> Run:
    run_dir = root / name
    (run_dir / "round_00").mkdir(parents=True)
    (run_dir / "run.yaml").write_text(yaml.safe_dump({"recipe": {"algorithm": algorithm, "judge": {"name": "verifier"}}}))
    atomic_write_json(run_dir / "round_00" / "metrics.json", {"eval": {"accuracy": 0.25, "kl_vs_base": 0.0, "mean_length": 4.0}})
    atomic_write_json(run_dir / "round_01" / "metrics.json", {
        "eval": {"accuracy": 0.5, "kl_vs_base": 0.1, "mean_length": 5.0, "win_rate_vs_base": 0.6},
        "train": {"stats": {"final_loss": 0.6}, "history": [{"step": 1, "loss": 0.7}, {"step": 2, "loss": 0.6}]},
        "judge": {"pairs": len(pairs or [])},
    })
    if judged:
        atomic_write_json(run_dir / "round_01" / "judge_meta.json",
                          {"prompts": 4, "pairs": len(pairs or []), "skipped_ties": 1, "skipped_identical": 0, "unparsed_judgements": 0})
    if pairs is not None:
        base = {"prompt": "p", "chosen": "a", "rejected": "b", "round": 1, "judge": "verifier",
                "chosen_win_prob": np.nan, "rejected_win_prob": np.nan}
        write_parquet(pd.DataFrame([{**base, **p} for p in pairs]), run_dir / "round_01" / "pairs.parquet", PAIRS)
    return Run(run_dir)


def test_matrix_spread_judge_stats_and_recipe(tmp_path):
    run = _fake_run(tmp_path, "judged", "sppo", pairs=[
        {"prompt_id": "x", "chosen_score": 1.0, "rejected_score": 0.0, "chosen_win_prob": 0.75, "rejected_win_prob": 0.25,
         "prob_matrix": [[0.5, 1.0], [0.0, 0.5]]},
        {"prompt_id": "y", "chosen_score": 0.5, "rejected_score": 0.5, "prob_matrix": [[0.5] * 3] * 3},
    ])
    assert run.algorithm == "sppo" and run.recipe["judge"]["name"] == "verifier"
    spread = run.matrix_spread().set_index("prompt_id")
    assert list(spread.columns) == ["round", "k", "score_gap", "win_prob_gap", "matrix_std", "decisiveness"]
    assert spread.loc["x", ["k", "score_gap", "win_prob_gap", "matrix_std", "decisiveness"]].tolist() == [2, 1.0, 0.5, 0.5, 0.5]
    assert spread.loc["y", ["k", "score_gap", "matrix_std", "decisiveness"]].tolist() == [3, 0.0, 0.0, 0.0]
    assert np.isnan(spread.loc["y", "win_prob_gap"])
    stats = run.judge_stats()
    assert stats.to_dict("records") == [{"round": 1, "prompts": 4, "pairs": 2, "skipped_ties": 1, "skipped_identical": 0,
                                         "unparsed_judgements": 0}]


def test_matrix_spread_is_empty_for_spin_pairs_and_for_unjudged_runs(tmp_path):
    spin = _fake_run(tmp_path, "spin", "spin", pairs=[
        {"prompt_id": "x", "chosen_score": np.nan, "rejected_score": np.nan, "prob_matrix": None}])
    assert spin.matrix_spread().empty and "matrix_std" in spin.matrix_spread().columns
    bare = _fake_run(tmp_path, "bare", "dpo", pairs=None, judged=False)
    assert bare.matrix_spread().empty and bare.judge_stats().empty and "skipped_ties" in bare.judge_stats().columns
    (tmp_path / "no_yaml").mkdir()
    assert Run(tmp_path / "no_yaml").recipe == {} and Run(tmp_path / "no_yaml").algorithm is None


def test_stack_metrics_and_unique_labels(tmp_path):
    a = _fake_run(tmp_path / "one", "same", "spin")
    b = _fake_run(tmp_path / "two", "same", "sppo")
    c = _fake_run(tmp_path, "other", "dpo")
    assert run_labels([a, b, c]) == ["one/same", "two/same", "other"]
    assert run_labels([c, c]) == [f"{tmp_path.name}/other#0", f"{tmp_path.name}/other#1"]  # the same run twice
    stacked = stack_metrics([a, b, c])
    assert list(stacked.columns[:3]) == ["run", "algorithm", "round"]
    assert stacked.groupby("run").size().to_dict() == {"one/same": 2, "two/same": 2, "other": 2}
    assert stacked.set_index(["run", "round"]).loc[("two/same", 1), ["algorithm", "accuracy", "train_final_loss"]].tolist() == ["sppo", 0.5, 0.6]
    (tmp_path / "empty").mkdir()
    assert stack_metrics([Run(tmp_path / "empty")]).empty
    # A run with only its base evaluated has no win rate at all: stacked, that is NaN (a float), not None.
    shutil.rmtree(c.round_dir(1))
    only_base = stack_metrics([c])
    assert only_base.win_rate_vs_base.dtype == float and only_base.win_rate_vs_base.isna().all()


# ---------------------------------------------------------------- the notebooks, executed


def _build(recipe: dict, recipes_dir: Path, runs_dir: Path) -> Path:
    path = recipes_dir / f"{recipe['name']}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = luigi.build([Iterate(recipe=str(path), runs_dir=str(runs_dir), rounds=2)], local_scheduler=True,
                         detailed_summary=True, log_level="WARNING")
    # Not SUCCESS_WITH_RETRY: luigi.build reports a task that failed (and was then found complete) as that.
    assert result.status == LuigiStatusCode.SUCCESS, result.summary_text
    return runs_dir / recipe["name"]


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """Two-round SPIN and SPPO runs, plus a run whose base model alone is evaluated (round 1 in progress)."""
    root = tmp_path_factory.mktemp("notebook_runs")
    runs_dir = root / "runs"
    spin = _build({**deep_merge(TINY, ALGORITHMS["spin"]), "name": "nb_spin"}, root, runs_dir)
    # The same demo base as SPIN's (same demo_model and seed), used by path: the base is trained once.
    sppo = _build({**deep_merge(TINY, deep_merge(ALGORITHMS["sppo"], {"model": {"base_model": str(spin / "base_model")}})),
                   "name": "nb_sppo"}, root, runs_dir)
    base_only = runs_dir / "nb_base_only"
    base_only.mkdir()
    shutil.copy(spin / "run.yaml", base_only / "run.yaml")
    shutil.copytree(spin / "round_00", base_only / "round_00")
    (base_only / "round_01").mkdir()
    shutil.copy(spin / "round_01" / "generations.parquet", base_only / "round_01" / "generations.parquet")
    assert Run(sppo).pairs().prob_matrix.notna().any(), "the SPPO run made no judged pair: the matrix cells went untested"
    return {"spin": spin, "sppo": sppo, "base_only": base_only}


@pytest.fixture(scope="module")
def kernel_name():
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec("python3")
    except NoSuchKernel:
        from ipykernel.kernelspec import install

        install(user=True)
    return "python3"


def execute(path: Path, cwd: Path, kernel_name: str, **params) -> nbformat.NotebookNode:
    """Run every cell of the notebook at `path` from `cwd` with `params` set after the parameters cell's
    defaults (papermill's semantics); nbclient raises CellExecutionError on the first failing cell."""
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    cell.source += "\n# injected by tests/test_notebooks.py\n" + "\n".join(f"{k} = {v!r}" for k, v in params.items())
    NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name=kernel_name, resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def _text(nb) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", "") if out.output_type == "stream" else out.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


def _images(nb) -> int:
    return sum("image/png" in out.get("data", {}) for cell in nb.cells for out in cell.get("outputs", []))


@pytest.mark.slow
@pytest.mark.parametrize("kind,cwd", [("spin", NOTEBOOKS), ("sppo", REPO), ("base_only", NOTEBOOKS)])
def test_iteration_drift_runs_every_cell(tiny_runs, kernel_name, kind, cwd):
    nb = execute(DRIFT, cwd, kernel_name, run_dir=str(tiny_runs[kind]), num_examples=3)
    text = _text(nb)
    assert f"run '{tiny_runs[kind].name}'" in text
    if kind == "spin":
        assert "No win-probability matrices in this run (algorithm spin" in text
        assert "[heldout-00000]" in text and "round 2:" in text
    elif kind == "sppo":
        assert "No win-probability matrices" not in text and "decisiveness" in text
    else:
        assert "No training steps recorded yet" in text and "No pairs yet" in text
    assert _images(nb) >= 5


@pytest.mark.slow
def test_compare_runs_runs_every_cell(tiny_runs, kernel_name, tmp_path):
    run_dirs = [str(tiny_runs["spin"]), str(tiny_runs["sppo"]), str(tiny_runs["base_only"]), str(tmp_path / "missing")]
    nb = execute(COMPARE, NOTEBOOKS, kernel_name, run_dirs=run_dirs)
    text = _text(nb)
    assert "Not run directories, left out:" in text and str(tmp_path / "missing") in text
    for name in ("nb_spin", "nb_sppo", "nb_base_only"):
        assert name in text
    for row in ("accuracy change", "win vs base last", "KL vs base last", "implicit-reward acc last", "final train loss last"):
        assert row in text
    assert _images(nb) >= 2
    # From the repository root too, with the two runs of the parameters' default shape.
    execute(COMPARE, REPO, kernel_name, run_dirs=run_dirs[:2])


@pytest.mark.slow
def test_the_installed_notebooks_run_on_any_run_directory_from_anywhere(tiny_runs, kernel_name, tmp_path):
    """`python -m data.notebooks` from a directory with no checkout, on the installed package (no PYTHONPATH):
    the notebook is written beside its outputs with run_dir set, executed, with an HTML copy."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = tmp_path / "elsewhere" / "drift.ipynb"
    result = subprocess.run([sys.executable, "-m", "data.notebooks", "iteration_drift", str(tiny_runs["spin"]), "--out", str(out),
                             "--html"], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == [str(out), str(out.with_suffix(".html"))]
    nb = nbformat.read(out, as_version=4)
    assert f"run '{tiny_runs['spin'].name}'" in _text(nb) and _images(nb) >= 5
    assert "round 2" in out.with_suffix(".html").read_text()
    bad = subprocess.run([sys.executable, "-m", "data.notebooks", "iteration_drift", str(tmp_path)], cwd=tmp_path,
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode != 0 and f"selfplay: {tmp_path}: not a run directory (no run.yaml)" in bad.stderr

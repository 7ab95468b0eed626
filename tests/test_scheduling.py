"""Deciding that a run is complete costs one check per output, however many rounds."""

import sys
from pathlib import Path

import luigi

import pipeline  # noqa: F401 - registers the tasks
from tasks.base import DirTarget
from tasks.evaluate import Evaluate

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from bench_scheduling import fake_complete_run  # noqa: E402


def test_completeness_checks_each_output_once(tmp_path, monkeypatch, tiny_recipe):
    task = Evaluate(recipe=tiny_recipe("spin"), runs_dir=str(tmp_path), round_idx=6)
    fake_complete_run(task)
    checked = []
    for target_class in (luigi.LocalTarget, DirTarget):  # DirTarget has an exists() of its own
        original = target_class.exists
        monkeypatch.setattr(target_class, "exists", lambda self, original=original: checked.append(self.path) or original(self))
    assert task.complete()
    # re-walking each dependency path (Train(r) reaches Train(r-1) three ways) checked ~3^6 times as many
    assert len(checked) == len(set(checked))
    # run.yaml, base_model/; per round generations + meta, pairs + meta (and each of their one shard's part +
    # meta), checkpoint/; eval + metrics of rounds 0..6 (and their one shard's part + judgements)
    assert len(checked) == 2 + 6 * (2 + 2 + 2 + 2 + 1) + 7 * (2 + 2)

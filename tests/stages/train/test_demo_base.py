"""The default demo's shipped warm start: used when a recipe asks for it, and reproducible."""

import copy
import hashlib
import json
from pathlib import Path

import luigi
import pytest

import pipeline  # noqa: F401 - registers the tasks
from configs.recipe import load_recipe
from models.train.sft import BUILD_RECORD, build_demo_base, compare_weights, demo_base_dir, shipped_demo_base
from tasks.base_model import BaseModel

CONFIGS = Path(__file__).resolve().parents[3] / "configs"


def test_default_demo_recipes_use_the_shipped_base_and_others_do_not():
    for name in ("demo_spin", "demo_dpo", "demo_sppo"):
        assert shipped_demo_base(load_recipe(CONFIGS / f"{name}.yaml")) == demo_base_dir(), name
    recipe = load_recipe(CONFIGS / "demo_spin.yaml")
    for change in (lambda r: setattr(r.demo_model, "sft_steps", 100), lambda r: setattr(r, "seed", 1),
                   lambda r: setattr(r.data, "train", "demo:train")):
        other = copy.deepcopy(recipe)
        change(other)
        assert shipped_demo_base(other) is None


def test_shipped_base_is_the_one_its_record_describes():
    record = json.loads((demo_base_dir() / BUILD_RECORD).read_text())
    assert hashlib.sha256((demo_base_dir() / "model.safetensors").read_bytes()).hexdigest() == record["model_sha256"]
    assert len(record["sft_losses"]) == record["sft_steps"] == 2400


def test_a_rebuild_retraces_the_shipped_warm_start(tmp_path):
    """The first 100 of 2,400 warm-start steps, rebuilt from the recipe, give the recorded losses (the
    whole rebuild, `python -m models.train.sft --rebuild-demo-base --check`, takes minutes). Bit for bit on the
    CPU kind that built it; a CPU with other vector instructions takes other matmul kernels, whose sums
    round differently in the last float32 bit (seen: 1e-7 on a loss of 3), so the check allows 1e-5
    relative, far below what another seed moves (checked here on its first steps)."""
    record = json.loads((demo_base_dir() / BUILD_RECORD).read_text())
    recipe = load_recipe(CONFIGS / "demo_spin.yaml")
    rebuilt = build_demo_base(recipe, tmp_path / "same", stop_after=100)
    assert rebuilt["sft_losses"] == pytest.approx(record["sft_losses"][:100], rel=1e-5, abs=0)
    recipe.seed += 1
    other_seed = build_demo_base(recipe, tmp_path / "other", stop_after=5)
    assert other_seed["sft_losses"] != pytest.approx(record["sft_losses"][:5], rel=1e-5, abs=0)


def test_base_model_task_copies_the_shipped_base(tmp_path):
    task = BaseModel(recipe=str(CONFIGS / "demo_spin.yaml"), runs_dir=str(tmp_path))
    assert luigi.build([task], local_scheduler=True, log_level="WARNING")
    out = Path(task.output().path)
    assert compare_weights(out, demo_base_dir()) == 0.0
    assert json.loads((out / "base_model.json").read_text())["copied_from"] == str(demo_base_dir())


def test_base_model_demo_names_the_shipped_base_whatever_the_data_and_the_differences_are_said(tmp_path):
    import yaml

    from models.train.sft import shipped_base_differences
    from tasks.requirements import preflight

    data = tmp_path / "mine.jsonl"
    data.write_text(json.dumps({"prompt": "Add 2 and 3.", "response": "5"}) + "\n")
    recipe_path = tmp_path / "mine.yaml"
    recipe_path.write_text(yaml.safe_dump({"model": {"base_model": "demo"}, "data": {"train": str(data), "eval": str(data)},
                                           "evaluation": {"num_prompts": 1}}))
    recipe = load_recipe(recipe_path)
    preflight(recipe, 1)  # `demo` is not a model path to check
    assert luigi.build([BaseModel(recipe=str(recipe_path), runs_dir=str(tmp_path / "runs"))], local_scheduler=True)
    copied = tmp_path / "runs" / "mine" / "base_model"
    assert compare_weights(copied, demo_base_dir()) == 0.0
    assert json.loads((copied / "base_model.json").read_text())["copied_from"] == str(demo_base_dir())
    # With base_model null the same data builds a base of its own, and says which settings made it do so.
    recipe.model.base_model = None
    recipe.demo_model.sft_steps = 10
    assert shipped_base_differences(recipe) == ["demo_model.sft_steps", "data.train"]
    assert shipped_base_differences(load_recipe(CONFIGS / "demo_spin.yaml")) == []


def test_a_round_that_trained_nothing_is_said_with_why_and_what_to_change(tmp_path):
    from data.advice import untrained_round, untrained_rounds

    run_dir = tmp_path / "run"
    for round_idx, steps, judged in ((1, 4, {"prompts": 12, "pairs": 11, "skipped_identical": 1}),
                                     (2, 0, {"prompts": 12, "pairs": 0, "skipped_identical": 12, "skipped_ties": 0}),
                                     (3, 0, {"prompts": 12, "pairs": 0, "skipped_ties": 9, "skipped_unfinished": 3})):
        (run_dir / f"round_{round_idx:02d}" / "checkpoint").mkdir(parents=True)
        (run_dir / f"round_{round_idx:02d}" / "checkpoint" / "training_log.json").write_text(json.dumps({"stats": {"steps": steps}}))
        (run_dir / f"round_{round_idx:02d}" / "judge_meta.json").write_text(json.dumps(judged))
    assert untrained_round(run_dir, 1) is None
    lines = untrained_rounds(run_dir, 3)
    assert len(lines) == 2
    assert lines[0].startswith("round 2 trained nothing: 0 pairs from 12 prompts (12 skipped: the model's sample equals the data's "
                               "response") and "model.base_model names one, `demo` the shipped demo base" in lines[0]
    assert lines[1].startswith("round 3 trained nothing: 0 pairs from 12 prompts (9 skipped: all samples of the prompt scored "
                               "the same") and "raise generation.num_samples or generation.temperature" in lines[1]

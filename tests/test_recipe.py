"""Recipes: every shipped YAML loads; a wrong key, type or value is one clear error."""

from pathlib import Path

import pytest
import yaml

from common.errors import RecipeError
from configs.recipe import (CONFIG_DIR, deep_merge, load_recipe, main, recipe_fields, recipe_from_dict, resolve_recipe,
                            shipped_recipes)

SHIPPED = sorted(CONFIG_DIR.glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_recipe_loads(path):
    recipe = load_recipe(path)
    assert recipe.name == path.stem
    for round_idx in range(1, len(recipe.rounds) + 2):
        recipe.for_round(round_idx)


def write(tmp_path, data) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_misspelled_key_names_the_key_and_a_suggestion(tmp_path):
    with pytest.raises(RecipeError, match=r"unknown key 'training.learnig_rate' \(did you mean 'training.learning_rate'\?\)"):
        load_recipe(write(tmp_path, {"training": {"learnig_rate": 1e-5}}))


def test_unknown_top_level_key(tmp_path):
    with pytest.raises(RecipeError, match="unknown key 'rouns'"):
        load_recipe(write(tmp_path, {"rouns": []}))


def test_wrong_type_and_bad_choice(tmp_path):
    with pytest.raises(RecipeError, match="'training.epochs' must be float"):
        load_recipe(write(tmp_path, {"training": {"epochs": "two"}}))
    with pytest.raises(RecipeError, match="'algorithm' must be one of"):
        load_recipe(write(tmp_path, {"algorithm": "ppo"}))
    with pytest.raises(RecipeError, match="'generation.num_samples' must be int"):
        load_recipe(write(tmp_path, {"generation": {"num_samples": True}}))


def test_a_float_written_without_a_dot_is_a_float(tmp_path):
    # YAML 1.1 (PyYAML) reads `2e-5` as a string; users write learning rates that way.
    path = tmp_path / "r.yaml"
    path.write_text("training:\n  learning_rate: 2e-5\n  beta: 1E-1\n")
    recipe = load_recipe(str(path))
    assert recipe.training.learning_rate == 2e-5 and isinstance(recipe.training.learning_rate, float)
    assert recipe.training.beta == 0.1
    with pytest.raises(RecipeError, match="'training.epochs' must be float, got '2e'"):
        load_recipe(write(tmp_path, {"training": {"epochs": "2e"}}))
    with pytest.raises(RecipeError, match="'generation.num_samples' must be int, got '8e0'"):
        load_recipe(write(tmp_path, {"generation": {"num_samples": "8e0"}}))


def test_cross_field_rules(tmp_path):
    with pytest.raises(RecipeError, match="num_samples must be >= 2"):
        recipe_from_dict({"algorithm": "sppo", "judge": {"name": "verifier"}})
    with pytest.raises(RecipeError, match="spin pairs by ground truth"):
        recipe_from_dict({"algorithm": "spin", "judge": {"name": "verifier"}})
    with pytest.raises(RecipeError, match="judge.model is required"):
        recipe_from_dict({"algorithm": "dpo", "judge": {"name": "reward_model"}, "generation": {"num_samples": 2}})


def test_integers_are_accepted_for_floats(tmp_path):
    recipe = load_recipe(write(tmp_path, {"training": {"learning_rate": 1, "epochs": 3}}))
    assert recipe.training.learning_rate == 1.0 and isinstance(recipe.training.epochs, float)


def test_per_round_overrides_merge_over_defaults(tmp_path):
    data = {"training": {"learning_rate": 5e-7, "beta": 0.1},
            "rounds": [{}, {"training": {"learning_rate": 1e-7}}, {"training": {"beta": 5.0}}]}
    recipe = load_recipe(write(tmp_path, data))
    assert recipe.for_round(1).training.learning_rate == 5e-7
    assert recipe.for_round(2).training.learning_rate == 1e-7
    assert recipe.for_round(3).training.beta == 5.0 and recipe.for_round(3).training.learning_rate == 5e-7
    assert recipe.for_round(4).training.beta == 0.1  # past the list: defaults


def test_deep_merge_merges_every_depth_and_shares_nothing_with_its_inputs():
    base = {"seed": 0, "training": {"beta": 0.1, "lora": {"r": 4, "alpha": 8}}, "rounds": [{"training": {}}]}
    override = {"training": {"lora": {"r": 8}, "loss": "ipo"}, "judge": {"name": "verifier"}}
    merged = deep_merge(base, override)
    assert merged == {"seed": 0, "training": {"beta": 0.1, "lora": {"r": 8, "alpha": 8}, "loss": "ipo"},
                      "rounds": [{"training": {}}], "judge": {"name": "verifier"}}
    # Changing the result at any depth changes neither input (tests build recipes from shared templates).
    merged["training"]["lora"]["alpha"] = 16
    merged["rounds"][0]["training"]["beta"] = 5.0
    merged["judge"]["name"] = "self"
    assert base == {"seed": 0, "training": {"beta": 0.1, "lora": {"r": 4, "alpha": 8}}, "rounds": [{"training": {}}]}
    assert override == {"training": {"lora": {"r": 8}, "loss": "ipo"}, "judge": {"name": "verifier"}}


def test_per_round_overrides_are_validated_at_load(tmp_path):
    with pytest.raises(RecipeError, match=r"unknown key 'training.bta'"):
        load_recipe(write(tmp_path, {"rounds": [{"training": {"bta": 1.0}}]}))
    with pytest.raises(RecipeError, match=r"rounds\[0\].model cannot change between rounds"):
        load_recipe(write(tmp_path, {"rounds": [{"model": {"base_model": "x/y"}}]}))


@pytest.mark.parametrize("key, value", [("lora_r", 8), ("lora_alpha", 64), ("lora_target_modules", "q_proj,v_proj")])
def test_lora_shape_cannot_change_between_rounds(tmp_path, key, value):
    # Every round continues the same adapter: a per-round shape would not fit the saved one.
    with pytest.raises(RecipeError, match=rf"rounds\[1\].training.{key} cannot change between rounds"):
        load_recipe(write(tmp_path, {"rounds": [{}, {"training": {key: value, "learning_rate": 1e-6}}]}))
    load_recipe(write(tmp_path, {"training": {key: value}, "rounds": [{}, {"training": {"lora_dropout": 0.1}}]}))


def test_defaults_by_algorithm():
    spin = recipe_from_dict({})
    assert spin.loss == "dpo_sigmoid" and spin.mix_previous_round
    sppo = recipe_from_dict({"algorithm": "sppo", "judge": {"name": "verifier"}, "generation": {"num_samples": 5}})
    assert sppo.loss == "sppo" and not sppo.mix_previous_round


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(RecipeError, match="nope.yaml not found: no such file, and no shipped recipe"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("training: [unclosed")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)


@pytest.mark.parametrize("key", [
    "training.save_steps", "training.max_length", "training.lora_r", "training.lora_alpha", "training.max_grad_norm",
    "judge.batch_size", "judge.max_new_tokens", "evaluation.max_new_tokens", "evaluation.kl_samples",
    "data.max_prompt_tokens", "data.prompts_per_round", "demo_model.sft_steps", "demo_model.num_heads",
])
@pytest.mark.parametrize("value", [0, -1])
def test_zero_or_negative_counts_fail_at_load_naming_the_key(tmp_path, key, value):
    section, name = key.split(".")
    with pytest.raises(RecipeError, match=rf"^r: {key} must be positive, got {value}(\.0)?$"):  # one line, the key named
        load_recipe(write(tmp_path, {section: {name: value}}))


def test_ranges_fail_at_load_naming_the_key(tmp_path):
    for key, value, message in [
        ("training.weight_decay", -0.1, "must be >= 0"), ("training.nll_weight", -1.0, "must be >= 0"),
        ("training.warmup_ratio", 1.0, r"must be in \[0, 1\)"), ("training.lora_dropout", -0.1, r"must be in \[0, 1\)"),
        ("training.label_smoothing", 0.5, r"must be in \[0, 0.5\)"), ("training.label_smoothing", -0.1, r"must be in \[0, 0.5\)"),
    ]:
        section, name = key.split(".")
        with pytest.raises(RecipeError, match=rf"{key} {message}"):
            load_recipe(write(tmp_path, {section: {name: value}}))
    with pytest.raises(RecipeError, match=r"rounds\[1\].*training.save_steps must be positive"):  # per-round values too
        load_recipe(write(tmp_path, {"rounds": [{}, {"training": {"save_steps": 0}}]}))


def test_label_smoothing_only_where_a_loss_uses_it(tmp_path):
    assert load_recipe(write(tmp_path, {"training": {"label_smoothing": 0.1}})).training.label_smoothing == 0.1  # cDPO
    assert load_recipe(write(tmp_path, {"training": {"loss": "robust", "label_smoothing": 0.1}})).loss == "robust"
    with pytest.raises(RecipeError, match="training.label_smoothing applies to losses dpo_sigmoid .cDPO. and robust only; loss ipo"):
        load_recipe(write(tmp_path, {"training": {"loss": "ipo", "label_smoothing": 0.1}}))


def test_prompt_token_limit_leaves_room_for_a_full_sample(tmp_path):
    recipe = load_recipe(write(tmp_path, {"data": {"max_prompt_tokens": 1024}, "generation": {"max_new_tokens": 512},
                                          "training": {"max_length": 1024}}))
    assert recipe.prompt_token_limit == 512
    assert load_recipe(write(tmp_path, {"data": {"max_prompt_tokens": 100}})).prompt_token_limit == 100
    with pytest.raises(RecipeError, match=r"generation.max_new_tokens \(128\) leaves no room for a prompt in training.max_length \(128\)"):
        load_recipe(write(tmp_path, {"generation": {"max_new_tokens": 128}, "training": {"max_length": 128}}))


@pytest.mark.parametrize("name", ["spin_qwen2.5-0.5b.yaml", "spin_qwen2.5-0.5b_qlora.yaml"])
def test_spin_recipes_follow_the_official_schedule(name):
    # uclaml/SPIN scripts/finetune.sh, finetune_iter1.sh, _iter2.sh, _iter3.sh: lr 5e-7, 5e-7, 1e-7, 1e-7;
    # beta 0.1, 0.1, 0.1, 5.0; --num_train_epochs=6 each. Our LoRA recipes scale every lr by the same factor.
    recipe = load_recipe(CONFIG_DIR / name)
    rounds = [recipe.for_round(r).training for r in range(1, 5)]
    scale = rounds[0].learning_rate / 5e-7
    assert [t.learning_rate / scale for t in rounds] == pytest.approx([5e-7, 5e-7, 1e-7, 1e-7])
    assert [t.beta for t in rounds] == [0.1, 0.1, 0.1, 5.0]
    assert [t.epochs for t in rounds] == [6, 6, 6, 6]


def test_every_recipe_key_has_a_help_text():
    fields = recipe_fields()
    assert len(fields) > 70 and len({f["key"] for f in fields}) == len(fields)
    missing = [f["key"] for f in fields if len(f["help"].split()) < 3]
    assert missing == []


def test_one_command_lists_every_key_with_its_type_default_help_and_a_recipes_value(capsys):
    assert main(["--fields", str(CONFIG_DIR / "demo_dpo.yaml")]) == 0
    lines = capsys.readouterr().out.splitlines()
    listed = [line for line in lines if not line.startswith("    ")]
    fields = {f["key"]: f for f in recipe_fields()}
    assert [line.split(":")[0] for line in listed] == list(fields)
    beta = lines.index(next(line for line in listed if line.startswith("training.beta:")))
    assert lines[beta].startswith("training.beta: float = 0.1")
    assert lines[beta + 1].strip() == fields["training.beta"]["help"]
    # A value the recipe changes is shown beside the default.
    assert "algorithm: one of 'spin', 'sppo', 'dpo', 'inpo', 'dno', 'rest' = spin  (demo_dpo.yaml: dpo)" in lines


def test_inpo_defaults_and_its_eta_and_tau(tmp_path):
    inpo = {"algorithm": "inpo", "judge": {"name": "verifier"}, "generation": {"num_samples": 4}}
    recipe = recipe_from_dict(inpo)
    assert recipe.loss == "inpo" and not recipe.mix_previous_round
    # eta = 1 / beta and eta * tau = 1/3 unless set (the authors' released settings, see Recipe.inpo_eta_tau).
    eta, tau = recipe.inpo_eta_tau
    assert eta == pytest.approx(1 / recipe.training.beta) and eta * tau == pytest.approx(1 / 3)
    set_both = recipe_from_dict({**inpo, "training": {"inpo_eta": 4.0, "inpo_tau": 0.05}})
    assert set_both.inpo_eta_tau == (4.0, 0.05)
    with pytest.raises(RecipeError, match=r"INPO needs eta \* tau in \[0, 1\]; training.inpo_eta 4 \* training.inpo_tau 0.5 = 2"):
        recipe_from_dict({**inpo, "training": {"inpo_eta": 4.0, "inpo_tau": 0.5}})
    with pytest.raises(RecipeError, match="training.inpo_eta must be positive"):
        recipe_from_dict({**inpo, "training": {"inpo_eta": 0.0}})
    with pytest.raises(RecipeError, match="training.inpo_tau applies to loss inpo only; loss dpo_sigmoid would ignore it"):
        load_recipe(write(tmp_path, {"training": {"inpo_tau": 0.1}}))
    # The loss works on any pairs: iterative DPO's pairs with INPO's loss.
    assert recipe_from_dict({**inpo, "algorithm": "dpo", "training": {"loss": "inpo"}}).loss == "inpo"


def test_shipped_recipes_resolve_by_name_and_by_configs_path_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here
    for spec in ("smollm2_spin_cpu", "smollm2_spin_cpu.yaml", "configs/smollm2_spin_cpu.yaml"):
        assert resolve_recipe(spec) == CONFIG_DIR / "smollm2_spin_cpu.yaml"
        assert load_recipe(spec).name == "smollm2_spin_cpu"
    # A file of that path in the working directory wins over the shipped one.
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "smollm2_spin_cpu.yaml").write_text("name: mine\n")
    assert load_recipe("configs/smollm2_spin_cpu.yaml").name == "mine"
    assert load_recipe("smollm2_spin_cpu").name == "smollm2_spin_cpu"  # a bare name is not a file here
    # Only a bare name or configs/NAME is looked up among the shipped recipes, never another directory's path.
    with pytest.raises(RecipeError, match="shipped: demo_dno, demo_dpo.*smollm2_spin_cpu"):
        load_recipe("elsewhere/smollm2_spin_cpu.yaml")
    with pytest.raises(RecipeError, match="recipe smollm2_spin not found"):
        load_recipe("smollm2_spin")


def test_list_names_every_shipped_recipe_with_what_it_runs(capsys):
    assert main(["--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == shipped_recipes() == sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    by_name = dict(line.split(": ", 1) for line in lines)
    assert by_name["demo_dno"].startswith("DNO (Direct Nash Optimization, Rosset et al. 2024), its practical")
    assert by_name["smollm2_spin_cpu"] == ("SPIN on SmolLM2-135M-Instruct, on a CPU: the demo's verifiable tasks, ground "
                                           "truth vs the model's own sample, LoRA in fp32")


def test_installed_package_finds_shipped_recipes_from_another_directory(tmp_path):
    """The README's commands, run from a directory with no checkout in it, on the installed package (no PYTHONPATH)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    fields = subprocess.run([sys.executable, "-m", "configs.recipe", "--fields", "configs/smollm2_spin_cpu.yaml"], cwd=tmp_path,
                            capture_output=True, text=True, env=env, timeout=120)
    assert fields.returncode == 0, fields.stderr[-2000:]
    assert "(smollm2_spin_cpu.yaml: cache:smollm2-135m-instruct)" in fields.stdout
    setup = subprocess.run([sys.executable, "-m", "luigi", "--module", "pipeline", "RunSetup", "--recipe", "smollm2_spin_cpu",
                            "--runs-dir", "runs"], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert setup.returncode == 0, setup.stderr[-2000:]
    record = yaml.safe_load((tmp_path / "runs" / "smollm2_spin_cpu" / "run.yaml").read_text())
    assert record["recipe"]["model"]["base_model"] == "cache:smollm2-135m-instruct"


def test_algorithm_help_names_every_algorithm_and_the_rounds_example_is_a_valid_recipe():
    import typing

    from configs.recipe import Algorithm

    rows = {row["key"]: row for row in recipe_fields()}
    for algorithm in typing.get_args(Algorithm):
        assert f"{algorithm}:" in rows["algorithm"]["help"], algorithm
    example = rows["rounds"]["help"].split("e.g. ", 1)[1].rstrip(".")
    recipe = recipe_from_dict(yaml.safe_load(example))
    assert recipe.for_round(2).training.learning_rate == 1e-3 and recipe.for_round(2).generation.temperature == 0.7


@pytest.mark.parametrize("variant", sorted(p.name for p in CONFIG_DIR.glob("*.yaml") if "_qlora" in p.stem or "_bf16" in p.stem))
def test_a_qlora_or_bf16_recipe_is_its_sibling_with_only_the_precision_changed(variant):
    # A user compares a QLoRA or bf16 round with the plain one: any other difference (the SmolLM2 variants once
    # lacked the sibling's validation split) would be measured as the precision's doing.
    tag = "_qlora" if "_qlora" in variant else "_bf16"
    from tasks.base import _diff_keys  # how a run directory tells a changed recipe

    changed = set(_diff_keys(load_recipe(CONFIG_DIR / variant.replace(tag, "")).to_dict(),
                             load_recipe(CONFIG_DIR / variant).to_dict()))
    assert changed == {"name", "model.quantization" if tag == "_qlora" else "model.precision"}

"""End to end on CPU: two rounds of each algorithm through Luigi, resume, and the artifact contract."""

import json
import shutil
from pathlib import Path

import luigi
import pytest
import yaml
from luigi.execution_summary import LuigiStatusCode

import pipeline  # noqa: F401 - registers the tasks
from common.errors import RecipeError
from data.runs import Run
from data.schema import EVAL, GENERATIONS, PAIRS, read_artifact
from tasks.iterate import Iterate

pytestmark = pytest.mark.slow


class Ran:
    """Collects the families of tasks that actually ran during a build."""

    def __init__(self):
        self.tasks = []

    def __enter__(self):
        luigi.Task.event_handler(luigi.Event.START)(self._record)
        return self

    def _record(self, task):
        self.tasks.append((task.task_family, getattr(task, "round_idx", None)))

    def __exit__(self, *exc):
        luigi.Task._event_callbacks[luigi.Task][luigi.Event.START].discard(self._record)


def build(task) -> list:
    with Ran() as ran:
        result = luigi.build([task], local_scheduler=True, detailed_summary=True, log_level="WARNING")
    # Not SUCCESS_WITH_RETRY: luigi.build reports a task that failed (and was then found complete) as that.
    assert result.status == LuigiStatusCode.SUCCESS, result.summary_text
    return ran.tasks


def check_contract(run_dir: Path, rounds: int, algorithm: str) -> None:
    run_yaml = yaml.safe_load((run_dir / "run.yaml").read_text())
    assert {"recipe", "versions", "git_commit", "seed"} <= set(run_yaml)
    total_pairs = 0
    for r in range(1, rounds + 1):
        rd = run_dir / f"round_{r:02d}"
        gens = read_artifact(rd / "generations.parquet", GENERATIONS)
        pairs = read_artifact(rd / "pairs.parquet", PAIRS)
        assert set(gens["round"]) == {r} and set(pairs["round"]) <= {r}
        ckpt = rd / "checkpoint"
        assert (ckpt / "_SUCCESS").is_file() and (ckpt / "config.json").is_file() and (ckpt / "adapter" / "adapter_config.json").is_file()
        info = json.loads((ckpt / "selfplay_checkpoint.json").read_text())
        expected_parent = run_dir / "base_model" if r == 1 else run_dir / f"round_{r - 1:02d}" / "checkpoint"
        assert Path(info["parent"]) == expected_parent
        # Every round is the base model's weights plus one adapter continued across rounds.
        assert info["chain"] == "root+adapter" and Path(info["root_path"]) == run_dir / "base_model"
        adapter_config = json.loads((ckpt / "adapter" / "adapter_config.json").read_text())
        assert Path(adapter_config["base_model_name_or_path"]) == run_dir / "base_model"
        metrics = json.loads((rd / "metrics.json").read_text())
        trained_on = metrics["train"]["stats"]["pairs"]
        assert trained_on >= len(pairs) and len(metrics["train"]["history"]) == metrics["train"]["stats"]["steps"]
        total_pairs += len(pairs)
        assert "accuracy" in metrics["eval"] and "kl_vs_base" in metrics["eval"]
        assert "win_rate_vs_previous" in metrics["eval"] and "implicit_reward_accuracy" in metrics["eval"]
        evals = read_artifact(rd / "eval.parquet", EVAL)
        # accuracy's standard error, recomputed from the per-prompt verdicts: sqrt(p (1 - p) / (n - 1)) for 0/1 values
        greedy = evals[evals.kind == "greedy"]
        p, n = greedy.correct.mean(), len(greedy)
        assert metrics["eval"]["prompts"] == n
        assert metrics["eval"]["accuracy_se"] == pytest.approx((p * (1 - p) / (n - 1)) ** 0.5)
        samples = evals[evals.kind == "sample"]
        per_prompt = (samples.logp - samples.base_logp).groupby(samples.prompt_id).mean()
        assert metrics["eval"]["kl_vs_base_se"] == pytest.approx(per_prompt.std(ddof=1) / n ** 0.5)
        if algorithm == "spin":
            assert (pairs.judge == "ground_truth").all()
            refs = gens.drop_duplicates("prompt_id").set_index("prompt_id").reference
            assert (pairs.chosen == refs.loc[pairs.prompt_id].to_numpy()).all()
        else:
            assert (pairs.chosen_score >= pairs.rejected_score).all()
    assert total_pairs > 0, "no round made a preference pair: the test exercised no training"
    assert (run_dir / "report.md").is_file() and list((run_dir / "plots").glob("*.png"))


def test_spin_two_rounds_resume_and_rerun_from_a_deleted_round(tiny_recipe, tmp_path):
    recipe = tiny_recipe("spin")
    runs = tmp_path / "runs"
    ran = build(Iterate(recipe=recipe, runs_dir=str(runs), rounds=2))
    families = {family for family, _ in ran}
    assert {"BaseModel", "Generate", "Judge", "Train", "Evaluate", "Validate", "Select", "Report", "Iterate"} <= families
    run_dir = runs / "tiny_spin"
    check_contract(run_dir, 2, "spin")
    # Round 2 trained on round 1's pairs too (SPIN's mixing), and started from round 1's weights.
    log = json.loads((run_dir / "round_02" / "checkpoint" / "training_log.json").read_text())
    pairs_1 = len(read_artifact(run_dir / "round_01" / "pairs.parquet", PAIRS))
    pairs_2 = len(read_artifact(run_dir / "round_02" / "pairs.parquet", PAIRS))
    assert log["stats"]["pairs"] == pairs_1 + pairs_2

    # A second identical command runs nothing.
    assert build(Iterate(recipe=recipe, runs_dir=str(runs), rounds=2)) == []

    # Deleting round 2's checkpoint marker reruns round 2's training and what follows it only.
    (run_dir / "round_02" / "checkpoint" / "_SUCCESS").unlink()
    ran = build(Iterate(recipe=recipe, runs_dir=str(runs), rounds=2))
    # (Iterate starts again after each round it hands out: Luigi's dynamic dependencies.)
    assert sorted(set(ran)) == sorted([("Train", 2), ("EvaluateShard", 2), ("Evaluate", 2), ("Validate", 2), ("Select", 2),
                                       ("Report", None), ("Iterate", None)])

    # Deleting round 1 entirely reruns round 1 and round 2, and nothing of round 0.
    shutil.rmtree(run_dir / "round_01")
    ran = build(Iterate(recipe=recipe, runs_dir=str(runs), rounds=2))
    rounds_run = {r for family, r in ran if r is not None}
    assert rounds_run == {1, 2} and ("BaseModel", None) not in ran
    check_contract(run_dir, 2, "spin")
    assert len(Run(run_dir).metrics()) == 3  # rounds 0, 1, 2


@pytest.mark.parametrize("algorithm", ["sppo", "dpo"])
def test_judged_algorithms_two_rounds(tiny_recipe, tmp_path, algorithm):
    recipe = tiny_recipe(algorithm)
    build(Iterate(recipe=recipe, runs_dir=str(tmp_path / "runs"), rounds=2))
    check_contract(tmp_path / "runs" / f"tiny_{algorithm}", 2, algorithm)


def test_changed_recipe_into_the_same_run_is_refused(tiny_recipe, tmp_path):
    from tasks.base_model import RunSetup

    runs = str(tmp_path / "runs")
    build(RunSetup(recipe=tiny_recipe("spin", name="a"), runs_dir=runs, run_name="same"))
    changed = tiny_recipe("spin", name="b", training={"beta": 0.5})
    with pytest.raises(RecipeError, match=r"was made by a different recipe \(changed: .*training.beta"):
        Iterate(recipe=changed, runs_dir=runs, run_name="same", rounds=1)


def test_a_run_made_before_a_recipe_key_existed_is_not_refused(tiny_recipe, tmp_path):
    # A run.yaml written before `generation.shards` was added: the key counts as its default.
    from tasks.base_model import RunSetup

    runs = tmp_path / "runs"
    recipe = tiny_recipe("spin", name="a")
    build(RunSetup(recipe=recipe, runs_dir=str(runs), run_name="old"))
    run_yaml = runs / "old" / "run.yaml"
    record = yaml.safe_load(run_yaml.read_text())
    del record["recipe"]["generation"]["shards"]
    run_yaml.write_text(yaml.safe_dump(record))
    Iterate(recipe=recipe, runs_dir=str(runs), run_name="old", rounds=1)  # not refused
    record["recipe"]["generation"]["shards"] = 2  # a value that differs is still a change
    run_yaml.write_text(yaml.safe_dump(record))
    Iterate.clear_instance_cache()  # luigi hands back the task made above for the same parameters
    with pytest.raises(RecipeError, match=r"changed: generation.shards"):
        Iterate(recipe=recipe, runs_dir=str(runs), run_name="old", rounds=1)


def test_train_under_accelerate_launch_with_two_processes(tiny_recipe, tmp_path):
    # DDP on CPU (gloo): the Train task starts `accelerate launch --num_processes 2` on itself.
    from tasks.rounds import Train

    recipe = tiny_recipe("spin", training={"launcher": "accelerate", "num_processes": 2})
    build(Train(recipe=recipe, runs_dir=str(tmp_path / "runs"), round_idx=1))
    ckpt = tmp_path / "runs" / "tiny_spin" / "round_01" / "checkpoint"
    log = json.loads((ckpt / "training_log.json").read_text())
    assert (ckpt / "_SUCCESS").is_file() and log["history"] and (ckpt / "adapter" / "adapter_model.safetensors").is_file()
    pairs = len(read_artifact(ckpt.parent / "pairs.parquet", PAIRS))
    batches = -(-pairs // 8)
    assert log["stats"]["steps"] == -(-batches // 2)  # each optimizer step took one batch from each of 2 processes


def shipped_demo(tmp_path, name: str, **overrides) -> str:
    """The shipped demo recipe `name` shrunk to the TINY sizes (K capped at 4), plus `overrides`: the
    method's own settings as shipped, run in seconds."""
    from configs.recipe import CONFIG_DIR, deep_merge as merge
    from conftest import TINY

    shipped = yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text())
    recipe = merge(shipped, TINY)
    recipe["generation"]["num_samples"] = min(4, shipped["generation"]["num_samples"])
    recipe = merge(recipe, overrides)
    recipe["name"] = name
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def test_inpo_demo_two_rounds(tmp_path):
    runs = tmp_path / "runs"
    build(Iterate(recipe=shipped_demo(tmp_path, "demo_inpo"), runs_dir=str(runs), rounds=2))
    run_dir = runs / "demo_inpo"
    check_contract(run_dir, 2, "inpo")
    for r in (1, 2):
        stats = json.loads((run_dir / f"round_{r:02d}" / "checkpoint" / "training_log.json").read_text())["stats"]
        assert stats["loss"] == "inpo"
    # Round 2's second reference, the base model, was taken with the adapter off; round 1's is round 0 itself.
    assert (run_dir / "round_02" / "train_work" / "base_logps" / "ref_logps.parquet").is_file()
    assert not (run_dir / "round_01" / "train_work" / "base_logps").exists()


def test_dno_demo_two_rounds(tmp_path):
    runs = tmp_path / "runs"
    build(Iterate(recipe=shipped_demo(tmp_path, "demo_dno"), runs_dir=str(runs), rounds=2))
    run_dir = runs / "demo_dno"
    check_contract(run_dir, 2, "dno")
    for r in (1, 2):
        rd = run_dir / f"round_{r:02d}"
        meta = json.loads((rd / "judge_meta.json").read_text())
        pairs = read_artifact(rd / "pairs.parquet", PAIRS)
        assert meta["pairs"] == len(pairs) and "skipped_small_margin" in meta
        # The dataset's answer was a candidate: where it is chosen, the pair says so and carries no sampled ids.
        from_dataset = pairs[pairs.chosen_source == "dataset"]
        assert len(from_dataset) == meta["pairs_chosen_dataset"]
        assert (from_dataset.chosen_index == -1).all() and from_dataset.chosen_token_ids.isna().all()
        assert (pairs.chosen_score - pairs.rejected_score > 0.1).all()  # the margin filter held
    assert sum(json.loads((run_dir / f"round_{r:02d}" / "judge_meta.json").read_text())["pairs_chosen_dataset"]
               for r in (1, 2)) > 0


def test_spar_refinement_demo_two_rounds(tmp_path):
    runs = tmp_path / "runs"
    build(Iterate(recipe=shipped_demo(tmp_path, "demo_spar"), runs_dir=str(runs), rounds=2))
    run_dir = runs / "demo_spar"
    check_contract(run_dir, 2, "dpo")
    for r in (1, 2):
        rd = run_dir / f"round_{r:02d}"
        meta = json.loads((rd / "judge_meta.json").read_text())
        pairs = read_artifact(rd / "pairs.parquet", PAIRS)
        refined = pairs[pairs.chosen_source == "refinement"]
        # The tiny model gets most prompts wrong, so rewrites were tried; each one that passed is one pair.
        assert meta["refinements_tried"] > 0 and meta["refinement_samples"] == 4 * meta["refinements_tried"]
        assert len(refined) == meta["refinements_passed"] <= meta["refinements_tried"]
        assert (refined.chosen_score == 1.0).all() and (refined.rejected_score == 0.0).all()
        # The round's figures carry the counts (metrics.json, from judge_meta.json).
        judge_figures = json.loads((rd / "metrics.json").read_text())["judge"]
        assert judge_figures["refinements_tried"] == meta["refinements_tried"]


def test_rest_demo_two_rounds(tmp_path):
    from data.schema import SELECTED
    from models.judge.verifiers import load_verifier

    runs = tmp_path / "runs"
    build(Iterate(recipe=shipped_demo(tmp_path, "demo_rest"), runs_dir=str(runs), rounds=2))
    run_dir = runs / "demo_rest"
    check = load_verifier("data.demo_tasks:check")
    total = 0
    for r in (1, 2):
        rd = run_dir / f"round_{r:02d}"
        gens = read_artifact(rd / "generations.parquet", GENERATIONS)
        selected = read_artifact(rd / "selected.parquet", SELECTED)
        meta = json.loads((rd / "judge_meta.json").read_text())
        assert not (rd / "pairs.parquet").exists() and meta["examples"] == len(selected) and set(selected["round"]) <= {r}
        # Every example is one of the round's own samples, finished, right by the verifier, at most 4 a prompt.
        same = selected.merge(gens, on=["prompt_id", "sample_index"], suffixes=("", "_sampled"))
        assert len(same) == len(selected) and (same.response == same.response_sampled).all()
        right = lambda frame: [check.score(p, y, {"task": t, "answer": a}) == 1.0  # noqa: E731
                               for p, y, t, a in zip(frame.prompt, frame.response, frame.task, frame.answer)]
        assert all(right(same))
        assert selected.finished.all() and selected.groupby("prompt_id").size().max() <= 4
        # ... and every sample right and finished in a prompt with fewer than 4 such is one.
        passed = gens[[ok and bool(done) for ok, done in zip(right(gens), gens.finished)]]
        assert meta["samples_passed"] == len(passed) and meta["prompts_passed"] == passed.prompt_id.nunique()
        stats = json.loads((rd / "checkpoint" / "training_log.json").read_text())["stats"]
        assert stats["loss"] == "nll" and stats["examples"] == len(selected) and stats["init"] == "base"
        assert stats["adapter_start"] == "fresh" and stats["parent_round"] == r - 1
        figures = json.loads((rd / "metrics.json").read_text())
        assert figures["judge"]["pass_rate"] == pytest.approx(meta["samples_passed"] / meta["samples"])
        total += len(selected)
    assert total > 0, "no sample passed: the test exercised no training"
    assert "## Examples kept" in (run_dir / "report.md").read_text()


def test_self_rewarding_two_rounds_the_judge_is_the_current_policy(tiny_recipe, tmp_path):
    # Self-Rewarding LMs: round r's samples are judged by the model that generated them, the policy after
    # round r-1 (the tiny model writes few readable verdicts; what is checked is who judged).
    recipe = tiny_recipe("dpo", name="tiny_self", judge={"name": "self", "self_model": "policy", "max_new_tokens": 8},
                         evaluation={"judge": "verifier"})
    runs = tmp_path / "runs"
    build(Iterate(recipe=recipe, runs_dir=str(runs), rounds=2))
    run_dir = runs / "tiny_self"
    for r, generator in ((1, run_dir / "base_model"), (2, run_dir / "round_01" / "checkpoint")):
        meta = json.loads((run_dir / f"round_{r:02d}" / "judge_meta.json").read_text())
        assert Path(meta["judge_model"]) == Path(meta["generator_model"]) == generator and meta["judge_is_generator"]
        assert meta["prompts"] == 32
        read_artifact(run_dir / f"round_{r:02d}" / "pairs.parquet", PAIRS)
        assert (run_dir / f"round_{r:02d}" / "checkpoint" / "_SUCCESS").is_file()
    report = (run_dir / "report.md").read_text()
    assert "judged by **the current policy**" in report and "| 2 |" in report.split("## Pairing")[1]
    # The verifier referees the held-out comparisons; the self-judge that paired each round judged them too.
    for r, detail in ((1, "the base model, pointwise"), (2, "the policy after round 1, pointwise")):
        ev = json.loads((run_dir / f"round_{r:02d}" / "metrics.json").read_text())["eval"]
        assert ev["train_judge"] == "self" and ev["train_judge_detail"] == detail and "judge_kappa_vs_base" in ev

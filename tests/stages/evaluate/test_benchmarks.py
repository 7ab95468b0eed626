"""lm-evaluation-harness in the loop: Benchmark(r) on a tiny run, against lm-eval's own run, and bad inputs.

Needs the `eval` extra (`pip install -e ".[eval]"`); without lm-eval the tests that run it are skipped and
the one that checks the install message runs.
"""

import json
import shutil
import sys
from pathlib import Path

import luigi
import pytest
import yaml
from luigi.execution_summary import LuigiStatusCode

import pipeline  # noqa: F401 - registers the tasks
from common.errors import ModelError, RecipeError
from configs.evaluation import BenchmarkSpec, benchmark_specs
from configs.recipe import deep_merge, load_recipe, recipe_from_dict
from conftest import ALGORITHMS, REPO, TINY
from tasks.iterate import Iterate

SUMS_MC = str(REPO / "data" / "fixtures" / "lm_eval" / "sums_mc.yaml")
SUMS_GEN = str(REPO / "data" / "fixtures" / "lm_eval" / "sums_gen.yaml")

# A task with a continuous figure (bits per byte of the demo's held-out answers), so that "equal" means equal
# to the last digit, not two accuracies of 0 that agree by chance.
ROLLING_TASK = {
    "task": "selfplay_demo_bpb",
    "dataset_path": "json",
    "dataset_kwargs": {"data_files": {"test": "heldout.jsonl"}},
    "test_split": "test",
    "output_type": "loglikelihood_rolling",
    "doc_to_text": "",
    "doc_to_target": "{{prompt}} {{response}}",
    "metric_list": [{"metric": "bits_per_byte", "aggregation": "bits_per_byte", "higher_is_better": False},
                    {"metric": "word_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False}],
    "metadata": {"version": 2.0},
}


def rolling_task(directory: Path) -> str:
    """ROLLING_TASK written as a YAML beside its data (the demo's first 24 held-out rows)."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = (REPO / "data" / "demo" / "heldout.jsonl").read_text().splitlines()[:24]
    (directory / "heldout.jsonl").write_text("\n".join(rows) + "\n")
    (directory / "demo_bpb.yaml").write_text(yaml.safe_dump(ROLLING_TASK))
    return str(directory / "demo_bpb.yaml")


def build(task) -> list:
    ran = []

    def record(started):
        ran.append((started.task_family, getattr(started, "round_idx", None)))

    luigi.Task.event_handler(luigi.Event.START)(record)
    try:
        result = luigi.build([task], local_scheduler=True, detailed_summary=True, log_level="WARNING")
    finally:
        luigi.Task._event_callbacks[luigi.Task][luigi.Event.START].discard(record)
    assert result.status == LuigiStatusCode.SUCCESS, result.summary_text
    return ran


def write_recipe(path: Path, **overrides) -> str:
    recipe = deep_merge(deep_merge(TINY, ALGORITHMS["spin"]), overrides)
    recipe["name"] = "tiny_bench"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A one-round tiny SPIN run made without benchmarks: (tmp dir, runs dir, recipe path)."""
    tmp = tmp_path_factory.mktemp("bench")
    recipe = write_recipe(tmp / "plain.yaml")
    build(Iterate(recipe=recipe, runs_dir=str(tmp / "runs"), rounds=1))
    return tmp, tmp / "runs", recipe


@pytest.mark.slow
def test_benchmarks_added_to_a_finished_run_run_alone_and_only_what_is_new(finished_run):
    pytest.importorskip("lm_eval")
    tmp, runs, _ = finished_run
    rolling = rolling_task(tmp / "tasks")
    recipe = write_recipe(tmp / "with_bench.yaml", evaluation={"benchmarks": [rolling]})
    ran = build(Iterate(recipe=recipe, runs_dir=str(runs), rounds=1))
    # Iterate starts again after the tasks it hands out (Luigi's dynamic requirements): only the others count.
    work = [task for task in ran if task[0] != "Iterate"]
    assert sorted(work, key=str) == sorted([("Benchmark", 0), ("Benchmark", 1), ("Report", None)], key=str)
    run_dir = runs / "tiny_bench"
    first = json.loads((run_dir / "round_01" / "benchmarks.json").read_text())
    [record] = first["benchmarks"]
    figure = record["tasks"]["selfplay_demo_bpb"]
    assert figure["n"] == 24 and figure["version"] == 2.0 and record["lm_eval_version"]
    assert figure["metrics"]["bits_per_byte"]["value"] > 0 and figure["metrics"]["bits_per_byte"]["stderr"] is None
    metrics = json.loads((run_dir / "round_01" / "metrics.json").read_text())
    assert {row["metric"] for row in metrics["benchmarks"]} == {"bits_per_byte", "word_perplexity"}
    assert metrics["eval"]["prompts"] == 12  # Evaluate's figures are still there beside them
    # run.yaml now records the benchmarks the run's outputs were made with
    assert yaml.safe_load((run_dir / "run.yaml").read_text())["recipe"]["evaluation"]["benchmarks"] == [rolling]
    report = (run_dir / "report.md").read_text()
    assert "## Benchmarks" in report and "bits_per_byte" in report and "lm-eval" in report

    assert build(Iterate(recipe=recipe, runs_dir=str(runs), rounds=1)) == []  # nothing new: nothing runs

    # One more benchmark: the Benchmark tasks run again, and only the new benchmark is measured.
    more = write_recipe(tmp / "more_bench.yaml", evaluation={"benchmarks": [rolling, {"task": SUMS_MC, "limit": 8}]})
    ran = build(Iterate(recipe=more, runs_dir=str(runs), rounds=1))
    assert {family for family, _ in ran} == {"Benchmark", "Report", "Iterate"}
    second = json.loads((run_dir / "round_01" / "benchmarks.json").read_text())
    assert second["benchmarks"][0] == record  # kept as it was, not measured again
    assert second["benchmarks"][1]["tasks"]["selfplay_sums_mc"]["n"] == 8
    acc = second["benchmarks"][1]["tasks"]["selfplay_sums_mc"]["metrics"]["acc"]
    assert acc["stderr"] == pytest.approx((acc["value"] * (1 - acc["value"]) / 7) ** 0.5)  # lm-eval's SE of a mean

    # Editing the task file's data makes its result stale: measured again, the other one kept.
    with open(tmp / "tasks" / "heldout.jsonl", "a") as f:
        f.write((REPO / "data" / "demo" / "heldout.jsonl").read_text().splitlines()[30] + "\n")
    build(Iterate(recipe=more, runs_dir=str(runs), rounds=1))
    third = json.loads((run_dir / "round_01" / "benchmarks.json").read_text())
    assert third["benchmarks"][0]["tasks"]["selfplay_demo_bpb"]["n"] == 25
    assert third["benchmarks"][1] == second["benchmarks"][1]

    # A benchmarks.json damaged by hand is not trusted: that round is measured again, and only that round.
    (run_dir / "round_00" / "benchmarks.json").write_text("{not json")
    ran = build(Iterate(recipe=more, runs_dir=str(runs), rounds=1))
    assert ("Benchmark", 0) in ran and ("Benchmark", 1) not in ran
    assert len(json.loads((run_dir / "round_00" / "benchmarks.json").read_text())["benchmarks"]) == 2

    # Any other change of the recipe is still refused.
    changed = write_recipe(tmp / "changed.yaml", evaluation={"benchmarks": [rolling]}, training={"beta": 0.5})
    with pytest.raises(RecipeError, match="changed: training.beta"):
        Iterate(recipe=changed, runs_dir=str(runs), rounds=1)


@pytest.mark.slow
def test_the_figure_of_a_round_equals_lm_evals_own_run_on_its_checkpoint(finished_run):
    """Benchmark(1) hands lm-eval the loaded policy (base + adapter, unmerged); lm-eval itself loads the base
    and the round's adapter by path (`--model hf --model_args pretrained=...,peft=...`): the same figures."""
    pytest.importorskip("lm_eval")
    import lm_eval

    from models.evaluate.benchmarks import task_file_config

    tmp, runs, _ = finished_run
    rolling = rolling_task(tmp / "own")
    recipe = write_recipe(tmp / "own.yaml", evaluation={"benchmarks": [rolling, {"task": SUMS_GEN, "limit": 6}]})
    build(Iterate(recipe=recipe, runs_dir=str(runs), rounds=1))
    run_dir = runs / "tiny_bench"
    ours = json.loads((run_dir / "round_01" / "benchmarks.json").read_text())["benchmarks"]

    from lm_eval.tasks import TaskManager

    checkpoint = run_dir / "round_01" / "checkpoint"
    common = {"dtype": "float32", "device": "cpu", "batch_size": 8}
    local_only = TaskManager(include_defaults=False)
    for task, limit, record in ((rolling, None, ours[0]), (SUMS_GEN, 6, ours[1])):
        config = task_file_config(BenchmarkSpec(task=task))
        own = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(run_dir / "base_model"),
                                                              "peft": str(checkpoint / "adapter"), **common},
                                      tasks=[config], limit=limit, log_samples=False, task_manager=local_only)
        name = config["task"]
        for metric, figure in record["tasks"][name]["metrics"].items():
            key = metric if " (" not in metric else metric.replace(" (", ",").rstrip(")")
            key = key if "," in key else f"{key},none"
            assert figure["value"] == own["results"][name][key], (name, metric)
    # The merged export is the same policy within fp32 rounding of the fold.
    merged = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(checkpoint), **common},
                                     tasks=[task_file_config(BenchmarkSpec(task=rolling))], log_samples=False,
                                     task_manager=local_only)
    value = ours[0]["tasks"]["selfplay_demo_bpb"]["metrics"]["bits_per_byte"]["value"]
    assert merged["results"]["selfplay_demo_bpb"]["bits_per_byte,none"] == pytest.approx(value, rel=1e-5)
    # and it is the round's model, not the base: round 0's figure differs
    base = json.loads((run_dir / "round_00" / "benchmarks.json").read_text())["benchmarks"][0]
    assert base["tasks"]["selfplay_demo_bpb"]["metrics"]["bits_per_byte"]["value"] != value


# --- bad inputs, before any compute ------------------------------------------------------------------


def preflight_of(tmp_path, **evaluation):
    from tasks.requirements import preflight

    path = Path(write_recipe(tmp_path / "r.yaml", evaluation=evaluation))
    preflight(load_recipe(path), 1)


def test_an_lm_eval_task_that_does_not_exist_fails_in_one_line(tmp_path):
    pytest.importorskip("lm_eval")
    with pytest.raises(RecipeError) as err:
        preflight_of(tmp_path, benchmarks=["gsm8k", {"task": "arc_challenge"}, {"task": "hellaswagg", "limit": 5}])
    message = str(err.value)
    assert "evaluation.benchmarks[2]" in message and "'hellaswagg'" in message and "did you mean 'hellaswag'" in message
    assert "\n" not in message


def test_a_task_file_that_does_not_parse_or_is_missing_fails_naming_it(tmp_path):
    pytest.importorskip("lm_eval")
    broken = tmp_path / "broken.yaml"
    broken.write_text("task: x\ndoc_to_text: [unclosed\n")
    with pytest.raises(RecipeError, match=r"evaluation.benchmarks\[0\]: .*broken.yaml is not a task file lm-eval can read"):
        preflight_of(tmp_path, benchmarks=[str(broken)])
    with pytest.raises(RecipeError, match=r"task file .*nowhere.yaml does not exist"):
        preflight_of(tmp_path, benchmarks=[str(tmp_path / "nowhere.yaml")])
    no_task = tmp_path / "no_task.yaml"
    no_task.write_text("dataset_path: json\n")
    with pytest.raises(RecipeError, match="names no 'task'"):
        preflight_of(tmp_path, benchmarks=[str(no_task)])
    no_data = tmp_path / "no_data.yaml"
    no_data.write_text(yaml.safe_dump({**ROLLING_TASK, "dataset_kwargs": {"data_files": {"test": "missing.jsonl"}}}))
    with pytest.raises(RecipeError, match="data file missing.jsonl not found"):
        preflight_of(tmp_path, benchmarks=[str(no_data)])


def test_without_the_eval_extra_the_error_says_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what `import lm_eval` meets when it is not installed
    with pytest.raises(RecipeError, match=r"not installed: pip install -e '\.\[eval\]'"):
        preflight_of(tmp_path, benchmarks=[SUMS_MC])


def test_a_referee_model_path_that_is_not_a_model_fails_before_any_compute(tmp_path):
    (tmp_path / "not_a_model").mkdir()
    with pytest.raises(ModelError, match="evaluation.judge_model: model path .*not_a_model is not a model directory"):
        preflight_of(tmp_path, judge="reward_model", judge_model=str(tmp_path / "not_a_model"))
    with pytest.raises(ModelError, match="evaluation.judge_model: model path ./nowhere does not exist"):
        preflight_of(tmp_path, judge="self", judge_model="./nowhere")


def test_benchmark_entries_are_checked_when_the_recipe_loads():
    base = deep_merge(TINY, ALGORITHMS["spin"])

    def load(**evaluation):
        return recipe_from_dict(deep_merge(base, {"evaluation": evaluation}), "r.yaml")

    specs = benchmark_specs(load(benchmarks=["gsm8k", {"task": "t.yaml", "num_fewshot": 5, "limit": 0.5}]).evaluation.benchmarks, "r")
    assert specs == [BenchmarkSpec("gsm8k"), BenchmarkSpec("t.yaml", num_fewshot=5, limit=0.5)]
    assert specs[1].is_file and not specs[0].is_file and specs[1].label == "t.yaml 5-shot limit 0.5"
    for bad, pattern in [
        ([{"task": "gsm8k", "shots": 5}], r"unknown key 'evaluation.benchmarks\[0\].shots'"),
        ([{"num_fewshot": 5}], r"evaluation.benchmarks\[0\].task must be"),
        ([{"task": "gsm8k", "limit": 1.5}], r"limit must be a positive count, or a fraction below 1"),
        ([{"task": "gsm8k", "num_fewshot": -1}], r"num_fewshot must be a count >= 0"),
        ([3], r"evaluation.benchmarks\[0\] must be a task name"),
        (["gsm8k", {"task": "gsm8k", "batch_size": 4}], r"evaluation.benchmarks\[1\] repeats evaluation.benchmarks\[0\]"),
    ]:
        with pytest.raises(RecipeError, match=pattern):
            load(benchmarks=bad)
    with pytest.raises(RecipeError, match="rounds.0..evaluation.benchmarks cannot change between rounds"):
        recipe_from_dict(deep_merge(base, {"rounds": [{"evaluation": {"benchmarks": ["gsm8k"]}}]}), "r.yaml")
    with pytest.raises(RecipeError, match="evaluation.judge_model needs evaluation.judge"):
        load(judge_model="some/rm")
    assert load(judge="reward_model", judge_model="some/rm").evaluation.judge_model == "some/rm"


def test_benchmark_records_are_reused_only_for_the_same_settings_content_and_model(tmp_path):
    pytest.importorskip("lm_eval")
    from models.evaluate.benchmarks import still_valid, task_content_hash

    task = tmp_path / "t" / "demo_bpb.yaml"
    rolling_task(task.parent)
    spec, other = BenchmarkSpec(str(task)), BenchmarkSpec(str(task), limit=4)
    record = {"settings": spec.settings(), "content_sha256": task_content_hash(spec), "model_stamp": "m1"}
    assert still_valid([record], [spec, other], "m1") == [record, None]
    assert still_valid([record], [spec], "m2") == [None]  # the round's model was remade
    shutil.copy(task.parent / "heldout.jsonl", tmp_path / "copy.jsonl")
    with open(task.parent / "heldout.jsonl", "a") as f:
        f.write('{"prompt": "x", "response": "y"}\n')
    assert still_valid([record], [spec], "m1") == [None]  # its data changed

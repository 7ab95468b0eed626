"""The real-model experiment: its lenient check reads answers out of chat sentences (and says wrong when
they are wrong), pass@k is the unbiased estimator, and the script runs end to end on a tiny model."""

import json
import math
import subprocess
import sys

import pytest

from data.demo_tasks import check as strict_check
from data.lenient import check as lenient_check
from conftest import REPO, save_tiny_llama_root

sys.path.insert(0, str(REPO / "experiments"))
from smollm2 import pass_at_k  # noqa: E402


def lenient(task, answer, response):
    return lenient_check("", response, {"task": task, "answer": answer})


@pytest.mark.parametrize(
    "task, answer, response, right",
    [
        # Sentences as SmolLM2-135M-Instruct writes them.
        ("add", "193", "The sum of 95 and 98 is 193.", True),
        ("add", "193", "95 + 98 = 193", True),
        ("add", "193", "The sum of 95 and 98 is 183.", False),
        ("add", "193", "The number of 9s in 98 is 98.", False),
        ("add", "193", "193, or maybe 194.", False),  # the last answer counts: a hedge ending wrong is wrong
        ("add", "193", "The answer is 1,193.", False),  # 1,193 is one number, not 193
        ("subtract", "38", "To subtract 45 from 83, we get 83 - 45 = 38.", True),
        ("subtract", "38", "83 minus 45 equals 48.", False),
        ("subtract", "38", "I cannot compute that.", False),
        ("extreme", "87", "The largest number is 87.", True),
        ("extreme", "87", "Among 12, 87 and 40, the largest is 87.", True),
        ("extreme", "87", "The largest number is 12, 87, 40.", False),  # an echo of the list ends on 40
        ("extreme", "3", "1. 87\n2. 3", True),  # list markers are not answers
        ("count", "2", "There are two a's in bakada, so the answer is 3.", False),  # the last count, a word or digits
        ("count", "3", "The letter a appears 3 times in kabala.", True),
        ("count", "2", "The letter 'o' appears twice in the word 'bokolo'.", True),
        ("count", "3", "The letter o appears three times.", True),
        ("count", "1", "The letter k appears once in bako.", True),
        ("count", "0", "The letter e does not appear in the word kabala.", True),
        ("count", "1", "The letter e does not appear in the word kabala.", False),
        ("count", "2", "The letter a appears 3 times.", False),
        ("sort", "11 47 54", "Sorted in ascending order: 11, 47, 54.", True),
        ("sort", "11 47 54", "The numbers in ascending order are 11, 47 and 54.", True),
        ("sort", "11 47 54", "1. 11\n2. 47\n3. 54", True),
        ("sort", "11 47 54", "Sorted: 11, 54, 47.", False),
        ("sort", "11 47 54", "54", False),
        ("reverse", "ilobak", "The word 'kaboli' backwards is 'ilobak'.", True),
        ("reverse", "ilobak", "ilobak is kaboli written backwards. Hope this helps!", True),
        ("reverse", "ilobak", "The reverse of kaboli is ilokab.", False),  # a wrong rearrangement
        ("reverse", "ilobak", "ilobak, or rather ilokab.", False),  # ends on the wrong one
        ("reverse", "ilobak", "The word kaboli written backwards is kaboli.", False),  # an echo is no reversal
        ("reverse", "ilobak", "Sure! Here it is.", False),
        ("reverse", "abba", "abba backwards is abba.", True),  # a palindrome is its own reversal
        # Cut at the length limit: a response that has not finished its sentence states nothing.
        ("extreme", "15", "To find the smallest number that is the smallest multiple of 15, we need 15 t", False),
        ("extreme", "15", "In this case, 15 is the s", False),
        ("add", "193", "193", True),  # the bare answer ends on itself
        ("add", "193", "The answer is 193", True),
        ("count", "2", "The letter o appears twice", True),
        ("reverse", "ilobak", "The reverse is ilobak", True),
        ("reverse", "ilobak", "The reverse is ilobak and then some more wor", False),
    ],
)
def test_lenient_reads_the_answer_a_sentence_arrives_at(task, answer, response, right):
    assert lenient(task, answer, response) is right


def test_strict_and_lenient_part_ways_on_sentences_only():
    row = {"task": "add", "answer": "193"}
    assert strict_check("", "193", row) and lenient_check("", "193", row)
    assert not strict_check("", "The sum is 193.", row) and lenient_check("", "The sum is 193.", row)
    assert not strict_check("", "The sum is 194.", row) and not lenient_check("", "The sum is 194.", row)


def test_lenient_check_loads_as_a_verifier_and_refuses_an_unknown_task():
    from models.judge.verifiers import load_verifier

    verifier = load_verifier("data.lenient:check")
    assert verifier.score("", "It is 193.", {"task": "add", "answer": "193"}) == 1.0
    with pytest.raises(ValueError, match="unknown demo task kind 'poem'"):
        lenient("poem", "x", "x")


def test_pass_at_k_is_the_unbiased_estimator():
    assert pass_at_k(8, 0, 1) == 0.0 and pass_at_k(8, 0, 8) == 0.0
    assert pass_at_k(8, 2, 1) == pytest.approx(2 / 8)
    assert pass_at_k(8, 1, 8) == 1.0
    assert pass_at_k(8, 2, 4) == pytest.approx(1 - math.comb(6, 4) / math.comb(8, 4))
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 8)


def test_the_committed_selection_record_renders_as_committed_and_a_shorter_control_is_said():
    from smollm2 import render_selection

    folder = REPO / "experiments/results/smollm2/selection"
    record = json.loads((folder / "selection.json").read_text())
    text = render_selection(record)
    assert text == (folder / "selection.md").read_text()
    assert record["control_rounds"] == record["rounds"] and "(`--control-rounds`)" not in text
    # The same record as if the control had run 1 round of the arms' 3 (--control-rounds 1).
    control = record["arms"]["sft_control"]
    shorter = {**record, "control_rounds": 1,
               "arms": {**record["arms"], "sft_control": {**control, "kept_round": 1,
                                                          "validation": [r for r in control["validation"] if r["round"] <= 1]}}}
    text = render_selection(shorter)
    assert "The supervised control ran 1 round (`--control-rounds`)." in text
    [row] = [line for line in text.splitlines() if line.startswith("| sft_control | 0.060")]
    assert row.endswith("| - | - |") and " * |" in row


@pytest.mark.slow
def test_smollm2_experiment_runs_at_tiny_scale_with_strict_and_lenient_figures(tmp_path):
    root, _tok = save_tiny_llama_root(tmp_path / "root")
    out = tmp_path / "exp"
    command = [sys.executable, "experiments/smollm2.py", "--scale", "tiny", "--base-model", root, "--out", str(out)]
    base = subprocess.run(command + ["--base-only", "--base-prompts", "2", "--samples", "8"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert base.returncode == 0, base.stderr[-3000:]
    passk = json.loads((out / "base_passk.json").read_text())
    assert set(passk["table"]) == {"all", "add", "count", "extreme", "reverse", "sort", "subtract"}
    assert passk["table"]["add"]["prompts"] == 2 and passk["split"] == "train"
    samples = [json.loads(line) for line in (out / "base_samples.jsonl").read_text().splitlines()]
    assert len(samples) == 12 * 9 and all(s["prompt_id"].startswith("train-") for s in samples)

    result = subprocess.run(command + ["--rounds", "1", "--algorithms", "spin,dpo,rest_em,star", "--tasks", "add,count"],
                            cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((out / "results.json").read_text())
    assert set(record["results"]) == {"spin", "dpo", "sft_control", "rest_em", "star"}
    from data.layout import RunLayout
    from data.schema import EVAL, read_artifact

    # The self-training arms ran as such: examples, not pairs, from a fresh adapter on the base; STaR rationalized.
    for name in ("rest_em", "star"):
        stats = json.loads(RunLayout(out / "runs" / name).training_log(1).read_text())["stats"]
        assert stats["loss"] == "nll" and stats["init"] == "base" and RunLayout(out / "runs" / name).selected(1).is_file()
    assert "rationalizations_tried" in json.loads(RunLayout(out / "runs" / "star").judge_meta(1).read_text())

    for name in ("spin", "dpo", "rest_em", "star"):
        rows = record["results"][name]
        assert [row["round"] for row in rows] == [0, 1]
        for row in rows:
            greedy = read_artifact(RunLayout(out / "runs" / name).eval(row["round"]), EVAL).query("kind == 'greedy'")
            # Held-out prompts of the chosen tasks only; both accuracies are the greedy answers' own.
            assert set(greedy.task) <= {"add", "count"} and greedy.prompt_id.str.startswith("heldout-").all()
            assert row["all"]["n"] == len(greedy)
            answers = greedy[["prompt", "response", "task", "answer"]].itertuples(index=False)
            strict, lenient_ = zip(*[(strict_check(p, r, {"task": t, "answer": a}), lenient_check(p, r, {"task": t, "answer": a}))
                                     for p, r, t, a in answers])
            assert row["all"]["strict"] == pytest.approx(sum(strict) / len(greedy))
            assert row["all"]["lenient"] == pytest.approx(sum(lenient_) / len(greedy))
        # Both rounds answered the same prompts, so the paired change is the difference of the accuracies.
        change = rows[1]["change_vs_base"]
        assert change["n"] == rows[0]["all"]["n"]
        for measure in ("strict", "lenient"):
            assert change[measure] == pytest.approx(rows[1]["all"][measure] - rows[0]["all"][measure])
    # The pipeline's own accuracy is the lenient one (the recipes' verifier).
    assert record["pipeline_metrics"]["dpo"][0]["accuracy"] == pytest.approx(record["results"]["dpo"][0]["all"]["lenient"])
    control = record["results"]["sft_control"]
    assert [row["round"] for row in control] == [0, 1]
    spin_log = json.loads(RunLayout(out / "runs" / "spin").training_log(1).read_text())
    assert control[1]["sequences"] >= 2 * spin_log["stats"]["pairs"]  # at least SPIN's round's sequences
    assert control[1]["change_vs_base"]["lenient"] == pytest.approx(control[1]["all"]["lenient"] - control[0]["all"]["lenient"])
    assert "| sft_control |" in (out / "results.md").read_text()
    # --rescore rebuilds the same figures from the saved evaluations.
    rescored = subprocess.run([sys.executable, "experiments/smollm2.py", "--rescore", "--out", str(out)],
                              cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rescored.returncode == 0, rescored.stderr[-3000:]
    assert json.loads((out / "results.json").read_text())["results"] == record["results"]
    assert "verifier: data.lenient:check" in (out / "recipes" / "dpo.yaml").read_text()
    # --keep-results: one method run again (its run is there: nothing to do) beside the others as they were measured.
    again = subprocess.run(command + ["--rounds", "1", "--algorithms", "star", "--tasks", "add,count", "--keep-results"],
                           cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    merged = json.loads((out / "results.json").read_text())
    assert list(merged["results"]) == ["spin", "sft_control", "dpo", "rest_em", "star"]
    assert merged["results"] == {name: record["results"][name] for name in merged["results"]}
    assert set(merged["measured"]) == set(merged["results"]) and merged["round_0_matches"] == {"star": True}
    refused = subprocess.run(command + ["--rounds", "2", "--algorithms", "star", "--tasks", "add,count", "--keep-results"],
                             cwd=REPO, capture_output=True, text=True, timeout=600)
    assert refused.returncode != 0 and "was measured with rounds 1, this run has 2" in refused.stderr


@pytest.mark.slow
def test_the_kept_round_experiment_runs_at_tiny_scale(tmp_path):
    # --selection: SPIN at two learning rates (one chosen by validation), DPO, the control selected the same way.
    from data.layout import RunLayout
    from data.selection import read_best

    root, _tok = save_tiny_llama_root(tmp_path / "root")
    out = tmp_path / "exp"
    command = [sys.executable, "experiments/smollm2.py", "--scale", "tiny", "--base-model", root, "--out", str(out),
               "--selection", "--rounds", "2", "--algorithms", "spin,dpo", "--spin-lrs", "1e-3,1e-2", "--tasks", "add,count"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((out / "selection.json").read_text())
    assert record["spin_candidates"] == ["spin_lr1e-3", "spin_lr1e-2"] and record["spin_chosen"] in record["spin_candidates"]
    chosen = record["spin_chosen"]
    kept = {name: record["arms"][name]["kept_round"] for name in record["arms"]}
    # The SPIN chosen is the one whose kept round did better on validation; each arm kept what its run kept.
    accuracy = {name: record["arms"][name]["validation"][kept[name]]["mean"] for name in record["spin_candidates"]}
    assert accuracy[chosen] == max(accuracy.values())
    for name in ("spin_lr1e-3", "spin_lr1e-2", "dpo"):
        assert read_best(RunLayout(out / "runs" / name))["round"] == kept[name]
    # Paired over every held-out prompt; a run that kept its base has changed nothing.
    for arm in record["arms"].values():
        assert arm["vs_round_0"]["n"] == arm["vs_control"]["n"] == arm["held_out"]["n"]
        if arm["kept_round"] == 0:
            assert arm["vs_round_0"]["lenient"] == arm["vs_round_0"]["strict"] == 0
    assert set(record["arms"]) == {"spin_lr1e-3", "spin_lr1e-2", "dpo", "sft_control"}
    assert (out / "control" / "round_01" / "validation.parquet").is_file()
    text = (out / "selection.md").read_text()
    assert "SPIN's kept model at least 2 standard errors above its base" in text and "| sft_control |" in text
    # The same command again resumes: every run is complete, and the control's rounds are read back, not trained.
    made = {path: path.stat().st_mtime_ns for path in (out / "control").glob("round_*/control_round.json")}
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(made) == 2 and {path: path.stat().st_mtime_ns for path in made} == made
    assert json.loads((out / "selection.json").read_text())["arms"] == record["arms"]

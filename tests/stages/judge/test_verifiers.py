"""Verifiers (built-in and the user's own), the answer and task columns, and what the preflight refuses."""

import json
import sys

import pandas as pd
import pytest
import yaml

from common.errors import DataError, ModelError, RecipeError
from configs.recipe import DataConfig, recipe_from_dict
from data.prompts import load_prompts
from tasks.requirements import check_eval_data, check_train_data, preflight
from models.judge.judge_types import JudgeGroup
from models.judge.judges import VerifierJudge, make_judge, pair_round
from models.judge.verifiers import choice_letter, last_number, load_verifier
from conftest import REPO

FIXTURES = REPO / "data" / "fixtures"


@pytest.mark.parametrize(
    "text, number",
    [
        ("The answer is 42.", 42), ("Natalia sold 48/2 = 24 clips.\n#### 72", 72), ("so 1,234 apples", 1234),
        ("10-5", 5), ("it is -3 degrees", -3), ("We get 3.50", 3.5), ("first 1, 2, 3", 3), ("#### 18 and 19 later", 19),
        ("no digits", None),
    ],
)
def test_last_number(text, number):
    assert last_number(text) == number


@pytest.mark.parametrize(
    "response, letter",
    [("(B)", "B"), ("Answer: B", "B"), ("B.", "B"), ("B", "B"), ("C) twelve", "C"), ("the answer is (D)", "D"),
     ("A is wrong, so the answer is C", "C"), ("a banana", None), ("I think so", None)],
)
def test_choice_letter(response, letter):
    assert choice_letter(response) == letter


@pytest.mark.parametrize(
    "name, response, answer, right",
    [
        ("exact", "  1 2 3. ", "1 2 3", True), ("exact", "1 2 3 4", "1 2 3", False),
        ("number", "So she has 1,250 left.", "1,000 - 750 = 250, no: 1250.\n#### 1,250", True),
        ("number", "5 + 4 = 9", "#### 9", True), ("number", "9 + 1 = 10", "#### 9", False), ("number", "nine", "#### 9", False),
        ("choice", "Answer: (c)", "C", False), ("choice", "Answer: C", "c", True), ("choice", "(A) is it", "B", False),
        ("contains", "The capital is Paris.", "paris", True), ("contains", "Lyon", "Paris", False),
        ("regex", "x = 42", r"\b4\d\b", True), ("regex", "x = 52", r"\b4\d\b", False),
    ],
)
def test_builtin_verifiers(name, response, answer, right):
    assert load_verifier(name).score("p", response, {}, answer) == float(right)


def test_user_verifier_from_a_file_gets_the_row_and_may_give_partial_credit(tmp_path):
    path = tmp_path / "checks.py"
    path.write_text("def half_if_subject(prompt, response, row):\n"
                    "    return 1.0 if response == row['answer'] else 0.5 if row['subject'] in response else 0\n")
    verifier = load_verifier(f"{path}:half_if_subject")
    row = {"subject": "maths", "answer": "B"}
    assert [verifier.score("p", r, row) for r in ("B", "maths?", "no")] == [1.0, 0.5, 0.0]
    [result] = VerifierJudge(verifier).judge([JudgeGroup("p", ["B", "maths?", "no"], row=row)])
    assert result.prob_matrix[0, 1] == 0.75 and result.prob_matrix[2, 0] == 0.0 and list(result.scores) == [1.0, 0.5, 0.0]


def test_user_verifier_from_a_module(tmp_path, monkeypatch):
    (tmp_path / "my_checks").mkdir()
    (tmp_path / "my_checks" / "__init__.py").write_text("")
    (tmp_path / "my_checks" / "grading.py").write_text("def upper(prompt, response, row):\n    return response.isupper()\n")
    # sys.path patched by hand: syspath_prepend also fixes up pkg_resources' namespaces, which setuptools >= 81 no longer ships.
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    verifier = load_verifier("my_checks.grading:upper")
    assert verifier.score("p", "YES") == 1.0 and verifier.score("p", "no") == 0.0
    assert not verifier.needs_answer


@pytest.mark.parametrize(
    "spec_of, message",
    [
        (lambda d: "nmber", r"judge.verifier 'nmber' is not a built-in verifier \(built-ins: exact, number, choice"),
        (lambda d: "no_such_pkg.checks:fn", r"'no_such_pkg.checks:fn': cannot import no_such_pkg.checks: ModuleNotFoundError"),
        (lambda d: f"{d}/missing.py:fn", r"no such file .*missing.py"),
        (lambda d: f"{d}/checks.py:nope", r"checks.py has no function 'nope'"),
        (lambda d: f"{d}/checks.py:two_args", r"two_args\(prompt, response\) cannot be called as two_args\(prompt, response, row\)"),
        (lambda d: f"{d}/checks.py:CONSTANT", r"checks.py.CONSTANT is not a function"),
        (lambda d: f"{d}/broken.py:fn", r"cannot load .*broken.py: ZeroDivisionError"),
        (lambda d: "checks.py:", r"expected 'package.module:function'"),
    ],
)
def test_a_verifier_that_cannot_be_used_is_one_line_naming_it(tmp_path, spec_of, message):
    (tmp_path / "checks.py").write_text("CONSTANT = 3\n\ndef two_args(prompt, response):\n    return True\n")
    (tmp_path / "broken.py").write_text("1 / 0\n")
    with pytest.raises(RecipeError, match=message) as err:
        load_verifier(spec_of(tmp_path))
    assert "\n" not in str(err.value)


def test_a_verifier_returning_something_else_than_a_score_is_refused(tmp_path):
    (tmp_path / "checks.py").write_text("def text(prompt, response, row):\n    return 'yes'\n"
                                        "def big(prompt, response, row):\n    return 3\n")
    for name in ("text", "big"):
        with pytest.raises(RecipeError, match=r"returned .* for prompt 'p'; a verifier returns a bool or a number in \[0, 1\]"):
            load_verifier(f"{tmp_path}/checks.py:{name}").score("p", "r", {})


def test_answer_and_task_columns_and_the_row_a_verifier_sees(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"question": "2+2?", "solution": "#### 4", "kind": "add", "level": 1, "tags": ["x"], "extra": None},
            {"question": "3+3?", "solution": 6, "kind": "add", "level": 2.5, "tags": [], "extra": "e"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(prompt_field="question", answer_field="solution", task_field="kind")
    frame = load_prompts(str(path), "train", cfg)
    assert list(frame.answer) == ["#### 4", "6"] and list(frame.task) == ["add", "add"]
    assert json.loads(frame.source_row[0]) == {"solution": "#### 4", "kind": "add", "level": 1, "extra": None}  # no prompt, no list
    assert frame.attrs["answer_from"] == "solution"
    with pytest.raises(DataError, match=r"data.jsonl: missing column subject \(data.task_field\)"):
        load_prompts(str(path), "train", DataConfig(prompt_field="question", task_field="subject"))
    with pytest.raises(DataError, match=r"data.jsonl: missing column answr \(data.answer_field\)"):
        load_prompts(str(path), "train", DataConfig(prompt_field="question", answer_field="answr"))


def test_without_an_answer_column_the_ground_truth_is_the_answer():
    frame = load_prompts(str(FIXTURES / "chat_messages.jsonl"), "train", DataConfig())
    assert list(frame.answer) == list(frame.reference) and frame.attrs["answer_from"] == "messages"
    prompts_only = load_prompts(str(FIXTURES / "prompt_response.parquet"), "train", DataConfig(response_field="none"))
    assert "answer" not in prompts_only.columns


def test_pairs_of_a_user_verifier_come_from_the_rows_it_sees(tmp_path):
    (tmp_path / "checks.py").write_text("def by_subject(prompt, response, row):\n    return response == row['subject']\n")
    recipe = recipe_from_dict({"algorithm": "dpo", "generation": {"num_samples": 2},
                               "judge": {"name": "verifier", "verifier": f"{tmp_path}/checks.py:by_subject"}})
    gens = pd.DataFrame({"prompt_id": ["a", "a"], "prompt": ["p", "p"], "response": ["maths", "art"], "sample_index": [0, 1],
                         "source_row": [json.dumps({"subject": "art"})] * 2})
    pairs, _ = pair_round(recipe, gens, 1, make_judge("verifier", recipe))
    assert pairs.chosen.tolist() == ["art"] and pairs.rejected.tolist() == ["maths"]


def dataset(tmp_path, rows, name="train.jsonl") -> str:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def dpo(tmp_path, train, evaluation=None, **judge) -> object:
    return recipe_from_dict({"algorithm": "dpo", "generation": {"num_samples": 2}, "judge": {"name": "verifier", **judge},
                             "data": {"train": train, "eval": evaluation or train}})


def test_preflight_refuses_data_the_verifier_judge_cannot_check(tmp_path):
    no_answers = dataset(tmp_path, [{"prompt": "a", "kind": "k"}, {"prompt": "b", "kind": "k"}])
    with pytest.raises(DataError, match=r"train.jsonl: the verifier judge \(verifier 'exact'\) checks against an answer, "
                                        r"but the data has no column 'answer' \(data.answer_field\) and no ground-truth response"):
        preflight(dpo(tmp_path, no_answers), rounds=1)
    bad_number = dataset(tmp_path, [{"prompt": "a", "answer": "#### 4"}, {"prompt": "b", "answer": "four"}], "n.jsonl")
    with pytest.raises(DataError, match=r"n.jsonl: row 1: field 'answer' has no number \(the verifier judge, verifier 'number'\)"):
        preflight(dpo(tmp_path, bad_number, verifier="number"), rounds=1)
    bad_letter = dataset(tmp_path, [{"prompt": "a", "answer": "E or F"}], "c.jsonl")
    with pytest.raises(DataError, match=r"row 0: field 'answer' is not an option letter A-J"):
        preflight(dpo(tmp_path, bad_letter, verifier="choice"), rounds=1)


def test_preflight_checks_the_held_out_answers_the_evaluation_will_score(tmp_path):
    train = dataset(tmp_path, [{"prompt": "a", "answer": "#### 1"}])
    held_out = dataset(tmp_path, [{"prompt": "b", "answer": "#### 2"}, {"prompt": "c", "answer": "?"}], "eval.jsonl")
    with pytest.raises(DataError, match=r"eval.jsonl: row 1: field 'answer' has no number \(the evaluation judge, verifier 'number'\)"):
        preflight(dpo(tmp_path, train, held_out, verifier="number"), rounds=1)
    # SPIN: the accuracy is measured by the verifier wherever the held-out rows have answers.
    spin = recipe_from_dict({"judge": {"verifier": "number"}, "data": {"eval": held_out}})
    with pytest.raises(DataError, match=r"row 1: field 'answer' has no number \(the evaluation judge, verifier 'number'\)"):
        check_eval_data(spin, load_prompts(held_out, "test", spin.data), held_out)
    # Without answers there is nothing to score: no accuracy, no error.
    no_answers = dataset(tmp_path, [{"prompt": "b"}], "plain.jsonl")
    check_eval_data(spin, load_prompts(no_answers, "test", spin.data), no_answers)


def test_preflight_checks_every_rounds_verifier_and_judge_models(tmp_path):
    train = dataset(tmp_path, [{"prompt": "a", "answer": "1"}])
    later = recipe_from_dict({"algorithm": "dpo", "generation": {"num_samples": 2}, "judge": {"name": "verifier"},
                              "data": {"train": train, "eval": train}, "rounds": [{}, {"judge": {"verifier": "nope:fn"}}]})
    preflight(later, rounds=1)  # round 2's verifier is not needed for one round
    with pytest.raises(RecipeError, match=r"judge.verifier 'nope:fn': cannot import nope"):
        preflight(later, rounds=2)
    rm = recipe_from_dict({"algorithm": "dpo", "generation": {"num_samples": 2},
                           "judge": {"name": "reward_model", "model": str(tmp_path / "no_model")}, "data": {"train": train, "eval": train}})
    with pytest.raises(ModelError, match=r"judge.model: model path .*no_model does not exist"):
        preflight(rm, rounds=1)
    (tmp_path / "empty").mkdir()
    pairrm_eval = recipe_from_dict({"judge": {"model": str(tmp_path / "empty")}, "evaluation": {"judge": "pairrm"},
                                    "data": {"train": dataset(tmp_path, [{"prompt": "a", "response": "b"}], "s.jsonl")}})
    with pytest.raises(ModelError, match=r"judge.model: model path .*empty is not a model directory \(no config.json"):
        preflight(pairrm_eval, rounds=1)
    # A referee without a model is refused as the recipe loads, before any preflight.
    with pytest.raises(RecipeError, match=r"evaluation.judge reward_model needs evaluation.judge_model \(or judge.model\)"):
        recipe_from_dict({"evaluation": {"judge": "reward_model"}})


def test_the_demo_names_its_own_check_as_its_verifier():
    for name in ("demo_spin", "demo_sppo", "demo_dpo"):
        recipe = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())
        assert recipe["judge"]["verifier"] == "data.demo_tasks:check"
    verifier = load_verifier("data.demo_tasks:check")
    assert verifier.score("What is 2 + 3?", " 5.", {"task": "add", "answer": "5"}) == 1.0
    frame = load_prompts("demo:heldout", "test", DataConfig()).head(5)
    check_train_data(recipe_from_dict({"algorithm": "dpo", "generation": {"num_samples": 2},
                                       "judge": {"name": "verifier", "verifier": "data.demo_tasks:check"}}), frame, "demo")

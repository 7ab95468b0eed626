"""The self-training family (algorithm rest; models/judge/self_training.py, models/train/losses.py completion_nll) and where a
round starts (training.init): the loss against its closed form, which samples become examples and how many,
STaR's rationalization trained without its hint, a fresh adapter per round whatever its parent, the parent kept
as the reference, a round where nothing passes, bad recipes refused in one line, and two whole STaR rounds."""

import json
import logging

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

import models.train.trainer as trainer
from common.errors import DataError, RecipeError
from configs.recipe import recipe_from_dict
from data.schema import SELECTED, read_artifact, write_parquet
from models.judge.judges import VerifierJudge
from models.train.losses import completion_nll
from models.generate.sampling import Sample
from models.judge.self_training import RATIONALIZE_PROMPT, finish_counts, pick_examples, select_round
from models.judge.verifiers import load_verifier
from conftest import save_tiny_llama_root


# --- the loss ------------------------------------------------------------------------------------------

def test_completion_nll_is_the_negative_log_likelihood_per_response_token():
    logps = torch.tensor([-2.0, -6.0, -1.0], requires_grad=True)
    lengths = torch.tensor([1.0, 3.0, 4.0])
    losses = completion_nll(logps, lengths)
    # The batch's mean is -(sum of log-probs) / (sum of tokens) = 9 / 8, whatever the split into examples.
    assert losses.mean().item() == pytest.approx(9 / 8)
    assert losses.tolist() == pytest.approx([2 * 3 / 8, 6 * 3 / 8, 1 * 3 / 8])
    # Every response token weighs the same: d mean / d log pi(y_i) = -1 / 8 for each example, lowering the loss
    # as any example's likelihood rises.
    losses.mean().backward()
    assert logps.grad.tolist() == pytest.approx([-1 / 8] * 3)


# --- which samples become examples ---------------------------------------------------------------------

def test_pick_examples_takes_distinct_answers_first_then_repeats_by_score():
    responses = ["5", "5", " 5 ", "6", "7"]
    scores = np.array([1.0, 1.0, 1.0, 1.0, 0.9])
    passed = [0, 1, 2, 3, 4]
    assert pick_examples(responses, scores, passed, 2) == [0, 3]  # "5" and "6" (the best scores), not a copy of "5"
    assert pick_examples(responses, scores, passed, 3) == [0, 3, 4]  # every distinct answer before any repeat
    assert pick_examples(responses, scores, passed, 4) == [0, 1, 3, 4]
    assert pick_examples(responses, scores, passed, None) == passed  # no cap: every sample that passed (ReST-EM)
    assert pick_examples(responses, scores, [], 2) == []


def generations() -> pd.DataFrame:
    rows = []
    for pid, prompt, answer, samples in (
        ("a", "Add 2 and 3.", "5", [("5", True), ("5", True), ("6", True), ("5 ", True)]),
        ("b", "Sort: 3 1 2", "1 2 3", [("1 2 3", False), ("3 2 1", True), ("", True), ("1 3 2", True)]),
        ("c", "Add 3 and 4.", "7", [("7", True), ("8", True), ("", True), ("9", False)]),
    ):
        for k, (text, finished) in enumerate(samples):
            rows.append({"prompt_id": pid, "prompt": prompt, "response": text, "sample_index": k, "round": 1,
                         "num_tokens": len(text), "finished": finished, "answer": answer, "task": "t",
                         "token_ids": [ord(ch) for ch in text] + ([0] if finished else [])})
    return pd.DataFrame(rows)


class AskedJudge(VerifierJudge):
    """The exact verifier, recording the prompts it was asked about."""

    def __init__(self):
        super().__init__(load_verifier("exact"))
        self.prompts = []

    def judge(self, groups):
        self.prompts += [group.prompt for group in groups]
        return super().judge(groups)


def rest_recipe(**judge):
    return recipe_from_dict({"algorithm": "rest", "judge": {"name": "verifier", "verifier": "exact", **judge}})


def test_the_samples_that_pass_become_examples_and_are_counted():
    frame, counts = select_round(rest_recipe(max_per_prompt=2), generations(), 1, AskedJudge())
    kept = {pid: sorted(group.sample_index) for pid, group in frame.groupby("prompt_id")}
    # a: three right answers, all "5": at most 2 kept; b: its only right answer was cut at the length limit
    # (judge.unfinished penalize keeps none such); c: one right answer.
    assert kept == {"a": [0, 1], "c": [0]}
    assert (frame.score == 1.0).all() and (frame.source == "sample").all() and frame.hinted_prompt.isna().all()
    assert (frame["round"] == 1).all() and (frame.judge == "verifier").all()
    assert list(frame.token_ids.iloc[0]) == [ord("5"), 0]  # a's first sample, as it was sampled (its EOS 0)
    assert counts == {"prompts": 3, "samples": 12, "samples_passed": 4, "prompts_passed": 2, "examples": 3,
                      "skipped_over_cap": 1, "skipped_unfinished": 1, "unfinished_samples": 2, "unparsed_judgements": 0,
                      "reprompted_judgements": 0}
    assert finish_counts(counts)["pass_rate"] == 4 / 12
    write_parquet(frame, "/dev/null", SELECTED)  # the artifact's contract holds
    # judge.unfinished keep: the cut right answer of b passes too.
    frame, counts = select_round(recipe_from_dict({"algorithm": "rest", "judge": {"name": "verifier", "verifier": "exact",
                                                                                     "unfinished": "keep"}}),
                                 generations(), 1, AskedJudge())
    assert sorted(frame[frame.prompt_id == "b"].sample_index) == [0] and counts["skipped_unfinished"] == 0
    assert len(frame[frame.prompt_id == "a"]) == 3  # no cap: every sample that passed


class Rationalizer:
    """Answers each hinted request with fixed samples, and records what it was asked."""

    template = "{prompt} (answer: {answer})"

    def __init__(self, answers: list[tuple[str, bool]]):
        self.answers, self.requests = answers, []

    def sample(self, requests):
        self.requests += requests
        return [[Sample(text, len(text), finished, [ord(ch) for ch in text]) for text, finished in self.answers]
                for _ in requests]


def test_rationalization_hints_the_answer_and_keeps_the_rewrites_without_it():
    judge = AskedJudge()
    rationalizer = Rationalizer([("1 2 3", True), ("1 2 3", True), ("2 1 3", True), ("1 2 3", False)])
    frame, counts = select_round(rest_recipe(max_per_prompt=2, rationalize=True), generations(), 1, judge, rationalizer)
    # Only b, where no sample passed, is asked again, with its answer in the request.
    assert rationalizer.requests == [("Sort: 3 1 2 (answer: 1 2 3)", None)]
    rewritten = frame[frame.source == "rationalization"]
    assert sorted(rewritten.sample_index) == [0, 1]  # the two finished right rewrites (cap 2), not the wrong or cut one
    # Kept with the prompt as it will be asked, never the hint; the hinted request is recorded beside it.
    assert (rewritten.prompt == "Sort: 3 1 2").all() and (rewritten.hinted_prompt == "Sort: 3 1 2 (answer: 1 2 3)").all()
    # The judge was asked about the plain prompt, for the samples and for the rewrites alike.
    assert all("answer:" not in prompt for prompt in judge.prompts) and judge.prompts.count("Sort: 3 1 2") == 2
    assert counts["rationalizations_tried"] == 1 and counts["rationalization_samples"] == 4
    assert counts["rationalizations_passed"] == 1 and counts["rationalized_examples"] == 2
    assert counts["examples"] == len(frame) == 3 + 2 and counts["skipped_no_answer"] == 0
    write_parquet(frame, "/dev/null", SELECTED)  # a rewrite's index never collides with a sample's of its prompt


def test_the_hint_template_by_default_carries_the_prompt_and_the_answer():
    text = RATIONALIZE_PROMPT.format(prompt="Add 2 and 3.", answer="5")
    assert "Add 2 and 3." in text and "5" in text


def test_a_round_where_nothing_passes_keeps_no_example():
    wrong = generations().assign(answer="nothing said this")
    frame, counts = select_round(rest_recipe(), wrong, 1, AskedJudge())
    assert frame.empty and counts["examples"] == 0 and counts["prompts_passed"] == 0
    assert finish_counts(counts)["pass_rate"] == 0.0
    write_parquet(frame, "/dev/null", SELECTED)  # an empty artifact is still a valid one


def test_an_example_is_encoded_after_its_plain_prompt_as_it_was_sampled(tmp_path):
    from data.prompts import format_prompt

    _root, tokenizer = save_tiny_llama_root(tmp_path / "root")
    examples = pd.DataFrame({"prompt": ["Sort: 3 1 2"], "response": ["1 2 3"], "token_ids": [[49, 32, 50, 32, 51, 2]],
                             "finished": [True], "hinted_prompt": ["Sort: 3 1 2 (answer: 1 2 3)"]})
    (item,) = trainer.encode_selected(tokenizer, examples, 96)
    assert item.prompt_ids == tokenizer(format_prompt(tokenizer, "Sort: 3 1 2"), add_special_tokens=False).input_ids
    # The sampled ids without their EOS, then the template's end of turn.
    assert item.completion_ids[:5] == [49, 32, 50, 32, 51] and item.completion_ids[-1] == tokenizer.eos_token_id


# --- bad recipes, before any compute --------------------------------------------------------------------

REST = {"algorithm": "rest", "judge": {"name": "verifier"}}


@pytest.mark.parametrize("recipe, message", [
    ({"algorithm": "rest", "judge": {"name": "pairrm", "model": "llm-blender/PairRM-hf"}},
     "algorithm rest keeps the samples whose own score passes judge.pass_score: it needs a judge that scores each "
     r"response \(verifier, reward_model, or self with self_mode pointwise\), not pairrm"),
    ({"algorithm": "rest", "judge": {"name": "self", "self_mode": "pairwise", "pass_score": 3}},
     "not self with self_mode pairwise"),
    ({"algorithm": "rest", "judge": {"name": "verifier", "pass_score": 1.5}},
     r"judge.pass_score 1.5 is outside the scores judge verifier gives \(\[0, 1\]\): no response could ever pass"),
    ({"algorithm": "rest", "judge": {"name": "verifier", "pass_score": -0.5}}, "every response would pass"),
    ({"algorithm": "rest", "judge": {"name": "self", "pass_score": 6}}, r"judge self gives \(\[0, 5\]\)"),
    ({"algorithm": "rest", "judge": {"name": "reward_model", "model": "rm"}}, "needs judge.pass_score"),
    ({**REST, "judge": {"name": "verifier", "rationalize": True, "rationalize_prompt": "{prompt} is hard"}},
     r"judge.rationalize_prompt must contain \{prompt\} and \{answer\}"),
    ({**REST, "judge": {"name": "verifier", "rationalize": True, "rationalize_prompt": "{prompt} {answer} {x}"}},
     "judge.rationalize_prompt: KeyError"),
    ({**REST, "judge": {"name": "verifier", "rationalize_prompt": "{prompt} {answer}"}},
     "judge.rationalize_prompt applies with judge.rationalize: true only"),
    ({"algorithm": "dpo", "judge": {"name": "verifier", "rationalize": True}, "generation": {"num_samples": 2}},
     "judge.rationalize applies to algorithm rest only"),
    ({"algorithm": "dpo", "judge": {"name": "verifier", "max_per_prompt": 2}, "generation": {"num_samples": 2}},
     "judge.max_per_prompt applies to algorithm rest only"),
    ({**REST, "training": {"loss": "dpo_sigmoid"}}, "algorithm rest fits its examples by their likelihood"),
    ({"algorithm": "dpo", "judge": {"name": "verifier"}, "generation": {"num_samples": 2}, "training": {"loss": "nll"}},
     "training.loss nll fits the examples of algorithm rest"),
    ({**REST, "training": {"reference": "base"}}, "training.reference base: loss nll has no reference model"),
    ({**REST, "training": {"nll_weight": 1.0}}, "training.nll_weight shapes preference pairs; algorithm rest makes none"),
    ({**REST, "judge": {"name": "verifier", "refine": True}}, "judge.refine"),
    ({**REST, "training": {"accumulate": True, "mix_rounds": [0.5]}}, "training.accumulate is training.mix_rounds"),
    ({"training": {"init": "base", "reference": "ema"}}, "with training.init base each round starts a fresh one"),
])
def test_bad_self_training_recipes_are_refused_in_one_line(recipe, message):
    with pytest.raises(RecipeError, match=message) as caught:
        recipe_from_dict(recipe)
    assert "\n" not in str(caught.value)


def test_a_bad_recipe_stops_the_command_before_anything_runs(tmp_path):
    import yaml

    import pipeline  # noqa: F401 - registers the tasks
    from tasks.iterate import Iterate

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**REST, "judge": {"name": "verifier", "pass_score": 2.0}}))
    with pytest.raises(RecipeError, match="outside the scores judge verifier gives"):
        Iterate(recipe=str(path), runs_dir=str(tmp_path / "runs"), rounds=1)
    assert not (tmp_path / "runs").exists()


def test_rationalization_needs_an_answer_in_every_training_row(tmp_path):
    from tasks.requirements import preflight

    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in [{"prompt": "a?", "answer": "1"}, {"prompt": "b?", "answer": " "}]))
    checks = tmp_path / "checks.py"
    checks.write_text("def anything(prompt, response, row):\n    return True\n")
    recipe = recipe_from_dict({**REST, "judge": {"name": "verifier", "verifier": f"{checks}:anything", "rationalize": True},
                               "data": {"train": str(data), "eval": str(data), "validation": "none"},
                               "iterate": {"select": "last"}})
    with pytest.raises(DataError, match=r"train.jsonl: row 1: field 'answer' is empty: judge.rationalize gives the answer"):
        preflight(recipe, 1)


# --- where a round starts (training.init) -----------------------------------------------------------------

@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return save_tiny_llama_root(tmp_path_factory.mktemp("root"))[0]


def recipe_for(root_path: str, algorithm: str, **training):
    judged = {"judge": {"name": "verifier"}, "generation": {"num_samples": 2}}
    return recipe_from_dict({
        "algorithm": algorithm, **judged, "model": {"base_model": root_path, "precision": "fp32"},
        "training": {"epochs": 2, "batch_size": 4, "max_length": 96, "learning_rate": 5e-3, "lora_r": 4, "lora_alpha": 8,
                     "save_steps": 100, "warmup_ratio": 0.0, **training},
    })


def pairs(offset: int) -> pd.DataFrame:
    ids = range(offset, offset + 8)
    return pd.DataFrame({"prompt_id": [str(i) for i in ids], "prompt": [f"q{i} {i * 7}" for i in ids],
                         "chosen": [f"a{i * 3}" for i in ids], "rejected": [f"b{i}x" for i in ids],
                         "chosen_score": 1.0, "rejected_score": 0.0, "round": 1, "judge": "verifier"})


def examples(n: int = 8) -> pd.DataFrame:
    return pd.DataFrame({"prompt_id": [str(i) for i in range(n)], "prompt": [f"q{i} {i * 5}" for i in range(n)],
                         "response": [f"r{i * 2}" for i in range(n)], "sample_index": 0, "round": 2, "num_tokens": 2,
                         "score": 1.0, "judge": "verifier", "source": "sample"})


def adapter(out_dir) -> dict:
    return load_file(f"{out_dir}/adapter/adapter_model.safetensors")


def example_logps(model_path: str, recipe, frame: pd.DataFrame, root_path: str) -> np.ndarray:
    from models.load import loading
    from models.logps import batched_logps

    tokenizer = loading.load_tokenizer(root_path, recipe.model)
    model = loading.load_policy(model_path, recipe.model, torch.device("cpu"), root=root_path, merge=False)
    return np.array(batched_logps(model, tokenizer, trainer.encode_selected(tokenizer, frame, 96), 16, torch.device("cpu"))[0])


@pytest.fixture(scope="module")
def parents(root, tmp_path_factory):
    """Two round-1 checkpoints trained from the root on different pairs: two different parents for round 2."""
    out = tmp_path_factory.mktemp("parents")
    recipe = recipe_for(root, "dpo")
    for name, offset in (("a", 0), ("b", 100)):
        trainer.train_round(recipe, root, pairs(offset), out / f"work_{name}", out / name, 1, "root", root)
    return str(out / "a"), str(out / "b")


def test_init_base_trains_the_same_adapter_whatever_the_parent(root, parents, tmp_path):
    parent_a, parent_b = parents
    trained = {}
    for init in ("base", "previous"):
        recipe = recipe_for(root, "rest", init=init)
        for name, parent in (("a", parent_a), ("b", parent_b)):
            out = tmp_path / f"{init}_{name}"
            stats = trainer.train_round(recipe, parent, examples(), tmp_path / f"w_{init}_{name}", out, 2, "root", root)
            assert stats["loss"] == "nll" and stats["examples"] == 8 and stats["trained"] and stats["init"] == init
            assert stats["adapter_start"] == ("fresh" if init == "base" else "parent")
            trained[init, name] = adapter(out)
    # A fresh adapter on the base: the parent leaves no trace (ReST-EM); continued, it does.
    assert all(torch.equal(trained["base", "a"][k], trained["base", "b"][k]) for k in trained["base", "a"])
    assert max((trained["previous", "a"][k] - trained["previous", "b"][k]).abs().max().item() for k in trained["base", "a"]) > 1e-3
    # The examples' likelihood went up from the base (the fit of completion_nll).
    recipe = recipe_for(root, "rest", init="base")
    before, after = example_logps(root, recipe, examples(), root), example_logps(str(tmp_path / "base_a"), recipe, examples(), root)
    assert (after > before).all() and (after - before).mean() > 1.0


def test_init_base_keeps_the_parent_as_the_reference_of_a_preference_loss(root, parents, tmp_path):
    from models.load import loading
    from models.logps import batched_logps

    parent_a, _ = parents
    recipe = recipe_for(root, "dpo", init="base")
    stats = trainer.train_round(recipe, parent_a, pairs(200), tmp_path / "work", tmp_path / "out", 2, "root", root)
    assert stats["adapter_start"] == "fresh" and stats["reference"] == "previous"
    ref = pd.read_parquet(tmp_path / "work" / "ref_logps.parquet")

    def logps(model_path):
        tokenizer = loading.load_tokenizer(root, recipe.model)
        model = loading.load_policy(model_path, recipe.model, torch.device("cpu"), root=root, merge=False)
        chosen, rejected = trainer.encode_pairs(tokenizer, pairs(200), 96)
        return np.array(batched_logps(model, tokenizer, chosen + rejected, 16, torch.device("cpu"))[0]).reshape(2, -1)

    # pi_ref is the model that sampled the round (its parent), though the policy starts from the base ...
    np.testing.assert_allclose(ref[["chosen", "rejected"]].to_numpy().T, logps(parent_a), atol=1e-4)
    # ... which it is not: the comparison above can fail.
    assert np.abs(ref[["chosen", "rejected"]].to_numpy().T - logps(root)).max() > 1e-2


def test_a_round_without_examples_trains_nothing_and_keeps_its_parent(root, parents, tmp_path):
    parent_a, _ = parents
    recipe = recipe_for(root, "rest", init="base")
    empty = examples().iloc[:0]
    stats = trainer.train_round(recipe, parent_a, empty, tmp_path / "work", tmp_path / "out", 2, "root", root)
    assert stats["examples"] == 0 and stats["steps"] == 0 and stats["trained"] is False
    # Not a fresh adapter (the base): the round's policy is its parent's, exactly.
    kept, parent = adapter(tmp_path / "out"), adapter(parent_a)
    assert set(kept) == set(parent) and all(torch.equal(kept[k], parent[k]) for k in parent)


# --- whole rounds ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_star_two_rounds_rationalize_accumulate_and_restart_from_the_base(tmp_path):
    import pipeline  # noqa: F401 - registers the tasks
    from data.layout import RunLayout
    from test_pipeline import build, shipped_demo
    from tasks.iterate import Iterate

    # STaR: one sample a prompt, rationalization where it fails, every round's examples, each round from the base.
    recipe = shipped_demo(tmp_path, "demo_rest", generation={"num_samples": 1},
                          judge={"rationalize": True, "rationalize_samples": 2, "max_per_prompt": 1},
                          training={"accumulate": True})
    runs = tmp_path / "runs"
    build(Iterate(recipe=recipe, runs_dir=str(runs), rounds=2))
    layout = RunLayout(runs / "demo_rest")
    selected = {r: read_artifact(layout.selected(r), SELECTED) for r in (1, 2)}
    for r in (1, 2):
        meta = json.loads(layout.judge_meta(r).read_text())
        assert not layout.pairs(r).exists()
        assert meta["examples"] == len(selected[r]) == meta["prompts_passed"] + meta["rationalizations_passed"]
        assert meta["rationalizations_tried"] == meta["prompts"] - meta["prompts_passed"] > 0
        assert meta["rationalization_samples"] == 2 * meta["rationalizations_tried"]
        assert meta["pass_rate"] == pytest.approx(meta["samples_passed"] / meta["samples"])
        rewritten = selected[r][selected[r].source == "rationalization"]
        assert len(rewritten) == meta["rationalized_examples"]
        assert (rewritten.hinted_prompt != rewritten.prompt).all()
        stats = json.loads(layout.training_log(r).read_text())["stats"]
        assert stats["init"] == "base" and stats["adapter_start"] == "fresh" and stats["parent_round"] == r - 1
        # training.accumulate: round 2 trains on round 1's examples too.
        assert stats["examples"] == sum(len(selected[k]) for k in range(1, r + 1))
        assert json.loads(layout.metrics(r).read_text())["judge"]["examples"] == meta["examples"]
    # The same command again runs nothing; round 2's checkpoint deleted reruns its Train and what follows only.
    assert build(Iterate(recipe=recipe, runs_dir=str(runs), rounds=2)) == []
    import shutil

    shutil.rmtree(layout.checkpoint(2))
    ran = build(Iterate(recipe=recipe, runs_dir=str(runs), rounds=2))
    assert ("Train", 2) in ran and not any(family in ("Generate", "Judge", "Train") and r == 1 for family, r in ran)
    assert ("Generate", 2) not in ran and ("JudgeShard", 2) not in ran


@pytest.mark.slow
def test_a_run_where_nothing_passes_trains_nothing_and_says_so(tmp_path):
    import pipeline  # noqa: F401 - registers the tasks
    from data.layout import RunLayout
    from test_pipeline import build, shipped_demo
    from tasks.iterate import Iterate

    checks = tmp_path / "checks.py"
    checks.write_text("def never(prompt, response, row):\n    return False\n")
    recipe = shipped_demo(tmp_path, "demo_rest", judge={"verifier": f"{checks}:never"}, iterate={"select": "last"},
                          data={"validation": "none"})
    # What the selfplay logger says, read by a handler of the test's own: its console handler writes to the stderr
    # it was set up with, which may be an earlier test's.
    said: list[str] = []
    listener = logging.Handler(logging.WARNING)
    listener.emit = lambda record: said.append(record.getMessage())
    logging.getLogger("selfplay").addHandler(listener)
    try:
        build(Iterate(recipe=recipe, runs_dir=str(tmp_path / "runs"), rounds=1))
    finally:
        logging.getLogger("selfplay").removeHandler(listener)
    layout = RunLayout(tmp_path / "runs" / "demo_rest")
    meta = json.loads(layout.judge_meta(1).read_text())
    assert meta["examples"] == 0 and meta["samples_passed"] == 0 and meta["pass_rate"] == 0.0
    assert read_artifact(layout.selected(1), SELECTED).empty
    stats = json.loads(layout.training_log(1).read_text())["stats"]
    assert stats["trained"] is False and stats["steps"] == 0 and stats["examples"] == 0
    assert any("train round 1: no example passed the judge; the round trains nothing" in line for line in said), said
    assert "Nothing passed the judge in round 1: nothing was trained there" in (layout.dir / "report.md").read_text()
    # The round's policy is its parent's, the base: a zero update.
    assert all(value.abs().max() == 0 for key, value in adapter(layout.checkpoint(1)).items() if "lora_B" in key)

"""INPO, DNO, SPaR-style refinement pairs and the self-judge: what each adds to pairing and training.

The losses are tested against their closed forms in test_losses.py and the two-round runs through
Luigi in test_pipeline.py; here: INPO's base-model log-probs in the trainer, the pairs DNO's options
and refinement make, and which model the self-judge is.
"""

import numpy as np
import pandas as pd
import pytest
import torch

from configs.recipe import recipe_from_dict
from models.load import loading
from models.logps import batched_logps
from models.train.trainer import encode_pairs, train_round
from conftest import save_tiny_llama_root
from test_judges import ScoredJudge, tiny_byte_llama

CPU = torch.device("cpu")


@pytest.fixture
def root(tmp_path):
    return save_tiny_llama_root(tmp_path / "root", hidden_size=32, num_layers=1, num_heads=2, max_positions=128)


def tiny_pairs(offset: int) -> pd.DataFrame:
    return pd.DataFrame({
        "prompt": [f"q{i} {i * 7}" for i in range(offset, offset + 8)],
        "chosen": [f"a{i * 3}" for i in range(offset, offset + 8)],
        "rejected": [f"b{i}" for i in range(offset, offset + 8)],
    })


def test_inpo_takes_the_base_models_log_probs_with_the_adapter_off(root, tmp_path):
    root_path, tok = root
    recipe = recipe_from_dict({
        "algorithm": "inpo", "judge": {"name": "verifier"}, "generation": {"num_samples": 2, "max_new_tokens": 16},
        "model": {"base_model": root_path, "precision": "fp32"},
        "training": {"epochs": 2, "batch_size": 4, "max_length": 64, "learning_rate": 1e-2, "lora_r": 4, "lora_alpha": 8,
                     "save_steps": 100, "inpo_eta": 2.0, "inpo_tau": 0.25},
    })
    first, second = tmp_path / "round_01", tmp_path / "round_02"
    train_round(recipe, root_path, tiny_pairs(0), tmp_path / "work_01", first, 1, "root", root_path)
    # Round 1: the fresh adapter leaves pi_{r-1} = pi_0, so no second pass is made.
    assert not (tmp_path / "work_01" / "base_logps").exists()
    pairs_2 = tiny_pairs(100)
    train_round(recipe, str(first), pairs_2, tmp_path / "work_02", second, 2, "root", root_path)
    chosen, rejected = encode_pairs(tok, pairs_2, 64)
    root_model = loading.load_causal_lm(root_path, recipe.model, CPU)
    expected = np.array(batched_logps(root_model, tok, chosen + rejected, 8, CPU)[0])
    base = pd.read_parquet(tmp_path / "work_02" / "base_logps" / "ref_logps.parquet")
    reference = pd.read_parquet(tmp_path / "work_02" / "ref_logps.parquet")
    assert np.abs(np.concatenate([base.chosen, base.rejected]) - expected).max() <= 1e-4
    # ... and they are not round 1's policy, which is the round's other reference.
    assert np.abs(base.to_numpy() - reference.to_numpy()).max() > 1e-2
    log = pd.read_json(second / "training_log.json", typ="series")
    assert log["stats"]["loss"] == "inpo" and np.isfinite(log["stats"]["final_loss"])


def generations(responses_by_prompt, answers, finished=None):
    rows = []
    for p, (responses, answer) in enumerate(zip(responses_by_prompt, answers)):
        rows += [{"prompt_id": f"p{p}", "prompt": f"q{p}", "response": r, "sample_index": k, "round": 1, "num_tokens": 1,
                  "reference": answer, "task": "add", "answer": answer, "system": None, "token_ids": [k + 1]}
                 for k, r in enumerate(responses)]
    frame = pd.DataFrame(rows)
    return frame if finished is None else frame.assign(finished=finished)


def dpo_recipe(**judge):
    return recipe_from_dict({"algorithm": "dpo", "judge": {"name": "verifier", **judge}, "generation": {"num_samples": 3}})


def test_an_empty_response_is_never_chosen():
    from models.judge.judges import VerifierJudge, pair_round

    # The only finished sample is empty and the others were cut: before, the empty one was chosen (and the
    # pairs file refused it). Now it can only be rejected; prompt p1 with every sample wrong and one
    # empty pairs a wrong answer over the empty one.
    gens = generations([["", "12 3", "4 5"], ["7", "", "8"]], ["9", "5"], finished=[True, False, False, True, True, True])
    pairs, stats = pair_round(dpo_recipe(), gens, 1, VerifierJudge())
    assert (pairs.chosen.str.strip() != "").all()
    assert list(zip(pairs.prompt_id, pairs.rejected)) == [("p1", "")]
    assert stats["skipped_empty"] == 1 and stats["skipped_unfinished"] == 0


@pytest.mark.parametrize("algorithm", ["dpo", "sppo"])
def test_an_empty_response_is_rejected_only_where_it_ranks_lowest(algorithm):
    from models.judge.judges import pair_round

    # A graded judge gives the empty answer 0.5 and "wrong" 0.2: "wrong" is the worst sample and the
    # rejected side; the empty one is neither side. Where the empty answer ties the worst, it is rejected.
    gens = generations([["", "wrong", "right"], ["", "meh", "ok"]], ["x", "y"])
    judge = ScoredJudge({"": 0.5, "wrong": 0.2, "right": 1.0, "meh": 0.0, "ok": 0.7})
    recipe = recipe_from_dict({"algorithm": algorithm, "judge": {"name": "verifier"}, "generation": {"num_samples": 3}})
    pairs, _ = pair_round(recipe, gens, 1, judge)
    assert list(zip(pairs.prompt_id, pairs.chosen, pairs.rejected)) == [("p0", "right", "wrong"), ("p1", "ok", "meh")]
    judge.table["meh"] = 0.5  # p1: the empty answer ties "meh" for the lowest score
    pairs, _ = pair_round(recipe, gens, 1, judge)
    assert list(zip(pairs.prompt_id, pairs.chosen, pairs.rejected)) == [("p0", "right", "wrong"), ("p1", "ok", "")]


def dno_recipe(**judge):
    return recipe_from_dict({"algorithm": "dno", "judge": {"name": "verifier", **judge}, "generation": {"num_samples": 3}})


def test_dno_judges_the_dataset_response_beside_the_samples_and_ranks_by_win_rate():
    from models.judge.judges import VerifierJudge, pair_round

    # p0: no sample is right, so the dataset's answer is chosen against the model's modal wrong answer;
    # p1: a sample is right and says what the dataset says: the model's own sample is chosen (its ids kept).
    gens = generations([["4", "6", "4"], ["3", "8", "8"]], ["5", "3"])
    pairs, stats = pair_round(dno_recipe(add_reference=True), gens, 1, VerifierJudge())
    first, second = pairs.iloc[0], pairs.iloc[1]
    assert (first.chosen, first.rejected, first.chosen_source, first.rejected_source) == ("5", "4", "dataset", "sample")
    assert first.chosen_index == -1 and first.chosen_token_ids is None and first.rejected_index == 0
    assert (second.chosen, second.rejected, second.chosen_source, second.chosen_index) == ("3", "8", "sample", 0)
    assert list(second.chosen_token_ids) == [1]
    # Ranked by win rate over the K + 1 candidates: a right answer beats the 3 wrong ones and ties itself.
    assert first.chosen_score == pytest.approx((3 * 1.0 + 0.5) / 4) and first.chosen_score == first.chosen_win_prob
    assert np.array(first.prob_matrix).shape == (4, 4)
    assert (stats["pairs_chosen_dataset"], stats["pairs_rejected_dataset"]) == (1, 0)
    # Without the option the dataset's answer is no candidate: p0 has no right answer and no pair.
    pairs, stats = pair_round(dno_recipe(), gens, 1, VerifierJudge())
    assert list(pairs.prompt_id) == ["p1"] and stats["skipped_ties"] == 1 and "pairs_chosen_dataset" not in stats


def test_the_margin_filter_drops_pairs_the_judge_barely_separates():
    from models.judge.judges import pair_round

    gens = generations([["a", "b", "c"], ["d", "e", "f"]], ["x", "y"])
    judge = ScoredJudge({"a": 3.0, "b": 2.9, "c": 2.8, "d": 5.0, "e": 1.0, "f": 2.0})
    dpo = dpo_recipe(min_margin=0.5)  # on the judge's scores: 0.2 apart is dropped, 4.0 apart kept
    pairs, stats = pair_round(dpo, gens, 1, judge)
    assert list(zip(pairs.chosen, pairs.rejected)) == [("d", "e")] and stats["skipped_small_margin"] == 1
    assert "skipped_small_margin" not in pair_round(dpo_recipe(), gens, 1, judge)[1]
    # DNO takes the margin on win rates (Bradley-Terry on these scores): a's and c's are 0.525 and 0.475,
    # d's and e's 0.81 and 0.26.
    pairs, stats = pair_round(dno_recipe(min_margin=0.3), gens, 1, judge)
    assert list(pairs.chosen) == ["d"] and stats["skipped_small_margin"] == 1
    assert pairs.chosen_score.iloc[0] - pairs.rejected_score.iloc[0] > 0.3


@pytest.mark.parametrize("algorithm", ["dpo", "inpo"])
def test_the_margin_of_dpo_and_inpo_is_taken_on_the_judges_scores_not_win_rates(algorithm):
    from models.judge.judges import pair_round

    # Scores 3.0 and 2.0 are 1.0 apart: kept at min_margin 0.5. Their win rates (Bradley-Terry, self counted
    # 1/2) are 0.62 and 0.38, 0.23 apart: a filter on those would drop the pair.
    judge = ScoredJudge({"good": 3.0, "fair": 2.0})
    recipe = recipe_from_dict({"algorithm": algorithm, "judge": {"name": "verifier", "min_margin": 0.5},
                               "generation": {"num_samples": 2}})
    pairs, stats = pair_round(recipe, generations([["good", "fair"]], ["x"]), 1, judge)
    assert list(zip(pairs.chosen, pairs.rejected)) == [("good", "fair")] and stats["skipped_small_margin"] == 0
    assert (pairs.chosen_score.iloc[0], pairs.rejected_score.iloc[0]) == (3.0, 2.0)
    assert pairs.chosen_win_prob.iloc[0] - pairs.rejected_win_prob.iloc[0] < 0.5


def test_spin_pairs_say_where_each_side_came_from():
    from models.judge.judges import pair_round

    pairs, _ = pair_round(recipe_from_dict({}), generations([["4"]], ["5"]), 1)
    assert (pairs.chosen_source.iloc[0], pairs.rejected_source.iloc[0]) == ("dataset", "sample")


def test_dno_options_are_checked_at_load():
    from common.errors import RecipeError

    assert dno_recipe().loss == "dpo_sigmoid" and dno_recipe(add_reference=True).needs_reference
    with pytest.raises(RecipeError, match="algorithm spin has none"):
        recipe_from_dict({"judge": {"add_reference": True}})
    with pytest.raises(RecipeError, match="judge.min_margin must be >= 0"):
        dno_recipe(min_margin=-0.1)


class ScriptedRefiner:
    """Rewrites each failed answer into the texts its script gives (finished, sampled ids [9, 9])."""

    def __init__(self, rewrites):
        self.rewrites, self.asked = rewrites, []

    def refine(self, requests):
        from models.generate.generation import Sample

        self.asked.extend(requests)
        return [[Sample(text=t, num_tokens=2, finished=True, token_ids=[9, 9]) for t in self.rewrites[response]]
                for _prompt, _system, response in requests]


def test_refinement_pairs_a_passing_rewrite_against_the_failed_answer():
    from models.judge.judges import VerifierJudge, pair_round

    # p0: every sample wrong; its modal answer "4" is rewritten, and the rewrite "5" passes.
    # p1: a sample is right: nothing is refined, the usual pair. p2: no rewrite passes: no pair.
    gens = generations([["4", "6", "4"], ["3", "8", "8"], ["1", "2", "2"]], ["5", "3", "7"])
    refiner = ScriptedRefiner({"4": ["4", "five", "5"], "2": ["2", "0"]})
    pairs, stats = pair_round(dpo_recipe(refine=True), gens, 1, VerifierJudge(), refiner)
    assert [request[2] for request in refiner.asked] == ["4", "2"]
    refined = pairs.set_index("prompt_id").loc["p0"]
    assert (refined.chosen, refined.rejected, refined.chosen_source, refined.rejected_source) == ("5", "4", "refinement", "sample")
    assert (refined.chosen_index, refined.rejected_index) == (-1, 0)
    assert list(refined.chosen_token_ids) == [9, 9] and list(refined.rejected_token_ids) == [1]
    assert (refined.chosen_score, refined.rejected_score) == (1.0, 0.0) and refined.prob_matrix is None
    assert pairs.set_index("prompt_id").loc["p1"].chosen_source == "sample"
    assert list(pairs.prompt_id) == ["p0", "p1"]
    assert (stats["refinements_tried"], stats["refinements_passed"], stats["refinement_samples"]) == (2, 1, 5)
    assert stats["pairs"] == 2
    # Without judge.refine nothing is rewritten and the prompts where all samples fail make no pair.
    pairs, stats = pair_round(dpo_recipe(), gens, 1, VerifierJudge())
    assert list(pairs.prompt_id) == ["p1"] and "refinements_tried" not in stats


def test_a_refinement_replaces_a_pair_of_two_failing_answers_and_changes_least():
    from models.judge.judges import pair_round

    # A graded judge: "a" and "b" both fail (pass_score 0.5); their pair would be a > b. Two rewrites pass
    # with the same score; the one that changes "a so" least is chosen.
    gens = generations([["a so", "b"]], ["x"])
    judge = ScoredJudge({"a so": 0.3, "b": 0.1, "a so!": 0.9, "something else": 0.9, "no": 0.2})
    recipe = recipe_from_dict({"algorithm": "inpo", "judge": {"name": "reward_model", "model": "rm", "refine": True,
                                                              "pass_score": 0.5}, "generation": {"num_samples": 2}})
    refiner = ScriptedRefiner({"a so": ["something else", "no", "a so!"]})
    pairs, stats = pair_round(recipe, gens, 1, judge, refiner)
    assert list(zip(pairs.chosen, pairs.rejected, pairs.chosen_source)) == [("a so!", "a so", "refinement")]
    assert pairs.chosen_score.iloc[0] == 0.9 and pairs.rejected_score.iloc[0] == pytest.approx(0.3)
    assert stats["refinements_passed"] == 1 and stats["pairs"] == 1


def test_refinement_pairs_are_held_to_the_margin_filter():
    from models.judge.judges import pair_round

    # Both samples fail (pass_score 0.5) and are 0.8 apart; the rewrite passes, 0.3 above the answer it rewrites.
    gens = generations([["a so", "b"]], ["x"])
    judge = ScoredJudge({"a so": 0.3, "b": -0.5, "a so!": 0.6})

    def pairs_with(min_margin):
        recipe = recipe_from_dict({"algorithm": "inpo", "generation": {"num_samples": 2}, "judge": {
            "name": "reward_model", "model": "rm", "refine": True, "pass_score": 0.5, "min_margin": min_margin}})
        pairs, stats = pair_round(recipe, gens, 1, judge, ScriptedRefiner({"a so": ["a so!"]}))
        return list(zip(pairs.chosen, pairs.rejected, pairs.chosen_source)), stats

    made, stats = pairs_with(0.35)  # the rewrite is not far enough above: the samples' pair, 0.8 apart, stays
    assert made == [("a so", "b", "sample")]
    assert stats["refinements_small_margin"] == 1
    assert stats["refinements_passed"] == 0 and stats["skipped_small_margin"] == 0
    made, stats = pairs_with(0.25)  # it is: it replaces the samples' pair
    assert made == [("a so!", "a so", "refinement")] and stats["refinements_small_margin"] == 0


def test_refinement_options_are_checked_at_load():
    from models.judge.judges import REFINE_PROMPT
    from common.errors import RecipeError

    assert dpo_recipe(refine=True).pass_score == 0.5  # the verifier: a right answer passes
    assert "{prompt}" in REFINE_PROMPT and "{response}" in REFINE_PROMPT
    with pytest.raises(RecipeError, match="algorithm dpo or inpo, not dno"):
        dno_recipe(refine=True)
    with pytest.raises(RecipeError, match="needs a judge that scores each response"):
        dpo_recipe(name="self", self_mode="pairwise", refine=True, pass_score=3.0)
    with pytest.raises(RecipeError, match="judge reward_model needs judge.pass_score"):
        dpo_recipe(name="reward_model", model="rm", refine=True)
    with pytest.raises(RecipeError, match=r"refine_prompt must contain \{prompt\} and \{response\}"):
        dpo_recipe(refine=True, refine_prompt="Fix: {response}")
    with pytest.raises(RecipeError, match="refine_prompt: KeyError"):
        dpo_recipe(refine=True, refine_prompt="{prompt} {response} {oops}")
    with pytest.raises(RecipeError, match="judge.pass_score applies with judge.refine: true only"):
        dpo_recipe(pass_score=0.5)


def test_the_refiner_samples_rewrites_from_the_refinement_prompt(monkeypatch):
    from models.judge.judges import make_refiner

    model, tok = tiny_byte_llama()
    recipe = dpo_recipe(refine=True, refine_samples=3, refine_prompt="Fix {response} for: {prompt}")
    refiner = make_refiner(recipe, model, tok, round_idx=1)
    seen, encode = [], type(tok).__call__

    def spy(self, text, *args, **kwargs):
        seen.append(text)
        return encode(self, text, *args, **kwargs)

    monkeypatch.setattr(type(tok), "__call__", spy)
    [rewrites] = refiner.refine([("What is 1 + 1?", None, "3")])
    assert len(rewrites) == 3 and all(isinstance(r.text, str) and r.token_ids for r in rewrites)
    assert any("Fix 3 for: What is 1 + 1?" in text for text in seen)  # the recipe's prompt, chat-formatted


def test_each_judge_shard_refines_from_a_seed_of_its_own():
    from models.judge.judges import make_refiner

    model, tok = tiny_byte_llama()
    recipe = recipe_from_dict({"algorithm": "dpo", "judge": {"name": "verifier", "refine": True, "refine_samples": 2},
                               "generation": {"num_samples": 3, "max_new_tokens": 8}})
    # Two shards that each refine their first failed answer: the same request here, so the same random
    # numbers would give the same rewrites; each shard's own seed gives others, and the same shard the same.
    request = [("What is 1 + 1?", None, "3")]
    rewrites = {shard: [r.text for r in make_refiner(recipe, model, tok, 1, shard).refine(request)[0]] for shard in (0, 1)}
    assert rewrites[0] != rewrites[1]
    assert [r.text for r in make_refiner(recipe, model, tok, 1, 1).refine(request)[0]] == rewrites[1]


def test_the_report_says_who_judged_and_what_pairing_counted(tmp_path):
    import json

    import yaml

    from data.report import render_report
    from data.runs import Run

    run_dir = tmp_path / "run"
    for round_idx, meta in ((1, {"prompts": 8, "pairs": 3, "skipped_ties": 5, "unparsed_judgements": 7,
                                 "judge_is_generator": True}),
                            (2, {"prompts": 8, "pairs": 4, "skipped_ties": 4, "unparsed_judgements": 2,
                                 "judge_is_generator": False})):
        (run_dir / f"round_{round_idx:02d}").mkdir(parents=True)
        (run_dir / f"round_{round_idx:02d}" / "judge_meta.json").write_text(json.dumps(meta))
    recipe = {"algorithm": "dpo", "judge": {"name": "self", "self_mode": "pointwise", "self_model": "policy"}}
    (run_dir / "run.yaml").write_text(yaml.safe_dump({"recipe": recipe}))
    text = render_report(Run(run_dir), plots=[])
    assert "judged by **the current policy**: round r's samples are scored by the model after round r-1" in text
    assert "| round | prompts | pairs | all tied | unreadable verdicts | judge |" in text
    assert "| 1 | 8 | 3 | 5 | 7 | the generator (round r-1) |" in text and "| 2 | 8 | 4 | 4 | 2 | the base model |" in text
    assert "refinements tried" not in text  # no round recorded any
    recipe["judge"]["self_model"] = "base"
    (run_dir / "run.yaml").write_text(yaml.safe_dump({"recipe": recipe}))
    assert "judged by **the base model**" in render_report(Run(run_dir), plots=[])

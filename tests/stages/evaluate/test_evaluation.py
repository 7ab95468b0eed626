"""The evaluation's figures (models/evaluate/evaluation.py) on inputs whose answers are worked out by hand.

evaluate_round is run with its model calls replaced by tables: generation returns chosen answers and
samples, and the log-prob of a response is looked up by its text, under the policy and under the base.
Every figure the run reports (accuracy, win rates, KL from the base, implicit reward) then has a value
worked out below from those tables alone.
"""

import math

import numpy as np
import pandas as pd
import pytest
import torch

import models.evaluate.evaluation as evaluation
import models.generate.generation as generation
import models.load.loading as loading
from configs.recipe import recipe_from_dict
from models.judge.judges import VerifierJudge
from models.generate.sampling import Sample
from models.load.tokenizer import build_byte_tokenizer
from models.judge.verifiers import load_verifier

BETA = 0.1
ANSWERS = ["4", "7", "9", "2"]
GREEDY = ["4", "7", "0", "2"]  # right, right, wrong, right
PREVIOUS_GREEDY = ["4", "0", "0", "0"]  # right, wrong, wrong, wrong
BASE_GREEDY = ["0", "0", "0", "0"]  # all wrong
# Two samples per prompt; a sample's log-ratio log pi_r(y) - log pi_base(y) is its length in tokens times 2 below.
SAMPLES = [["a", "bbb"], ["cc", "dd"], ["e", "f"], ["gggg", "hh"]]
# Held-out pairs (fixed at round 0): (chosen, rejected), log-prob now, log-prob under the previous round.
PAIRS = {"p0": (("four", -2.0, -3.0), ("zero", -5.0, -4.0)), "p1": (("seven", -6.0, -5.0), ("nil", -1.5, -2.0))}


def policy_logp(text: str) -> float:
    pair_logps = {text: now for sides in PAIRS.values() for text, now, _prev in sides}
    return pair_logps.get(text, -1.0 * len(text))


def base_logp(text: str) -> float:
    return -3.0 * len(text)


def prompts_frame() -> pd.DataFrame:
    return pd.DataFrame({"prompt_id": ["p0", "p1", "p2", "p3"], "prompt": [f"What is {a}?" for a in ANSWERS],
                         "reference": ANSWERS, "answer": ANSWERS, "system": [None] * 4, "source_row": ["{}"] * 4})


def round_0_frame(greedy: list[str], pair_logp_index: int) -> pd.DataFrame:
    """A round-0 eval frame: greedy answers and the held-out pairs with their log-probs then."""
    rows = [{"prompt_id": f"p{i}", "prompt": f"What is {ANSWERS[i]}?", "kind": "greedy", "sample_index": 0, "response": text,
             "round": 0, "num_tokens": len(text), "finished": True, "token_ids": None, "logp": 0.0} for i, text in enumerate(greedy)]
    for pid, sides in PAIRS.items():
        for kind, side in zip(("pair_chosen", "pair_rejected"), sides):
            rows.append({"prompt_id": pid, "prompt": f"What is {ANSWERS[int(pid[1])]}?", "kind": kind, "sample_index": 0,
                         "response": side[0], "round": 0, "num_tokens": len(side[0]), "finished": True, "token_ids": None,
                         "logp": side[pair_logp_index]})
    return pd.DataFrame(rows)


def fake_model_calls(monkeypatch) -> tuple[list, list]:
    """Generation and the log-prob pass replaced by the tables above; returns the lists that record how many
    continuations each generation scored on its prefill (its own and `later`'s) and how many items each
    log-prob pass scored."""
    tokenizer = build_byte_tokenizer()
    model = torch.nn.Linear(1, 1)  # stands in for the policy: only its device is read
    monkeypatch.setattr(loading, "load_tokenizer", lambda path, cfg: tokenizer)
    monkeypatch.setattr(loading, "load_policy", lambda *args, **kwargs: model)

    scored_on_prefill = []

    def generate_and_score(model, tokenizer_, texts, settings, continuations, progress=None, later=None):
        assert len(texts) == 4
        assert settings.logps  # each answer's policy log-prob comes with it, summed while it was generated
        assert settings.num_samples == 3 and settings.greedy_samples == 1  # the greedy answer, then 2 samples

        def sample(text):
            return Sample(text, len(text), True, tokenizer.encode(text, add_special_tokens=False), policy_logp(text))

        def decoded(ids):
            return tokenizer.decode(ids, skip_special_tokens=True).strip()

        samples = [[sample(greedy)] + [sample(text) for text in samples] for greedy, samples in zip(GREEDY, SAMPLES)]
        wanted = [items + (later(p, samples[p]) if later else []) for p, items in enumerate(continuations)]
        scored_on_prefill.append(sum(len(items) for items in wanted))
        return samples, [[policy_logp(decoded(ids)) for ids in items] for items in wanted]

    calls = []

    def batched_logps(model_, tokenizer_, items, batch_size, device, progress=None):
        calls.append(len(items))
        texts = [tokenizer.decode(item.completion_ids, skip_special_tokens=True).strip() for item in items]
        return [base_logp(text) for text in texts], [len(item.completion_ids) for item in items]

    monkeypatch.setattr(generation, "generate_and_score", generate_and_score)
    monkeypatch.setattr(evaluation, "batched_logps", batched_logps)
    return scored_on_prefill, calls


@pytest.fixture
def figures(monkeypatch):
    scored_on_prefill, calls = fake_model_calls(monkeypatch)
    recipe = recipe_from_dict({"training": {"beta": BETA}, "evaluation": {"num_prompts": 4, "kl_samples": 2}})
    previous, base = round_0_frame(PREVIOUS_GREEDY, 2), round_0_frame(BASE_GREEDY, 1)
    frame, metrics = evaluation.evaluate_round(recipe, 1, "round_01/checkpoint", "base_model", prompts_frame(), previous, base)
    # The 4 sides of the held-out pairs and the 4 prompts' ground truths, scored on the policy's run of their prompts.
    assert scored_on_prefill == [8]
    assert calls == [8]  # then the 8 samples under the base
    return frame, metrics


def test_round_0_fixes_the_held_out_pairs_and_scores_them_on_the_generations_run(monkeypatch):
    """Round 0's pairs are (ground truth, the first KL sample): scored on the generation's run of their prompt
    once the sample is decoded (generate_and_score's `later`), with no log-prob pass of their own."""
    scored_on_prefill, calls = fake_model_calls(monkeypatch)
    recipe = recipe_from_dict({"training": {"beta": BETA}, "evaluation": {"num_prompts": 4, "kl_samples": 2}})
    frame, metrics = evaluation.evaluate_round(recipe, 0, "base_model", "base_model", prompts_frame(), None, None)
    assert scored_on_prefill == [4 + 8] and calls == []  # 4 ground truths, then 4 pairs' two sides
    pairs = frame[frame.kind.str.startswith("pair_")]
    chosen, rejected = (pairs[pairs.kind == kind].set_index("prompt_id") for kind in ("pair_chosen", "pair_rejected"))
    assert chosen.response.tolist() == ANSWERS and rejected.response.tolist() == [group[0] for group in SAMPLES]
    assert pairs.logp.tolist() == [policy_logp(text) for text in pairs.response]
    assert metrics["kl_vs_base"] == 0.0


def test_accuracy_is_the_share_of_right_greedy_answers(figures):
    _frame, metrics = figures
    assert metrics["verifier"] == "exact" and metrics["prompts"] == 4
    # 3 of 4 right; standard error: sample std of (1, 1, 0, 1) = 0.5, over sqrt(4).
    assert metrics["accuracy"] == pytest.approx(0.75) and metrics["accuracy_se"] == pytest.approx(0.25)


def test_win_rates_against_the_previous_round_and_the_base(figures):
    _frame, metrics = figures
    assert metrics["eval_judge"] == "verifier"
    # By the verifier, P(ours beats theirs) = 1/2 + (s_ours - s_theirs) / 2: against the previous round's
    # (right, wrong, wrong, wrong): 1/2, 1, 1/2, 1; against the base's (all wrong): 1, 1, 1/2, 1.
    assert metrics["win_rate_vs_previous"] == pytest.approx(0.75)
    assert metrics["win_rate_vs_previous_se"] == pytest.approx(np.std([0.5, 1, 0.5, 1], ddof=1) / 2)
    assert metrics["win_rate_vs_base"] == pytest.approx(0.875)
    assert metrics["win_rate_vs_base_se"] == pytest.approx(0.125)  # std of (1, 1, 0.5, 1) = 0.25, over 2


def test_kl_from_the_base_averages_each_prompts_samples_first(figures):
    frame, metrics = figures
    # log pi_r(y) - log pi_base(y) = -len + 3 len = 2 len: per prompt (2 + 6)/2, (4 + 4)/2, (2 + 2)/2, (8 + 4)/2
    # = 4, 4, 2, 6; their mean 4, and the standard error over those four per-prompt means.
    assert metrics["kl_vs_base"] == pytest.approx(4.0)
    assert metrics["kl_vs_base_se"] == pytest.approx(np.std([4, 4, 2, 6], ddof=1) / 2)
    samples = frame[frame.kind == "sample"]
    assert (samples.logp - samples.base_logp).tolist() == [2.0 * len(t) for group in SAMPLES for t in group]


def test_implicit_reward_of_the_held_out_pairs(figures):
    _frame, metrics = figures
    # r = beta (log pi_r - log pi_{r-1}): pair p0 chosen 0.1 * 1, rejected 0.1 * -1 (right, margin 0.2);
    # p1 chosen 0.1 * -1, rejected 0.1 * 0.5 (wrong, margin -0.15).
    assert metrics["implicit_reward_pairs"] == 2
    assert metrics["implicit_reward_accuracy"] == pytest.approx(0.5)
    assert metrics["implicit_reward_margin"] == pytest.approx(0.025)
    assert metrics["implicit_reward_margin_se"] == pytest.approx(0.35 / math.sqrt(2) / math.sqrt(2))


def test_ground_truth_log_likelihood_per_token(figures):
    frame, metrics = figures
    # Each ground truth (its text and the template's end of turn) scored on the prefill: policy_logp(text) =
    # -len(text), over its tokens.
    tokens = [len(item.completion_ids) for item in evaluation.ground_truth_items(build_byte_tokenizer(), prompts_frame())]
    expected = [-len(answer) / n for answer, n in zip(ANSWERS, tokens)]
    assert frame[frame.kind == "greedy"].gt_logprob.tolist() == pytest.approx(expected)
    assert metrics["gt_logprob"] == pytest.approx(np.mean(expected)) and metrics["gt_logprob_prompts"] == 4
    assert metrics["gt_logprob_se"] == pytest.approx(np.std(expected, ddof=1) / 2)


def test_verifier_win_rate_and_mean_se_by_hand():
    prompts = prompts_frame()
    rate, se = evaluation.win_rate(VerifierJudge(load_verifier(None)), prompts, GREEDY, BASE_GREEDY)
    assert rate == pytest.approx(0.875) and se == pytest.approx(0.125)
    assert evaluation.mean_se([2.0]) == (2.0, pytest.approx(float("nan"), nan_ok=True))
    assert evaluation.distinct_n(["a b a", "a b"], 1) == pytest.approx(2 / 5)
    assert evaluation.distinct_n(["a b a", "a b"], 2) == pytest.approx(2 / 3)


def test_each_evaluate_shard_samples_from_a_seed_of_its_own(tmp_path):
    """Two Evaluate shards holding the same prompt text (under two ids): with one seed for every shard they
    drew the same random numbers and so the same KL samples; each shard's own seed gives others. The
    greedy answers, which draw nothing, are the same."""
    from conftest import save_tiny_llama_root

    root, _tok = save_tiny_llama_root(tmp_path / "root", hidden_size=32, num_layers=1, num_heads=2, max_positions=128)
    recipe = recipe_from_dict({"model": {"base_model": root, "precision": "fp32"}, "generation": {"batch_size": 8},
                               "evaluation": {"num_prompts": 2, "kl_samples": 2, "max_new_tokens": 6}})
    prompts = pd.DataFrame({"prompt_id": ["a", "b"], "prompt": ["What is 2 + 2?"] * 2, "system": [None] * 2,
                            "reference": ["4"] * 2, "answer": ["4"] * 2})
    frames = [evaluation.evaluate_rows(recipe, 0, root, root, prompts.iloc[[shard]], None, None, all_prompts=prompts,
                                       shard_idx=shard)[0] for shard in (0, 1)]
    greedy, samples = ([frame[frame.kind == kind].response.tolist() for frame in frames] for kind in ("greedy", "sample"))
    assert greedy[0] == greedy[1]
    assert samples[0] != samples[1]

"""Judges and pairing: matrices, ties, parsing, and the pairs each algorithm makes."""

import numpy as np
import pandas as pd
import pytest
import torch

from common.errors import RecipeError
from configs.recipe import recipe_from_dict
from models.judge.judge_types import JudgeGroup, JudgeResult, matrix_from_scores
from models.judge.judges import (
    RewardModelJudge,
    SelfJudge,
    VerifierJudge,
    pair_round,
    parse_score,
    parse_verdict,
    select_pair,
)

SPPO = recipe_from_dict({"algorithm": "sppo", "judge": {"name": "verifier"}, "generation": {"num_samples": 3}})
DPO = recipe_from_dict({"algorithm": "dpo", "judge": {"name": "verifier"}, "generation": {"num_samples": 3}})
SPIN = recipe_from_dict({})


def assert_valid_matrix(prob):
    assert np.allclose(prob + prob.T, 1.0) and np.allclose(np.diag(prob), 0.5)


def test_matrix_from_scores_is_bradley_terry_and_nan_ties():
    prob = matrix_from_scores(np.array([1.0, 0.0, np.nan]))
    assert_valid_matrix(prob)
    assert prob[0, 1] == pytest.approx(1 / (1 + np.exp(-1.0)))
    assert prob[0, 2] == prob[2, 1] == 0.5


def test_verifier_judge():
    [result] = VerifierJudge().judge([JudgeGroup("What is 2 + 3?", ["5", "6", " 5."], task="add", answer="5")])
    assert_valid_matrix(result.prob_matrix)
    assert result.prob_matrix[0, 1] == 1.0 and result.prob_matrix[0, 2] == 0.5
    assert np.allclose(result.win_probs, [(0.5 + 1 + 0.5) / 3, (0 + 0.5 + 0) / 3, (0.5 + 1 + 0.5) / 3])


def test_select_pair_best_vs_worst_and_ties():
    result = JudgeResult(matrix_from_scores(np.array([0.2, 3.0, -1.0])), scores=np.array([0.2, 3.0, -1.0]))
    assert select_pair(result, "sppo") == (1, 2) == select_pair(result, "dpo")
    tie = JudgeResult(np.full((3, 3), 0.5), scores=np.zeros(3))
    assert select_pair(tie, "sppo") is None and select_pair(tie, "dpo") is None


def test_select_pair_breaks_ties_by_the_most_sampled_response():
    # A verifier ties every right and every wrong answer; the pair takes the model's modal ones.
    responses = ["7", "9", "5", "9", "5", " 9 ", "5"]
    scores = np.array([0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    result = JudgeResult(matrix_from_scores(scores), scores=scores)
    assert select_pair(result, "dpo") == (2, 0)  # without the responses: the first of each tie
    assert select_pair(result, "dpo", responses) == (2, 1)  # "9" was sampled three times, "7" once
    assert select_pair(result, "sppo", responses) == (2, 1)


def generations(responses_by_prompt, answers):
    rows = []
    for p, (responses, answer) in enumerate(zip(responses_by_prompt, answers)):
        rows += [{"prompt_id": f"p{p}", "prompt": f"q{p}", "response": r, "sample_index": k, "round": 1, "num_tokens": 1,
                  "reference": answer, "task": "add", "answer": answer, "system": None} for k, r in enumerate(responses)]
    return pd.DataFrame(rows)


def test_sppo_pairs_carry_mean_win_probabilities_and_matrix():
    gens = generations([["1", "5", "7"], ["2", "2", "2"], ["9", "9", "4"]], ["5", "3", "4"])
    pairs, stats = pair_round(SPPO, gens, 1, VerifierJudge())
    assert stats == {"prompts": 3, "pairs": 2, "skipped_ties": 1, "skipped_identical": 0, "unparsed_judgements": 0,
                     "reprompted_judgements": 0, "unfinished_samples": 0, "skipped_unfinished": 0, "pairs_rejected_unfinished": 0}
    first = pairs.iloc[0]
    assert (first.chosen, first.rejected) == ("5", "1")
    # win probabilities: row means with the diagonal counted 0.5, (1 + 0.5 + 1) / 3 and (0.5 + 0 + 0.5) / 3
    assert first.chosen_score == pytest.approx(2.5 / 3) and first.rejected_score == pytest.approx(1 / 3)
    assert first.chosen_win_prob == first.chosen_score and np.array(first.prob_matrix).shape == (3, 3)
    assert set(pairs.judge) == {"verifier"} and set(pairs["round"]) == {1}


def test_dpo_pairs_use_the_judges_scores():
    gens = generations([["1", "5", "7"]], ["5"])
    pairs, _ = pair_round(DPO, gens, 2, VerifierJudge())
    assert (pairs.chosen_score.iloc[0], pairs.rejected_score.iloc[0]) == (1.0, 0.0)


def test_spin_pairs_ground_truth_against_own_sample():
    gens = generations([["4"], ["3"]], ["5", "3"])
    pairs, stats = pair_round(SPIN, gens, 1)
    assert list(pairs.chosen) == ["5"] and list(pairs.rejected) == ["4"]
    assert stats["skipped_identical"] == 1 and pairs.judge.iloc[0] == "ground_truth"


def test_spin_keeps_identical_pairs_when_asked():
    # judge.keep_identical: the pair whose sample equals the ground truth is kept (chosen == rejected),
    # so the NLL anchor fits that prompt's answer too; the other pair is made as before.
    recipe = recipe_from_dict({"judge": {"name": "ground_truth", "keep_identical": True}})
    gens = generations([["4"], ["3"]], ["5", "3"])
    pairs, stats = pair_round(recipe, gens, 1)
    assert list(pairs.chosen) == ["5", "3"] and list(pairs.rejected) == ["4", "3"]
    assert stats["skipped_identical"] == 0 and stats["pairs_identical"] == 1 and stats["pairs"] == 2


def test_keep_identical_is_refused_outside_spin():
    with pytest.raises(RecipeError, match="judge.keep_identical applies to algorithm spin only"):
        recipe_from_dict({"algorithm": "dpo", "judge": {"name": "verifier", "keep_identical": True},
                          "generation": {"num_samples": 2}})


def test_parsers():
    assert parse_score("Relevant and complete.\nScore: 4") == 4.0
    assert parse_score("score = 2.5 ... Score: 3") == 3.0
    assert parse_score("I would give it four points") is None
    assert parse_score("Score: 100") is None and parse_score("Score: 10.") is None and parse_score("Score: 3.") == 3.0
    assert parse_verdict("Better: B") == "B" and parse_verdict("better response a") == "A"
    assert parse_verdict("both are fine") is None


def scripted_judge(monkeypatch, mode, answers, continuation=lambda question, answer, opening: ""):
    """A SelfJudge whose model answers from a script instead of generating (and, asked again after
    the verdict's opening, continues with `continuation`: nothing by default)."""
    judge = SelfJudge(model=None, tokenizer=None, mode=mode)
    asked = []

    def fake_ask(questions):
        asked.extend(questions)
        return [answers(q) for q, _ in questions]

    def fake_continue(questions, given, opening):
        return [continuation(q, a, opening) for (q, _), a in zip(questions, given)]

    monkeypatch.setattr(judge, "_ask", fake_ask)
    monkeypatch.setattr(judge, "_continue", fake_continue)
    return judge, asked


def test_a_verdictless_answer_is_continued_once_after_the_verdicts_opening(monkeypatch):
    # SmolLM2-135M restates the response instead of scoring it; with 'Score:' written for it, it scores.
    restate = lambda question: question.split("Response: ")[1].split("\n")[0]  # noqa: E731
    continued = []

    def after_opening(question, answer, opening):
        continued.append((answer, opening))
        return {"good": " 4", "bad": " 100"}.get(answer, " ?")

    judge, _ = scripted_judge(monkeypatch, "pointwise", lambda q: "Score: 2" if "Response: fine" in q else restate(q),
                              after_opening)
    [result] = judge.judge([JudgeGroup("q", ["good", "bad", "fine"])])
    assert continued == [("good", "\nScore:"), ("bad", "\nScore:")]  # only the answers without a score
    assert list(result.scores[[0, 2]]) == [4.0, 2.0] and np.isnan(result.scores[1])  # 'Score: 100' is not out of 5
    assert (result.reprompted, result.unparsed) == (2, 1)
    judge, _ = scripted_judge(monkeypatch, "pairwise", lambda q: "I like both.", lambda q, a, opening: " A")
    [result] = judge.judge([JudgeGroup("q", ["x", "y"])])
    assert (result.reprompted, result.unparsed) == (2, 0) and np.allclose(result.prob_matrix, 0.5)  # always A: position bias


def test_self_judge_pointwise_unparsed_answers_are_ties_and_counted(monkeypatch):
    def answers(question):
        return {"good": "Score: 5", "bad": "Score: 1"}.get(question.split("Response: ")[1].split("\n")[0], "no idea")

    judge, _ = scripted_judge(monkeypatch, "pointwise", answers)
    [result] = judge.judge([JudgeGroup("q", ["good", "bad", "odd"])])
    assert result.unparsed == 1
    assert result.prob_matrix[0, 1] == pytest.approx(1 / (1 + np.exp(-4)))
    assert result.prob_matrix[2, 0] == result.prob_matrix[2, 1] == 0.5


def test_self_judge_pairwise_asks_both_orders_and_cancels_position_bias(monkeypatch):
    always_a = lambda question: "Better: A"  # noqa: E731 - a judge that always prefers the first position
    judge, asked = scripted_judge(monkeypatch, "pairwise", always_a)
    [result] = judge.judge([JudgeGroup("q", ["x", "y", "z"])])
    assert len(asked) == 6  # every ordered pair
    assert np.allclose(result.prob_matrix, 0.5)  # pure position bias carries no preference
    prefers_x = lambda q: "Better: A" if "Response A: x" in q else ("Better: B" if "Response B: x" in q else "??")  # noqa: E731
    judge, _ = scripted_judge(monkeypatch, "pairwise", prefers_x)
    [result] = judge.judge([JudgeGroup("q", ["x", "y"])])
    assert result.prob_matrix[0, 1] == 1.0 and result.unparsed == 0
    assert_valid_matrix(result.prob_matrix)


def tiny_byte_llama():
    """(a randomly initialised one-layer Llama, the byte tokenizer it reads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from models.load.tokenizer import build_byte_tokenizer

    tok = build_byte_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                                         eos_token_id=tok.eos_token_id))
    return model, tok


def test_self_judge_with_a_real_tiny_model_never_crashes():
    model, tok = tiny_byte_llama()
    judge = SelfJudge(model, tok, "pointwise", batch_size=4, max_new_tokens=4)
    [result] = judge.judge([JudgeGroup("What is 1 + 1?", ["2", "3"])])
    assert result.unparsed == 2 and np.allclose(result.prob_matrix, 0.5)  # a random model answers nonsense


def test_reward_model_judge(tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from configs.recipe import ModelConfig
    from models.load.tokenizer import build_byte_tokenizer

    tok = build_byte_tokenizer()
    torch.manual_seed(0)
    rm = LlamaForSequenceClassification(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                    num_attention_heads=2, num_key_value_heads=2, num_labels=1,
                                                    pad_token_id=tok.pad_token_id))
    rm.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    judge = RewardModelJudge(str(tmp_path / "rm"), ModelConfig(precision="fp32"), batch_size=2)
    [result] = judge.judge([JudgeGroup("q", ["alpha", "beta", "gamma"])])
    assert_valid_matrix(result.prob_matrix)
    direct = judge.rewards([judge.encode(JudgeGroup("q", []), r) for r in ["alpha", "beta", "gamma"]])
    assert np.allclose(result.scores, direct)
    assert result.prob_matrix[0, 1] == pytest.approx(1 / (1 + np.exp(-(direct[0] - direct[1]))))


def tiny_deberta_reward_model(path):
    """A DeBERTa-v2 sequence classifier and a DeBERTa-v2 tokenizer without a chat template, built in
    place (offline) like OpenAssistant/reward-model-deberta-v3-large-v2's, saved to `path`."""
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification, DebertaV2Tokenizer

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = DebertaV2Tokenizer(vocab=[(t, 0.0) for t in specials] + [(c, -1.0) for c in "\u2581abcdefghijklmnopqrstuvwxyz?.!,"])
    torch.manual_seed(0)
    rm = DebertaV2ForSequenceClassification(DebertaV2Config(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=64, type_vocab_size=0, relative_attention=True, position_buckets=16,
        pos_att_type=["p2c", "c2p"], num_labels=1, pad_token_id=tok.pad_token_id))
    rm.save_pretrained(path)
    tok.save_pretrained(path)
    return tok


def test_reward_model_without_chat_template_scores_the_text_pair_with_special_tokens(tmp_path):
    from configs.recipe import ModelConfig

    tok = tiny_deberta_reward_model(tmp_path / "rm")
    judge = RewardModelJudge(str(tmp_path / "rm"), ModelConfig(precision="fp32"), batch_size=2)
    ids = judge.encode(JudgeGroup("why?", []), "because.").input_ids
    question = tok("why?", add_special_tokens=False).input_ids
    answer = tok("because.", add_special_tokens=False).input_ids
    assert ids == [tok.cls_token_id, *question, tok.sep_token_id, *answer, tok.sep_token_id]
    [result] = judge.judge([JudgeGroup("why?", ["because.", "no", "it is so."])])
    assert_valid_matrix(result.prob_matrix)
    with torch.no_grad():  # each response scored alone, unpadded, as the model card does
        alone = [judge.model(**tok("why?", r, return_tensors="pt")).logits[0, 0].item() for r in ["because.", "no", "it is so."]]
    assert np.allclose(result.scores, alone, atol=1e-5)


class ScoredJudge:
    """A judge that gives each response the score written in the table (pointwise, like a reward model)."""

    name = "reward_model"

    def __init__(self, table):
        self.table = table

    def judge(self, groups):
        out = []
        for group in groups:
            scores = np.array([self.table[r] for r in group.responses], dtype=float)
            out.append(JudgeResult(matrix_from_scores(scores), scores=scores))
        return out


def with_finished(gens, finished):
    return gens.assign(finished=finished)


@pytest.mark.parametrize("algorithm", ["dpo", "sppo"])
def test_unfinished_samples_are_penalized_dropped_or_kept(algorithm):
    # p0: the judge likes the sample that was cut at max_new_tokens best; p1: every sample was cut.
    gens = with_finished(generations([["long and cut", "meh", "good"], ["a", "b"]], ["x", "y"]), [False, True, True, False, False])
    judge = ScoredJudge({"long and cut": 3.0, "meh": 1.0, "good": 2.0, "a": 1.0, "b": 0.0})
    made = {}
    for policy in ("keep", "drop", "penalize"):
        recipe = recipe_from_dict({"algorithm": algorithm, "judge": {"name": "verifier", "unfinished": policy},
                                   "generation": {"num_samples": 3}})
        made[policy] = pair_round(recipe, gens, 1, judge)
    pairs, stats = made["penalize"]  # the default: an unfinished sample can be rejected, never chosen
    assert recipe_from_dict({}).judge.unfinished == "penalize"
    assert list(zip(pairs.chosen, pairs.rejected)) == [("good", "long and cut")]
    assert (pairs.chosen_finished.iloc[0], pairs.rejected_finished.iloc[0]) == (True, False)
    assert stats["unfinished_samples"] == 3 and stats["skipped_unfinished"] == 1 and stats["pairs_rejected_unfinished"] == 1
    matrix = np.array(pairs.prob_matrix.iloc[0])
    assert matrix[1, 0] == matrix[2, 0] == 1.0 and matrix[0, 1] == matrix[0, 2] == 0.0  # finished beats unfinished
    if algorithm == "sppo":  # the SPPO targets carry the penalty
        assert pairs.chosen_win_prob.iloc[0] > 0.5 > pairs.rejected_win_prob.iloc[0]
    pairs, stats = made["drop"]
    assert list(zip(pairs.chosen, pairs.rejected)) == [("good", "meh")] and stats["skipped_unfinished"] == 1
    assert (pairs.chosen_index.iloc[0], pairs.rejected_index.iloc[0]) == (2, 1)  # sample indices, not positions
    pairs, stats = made["keep"]
    assert list(zip(pairs.chosen, pairs.rejected)) == [("long and cut", "meh"), ("a", "b")]
    assert stats["skipped_unfinished"] == 0 and stats["pairs_rejected_unfinished"] == 1


def test_spin_drops_or_keeps_unfinished_samples_and_counts_them():
    gens = with_finished(generations([["4"], ["6"]], ["5", "3"]), [False, True])
    for policy, pairs_made in (("keep", 2), ("penalize", 2), ("drop", 1)):
        recipe = recipe_from_dict({"judge": {"unfinished": policy}})
        pairs, stats = pair_round(recipe, gens, 1)
        assert len(pairs) == pairs_made and stats["unfinished_samples"] == 1
        assert stats["skipped_unfinished"] == (policy == "drop") and stats["pairs_rejected_unfinished"] == (policy != "drop")


def test_spin_reference_is_normalised_like_the_samples():
    # Samples are stripped when decoded; a ground truth ending in a newline must be too, or "trailing
    # newline = chosen" is something SPIN can learn.
    gens = generations([["4"], ["3"]], ["5\n", " 3\n\n"])
    pairs, stats = pair_round(SPIN, gens, 1)
    assert list(pairs.chosen) == ["5"] and stats["skipped_identical"] == 1

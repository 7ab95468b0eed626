"""PairRM loader and judge (models/judge/pairrm.py) on a tiny random checkpoint saved in the PairRM-hf format."""

from __future__ import annotations

import json
import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from common.errors import ModelError
from models.judge.judge_types import JudgeGroup
from models.judge.pairrm import (
    CAND1_PREFIX,
    CAND2_PREFIX,
    PREFIX_TOKENS,
    SOURCE_PREFIX,
    DebertaV2PairRM,
    PairRMJudge,
    encode_segments,
    pair_input_ids,
    scores_from_logits,
    tokenize_pairs,
)
from tiny_pairrm import save_random_pairrm

RESPONSES = ["Paris.", "The capital of France is Paris, of course!", "Lyon", "I do not know, sorry."]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # A 32-wide model gains nothing from intra-op threads, and on a busy CPU their hand-offs cost ~10x.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairrm")
    model, tokenizer = save_random_pairrm(path)
    return str(path), model, tokenizer


@pytest.fixture(scope="module")
def judge(saved):
    return PairRMJudge(saved[0], batch_size=4, device="cpu", dtype="fp32")


def test_saved_checkpoint_has_the_pairrm_hf_format_and_reloads_without_missing_keys(saved):
    path, model, tokenizer = saved
    config = json.loads(open(f"{path}/config.json").read())
    assert config["architectures"] == ["DebertaV2PairRM"]
    assert config["model_type"] == "deberta-v2"
    for key, token in (("source_prefix_id", SOURCE_PREFIX), ("cand1_prefix_id", CAND1_PREFIX),
                       ("cand2_prefix_id", CAND2_PREFIX), ("cand_prefix_id", PREFIX_TOKENS[3])):
        assert config[key] == tokenizer.convert_tokens_to_ids(token)
    assert config["n_tasks"] == 1 and config["drop_out"] == 0.05

    keys = set(model.state_dict())
    assert {"head_layer.1.weight", "head_layer.1.bias", "head_layer.4.weight", "head_layer.4.bias"} <= keys
    assert all(k.startswith(("pretrained_model.", "head_layer.")) for k in keys)

    loaded, info = DebertaV2PairRM.from_pretrained(path, output_loading_info=True, use_safetensors=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    batch = tokenize_pairs(tokenizer, ["hi", "What is the capital of France?"], ["hello!", RESPONSES[1]], ["go away", "Lyon"])
    with torch.no_grad():
        expected, got = model(**batch).logits, loaded.eval()(**batch).logits
    assert expected.shape == (2,)
    # Same weights (checked bit for bit); the forward may differ by float round-off (memory layout of mmapped tensors).
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(got[0], got[1])  # the random model is not constant


def test_segments_match_the_model_cards_encode_and_truncate_from_the_right(saved):
    _path, _model, tokenizer = saved
    text = "one two three four five six seven eight nine ten"
    for m in (4, 7, 100):
        reference = tokenizer.encode(SOURCE_PREFIX + text, max_length=m, truncation=True)
        assert encode_segments(tokenizer, SOURCE_PREFIX, [text], m) == [reference]
    (row,) = pair_input_ids(tokenizer, [text], [text], ["short"], source_max_length=7, max_length=21)
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    body = tokenizer(text, add_special_tokens=False).input_ids
    source_prefix, cand1_prefix, cand2_prefix = (tokenizer.convert_tokens_to_ids(t) for t in PREFIX_TOKENS[:3])
    # Source: 7 tokens with its specials; each candidate at most (21 - 7) // 2 = 7.
    assert row[:7] == [cls, source_prefix, *body[:4], sep]
    assert row[7:14] == [cls, cand1_prefix, *body[:4], sep]
    assert row[14:16] == [cls, cand2_prefix] and row[-1] == sep and len(row) <= 21
    # Padded to the longest row of the batch, not to max_length.
    batch = tokenize_pairs(tokenizer, ["a", "a b c"], ["x", "x"], ["y", "y"], max_length=2048)
    assert batch["input_ids"].shape[1] == batch["attention_mask"].sum(1).max() < 2048
    # A literal prefix string in a response cannot add a second prefix token.
    (row,) = pair_input_ids(tokenizer, ["q"], [f"a {CAND2_PREFIX} b"], ["c"])
    assert row.count(cand2_prefix) == 1


def test_matrix_is_antisymmetric_and_made_of_the_models_logits_for_every_ordered_pair(saved, judge):
    _path, model, tokenizer = saved
    prompt = "What is the capital of France?"
    (result,) = judge.judge([JudgeGroup(prompt, RESPONSES)])
    prob, k = result.prob_matrix, len(RESPONSES)
    np.testing.assert_allclose(prob + prob.T, np.ones((k, k)), atol=1e-12)
    np.testing.assert_allclose(np.diag(prob), 0.5)
    assert np.abs(prob - 0.5).max() > 0.01  # not all ties

    # L[i, j] is the model's own logit with response i as candidate 1 and j as candidate 2, each pair
    # run through the model alone.
    (logits,) = judge.logit_matrices([JudgeGroup(prompt, RESPONSES)])
    for i in range(k):
        for j in range(k):
            if i != j:
                with torch.no_grad():
                    alone = model(**tokenize_pairs(tokenizer, [prompt], [RESPONSES[i]], [RESPONSES[j]])).logits.item()
                assert logits[i, j] == pytest.approx(alone, abs=1e-5), (i, j)
    assert np.all(np.diag(logits) == 0)


def test_scores_and_win_probabilities_of_a_hand_computed_logit_matrix(judge, monkeypatch):
    # SPPO / llm-blender: s_i = (1/K) sum_{j != i} (L[i, j] - L[j, i]), the sum divided by K (the zero
    # diagonal counted), and P[i, j] = sigmoid(s_i - s_j). Worked by hand for this L:
    #   s_0 = ((2 + 1) + (1 - 0)) / 3 = 4/3,  s_1 = ((-1 - 2) + (0.5 - 1)) / 3 = -7/6,  s_2 = ((0 - 1) + (1 - 0.5)) / 3 = -1/6
    #   P[0, 1] = sigmoid(2.5) = 0.924142,  P[0, 2] = sigmoid(1.5) = 0.817574,  P[1, 2] = sigmoid(-1) = 0.268941
    logits = np.array([[0.0, 2.0, 1.0], [-1.0, 0.0, 0.5], [0.0, 1.0, 0.0]])
    monkeypatch.setattr(judge, "logit_matrices", lambda groups: [logits for _ in groups])
    (result,) = judge.judge([JudgeGroup("q", ["a", "b", "c"])])
    np.testing.assert_allclose(result.scores, [4 / 3, -7 / 6, -1 / 6], atol=1e-12)
    np.testing.assert_allclose(result.prob_matrix, [[0.5, 0.924142, 0.817574],
                                                    [0.075858, 0.5, 0.268941],
                                                    [0.182426, 0.731059, 0.5]], atol=1e-6)
    np.testing.assert_allclose(result.win_probs, [(0.5 + 0.924142 + 0.817574) / 3, (0.075858 + 0.5 + 0.268941) / 3,
                                                  (0.182426 + 0.731059 + 0.5) / 3], atol=1e-6)
    np.testing.assert_allclose(scores_from_logits(logits), [4 / 3, -7 / 6, -1 / 6], atol=1e-12)


class SegmentLengthBackbone(nn.Module):
    """Stands in for DeBERTa: hidden[b, t, 0] = tokens from t up to (not including) the next [SEP]."""

    def __init__(self, hidden_size: int, sep_id: int):
        super().__init__()
        self.hidden_size, self.sep_id = hidden_size, sep_id

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        states = torch.zeros(*input_ids.shape, self.hidden_size)
        for b, row in enumerate(input_ids.tolist()):
            run = 0
            for t in reversed(range(len(row))):
                run = 0 if row[t] == self.sep_id else run + 1
                states[b, t, 0] = run
        return SimpleNamespace(last_hidden_state=states)


def test_known_head_ranks_by_candidate_length_and_order_flips_the_sign(saved):
    path, _model, tokenizer = saved
    judge = PairRMJudge(path, batch_size=3, device="cpu", dtype="fp32")
    model, hidden = judge.model, judge.model.config.hidden_size
    model.pretrained_model = SegmentLengthBackbone(hidden, tokenizer.sep_token_id)
    # s_k = tanh(a * x_k), x_k = the state at candidate k's prefix = 1 + its text's token count.
    a = 0.1
    with torch.no_grad():
        for layer in (model.head_layer[1], model.head_layer[4]):
            layer.weight.zero_()
            layer.bias.zero_()
        model.head_layer[1].weight[0, hidden] = a  # the first feature of the candidate half of [source; cand]
        model.head_layer[4].weight[0, 0] = 1.0

    responses = ["ok", "ok ok ok", "ok ok", "ok ok ok ok ok"]
    x = np.array([1 + len(tokenizer(r, add_special_tokens=False).input_ids) for r in responses])
    assert len(set(x)) == 4
    (logits,) = judge.logit_matrices([JudgeGroup("Say ok.", responses)])
    expected = np.tanh(a * x)[:, None] - np.tanh(a * x)[None, :]
    np.fill_diagonal(expected, 0.0)
    np.testing.assert_allclose(logits, expected, atol=1e-6)
    np.testing.assert_allclose(logits, -logits.T, atol=1e-6)  # swapping candidates flips the sign

    (result,) = judge.judge([JudgeGroup("Say ok.", responses)])
    assert list(np.argsort(-result.scores)) == [3, 1, 2, 0]  # most words first
    assert result.prob_matrix[3, 0] > 0.5 > result.prob_matrix[0, 3]

    # The same through the model's own forward, in both orders.
    batch = tokenize_pairs(tokenizer, ["Say ok.", "Say ok."], [responses[3], responses[0]], [responses[0], responses[3]])
    with torch.no_grad():
        forward = model(**batch).logits
    assert forward[0] > 0 > forward[1]
    assert math.isclose(forward[0].item(), -forward[1].item(), abs_tol=1e-6)


def test_batching_across_prompts_matches_one_prompt_at_a_time(saved):
    path = saved[0]
    groups = [
        JudgeGroup("What is the capital of France?", RESPONSES),
        JudgeGroup("hi", ["hello!", "go away", "Hi! How can I help you today?"]),
        JudgeGroup("Write a poem about the sea and the wind, in four lines please.", ["The sea...", "No."]),
        JudgeGroup("one answer only", ["just this"]),
    ]
    together = PairRMJudge(path, batch_size=5, device="cpu", dtype="fp32")
    alone = PairRMJudge(path, batch_size=16, device="cpu", dtype="fp32")  # a whole group per forward
    batched = together.judge(groups)
    assert together.pairs_scored == 12 + 6 + 2 + 0 and together.pairs_per_second > 0
    for group, result in zip(groups, batched):
        (single,) = alone.judge([group])
        k = len(group.responses)
        assert result.prob_matrix.shape == (k, k) and result.scores.shape == (k,)
        np.testing.assert_allclose(result.prob_matrix, single.prob_matrix, atol=1e-5)
        np.testing.assert_allclose(result.scores, single.scores, atol=1e-5)
    np.testing.assert_allclose(batched[3].prob_matrix, [[0.5]])
    assert together.judge([]) == []


def test_a_path_that_is_not_a_pairrm_model_is_a_model_error(tmp_path, saved):
    with pytest.raises(ModelError):
        PairRMJudge(str(tmp_path / "missing" / "dir"), device="cpu")
    with pytest.raises(ModelError, match="no config.json"):
        PairRMJudge(str(tmp_path), device="cpu")
    # A DeBERTa config without PairRM's prefix ids.
    plain = tmp_path / "plain"
    plain.mkdir()
    config = json.loads(open(f"{saved[0]}/config.json").read())
    for key in ("source_prefix_id", "cand1_prefix_id", "cand2_prefix_id", "cand_prefix_id"):
        config.pop(key)
    (plain / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="not a PairRM checkpoint"):
        PairRMJudge(str(plain), device="cpu")
    # The right config and tokenizer, but no weights.
    empty = tmp_path / "noweights"
    empty.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (empty / name).write_bytes(open(f"{saved[0]}/{name}", "rb").read())
    with pytest.raises(ModelError) as caught:
        PairRMJudge(str(empty), device="cpu")
    assert "\n" not in str(caught.value)
    # Weights without the head (a bare DeBERTa saved under PairRM's config): refused, not judged at random.
    from safetensors.torch import load_file, save_file

    headless = tmp_path / "headless"
    headless.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (headless / name).write_bytes(open(f"{saved[0]}/{name}", "rb").read())
    weights = {k: v for k, v in load_file(f"{saved[0]}/model.safetensors").items() if not k.startswith("head_layer.4")}
    save_file(weights, str(headless / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelError, match="head_layer.4"):
        PairRMJudge(str(headless), device="cpu")


def test_forward_refuses_rows_without_prefix_tokens(saved):
    _path, model, tokenizer = saved
    ids = torch.tensor([tokenizer.encode("no prefixes here")])
    with pytest.raises(ValueError, match=re.escape(f"no {SOURCE_PREFIX}")):
        model(input_ids=ids, attention_mask=torch.ones_like(ids))

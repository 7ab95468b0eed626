"""A referee apart from the training judge, end to end: a tiny iterative-DPO run whose pairs are judged by the
verifier while a reward model (evaluation.judge_model) referees the held-out comparisons. The figures in
metrics.json are recomputed here from eval.parquet with each judge called directly."""

import json

import numpy as np
import pytest
import torch

import pipeline  # noqa: F401 - registers the tasks
from configs.recipe import ModelConfig
from data.comparisons import judge_agreement, lc_win_rate
from data.schema import EVAL, read_artifact
from models.judge.judge_types import JudgeGroup
from models.judge.judges import RewardModelJudge
from tasks.iterate import Iterate
from test_pipeline import build

pytestmark = pytest.mark.slow


def tiny_reward_model(path) -> str:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from models.load.tokenizer import build_byte_tokenizer

    tok = build_byte_tokenizer()
    torch.manual_seed(0)
    rm = LlamaForSequenceClassification(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                    num_attention_heads=2, num_key_value_heads=2, num_labels=1,
                                                    pad_token_id=tok.pad_token_id))
    rm.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_a_reward_model_referees_while_the_verifier_trains(tiny_recipe, tmp_path):
    rm_path = tiny_reward_model(tmp_path / "rm")
    recipe = tiny_recipe("dpo", name="tiny_referee", evaluation={"judge": "reward_model", "judge_model": rm_path})
    runs = tmp_path / "runs"
    build(Iterate(recipe=recipe, runs_dir=str(runs), rounds=1))
    run_dir = runs / "tiny_referee"
    ev = json.loads((run_dir / "round_01" / "metrics.json").read_text())["eval"]
    assert ev["eval_judge"] == "reward_model" and ev["eval_judge_detail"] == rm_path
    assert ev["train_judge"] == "verifier" and ev["train_judge_detail"] == "exact"

    evals = {r: read_artifact(run_dir / f"round_{r:02d}" / "eval.parquet", EVAL) for r in (0, 1)}
    greedy = {r: frame[frame.kind == "greedy"].set_index("prompt_id") for r, frame in evals.items()}
    ours, base = greedy[1], greedy[0].loc[greedy[1].index]
    referee = RewardModelJudge(rm_path, ModelConfig(precision="fp32"), batch_size=4)
    groups = [JudgeGroup(prompt=p, responses=[a, b]) for p, a, b in zip(ours.prompt, ours.response, base.response)]
    referee_probs = np.array([result.prob_matrix[0, 1] for result in referee.judge(groups)])
    # The training judge (the verifier, `exact`): a right answer beats a wrong one, ties are 1/2.
    training_probs = 0.5 + 0.5 * (ours.verifier_score.to_numpy() - base.verifier_score.to_numpy())
    assert ev["win_rate_vs_base"] == pytest.approx(referee_probs.mean(), abs=1e-6)
    assert ev["train_judge_win_rate_vs_base"] == pytest.approx(training_probs.mean())
    agreement = judge_agreement(referee_probs, training_probs)
    assert ev["judge_agreement_vs_base"] == pytest.approx(agreement["agreement"])
    assert ev["judge_kappa_vs_base"] == pytest.approx(agreement["kappa"], nan_ok=True)
    lengths = ours.response.str.len().to_numpy(), base.response.str.len().to_numpy()
    assert ev["win_rate_vs_base_chars_ours"] == pytest.approx(lengths[0].mean())
    assert ev["win_rate_vs_base_chars_theirs"] == pytest.approx(lengths[1].mean())
    assert ev["win_rate_vs_base_lc"] == pytest.approx(lc_win_rate(referee_probs, *lengths)[0], abs=1e-6)
    assert ev["train_judge_win_rate_vs_base_lc"] == pytest.approx(lc_win_rate(training_probs, *lengths)[0])

    report = (run_dir / "report.md").read_text()
    section = report.split("## Referee and training judge")[1].split("##")[0]
    assert f"`reward_model` ({rm_path})" in section and "`verifier` (exact)" in section
    assert "## Win rates controlled for length" in report


def test_no_training_judge_is_asked_where_it_is_the_referee(tiny_recipe, tmp_path):
    recipe = tiny_recipe("dpo", name="tiny_same")  # evaluation.judge auto: the verifier, as in training
    runs = tmp_path / "runs"
    build(Iterate(recipe=recipe, runs_dir=str(runs), rounds=1))
    ev = json.loads((runs / "tiny_same" / "round_01" / "metrics.json").read_text())["eval"]
    assert "train_judge" not in ev and "judge_agreement_vs_base" not in ev
    assert "win_rate_vs_base_lc" in ev and "win_rate_vs_previous_lc_se" in ev
    assert "## Referee and training judge" not in (runs / "tiny_same" / "report.md").read_text()


def test_the_referee_helpers_name_who_judges(tiny_recipe):
    from configs.recipe import load_recipe
    from models.evaluate.referee import referee_model, training_judge_apart, training_judge_detail

    self_policy = load_recipe(tiny_recipe("dpo", name="s", judge={"name": "self"}))
    # round 1's self-judge was the base model, as is the default referee: one judge; from round 2 on, two
    assert not training_judge_apart(self_policy, 1, "self") and training_judge_apart(self_policy, 2, "self")
    assert training_judge_detail(self_policy, 3) == "the policy after round 2, pointwise"
    self_base = load_recipe(tiny_recipe("dpo", name="b", judge={"name": "self", "self_model": "base"}))
    assert not training_judge_apart(self_base, 3, "self")
    bigger = load_recipe(tiny_recipe("dpo", name="g", judge={"name": "self", "self_model": "base"},
                                     evaluation={"judge": "self", "judge_model": "org/bigger"}))
    assert referee_model(bigger, "self") == "org/bigger" and training_judge_apart(bigger, 1, "self")
    spin = load_recipe(tiny_recipe("spin", name="p"))
    assert not training_judge_apart(spin, 1, "verifier")  # SPIN's pairs come from the ground truth: no judge

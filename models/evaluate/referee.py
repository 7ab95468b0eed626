"""The evaluation's judges: the referee behind the reported win rates, and the training judge beside it.

    from models.evaluate.referee import make_referee, make_training_judge
    referee = make_referee(name, recipe, base_model, base_tokenizer)
    training = make_training_judge(recipe, round_idx, name, model_path, base_model, base_tokenizer, prompts)  # or None

A policy trained against a judge can learn what that judge likes rather than what is better (reward
hacking looks like progress when the same judge reports the gain). So the held-out win rates are judged
by the *referee*: `evaluation.judge` with `evaluation.judge_model` (a reward model, PairRM, or a causal
LM as self-judge: a bigger model while a small one trains), or by default the recipe's judge (the
self-judge's referee is then the base model, fixed every round). Where the referee is not the judge
that made round r's training pairs, that *training judge* judges the same held-out comparisons too, and
metrics.json gives its win rates and its agreement with the referee (data/comparisons.py); report.md
flags a round whose training judge sees a gain the referee does not.

The training judge of round r, as it judged round r's samples: the verifier, the reward model or PairRM
of `judge.model`, or the self-judge, which is the model after round r-1 (`judge.self_model: policy`,
the generator of round r's samples; the base model in round 1) or the base model (`self_model: base`).
SPIN's pairs come from the ground truth, with no judge to compare.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

log = logging.getLogger("selfplay")


def referee_model(recipe, name: str | None) -> str | None:
    """What the referee `name` runs on: its model path or hub id, 'base' for the base model as self-judge,
    the verifier's spec for the verifier."""
    ev = recipe.evaluation
    if name in ("pairrm", "reward_model"):
        return ev.judge_model or recipe.judge.model
    if name == "self":
        return ev.judge_model or "base"
    if name == "verifier":
        return recipe.judge.verifier or "exact"
    return None


def training_judge_model(recipe, round_idx: int) -> str | None:
    """What round `round_idx`'s training judge ran on, in the terms of `referee_model`; None for SPIN."""
    judge = recipe.judge
    if judge.name in ("pairrm", "reward_model"):
        return judge.model
    if judge.name == "self":
        return "base" if judge.self_model == "base" or round_idx == 1 else f"round {round_idx - 1}"
    if judge.name == "verifier":
        return judge.verifier or "exact"
    return None


def training_judge_apart(recipe, round_idx: int, referee_name: str | None) -> bool:
    """Whether the training judge of the round is another judge than the referee (so both are asked)."""
    if round_idx < 1 or recipe.judge.name == "ground_truth" or referee_name is None:
        return False
    return (recipe.judge.name, training_judge_model(recipe, round_idx)) != (referee_name, referee_model(recipe, referee_name))


def training_judge_detail(recipe, round_idx: int) -> str | None:
    """How report.md names the training judge's model."""
    model = training_judge_model(recipe, round_idx)
    if recipe.judge.name == "self":
        return ("the base model" if model == "base" else f"the policy after {model}") + f", {recipe.judge.self_mode}"
    return model


def make_referee(name: str, recipe, base_model, base_tokenizer):
    """The referee judge `name` (models.judge.judges): on evaluation.judge_model where one is named."""
    from models.judge.judges import SelfJudge, make_judge
    from models.load.loading import load_causal_lm, load_tokenizer

    model_path = recipe.evaluation.judge_model
    if model_path is None:
        return make_judge(name, recipe, base_model, base_tokenizer)
    if name == "self":
        judge = recipe.judge
        return SelfJudge(load_causal_lm(model_path, recipe.model).eval(), load_tokenizer(model_path, recipe.model),
                         judge.self_mode, judge.batch_size, judge.max_new_tokens)
    referee_recipe = dataclasses.replace(recipe, judge=dataclasses.replace(recipe.judge, model=model_path))
    return make_judge(name, referee_recipe, base_model, base_tokenizer)


def make_training_judge(recipe, round_idx: int, referee_name: str | None, model_path: str, base_model, base_tokenizer,
                        whole_prompts):
    """Round `round_idx`'s training judge, to judge the held-out comparisons beside the referee `referee_name`;
    None where it is the referee, where SPIN has none, or where it cannot judge these prompts (a verifier
    without answers in them). A self-judge that is the policy after round r-1 is loaded here (and freed with
    the judge); `model_path` is round r's checkpoint, the one beside it is round r-1's."""
    from models.judge.judges import make_judge
    from models.judge.verifiers import can_verify, load_verifier

    if not training_judge_apart(recipe, round_idx, referee_name):
        return None
    if recipe.judge.name == "verifier" and not can_verify(load_verifier(recipe.judge.verifier), whole_prompts):
        log.info("the training judge (verifier) cannot score the held-out prompts (no answers): its agreement is not measured")
        return None
    if recipe.judge.name != "self" or training_judge_model(recipe, round_idx) == "base":
        return make_judge(recipe.judge.name, recipe, base_model, base_tokenizer)
    from data.layout import CHECKPOINT, round_dir
    from models.load.loading import load_policy, load_tokenizer

    previous = str(round_dir(Path(model_path).parent.parent, round_idx - 1) / CHECKPOINT)
    model = load_policy(previous, recipe.model, quantize=recipe.model.quantization == "4bit", merge=False)
    return make_judge("self", recipe, model, load_tokenizer(previous, recipe.model))

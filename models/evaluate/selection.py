"""Scoring a round on the validation split, with Evaluate's own machinery (models/evaluate/evaluation.py).

    figure = selection_figure(recipe, validation)            # iterate.select_by, resolved for these prompts
    frame = score_validation(recipe, round_idx, model_path, base_path, validation, figure)
    win_probs = judge_vs_best(recipe, base_path, validation, ours, theirs)   # win_rate_vs_best only

`score_validation` loads the round's policy as Evaluate does (root + adapter, folded for decoding), and
writes one row per validation prompt: the greedy answer (when the figure needs answers: accuracy and
win_rate_vs_best), the verifier's score of it (where the verifier can score the rows), and the
ground truth's mean per-token log-likelihood (where the rows have a ground truth). Greedy decoding at
evaluation.max_new_tokens, the verifier and the judge are those of the held-out evaluation, so the
validation figure measures what the held-out figures measure, on other prompts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from common.errors import DataError, RecipeError
from data.prompts import format_prompt

ANSWERED = ("accuracy", "win_rate_vs_best")  # figures that need the round's greedy answers


def selection_figure(recipe, validation: pd.DataFrame) -> str:
    """iterate.select_by, or its default for these prompts: accuracy where the verifier can score them, else
    win_rate_vs_best where there is an evaluation judge, else gt_logprob. A figure the recipe cannot compute
    is a RecipeError naming the key."""
    from models.evaluate.evaluation import eval_judge_name
    from models.judge.verifiers import can_verify, load_verifier

    verifier = load_verifier(recipe.judge.verifier)
    judge = eval_judge_name(recipe, validation)
    has_truth = "reference" in validation and all(isinstance(r, str) and r.strip() for r in validation.reference)
    chosen = recipe.iterate.select_by
    if chosen is None:
        chosen = ("accuracy" if can_verify(verifier, validation) else "win_rate_vs_best" if judge
                  else "gt_logprob" if has_truth else None)
        if chosen is None:
            raise RecipeError("iterate.select_by: nothing can score the validation prompts (no answers for the verifier, "
                              "no evaluation judge, no ground-truth responses); set data.validation to data that has them")
    elif chosen == "accuracy" and not can_verify(verifier, validation):
        raise RecipeError(f"iterate.select_by accuracy: verifier '{verifier.spec}' cannot score the validation rows "
                          f"(it needs an answer in every row: data.answer_field or a ground-truth response)")
    elif chosen == "win_rate_vs_best" and not judge:
        raise RecipeError("iterate.select_by win_rate_vs_best needs an evaluation judge (evaluation.judge is none)")
    elif chosen == "gt_logprob" and not has_truth:
        raise RecipeError("iterate.select_by gt_logprob needs a ground-truth response in every validation row "
                          "(data.response_field or messages)")
    return chosen


def score_validation(recipe, round_idx: int, model_path: str, base_path: str, prompts: pd.DataFrame,
                     figure: str) -> pd.DataFrame:
    """One row per validation prompt of the model after `round_idx` rounds (see the module docstring)."""
    from models.evaluate.evaluation import ground_truth_items, ground_truth_logprobs, score_responses
    from models.generate.generation import generate_and_score
    from models.load.loading import adapter_merged, load_policy, load_tokenizer
    from models.generate.sampling import SamplingSettings
    from models.judge.verifiers import can_verify, load_verifier

    gen, ev = recipe.generation, recipe.evaluation
    tokenizer = load_tokenizer(model_path, recipe.model)
    model = load_policy(model_path, recipe.model, quantize=recipe.model.quantization == "4bit", root=base_path, merge=False)
    device = next(model.parameters()).device
    frame = pd.DataFrame({"prompt_id": prompts.prompt_id.to_numpy(), "prompt": prompts.prompt.to_numpy(), "round": round_idx})
    items = ground_truth_items(tokenizer, prompts)
    scored = {}
    with adapter_merged(model, packed=gen.backend == "static"):
        if figure in ANSWERED:
            # Greedy answers; each ground truth scored on the same prefill of its prompt, as Evaluate does.
            texts = [format_prompt(tokenizer, p, s) for p, s in zip(prompts.prompt, prompts.system)]
            prompt_ids = [tokenizer(text, add_special_tokens=False).input_ids for text in texts]
            riding = [item is not None and item.prompt_ids == ids for item, ids in zip(items, prompt_ids)]
            answers, continuation_logps = generate_and_score(model, tokenizer, texts, SamplingSettings(
                temperature=0.0, max_new_tokens=ev.max_new_tokens, batch_size=gen.batch_size,
                seed=recipe.seed, backend=gen.backend), [[item.completion_ids] if ride else []
                                                         for item, ride in zip(items, riding)], f"validation r{round_idx}")
            scored = {i: continuation_logps[i][0] for i, ride in enumerate(riding) if ride}
            frame["response"] = [a[0].text for a in answers]
            frame["num_tokens"] = [a[0].num_tokens for a in answers]
            frame["finished"] = [a[0].finished for a in answers]
        gt = ground_truth_logprobs(model, tokenizer, prompts, gen.batch_size, device, items, scored)
    frame["gt_logprob"] = gt.gt_logprob.reindex(frame.prompt_id).to_numpy()
    frame["gt_tokens"] = gt.gt_tokens.reindex(frame.prompt_id).to_numpy()
    verifier = load_verifier(recipe.judge.verifier)
    if "response" in frame and can_verify(verifier, prompts):
        frame["verifier_score"] = score_responses(verifier, prompts.reset_index(drop=True), frame.response)
    return frame


def judge_vs_best(recipe, base_path: str, prompts: pd.DataFrame, ours: list[str], theirs: list[str]) -> np.ndarray:
    """P(ours beats theirs) per validation prompt, by the evaluation judge (the base model referees as the
    self-judge, as in Evaluate)."""
    from models.evaluate.evaluation import eval_judge_name, win_probs
    from models.judge.judges import make_judge

    name = eval_judge_name(recipe, prompts)
    model = tokenizer = None
    if name == "self":
        from models.load.loading import load_policy, load_tokenizer

        tokenizer = load_tokenizer(base_path, recipe.model)
        model = load_policy(base_path, recipe.model, quantize=recipe.model.quantization == "4bit")
    return win_probs(make_judge(name, recipe, model, tokenizer), prompts.reset_index(drop=True), ours, theirs)


def model_directory(model_path: str, revision: str | None = None) -> Path:
    """The local directory holding the files of `model_path` (a directory, or a hub id in the local hub cache,
    which scoring it has filled), for best/ to link to."""
    path = Path(model_path).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model_path, revision=revision, local_files_only=True))
    except Exception as exc:  # not in the cache: nothing local to keep
        raise DataError(f"best/: the base model {model_path} has no local files to keep ({str(exc).splitlines()[0]})") from None

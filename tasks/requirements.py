"""What the later stages of a run need of the data and the recipe, checked before any compute.

    from tasks.requirements import preflight
    preflight(recipe, rounds)      # Iterate calls it before anything is scheduled

A run samples for hours before its Judge and Evaluate stages read the data again; whatever those
stages would refuse is refused here first, in one line naming the file, row, field or key:

- the base model path, `judge.model` of a PairRM or reward-model judge (pairing or evaluating), and
  `evaluation.judge_model`, a referee's model: a local directory with a config.json, or something that
  looks like a hub id; a cached GGUF file (`cache:NAME`) with its pinned sha256;
- `model.precision` and `model.quantization` on this machine's device: bf16 on a GPU without it, or a
  4-bit quantisation the installed bitsandbytes cannot do there (it is asked to, on a few numbers);
- `evaluation.benchmarks`: lm-eval is installed (else the install command), every task name exists in
  it, every local task file parses and its data files are there (models/evaluate/benchmarks.py);
- `judge.verifier` of every round: a built-in name, or a function that imports and can be called
  as fn(prompt, response, row);
- the training data (SPIN: a ground truth in every row; the verifier judge: an answer its verifier
  can check in every row; judge.rationalize: an answer to give as a hint in every row) and the held-out
  data (the answers the evaluation judge or the accuracy will check), with `data.task_field` / `data.answer_field` columns present where they are named;
- the validation split (data/validation.py): apart from the training and held-out prompts, and
  scorable by `iterate.select_by` (answers for the verifier's accuracy, a judge for win_rate_vs_best,
  ground-truth responses for gt_logprob).

Local files are read here; a hub dataset is checked by the same functions as Generate and Evaluate
load it, still before they sample.
"""

from __future__ import annotations

from pathlib import Path

import logging

from common.errors import ModelError, RecipeError
from configs.recipe import DEMO_BASE

log = logging.getLogger("selfplay")

MODEL_JUDGES = ("pairrm", "reward_model")


def _answers(verifier, frame, source: str, purpose: str) -> None:
    """Every row of `frame` has an answer `verifier` can check, or a DataError naming the first that has not."""
    from common.errors import DataError

    if "answer" not in frame.columns:
        raise DataError(
            f"{source}: {purpose} (verifier '{verifier.spec}') checks against an answer, but the data has no "
            f"column '{frame.attrs.get('answer_field', 'answer')}' (data.answer_field) and no ground-truth response"
        )
    field = frame.attrs.get("answer_from", "answer")
    for row_idx, answer in enumerate(frame["answer"]):
        problem = verifier.answer_problem(answer)
        if problem:
            raise DataError(f"{source}: row {row_idx}: field '{field}' {problem} ({purpose}, verifier '{verifier.spec}')")


def check_model_judge(recipe, judge_name: str | None, key: str) -> None:
    """A PairRM or reward-model judge has a `judge.model` that can be a model."""
    from models.load.loading import check_model_path

    if judge_name not in MODEL_JUDGES:
        return
    if not recipe.judge.model:
        raise RecipeError(f"{recipe.name}: {key} {judge_name} needs judge.model (a model path or hub id)")
    try:
        check_model_path(recipe.judge.model)
    except ModelError as exc:
        raise ModelError(f"judge.model: {exc}") from None


def check_referee(recipe, judge_name: str | None) -> None:
    """The evaluation judge's model: `evaluation.judge_model` when one is named (a PairRM, reward model or
    self-judge referee apart from the training judge), else judge.model as check_model_judge checks it."""
    from models.load.loading import check_model_path

    if recipe.evaluation.judge_model is None:
        check_model_judge(recipe, judge_name, "evaluation judge")
        return
    try:
        check_model_path(recipe.evaluation.judge_model)
    except ModelError as exc:
        raise ModelError(f"evaluation.judge_model: {exc}") from None


def check_train_data(recipe, frame, source: str) -> None:
    """What Judge will need of the training prompts of a round of `recipe` (its ground truth is checked on loading)."""
    from models.judge.verifiers import load_verifier

    verifier = load_verifier(recipe.judge.verifier)
    if recipe.algorithm != "spin" and recipe.judge.name == "verifier" and verifier.needs_answer:
        _answers(verifier, frame, source, "the verifier judge")
    if recipe.judge.rationalize:
        _hints(frame, source)


def _hints(frame, source: str) -> None:
    """Every row has an answer to give as STaR's hint (judge.rationalize), or a DataError naming the first that has not."""
    from common.errors import DataError

    field = frame.attrs.get("answer_from", "answer")
    if "answer" not in frame.columns:
        raise DataError(f"{source}: judge.rationalize gives the answer as a hint, but the data has no column "
                        f"'{frame.attrs.get('answer_field', 'answer')}' (data.answer_field) and no ground-truth response")
    for row_idx, answer in enumerate(frame["answer"]):
        if not isinstance(answer, str) or not answer.strip():
            raise DataError(f"{source}: row {row_idx}: field '{field}' is empty: judge.rationalize gives the answer as a hint")


def check_eval_data(recipe, frame, source: str) -> None:
    """What Evaluate will need of the held-out prompts it scores (`frame`: the first evaluation.num_prompts)."""
    from models.evaluate.evaluation import eval_judge_name
    from models.judge.verifiers import can_verify, load_verifier

    verifier = load_verifier(recipe.judge.verifier)
    judge_name = eval_judge_name(recipe, frame)
    check_referee(recipe, judge_name)
    if verifier.needs_answer and (judge_name == "verifier" or can_verify(verifier, frame)):
        purpose = "the evaluation judge" if judge_name == "verifier" else "the evaluation's accuracy"
        _answers(verifier, frame, source, purpose)


def _is_local(source: str) -> bool:
    from data.prompts import DEMO_PREFIX

    return source.startswith(DEMO_PREFIX) or Path(source).expanduser().suffix in (".parquet", ".jsonl", ".json")


def preflight(recipe, rounds: int) -> None:
    """Check, before anything is scheduled, every requirement the `rounds` rounds of `recipe` have."""
    from data.prompts import load_prompts
    from models.load.gguf import check_gguf, is_gguf_spec, resolve_gguf
    from models.load.loading import check_model_device, check_model_path
    from models.judge.verifiers import load_verifier

    base = recipe.model.base_model
    if is_gguf_spec(base):
        check_gguf(resolve_gguf(base, verify=True), named=base)
    elif base and base != DEMO_BASE:  # `demo`: the shipped demo base, not a path
        check_model_path(base)
    check_model_device(recipe.model)
    round_recipes = [recipe.for_round(r) for r in range(1, rounds + 1)]
    if recipe.evaluation.benchmarks:
        from configs.evaluation import benchmark_specs
        from models.evaluate.benchmarks import check_benchmarks

        check_benchmarks(benchmark_specs(recipe.evaluation.benchmarks, recipe.name))
    for round_recipe in round_recipes:  # judge and evaluation may change between rounds
        load_verifier(round_recipe.judge.verifier)
        if round_recipe.algorithm != "spin":
            check_model_judge(round_recipe, round_recipe.judge.name, "judge.name")
        if round_recipe.evaluation.judge_model:  # a referee named whatever the held-out data (a hub dataset is read later)
            check_referee(round_recipe, round_recipe.evaluation.judge)
    data = recipe.data
    train = None
    if _is_local(data.train):
        train = load_prompts(data.train, data.train_split, data, require_reference=any(r.needs_reference for r in round_recipes))
        for round_recipe in round_recipes:
            check_train_data(round_recipe, train, data.train)
    held_out = None
    if _is_local(data.eval):
        held_out = load_prompts(data.eval, data.eval_split, data)
        for round_recipe in round_recipes:
            check_eval_data(round_recipe, held_out.head(round_recipe.evaluation.num_prompts), data.eval)
    if _is_local(data.train) and held_out is not None:
        check_validation(recipe, train, held_out)
    if recipe.training.mix_previous_round is not None:
        log.info("training.mix_previous_round is the older spelling of training.mix_rounds (%s means mix_rounds: %s)",
                 str(recipe.training.mix_previous_round).lower(), recipe.mix_rounds)


def check_validation(recipe, train, held_out) -> None:
    """What Validate and Select will need of the validation split, read now from local files."""
    from data.validation import has_validation, validation_plan, validation_prompts
    from models.evaluate.selection import selection_figure
    from models.judge.verifiers import load_verifier

    kind, source = validation_plan(recipe.data)
    if not has_validation(recipe):
        it = recipe.iterate
        for key, value, off in (("iterate.patience", it.patience, None), ("iterate.on_regress", it.on_regress, "continue"),
                                ("iterate.select_by", it.select_by, None)):
            if value != off:
                raise RecipeError(f"{key}: {value} needs a validation split, and this data has none apart from training "
                                  "and held-out (data.validation_fraction sets no prompt aside that is not held out); "
                                  "name a data.validation")
        if it.select == "best" and recipe.data.validation != "none":
            log.info("no validation split (the training data sets no prompt aside that is not held out): the run keeps "
                     "its last round; name a data.validation to keep the best one")
        return
    if kind == "source" and not _is_local(source):
        return  # a hub dataset: Validate reads and checks it, before it scores anything
    validation = validation_prompts(recipe, train=train, held_out=held_out)
    if validation is None:
        return
    figure = selection_figure(recipe, validation)
    if figure == "accuracy":
        _answers(load_verifier(recipe.judge.verifier), validation, recipe.data.validation or "data.validation",
                 "iterate.select_by accuracy")
    elif figure == "win_rate_vs_best":
        from models.evaluate.evaluation import eval_judge_name

        check_model_judge(recipe, eval_judge_name(recipe, validation), "iterate.select_by win_rate_vs_best")

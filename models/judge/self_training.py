"""The Judge stage of the self-training family (algorithm rest): from samples to supervised examples.

    select_round(recipe, generations, round_idx, judge, rationalizer) -> (examples, counts)

ReST (Gulcehre et al. 2023, arXiv:2308.08998), ReST-EM (Singh et al. 2023, arXiv:2312.06585) and STaR
(Zelikman et al. 2022, arXiv:2203.14465) share one loop: sample from the current model, keep what a reward or a
verifier accepts, fine-tune on it by likelihood (models/train/losses.py, completion_nll), repeat. Here:

- every sample is scored by the recipe's judge, one score per response (a verifier, a reward model, the
  pointwise self-judge; configs/recipe.py refuses a pairwise judge, which has no score to threshold);
- a sample passes when its score is at least judge.pass_score (ReST's threshold tau, which ReST raises from one
  Improve step to the next: a `rounds:` override), it is not empty, and it finished unless judge.unfinished is
  keep (a sample cut at max_new_tokens, closed with the end of turn in training, would teach the model to stop
  anywhere);
- at most judge.max_per_prompt of a prompt's passing samples are kept, distinct ones first (`pick_examples`): a
  prompt the model already solves passes K times, and copies of one answer would fill the round;
- with judge.rationalize (STaR, Sec. 3.2), a prompt where no sample passes is sampled again by the round's
  generator with the ground-truth answer given as a hint (judge.rationalize_prompt); those rewrites are judged
  against the prompt without the hint, and the ones that pass are kept with the plain prompt, so training
  teaches the answer without the hint, as if the model had found it alone (the paper's point).

The examples go to round_NN/selected.parquet (data/schema.py SELECTED) and the counts to judge_meta.json:
`prompts`, `samples` judged, `samples_passed`, `pass_rate` (passed / judged), `prompts_passed` (prompts with at
least one passing sample), `examples` (rows kept, rationalizations included), `skipped_over_cap`,
`skipped_unfinished` (passed the judge but cut), and with rationalization `rationalizations_tried` (prompts),
`rationalization_samples`, `rationalizations_passed` (prompts with a passing rewrite), `rationalized_examples`.
A round where nothing passes keeps no example, which Train turns into a round that trains nothing.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from models.judge.judge_types import JudgeGroup, row_of
from models.judge.judges import RATIONALIZE_SEED_OFFSET, Refiner, rewrite_settings

if TYPE_CHECKING:  # annotations only: pandas loads inside the functions that use it
    import pandas as pd

# STaR's rationalization gives the answer as a hint after the question (Zelikman et al. 2022, Sec. 3.2 and Fig. 2);
# `{answer}` is the row's answer (data.answer_field, else the ground-truth response).
RATIONALIZE_PROMPT = "{prompt}\n\n(Hint: the correct answer is {answer}.)"
SAMPLE, RATIONALIZATION = "sample", "rationalization"
KEPT = ("prompt_id", "prompt", "system", "task", "answer", "reference")  # the prompt's columns an example carries
COLUMNS = ["prompt_id", "prompt", "response", "sample_index", "round", "num_tokens", "score", "judge", "source",
           "finished", "token_ids", "hinted_prompt", "system", "task", "answer", "reference"]


def normalized(text: str) -> str:
    return " ".join(text.split())


def passing(scores, responses: list[str], finished: list[bool], pass_score: float, keep_unfinished: bool) -> tuple[list[int], int]:
    """(indices of the responses that pass, how many more passed the judge but were cut at the length limit)."""
    scored = [i for i, (score, text) in enumerate(zip(scores, responses))
              if text.strip() and not math.isnan(score) and score >= pass_score]
    kept = [i for i in scored if finished[i] or keep_unfinished]
    return kept, len(scored) - len(kept)


def pick_examples(responses: list[str], scores, passed: list[int], cap: int | None) -> list[int]:
    """Which passing responses become examples, in index order: all of them, or with a `cap` at most that many,
    distinct texts first (by score, highest first, then index), then repeats of them in the same order."""
    order = sorted(passed, key=lambda i: (-scores[i], i))
    seen, distinct, repeats = set(), [], []
    for i in order:
        text = normalized(responses[i])
        (repeats if text in seen else distinct).append(i)
        seen.add(text)
    return sorted((distinct + repeats)[:cap] if cap is not None else order)


def make_rationalizer(recipe, model, tokenizer, round_idx: int, shard_idx: int = 0) -> Refiner:
    """STaR's rationalizer of a round's judge shard: `model` is the round's generator, sampling
    judge.rationalize_samples answers to each hinted prompt as generation.* says, from a seed of the shard's own."""
    return Refiner(model, tokenizer, recipe.judge.rationalize_prompt or RATIONALIZE_PROMPT, recipe.judge.rationalize_samples,
                   rewrite_settings(recipe, round_idx, RATIONALIZE_SEED_OFFSET + shard_idx), desc="rationalize")


def _group(rows, responses: list[str]) -> JudgeGroup:
    """The judge's view of one prompt (never the hinted one) and `responses` to it."""
    first = rows.iloc[0]
    get = lambda column: first[column] if column in rows.columns else None  # noqa: E731
    return JudgeGroup(prompt=first.prompt, responses=responses, system=get("system"), reference=get("reference"),
                      task=get("task"), answer=get("answer"), row=row_of(get("source_row")))


def _prompt_fields(rows) -> dict:
    first = rows.iloc[0]
    return {column: first[column] for column in KEPT if column in rows.columns}


def select_round(recipe, generations: "pd.DataFrame", round_idx: int, judge, rationalizer: Refiner | None = None):
    """Round `round_idx`'s supervised examples from its generations, and the counts of what passed (module docstring)."""
    import pandas as pd

    from data.schema import token_ids_or_none

    if "finished" not in generations.columns:  # generations written before `finished` was recorded
        generations = generations.assign(finished=True)
    generations = generations.assign(finished=generations.finished.fillna(True).astype(bool))
    grouped = [g.sort_values("sample_index") for _pid, g in generations.groupby("prompt_id", sort=False)]
    pass_score, cap = recipe.pass_score, recipe.judge.max_per_prompt
    keep_unfinished = recipe.judge.unfinished == "keep"
    counts = {"prompts": len(grouped), "samples": len(generations), "samples_passed": 0, "prompts_passed": 0,
              "examples": 0, "skipped_over_cap": 0, "skipped_unfinished": 0, "unfinished_samples": int((~generations.finished).sum()),
              "unparsed_judgements": 0, "reprompted_judgements": 0}
    results = judge.judge([_group(g, g.response.tolist()) for g in grouped]) if grouped else []
    rows, failed = [], []
    for group, result in zip(grouped, results):
        counts["unparsed_judgements"] += result.unparsed
        counts["reprompted_judgements"] += result.reprompted
        responses = group.response.tolist()
        passed, cut = passing(result.scores, responses, group.finished.tolist(), pass_score, keep_unfinished)
        counts["samples_passed"] += len(passed)
        counts["skipped_unfinished"] += cut
        if not passed:
            failed.append(group)
            continue
        counts["prompts_passed"] += 1
        picked = pick_examples(responses, result.scores, passed, cap)
        counts["skipped_over_cap"] += len(passed) - len(picked)
        for i in picked:
            sample = group.iloc[i]
            rows.append({**_prompt_fields(group), "response": sample.response, "sample_index": int(sample.sample_index),
                         "num_tokens": int(sample.num_tokens), "score": float(result.scores[i]), "source": SAMPLE,
                         "finished": bool(sample.finished), "token_ids": token_ids_or_none(sample.get("token_ids")),
                         "hinted_prompt": None})
    if rationalizer is not None:
        rows += rationalized_examples(recipe, failed, judge, rationalizer, counts)
    counts["examples"] = len(rows)
    frame = pd.DataFrame(rows, columns=[c for c in COLUMNS if c not in ("round", "judge")])
    frame = frame.assign(round=round_idx, judge=recipe.judge.name)
    return frame[[c for c in COLUMNS if c in frame.columns]], counts


def rationalized_examples(recipe, failed: list, judge, rationalizer: Refiner, counts: dict) -> list[dict]:
    """STaR's rationalization (Zelikman et al. 2022, arXiv:2203.14465, Sec. 3.2 and Algorithm 1): for each prompt
    in `failed` (no sample passed), the generator answers the prompt with the ground-truth answer as a hint; the
    rewrites that pass the judge, asked about the prompt without the hint, become examples of the plain prompt
    (at most judge.max_per_prompt, distinct first). A prompt without an answer to give is not rationalized
    (counted in skipped_no_answer; the preflight refuses local data that has one)."""
    hinted = []
    for group in failed:
        answer = group.answer.iloc[0] if "answer" in group.columns else None
        if isinstance(answer, str) and answer.strip():
            hinted.append((group, rationalizer.template.format(prompt=group.prompt.iloc[0], answer=answer)))
    counts.update(rationalizations_tried=len(hinted), rationalization_samples=0, rationalizations_passed=0,
                  rationalized_examples=0, skipped_no_answer=len(failed) - len(hinted))
    if not hinted:
        return []
    system = lambda group: group.system.iloc[0] if "system" in group.columns else None  # noqa: E731
    rewrites = rationalizer.sample([(text, system(group)) for group, text in hinted])
    counts["rationalization_samples"] = sum(len(samples) for samples in rewrites)
    results = judge.judge([_group(group, [s.text for s in samples]) for (group, _text), samples in zip(hinted, rewrites)])
    keep_unfinished = recipe.judge.unfinished == "keep"
    rows = []
    for (group, text), samples, result in zip(hinted, rewrites, results):
        counts["unparsed_judgements"] += result.unparsed
        counts["reprompted_judgements"] += result.reprompted
        responses = [s.text for s in samples]
        passed, _cut = passing(result.scores, responses, [s.finished for s in samples], recipe.pass_score, keep_unfinished)
        if not passed:
            continue
        counts["rationalizations_passed"] += 1
        for k in pick_examples(responses, result.scores, passed, recipe.judge.max_per_prompt):
            sample = samples[k]
            rows.append({**_prompt_fields(group), "response": sample.text, "sample_index": k, "num_tokens": sample.num_tokens,
                         "score": float(result.scores[k]), "source": RATIONALIZATION, "finished": bool(sample.finished),
                         "token_ids": list(sample.token_ids) or None, "hinted_prompt": text})
    counts["rationalized_examples"] = len(rows)
    return rows


def finish_counts(counts: dict) -> dict:
    """The counts of a whole round (its judging shards' added up) with its pass rate: passed / judged samples."""
    samples = counts.get("samples", 0)
    return {**counts, "pass_rate": counts.get("samples_passed", 0) / samples if samples else None}

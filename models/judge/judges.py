"""Judges: for each prompt and its K responses, the K x K matrix of P(response i beats response j).

One interface for all: `judge.judge(groups) -> list[JudgeResult]`, batched across prompts (the types
are in models/judge/judge_types.py). The matrix has 0.5 on the diagonal and P[i, j] + P[j, i] = 1. A judge
may also give pointwise `scores` (a reward, a rubric score, correctness); iterative DPO pairs by them
when present.

- VerifierJudge: programmatic correctness by a verifier, built in or the user's (models/judge/verifiers.py).
- RewardModelJudge: any AutoModelForSequenceClassification reward model; P = sigmoid(r_i - r_j).
- SelfJudge: the current model as an LLM judge, pointwise (Self-Rewarding LMs' additive 5-point
  rubric, 'Score: N' parsed from its text) or pairwise (asked in both orders to cancel position bias).
  An answer with no verdict in it is continued once with the verdict's opening written for it
  ('Score:' / 'Better:'), which small models need (SmolLM2-135M restates the response instead of
  scoring it). Answers still without a verdict are counted in `unparsed` and treated as ties; they
  never fail a round.
- PairRMJudge (models/judge/pairrm.py): llm-blender/PairRM-hf loaded by our own code.

`make_judge(name, recipe, policy_model, tokenizer)` builds the judge `name` for a recipe; the self-judge
asks `policy_model` (the round's generator), the others load what the recipe names.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from models.judge.judge_types import JudgeGroup, JudgeResult, matrix_from_scores, row_of

if TYPE_CHECKING:  # annotations only: pandas loads inside the functions that use it
    import pandas as pd

log = logging.getLogger("selfplay")


class VerifierJudge:
    """Scores each response with a verifier (models/judge/verifiers.py; `exact` when none is given): a right
    answer beats a wrong one with probability 1, and P = 1/2 + (s_i - s_j)/2 for partial credit."""

    name = "verifier"

    def __init__(self, verifier=None):
        from models.judge.verifiers import load_verifier

        self.verifier = verifier or load_verifier(None)

    def judge(self, groups: list[JudgeGroup]) -> list[JudgeResult]:
        results = []
        for group in groups:
            scores = np.array([self.verifier.score(group.prompt, r, group.row, group.answer) for r in group.responses])
            results.append(JudgeResult(0.5 + 0.5 * (scores[:, None] - scores[None, :]), scores=scores))
        return results


class RewardModelJudge:
    """A sequence-classification reward model scores each (prompt, response); P = sigmoid(r_i - r_j)."""

    name = "reward_model"

    def __init__(self, path: str, model_cfg, batch_size: int = 16, device=None):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from models.load.loading import check_model_path, default_device, resolve_dtype

        check_model_path(path)
        self.device = device or default_device()
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path,
            dtype=resolve_dtype(model_cfg.precision, self.device),
            trust_remote_code=model_cfg.trust_remote_code,
            use_safetensors=True,
        ).to(self.device).eval()
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.batch_size = batch_size
        self._torch = torch

    def encode(self, group: JudgeGroup, response: str):
        """The reward model's input for (prompt, response), as its own tokenizer would build it.

        A reward model with a chat template (Skywork, ArmoRM, ...) scores the conversation rendered by
        it; the template writes its own BOS, so no special tokens are added again. Without one, the
        tokenizer's text-pair encoding with special tokens: `tokenizer(question, answer)`, which for
        OpenAssistant/reward-model-deberta-v3-large-v2 (its model card's usage) is
        [CLS] question [SEP] answer [SEP], the [CLS] being what its pooler reads. The system prompt,
        if any, goes only into a chat template: text-pair reward models were trained on question and
        answer alone.
        """
        if self.tokenizer.chat_template:
            turns = [{"role": "system", "content": group.system}] if group.system else []
            turns += [{"role": "user", "content": group.prompt}, {"role": "assistant", "content": response}]
            text = self.tokenizer.apply_chat_template(turns, tokenize=False)
            return self.tokenizer(text, add_special_tokens=False, truncation=True)
        return self.tokenizer(group.prompt, response, truncation=True)

    def rewards(self, encodings: list) -> list[float]:
        """Reward of each encoding from `encode`, batched with padding."""
        from models.generate.generation import run_with_oom_backoff

        def work(chunk):
            batch = self.tokenizer.pad([dict(e) for e in chunk], return_tensors="pt")
            with self._torch.no_grad():
                logits = self.model(**{k: v.to(self.device) for k, v in batch.items()}).logits
            return logits[:, 0].float().tolist()

        return run_with_oom_backoff(work, encodings, self.batch_size, "reward model")

    def judge(self, groups: list[JudgeGroup]) -> list[JudgeResult]:
        encodings = [self.encode(g, r) for g in groups for r in g.responses]
        flat = iter(self.rewards(encodings))
        results = []
        for group in groups:
            scores = np.array([next(flat) for _ in group.responses])
            results.append(JudgeResult(matrix_from_scores(scores), scores=scores))
        return results


# The additive 5-point rubric of Self-Rewarding Language Models (Yuan et al. 2024, Fig. 2), in our words.
POINTWISE_PROMPT = """Review the user's question and the response below, and score the response out of 5 with this additive system:
- Add 1 point if the response is relevant to the question, even if incomplete.
- Add 1 point if it addresses a substantial part of the question.
- Add 1 point if it answers the basic elements of the question usefully.
- Add 1 point if it is clearly written from an assistant's perspective, direct and well organised.
- Add 1 point if it is impeccably tailored to the question, expert and without extraneous content.

Question: {prompt}

Response: {response}

Briefly justify your total, then conclude with "Score: <total points>"."""

PAIRWISE_PROMPT = """Which response answers the user's question better?

Question: {prompt}

Response A: {first}

Response B: {second}

Answer with "Better: A" or "Better: B"."""

# The number must end there: 'Score: 100' or 'Score: 10.' is no score out of 5 (not a 1).
SCORE_RE = re.compile(r"score\s*[:=]\s*([0-5](?:\.\d+)?)(?!\d)", re.IGNORECASE)
SCORE_OPENING, VERDICT_OPENING = "\nScore:", "\nBetter:"
REPROMPT_TOKENS = 4  # enough for ' 4' or ' A' and what follows
VERDICT_RE = re.compile(r"better\s*[:=]?\s*(?:response\s*)?\b([AB])\b", re.IGNORECASE)


def parse_score(text: str) -> float | None:
    match = SCORE_RE.findall(text)
    return float(match[-1]) if match else None


def parse_verdict(text: str) -> str | None:
    match = VERDICT_RE.findall(text)
    return match[-1].upper() if match else None


@dataclass
class SelfJudge:
    """The model being trained judges its own samples (Self-Rewarding LMs, Yuan et al. 2024)."""

    model: object
    tokenizer: object
    mode: str = "pointwise"
    batch_size: int = 16
    max_new_tokens: int = 32
    reprompt: bool = True  # continue a verdict-less answer once with the verdict's opening
    name: str = field(default="self", init=False)

    def _ask(self, questions: list[tuple[str, str | None]]) -> list[str]:
        from data.prompts import format_prompt

        return self._generate([format_prompt(self.tokenizer, q, system) for q, system in questions], self.max_new_tokens)

    def _continue(self, questions: list[tuple[str, str | None]], answers: list[str], opening: str) -> list[str]:
        """What the model writes after its own answer followed by `opening`, in the same assistant turn."""
        from data.prompts import format_prompt

        texts = [format_prompt(self.tokenizer, q, system) + answer + opening for (q, system), answer in zip(questions, answers)]
        return self._generate(texts, REPROMPT_TOKENS)

    def _generate(self, texts: list[str], max_new_tokens: int) -> list[str]:
        from models.generate.generation import generate_texts
        from models.generate.sampling import SamplingSettings

        settings = SamplingSettings(temperature=0.0, max_new_tokens=max_new_tokens, batch_size=self.batch_size)
        return [samples[0].text for samples in generate_texts(self.model, self.tokenizer, texts, settings, "self-judge")]

    def _verdicts(self, questions: list[tuple[str, str | None]], parse, opening: str) -> tuple[list, list[bool]]:
        """Parsed verdicts (None where none) and whether each needed the reprompt."""
        answers = self._ask(questions)
        verdicts = [parse(a) for a in answers]
        retry = [i for i, v in enumerate(verdicts) if v is None] if self.reprompt else []
        if retry:
            more = self._continue([questions[i] for i in retry], [answers[i] for i in retry], opening)
            for i, extra in zip(retry, more):
                verdicts[i] = parse(opening + extra)
        retried = set(retry)
        return verdicts, [i in retried for i in range(len(answers))]

    def judge(self, groups: list[JudgeGroup]) -> list[JudgeResult]:
        return self._pointwise(groups) if self.mode == "pointwise" else self._pairwise(groups)

    def _pointwise(self, groups: list[JudgeGroup]) -> list[JudgeResult]:
        questions = [(POINTWISE_PROMPT.format(prompt=g.prompt, response=r), g.system) for g in groups for r in g.responses]
        verdicts, reprompted = self._verdicts(questions, parse_score, SCORE_OPENING)
        results, start = [], 0
        for group in groups:
            end = start + len(group.responses)
            parsed = verdicts[start:end]
            scores = np.array([math.nan if s is None else s for s in parsed])
            results.append(JudgeResult(matrix_from_scores(scores), scores=scores, unparsed=parsed.count(None),
                                       reprompted=sum(reprompted[start:end])))
            start = end
        return results

    def _pairwise(self, groups: list[JudgeGroup]) -> list[JudgeResult]:
        orders = [[(i, j) for i in range(len(g.responses)) for j in range(len(g.responses)) if i != j] for g in groups]
        questions = [
            (PAIRWISE_PROMPT.format(prompt=g.prompt, first=g.responses[i], second=g.responses[j]), g.system)
            for g, pairs in zip(groups, orders)
            for i, j in pairs
        ]
        verdicts, reprompted = self._verdicts(questions, parse_verdict, VERDICT_OPENING)
        answers, retried = iter(verdicts), iter(reprompted)
        results = []
        for group, pairs in zip(groups, orders):
            k = len(group.responses)
            first_wins = np.full((k, k), 0.5)  # first_wins[i, j]: i shown as A beat j shown as B
            unparsed = again = 0
            for i, j in pairs:
                verdict = next(answers)
                unparsed += verdict is None
                again += next(retried)
                first_wins[i, j] = {"A": 1.0, "B": 0.0}.get(verdict, 0.5)
            # Average i's result as A against j with its result as B: position bias cancels.
            prob = (first_wins + (1.0 - first_wins.T)) / 2
            np.fill_diagonal(prob, 0.5)
            results.append(JudgeResult(prob, unparsed=unparsed, reprompted=again))
        return results


def make_judge(name: str, recipe, policy_model=None, tokenizer=None):
    """The judge `name` for a recipe; the self-judge uses `policy_model` (the round's generator)."""
    if name == "verifier":
        from models.judge.verifiers import load_verifier

        return VerifierJudge(load_verifier(recipe.judge.verifier))
    if name == "reward_model":
        return RewardModelJudge(recipe.judge.model, recipe.model, recipe.judge.batch_size)
    if name == "pairrm":
        from models.judge.pairrm import PairRMJudge

        precision = recipe.model.precision
        return PairRMJudge(recipe.judge.model, batch_size=recipe.judge.batch_size, dtype=None if precision == "auto" else precision)
    if name == "self":
        return SelfJudge(policy_model, tokenizer, recipe.judge.self_mode, recipe.judge.batch_size, recipe.judge.max_new_tokens)
    raise ValueError(f"no judge named {name!r}")


# --- the Judge stage: from samples to preference pairs ------------------------------------------


WIN_RATE_RANKED = ("sppo", "dno")


def ranking_scores(result: JudgeResult, algorithm: str) -> np.ndarray:
    """What responses are ranked by: mean win probability (SPPO; DNO, whose Algorithm 2 ranks the
    candidates by their pairwise win rate), or the judge's pointwise scores when it has them (iterative
    DPO, INPO)."""
    return result.win_probs if algorithm in WIN_RATE_RANKED or result.scores is None else result.scores


def select_pair(result: JudgeResult, algorithm: str, responses: list[str] | None = None,
                finished: list[bool] | None = None, choosable: list[bool] | None = None) -> tuple[int, int] | None:
    """(chosen, rejected) indices: best and worst by `ranking_scores`; None when every response ties.

    Coarse judges (a verifier's right/wrong) tie many responses at the top and the bottom. Among tied
    ones, take the response the model sampled most often: the rejected side is then the model's most
    likely wrong answer rather than a rare stray sample, so the pair pushes on what greedy decoding
    would say. Counting samples costs nothing; ranking ties by log-prob would need another pass.

    With `finished` (judge.unfinished: penalize), a sample cut at max_new_tokens ranks below every
    finished one whatever the judge said: the chosen side is the best finished sample (None when there
    is none), the rejected side the worst unfinished one when there is one.

    With `choosable`, only those responses may be the chosen side (pair_round: an empty one never is).
    The others rank by their scores like any response, so the rejected side is still the lowest-ranked
    one; only among responses tied for the lowest score is one that may not be chosen rejected first, and
    it makes a pair even with equal scores (a tied non-empty answer over an empty one).
    """
    key = ranking_scores(result, algorithm)
    valid = ~np.isnan(key)
    done = np.ones(len(key), dtype=bool) if finished is None else np.asarray(finished, dtype=bool)
    allowed = np.ones(len(key), dtype=bool) if choosable is None else np.asarray(choosable, dtype=bool)
    top_pool = valid & done & allowed
    bottom_pool = valid & ~done if (valid & ~done).any() else valid
    if not top_pool.any():
        return None
    top, bottom = key[top_pool].max(), key[bottom_pool].min()
    barred = bottom_pool & (key == bottom) & ~allowed  # tied for the lowest, and never to be chosen
    if top == bottom and done[bottom_pool].all() and not barred.any():
        return None
    if barred.any():
        bottom_pool = barred
    counts = Counter(_normalized(r) for r in responses) if responses is not None else None

    def most_sampled(value: float, pool: np.ndarray) -> int:
        tied = [i for i in range(len(key)) if pool[i] and key[i] == value]
        return max(tied, key=lambda i: counts[_normalized(responses[i])]) if counts else tied[0]

    return most_sampled(top, top_pool), most_sampled(bottom, bottom_pool)


def penalize_unfinished(result: JudgeResult, finished: list[bool]) -> JudgeResult:
    """The judge's matrix with every finished sample beating every unfinished one (P = 1), ties within
    each group left to the judge; SPPO's win probabilities (its training targets) then carry the penalty
    too: a finished sample's row mean is always above an unfinished one's."""
    done = np.asarray(finished, dtype=bool)
    prob = result.prob_matrix.copy()
    prob[np.ix_(done, ~done)] = 1.0
    prob[np.ix_(~done, done)] = 0.0
    return JudgeResult(prob, scores=result.scores, unparsed=result.unparsed, reprompted=result.reprompted)


def _normalized(text: str) -> str:
    return " ".join(text.split())


def _same_text(a: str, b: str) -> bool:
    return _normalized(a) == _normalized(b)


def _token_ids(sample) -> list[int] | None:
    """The ids a sample was generated as (generations.parquet `token_ids`, its EOS included when it
    finished), where they were recorded."""
    from data.schema import token_ids_or_none

    return token_ids_or_none(sample.get("token_ids"))


def _first(group, column: str):
    return group[column].iloc[0] if column in group.columns else None


# Where a side of a pair came from (pairs.parquet `chosen_source` / `rejected_source`).
SAMPLE, DATASET, REFINEMENT = "sample", "dataset", "refinement"
NOT_A_SAMPLE = -1  # `chosen_index` / `rejected_index` of a side that is none of the round's samples
DATASET_INDEX = NOT_A_SAMPLE


def _with_dataset_response(group):
    """The prompt's samples plus the dataset's response as one more candidate (judge.add_reference; DNO's
    gold answer, Rosset et al. 2024, Algorithm 2): finished, no sampled ids, sample index -1."""
    import pandas as pd

    from data.prompts import clean_response

    reference = _first(group, "reference")
    if not isinstance(reference, str) or not reference.strip():
        return group  # the data has none for this prompt (the preflight refuses such data for these recipes)
    extra = group.iloc[[0]].copy()
    extra["response"] = clean_response(reference)  # the same normalisation as the samples had
    extra["sample_index"], extra["finished"], extra["source"] = DATASET_INDEX, True, DATASET
    if "token_ids" in extra.columns:
        extra["token_ids"] = pd.Series([None], index=extra.index, dtype=object)
    return pd.concat([group, extra], ignore_index=True)


PROMPT_COLUMNS = ("prompt_id", "prompt", "system", "task", "answer")  # copied into a pair from its prompt's rows
PAIR_COLUMNS = [*PROMPT_COLUMNS, "chosen", "rejected", "chosen_score", "rejected_score", "chosen_index", "rejected_index",
                "chosen_win_prob", "rejected_win_prob", "prob_matrix", "chosen_finished", "rejected_finished",
                "chosen_token_ids", "rejected_token_ids", "chosen_source", "rejected_source"]


@dataclass(frozen=True)
class PairSide:
    """One side of a pair: the text, the ids it was sampled as (None: not sampled), its `sample_index`
    (NOT_A_SAMPLE for the dataset's response or a refinement), whether it finished, where it came from
    (SAMPLE, DATASET, REFINEMENT), and what the judge made of it."""

    text: str
    token_ids: list[int] | None
    index: int
    finished: bool
    source: str
    score: float = math.nan
    win_prob: float = math.nan


def sample_side(sample, score: float = math.nan, win_prob: float = math.nan, source: str | None = None) -> PairSide:
    """A generations row (one of the round's samples, or the dataset's response added as a candidate) as a side."""
    return PairSide(sample.response, _token_ids(sample), int(sample.sample_index), bool(sample.finished),
                    sample.source if source is None else source, score, win_prob)


def pair_row(prompt_row, columns, chosen: PairSide, rejected: PairSide, prob_matrix: list | None = None) -> dict:
    """One row of pairs.parquet (PAIR_COLUMNS): the prompt's columns (from `prompt_row`, those of `columns` there are) and the two sides."""
    return {
        **{k: prompt_row.get(k) for k in PROMPT_COLUMNS if k in columns},
        "chosen": chosen.text, "rejected": rejected.text,
        "chosen_token_ids": chosen.token_ids, "rejected_token_ids": rejected.token_ids,
        "chosen_score": chosen.score, "rejected_score": rejected.score,
        "chosen_index": chosen.index, "rejected_index": rejected.index,
        "chosen_win_prob": chosen.win_prob, "rejected_win_prob": rejected.win_prob, "prob_matrix": prob_matrix,
        "chosen_finished": chosen.finished, "rejected_finished": rejected.finished,
        "chosen_source": chosen.source, "rejected_source": rejected.source,
    }


def pair_round(recipe, generations, round_idx: int, judge=None, refiner=None) -> tuple["pd.DataFrame", dict]:
    """Preference pairs of one round, with stats of what was skipped and why.

    SPIN: chosen = the dataset's ground truth, rejected = the model's own sample (Chen et al. 2024;
    spin_pairs). SPPO / DPO / INPO / DNO (judged_pairs): the judge's K x K matrix per prompt; chosen = best,
    rejected = worst (see select_pair); the scores are the mean win probabilities (SPPO, DNO) or the judge's
    scores (DPO, INPO); the full matrix is kept in `prob_matrix` for the drift analysis. With `judge.add_reference`
    the dataset's response is judged as one more candidate (DNO's gold answer; its index is -1), and
    with `judge.min_margin` > 0 a pair is kept only when chosen's score exceeds rejected's by more
    than that (DNO's large-margin filter; counted in `skipped_small_margin`). With a `refiner`
    (judge.refine), a prompt whose best sample fails the judge gets SPaR-style refinement pairs
    (refinement_pairs). `chosen_source` and `rejected_source` say where each side came from: `sample`,
    `dataset` or `refinement`. Every row is made by pair_row.

    Samples cut at max_new_tokens (`finished` false in the generations) follow `judge.unfinished`:
    keep = pair them like any other; drop = never pair them (a prompt left with fewer than two, or for
    SPIN an unfinished sample, is skipped); penalize = they lose to every finished sample, so one can
    be rejected but never chosen (a chosen response cut mid-sentence, then closed with the end-of-turn
    token in training, would teach the model to stop anywhere). For SPIN, whose chosen side is always
    the ground truth, penalize pairs them as keep does. The stats count unfinished samples, prompts
    skipped for them and pairs whose rejected side is one.
    """
    import pandas as pd

    if "finished" not in generations.columns:  # generations written before `finished` was recorded
        generations = generations.assign(finished=True)
    generations = generations.assign(finished=generations.finished.fillna(True).astype(bool))
    grouped = [(pid, g.sort_values("sample_index")) for pid, g in generations.groupby("prompt_id", sort=False)]
    stats = {"prompts": len(grouped), "pairs": 0, "skipped_ties": 0, "skipped_identical": 0, "unparsed_judgements": 0,
             "reprompted_judgements": 0, "unfinished_samples": int((~generations.finished).sum()), "skipped_unfinished": 0, "pairs_rejected_unfinished": 0}
    if recipe.algorithm == "spin":
        rows = spin_pairs(recipe, grouped, stats)
    else:
        rows = judged_pairs(recipe, grouped, stats, judge, refiner)
    stats["pairs"] = len(rows)
    stats["pairs_rejected_unfinished"] = sum(not row["rejected_finished"] for row in rows)
    frame = pd.DataFrame(rows, columns=PAIR_COLUMNS)
    frame = frame.assign(round=round_idx, judge=recipe.judge.name)
    return frame, stats


def spin_pairs(recipe, grouped: list, stats: dict) -> list[dict]:
    """SPIN's pairs (Chen et al. 2024): the dataset's ground truth against the prompt's first sample, where they differ."""
    from data.prompts import clean_response

    rows = []
    for _pid, group in grouped:
        first = group.iloc[0]
        if recipe.judge.unfinished == "drop" and not first.finished:
            stats["skipped_unfinished"] += 1
            continue
        reference = clean_response(first.reference)  # the same normalisation as the sample had
        if _same_text(reference, first.response):
            if not recipe.judge.keep_identical:
                stats["skipped_identical"] += 1
                continue
            stats["pairs_identical"] = stats.get("pairs_identical", 0) + 1
        ground_truth = PairSide(reference, None, NOT_A_SAMPLE, True, DATASET)
        rows.append(pair_row(first, group.columns, ground_truth, sample_side(first, source=SAMPLE)))
    return rows


def _judged_groups(recipe, grouped: list, stats: dict) -> list:
    """The candidates each prompt's judge sees: its samples (unfinished ones left out under judge.unfinished drop)
    and, with judge.add_reference, the dataset's response; prompts left with fewer than two are counted and dropped."""
    drop = recipe.judge.unfinished == "drop"
    grouped = [(pid, g.assign(source=SAMPLE)) for pid, g in grouped]
    if drop:
        grouped = [(pid, g[g.finished]) for pid, g in grouped]
    if recipe.judge.add_reference:
        grouped = [(pid, _with_dataset_response(g)) for pid, g in grouped]
    if drop:
        stats["skipped_unfinished"] += sum(len(g) < 2 for _pid, g in grouped)
        grouped = [(pid, g) for pid, g in grouped if len(g) >= 2]
    return grouped


def judged_pairs(recipe, grouped: list, stats: dict, judge, refiner=None) -> list[dict]:
    """The judged algorithms' pairs: each prompt's candidates judged together, best against worst (judged_pair),
    a refinement pair in place of a prompt's pair where its best sample fails (refinement_pairs)."""
    if recipe.judge.min_margin:
        stats["skipped_small_margin"] = 0
    grouped = _judged_groups(recipe, grouped, stats)
    groups = [
        JudgeGroup(
            prompt=g.prompt.iloc[0], responses=g.response.tolist(), system=_first(g, "system"),
            reference=_first(g, "reference"), task=_first(g, "task"), answer=_first(g, "answer"),
            row=row_of(_first(g, "source_row")),
        )
        for _pid, g in grouped
    ]
    results = judge.judge(groups) if groups else []
    by_prompt: dict = {}  # prompt_id -> its pair, in prompt order
    to_refine = []  # (prompt_id, group, index of the sample to refine, its score)
    for (pid, group), result in zip(grouped, results):
        stats["unparsed_judgements"] += result.unparsed
        stats["reprompted_judgements"] += result.reprompted
        if refiner is not None:
            failing = failing_best(result, group.response.tolist(), recipe.pass_score)
            if failing is not None:
                to_refine.append((pid, group, failing, float(result.scores[failing])))
        row = judged_pair(recipe, group, result, stats)
        if row is not None:
            by_prompt[pid] = row
    if refiner is not None:
        refined = refinement_pairs(recipe, to_refine, judge, refiner, stats)
        by_prompt.update(refined)  # a refinement pair replaces the pair of two failing samples
    rows = [by_prompt[pid] for pid, _group in grouped if pid in by_prompt]
    if recipe.judge.add_reference:
        stats["pairs_chosen_dataset"] = sum(row["chosen_source"] == DATASET for row in rows)
        stats["pairs_rejected_dataset"] = sum(row["rejected_source"] == DATASET for row in rows)
    return rows


def judged_pair(recipe, group, result: JudgeResult, stats: dict) -> dict | None:
    """One prompt's pair from its judgement: the best candidate against the worst (select_pair), or None with the
    reason counted in `stats` (ties, empty or unfinished candidates, the same text, too small a margin)."""
    finished = group.finished.tolist()
    penalize = recipe.judge.unfinished == "penalize" and not all(finished)
    if penalize:
        result = penalize_unfinished(result, finished)
    # An empty response is never chosen, whatever its score: the pair would teach the model to stop
    # at once (and pairs.parquet refuses an empty chosen side). It is rejected where it ranks lowest.
    nonempty = [bool(r.strip()) for r in group.response]
    choosable = [full and (done or not penalize) for full, done in zip(nonempty, finished)]
    picked = select_pair(result, recipe.algorithm, group.response.tolist(), finished if penalize else None, nonempty)
    if picked is None:
        if penalize and not any(finished):
            stats["skipped_unfinished"] += 1
        elif not any(choosable):  # the samples it could choose from were empty
            stats["skipped_empty"] = stats.get("skipped_empty", 0) + 1
        else:
            stats["skipped_ties"] += 1
        return None
    best, worst = picked
    chosen, rejected = group.iloc[best], group.iloc[worst]
    if _same_text(chosen.response, rejected.response):
        stats["skipped_identical"] += 1
        return None
    win, score = result.win_probs, ranking_scores(result, recipe.algorithm)
    # DNO's large-margin filter (Rosset et al. 2024, Algorithm 2, "filter and construct preference
    # pairs"): a pair whose judge barely prefers one side teaches noise. The margin is taken on what
    # the pair was ranked by (win rates for SPPO and DNO, the judge's scores otherwise).
    if recipe.judge.min_margin and not score[best] - score[worst] > recipe.judge.min_margin:
        stats["skipped_small_margin"] += 1
        return None
    return pair_row(chosen, group.columns, sample_side(chosen, float(score[best]), float(win[best])),
                    sample_side(rejected, float(score[worst]), float(win[worst])), result.prob_matrix.tolist())


# --- SPaR-style refinement pairs ------------------------------------------------------------------

# The refinement prompt when the recipe names none (judge.refine_prompt): SPaR refines a response "while
# minimizing unnecessary variations", so the pair differs where the instruction was missed and little else.
REFINE_PROMPT = """Here is a question and an answer to it that is wrong or does not do what the question asks.

Question: {prompt}

Answer: {response}

Write the corrected answer. Change only what is needed to make it right and keep the rest as it is. Reply with the corrected answer alone."""


def failing_best(result: JudgeResult, responses: list[str], pass_score: float) -> int | None:
    """Index of the prompt's best non-empty sample when even it fails the judge (its score is below
    `pass_score`), the most sampled one among equals; None when some sample passes or none was scored."""
    scores = result.scores
    usable = [i for i, r in enumerate(responses) if r.strip() and not math.isnan(scores[i])]
    if not usable:
        return None
    top = max(scores[i] for i in usable)
    if top >= pass_score:
        return None
    counts = Counter(_normalized(r) for r in responses)
    return max((i for i in usable if scores[i] == top), key=lambda i: counts[_normalized(responses[i])])


@dataclass
class Refiner:
    """The round's generator (pi_{r-1}) rewriting its own failed answers with the recipe's refinement
    prompt: `samples` refinements of each, sampled like the round's generations. STaR's rationalization
    (models/judge/self_training.py) samples through `sample` with its hint template."""

    model: object
    tokenizer: object
    template: str
    samples: int
    settings: object  # models.generate.generation.SamplingSettings, num_samples aside
    desc: str = "refine"

    def refine(self, requests: list[tuple[str, str | None, str]]) -> list[list]:
        """For each (prompt, system, response), `samples` models.generate.generation.Sample's."""
        return self.sample([(self.template.format(prompt=p, response=r), system) for p, system, r in requests])

    def sample(self, requests: list[tuple[str, str | None]]) -> list[list]:
        """For each (request text, system), `samples` models.generate.generation.Sample's of the model's answer to it."""
        import dataclasses

        from data.prompts import format_prompt
        from models.generate.generation import generate_texts

        texts = [format_prompt(self.tokenizer, text, system) for text, system in requests]
        settings = dataclasses.replace(self.settings, num_samples=self.samples)
        return generate_texts(self.model, self.tokenizer, texts, settings, self.desc)


REFINE_SEED_OFFSET = 99_991  # the refiner's seed: shard_seed(seed, round, this + judge shard), far from generation parts' indices
RATIONALIZE_SEED_OFFSET = 99_989  # the same for STaR's rationalizer (models/judge/self_training.py)


def rewrite_settings(recipe, round_idx: int, salt: int):
    """How a round's generator samples a rewrite (a refinement, a rationalization): as generation.* says, with a
    seed of its own (vLLM serves paths, not loaded models: rewrites use transformers' generate then)."""
    from models.generate.generation import SamplingSettings, shard_seed

    gen = recipe.generation
    return SamplingSettings(temperature=gen.temperature, top_p=gen.top_p, max_new_tokens=gen.max_new_tokens,
                            batch_size=gen.batch_size, seed=shard_seed(recipe.seed, round_idx, salt),
                            backend="hf" if gen.backend == "vllm" else gen.backend)


def make_refiner(recipe, model, tokenizer, round_idx: int, shard_idx: int = 0) -> Refiner:
    """The refiner of a round's judge shard `shard_idx`: `model` is the round's generator. Each judge shard
    samples from a seed of its own, so shards do not draw the same random numbers."""
    return Refiner(model, tokenizer, recipe.judge.refine_prompt or REFINE_PROMPT, recipe.judge.refine_samples,
                   rewrite_settings(recipe, round_idx, REFINE_SEED_OFFSET + shard_idx))


def refinement_pairs(recipe, to_refine: list, judge, refiner, stats: dict) -> dict:
    """SPaR-style pairs (Cheng et al. 2024, arXiv:2412.11605, Fig. 2 and its method: the refiner rewrites
    a response that fails the judge, and (x, y_refined > y_negative) trains the actor with DPO; the sides
    differ where the instruction was missed, not in wording that does not matter).

    For each (prompt_id, samples, index of its best failing sample, its score): `refiner` writes
    judge.refine_samples refinements of that sample, `judge` scores them, and the best passing one
    (score >= pass_score; finished, unless judge.unfinished is keep; not the same text) becomes chosen
    against the original, ties going to the refinement closest to the original (fewest changes). Our
    reading of the paper, simplified: one level of refinements sampled in parallel stands in for its tree
    search (a failed refinement is not refined again), the refiner is the round's generator itself (the
    paper also trains a separate refiner), the refinement prompt holds no judge's critique (a verifier
    has none to give), and only prompts where no sample passes are refined (the paper refines its
    negative responses; where a sample passes, best vs worst already makes a pair). Counts refinements_tried (prompts refined), refinements_passed (pairs
    made) and refinement_samples into `stats`; returns {prompt_id: pair row}.
    With `judge.min_margin`, a refinement pair too is kept only when the rewrite's score exceeds the
    original's by more than it (counted in refinements_small_margin; the prompt keeps its samples' pair).
    """
    import difflib

    min_margin = recipe.judge.min_margin
    stats.update(refinements_tried=len(to_refine), refinements_passed=0, refinement_samples=0)
    if min_margin:
        stats["refinements_small_margin"] = 0
    if not to_refine:
        return {}
    requests = [(g.prompt.iloc[0], _first(g, "system"), g.response.iloc[i]) for _pid, g, i, _score in to_refine]
    refinements = refiner.refine(requests)
    stats["refinement_samples"] = sum(len(r) for r in refinements)
    groups = [
        JudgeGroup(prompt=g.prompt.iloc[0], responses=[sample.text for sample in samples], system=_first(g, "system"),
                   reference=_first(g, "reference"), task=_first(g, "task"), answer=_first(g, "answer"),
                   row=row_of(_first(g, "source_row")))
        for (_pid, g, _i, _score), samples in zip(to_refine, refinements)
    ]
    results = judge.judge(groups)
    pairs = {}
    for (pid, group, index, original_score), samples, result in zip(to_refine, refinements, results):
        stats["unparsed_judgements"] += result.unparsed
        stats["reprompted_judgements"] += result.reprompted
        original = group.iloc[index]
        passing = [
            k for k, sample in enumerate(samples)
            if sample.text.strip() and not math.isnan(result.scores[k]) and result.scores[k] >= recipe.pass_score
            and (sample.finished or recipe.judge.unfinished == "keep") and not _same_text(sample.text, original.response)
        ]
        if not passing:
            continue
        closeness = lambda k: difflib.SequenceMatcher(None, samples[k].text, original.response).ratio()  # noqa: E731
        best = max(passing, key=lambda k: (result.scores[k], closeness(k)))
        if min_margin and not result.scores[best] - original_score > min_margin:
            stats["refinements_small_margin"] += 1
            continue
        refined = samples[best]
        refinement = PairSide(refined.text, list(refined.token_ids), NOT_A_SAMPLE, bool(refined.finished), REFINEMENT,
                              float(result.scores[best]))
        pairs[pid] = pair_row(original, group.columns, refinement, sample_side(original, original_score))
    stats["refinements_passed"] = len(pairs)
    return pairs

"""The Evaluate stage: how round r's model compares with round r-1 and the base on held-out prompts.

    eval_frame, metrics = evaluate_round(recipe, round_idx, model_path, base_path, prompts, previous, base)

Round 0 evaluates the base model and fixes the held-out pairs (ground truth vs the base's own sample)
that every later round scores. Figures, all on prompts no round trains on:

- accuracy: the mean score of greedy responses by `judge.verifier` (`exact` when unset; the fraction
  right for a right/wrong verifier), wherever it can score the prompts (per task kind too);
- win_rate_vs_previous / win_rate_vs_base: greedy response of round r against that of round r-1 /
  the base, by the evaluation judge (both orders for pairwise judges; ties count one half). The
  self-judge is the *base* model here, a fixed referee, not the model being graded; per task kind too;
  beside each, `_lc`: the length-controlled rate (AlpacaEval 2's, data/comparisons.py) and both sides'
  mean length in characters; where the training judge is not this referee (evaluation.judge,
  evaluation.judge_model; models/evaluate/referee.py), its own `train_judge_win_rate_vs_*` and its agreement
  with the referee (`judge_agreement_vs_*`, `judge_kappa_vs_*`);
- length: mean, median and 90th percentile of response tokens;
- distinct_1 / distinct_2: unique n-grams over all n-grams of the samples (diversity, collapse);
- kl_vs_base: Monte-Carlo KL(pi_r || pi_base) = mean over samples y ~ pi_r of log pi_r(y) - log pi_base(y),
  y being the sampled token ids themselves (`token_ids`), not a re-tokenisation of the decoded text;
- implicit_reward_accuracy / margin: on the held-out pairs, r(y) = beta (log pi_r(y) - log pi_{r-1}(y))
  (DPO's implicit reward, Rafailov et al. 2023, Eq. 5): how often r(chosen) > r(rejected), and by how much;
- gt_logprob: the mean per-token log-likelihood of each prompt's ground-truth response under the round's
  policy (`ground_truth_logprobs`), a figure no judge enters; `gt_logprob_change` pairs it with the base's.

Each mean over prompts comes with its standard error (`<figure>_se`, the sample standard deviation over
sqrt(n)) and its n (`prompts`, `implicit_reward_pairs`): a change of one or two standard errors between
rounds is noise. KL's standard error is taken over per-prompt means, since a prompt's samples are not
independent of each other.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from data.prompts import clean_response, format_completion, format_prompt
from data.schema import token_ids_or_none
from data.stats import mean_se
from models.logps import Encoded, batched_logps, encode, encode_pair

log = logging.getLogger("selfplay")
EVAL_MAX_LENGTH = 2048


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct-n (Li et al. 2016): unique word n-grams / all word n-grams across `texts`."""
    grams = [tuple(words[i : i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def implicit_reward_stats(
    chosen_logp: np.ndarray, chosen_prev: np.ndarray, rejected_logp: np.ndarray, rejected_prev: np.ndarray, beta: float
) -> dict[str, float]:
    """Accuracy and mean margin, each with its standard error, of r(y) = beta * (log pi_r(y) - log pi_{r-1}(y))
    on held-out pairs."""
    chosen_reward = beta * (np.asarray(chosen_logp) - np.asarray(chosen_prev))
    rejected_reward = beta * (np.asarray(rejected_logp) - np.asarray(rejected_prev))
    accuracy, accuracy_se = mean_se(chosen_reward > rejected_reward)
    margin, margin_se = mean_se(chosen_reward - rejected_reward)
    return {"implicit_reward_accuracy": accuracy, "implicit_reward_accuracy_se": accuracy_se,
            "implicit_reward_margin": margin, "implicit_reward_margin_se": margin_se,
            "implicit_reward_pairs": int(len(chosen_reward))}


def judge_pairs(judge, prompts: pd.DataFrame, ours: list[str], theirs: list[str]) -> list:
    """The judge's result (models.judge.judges.JudgeResult) for each prompt's (ours, theirs)."""
    from models.judge.judge_types import JudgeGroup, row_of

    groups = [
        JudgeGroup(prompt=row["prompt"], responses=[a, b], system=row.get("system"), reference=row.get("reference"),
                   task=row.get("task"), answer=row.get("answer"), row=row_of(row.get("source_row")))
        for row, a, b in zip(prompts.to_dict("records"), ours, theirs)
    ]
    return judge.judge(groups)


def win_probs(judge, prompts: pd.DataFrame, ours: list[str], theirs: list[str]) -> np.ndarray:
    """P(ours beats theirs) per prompt by `judge` (a models.judge.judges judge)."""
    return np.array([result.prob_matrix[0, 1] for result in judge_pairs(judge, prompts, ours, theirs)])


def win_rate(judge, prompts: pd.DataFrame, ours: list[str], theirs: list[str]) -> tuple[float, float]:
    """(mean, standard error) over prompts of P(ours beats theirs) by `judge` (a models.judge.judges judge)."""
    return mean_se(win_probs(judge, prompts, ours, theirs))


def eval_judge_name(recipe, prompts: pd.DataFrame) -> str | None:
    """The judge of the win rates: `evaluation.judge`, or for `auto` the recipe's judge, or (SPIN) the
    verifier when it can score these prompts."""
    from models.judge.verifiers import can_verify, load_verifier

    name = recipe.evaluation.judge
    if name == "auto":
        verifiable = can_verify(load_verifier(recipe.judge.verifier), prompts)
        name = recipe.judge.name if recipe.judge.name != "ground_truth" else ("verifier" if verifiable else "none")
    return None if name == "none" else name


def encode_eval_rows(tokenizer, frame: pd.DataFrame, prompts_by_id: pd.DataFrame) -> list[Encoded]:
    """What each eval row's log-prob is taken of.

    Generated rows (greedy, sample): the prompt's ids followed by the sampled token ids themselves, so
    the KL estimate scores exactly the y ~ pi_r that was drawn. Re-tokenising the decoded, stripped
    text would score another sequence: whitespace gone, the ending EOS replaced by the template's
    end-of-turn text, and a different split into tokens where the sample's was not canonical.
    Held-out pairs: the reference and the base's sample as text, one prompt cut for both (encode_pair).
    """
    items: list[Encoded | None] = [None] * len(frame)
    pair_rows: dict[str, dict[str, int]] = {}
    prompt_ids: dict[str, list[int]] = {}
    rows = frame.reset_index(drop=True).to_dict("records")
    def prompt_of(prompt_id) -> tuple[str, str | None]:
        row = prompts_by_id.loc[prompt_id]
        system = row.get("system")
        return row["prompt"], system if isinstance(system, str) else None

    for i, row in enumerate(rows):
        prompt, system = prompt_of(row["prompt_id"])
        sampled = token_ids_or_none(row.get("token_ids"))  # None: pair rows, frames written before them
        if row["kind"].startswith("pair_"):
            pair_rows.setdefault(row["prompt_id"], {})[row["kind"]] = i
        elif sampled is not None:
            if row["prompt_id"] not in prompt_ids:
                prompt_ids[row["prompt_id"]] = tokenizer(format_prompt(tokenizer, prompt, system), add_special_tokens=False).input_ids
            items[i] = Encoded(prompt_ids[row["prompt_id"]], sampled)
        else:
            completion = format_completion(tokenizer, prompt, row["response"], system)
            items[i] = encode(tokenizer, format_prompt(tokenizer, prompt, system), completion, EVAL_MAX_LENGTH)
    for pid, kinds in pair_rows.items():
        chosen_i, rejected_i = kinds["pair_chosen"], kinds["pair_rejected"]
        items[chosen_i], items[rejected_i] = encode_held_out_pair(tokenizer, *prompt_of(pid), rows[chosen_i]["response"],
                                                                  rows[rejected_i]["response"])
    return items


def encode_held_out_pair(tokenizer, prompt: str, system: str | None, chosen: str, rejected: str) -> tuple[Encoded, Encoded]:
    """A held-out pair's sides as text after the chat-formatted prompt, one prompt cut for both (encode_pair)."""
    chosen, rejected = (format_completion(tokenizer, prompt, text, system) for text in (chosen, rejected))
    return encode_pair(tokenizer, format_prompt(tokenizer, prompt, system), chosen, rejected, EVAL_MAX_LENGTH)


def held_out_pair(reference, sample_text: str) -> tuple[str, str] | None:
    """The held-out pair round 0 fixes for a prompt: (its ground truth, the base's first sample) as text, or None
    without a ground truth or where the sample says the same (whitespace aside)."""
    if not isinstance(reference, str) or " ".join(reference.split()) == " ".join(sample_text.split()):
        return None
    return clean_response(reference), sample_text


def eval_judge_detail(recipe, judge_name: str | None) -> str | None:
    """What stands behind the evaluation judge: the verifier, the judge model, or the self-judge's referee."""
    if judge_name == "verifier":
        return recipe.judge.verifier or "exact"
    referee = recipe.evaluation.judge_model  # a referee's own model, apart from the training judge's
    if judge_name in ("pairrm", "reward_model"):
        return referee or recipe.judge.model
    if judge_name == "self":
        return f"{referee or 'the base model'} as referee, {recipe.judge.self_mode}"
    return None


def fixed_pairs(base: pd.DataFrame, prompts: pd.DataFrame) -> pd.DataFrame:
    """The held-out pair rows round 0 fixed (`base`, its eval frame) for these prompts, as written there."""
    return base[base.kind.isin(["pair_chosen", "pair_rejected"]) & base.prompt_id.isin(prompts.prompt_id)]


def pair_continuations(tokenizer, prompts: pd.DataFrame, prompt_ids: list[list[int]], base: pd.DataFrame | None):
    """(for each prompt, the completion ids of its fixed held-out pair's sides; and where each side sits in
    them: {(prompt_id, kind): (prompt index, position)}), to score them on the generation's own run of the
    prompt (models.generate.generation.generate_and_score). Round 0 has none fixed yet (its rejected side is the
    sample being drawn), and a side whose prompt encode_pair had to cut is left to the log-prob pass."""
    continuations: list[list[list[int]]] = [[] for _ in prompt_ids]
    slots: dict[tuple, tuple[int, int]] = {}
    if base is None:
        return continuations, slots
    pairs = fixed_pairs(base, prompts).reset_index(drop=True)
    position = {prompt_id: i for i, prompt_id in enumerate(prompts.prompt_id)}
    for row, item in zip(pairs.to_dict("records"), encode_eval_rows(tokenizer, pairs, prompts.set_index("prompt_id"))):
        i = position[row["prompt_id"]]
        if item.prompt_ids == prompt_ids[i]:
            slots[(row["prompt_id"], row["kind"])] = (i, len(continuations[i]))
            continuations[i].append(item.completion_ids)
    return continuations, slots


def round0_pairs(tokenizer, prompts: pd.DataFrame, prompt_ids: list[list[int]]):
    """Round 0's held-out pairs, (ground truth, the first KL sample), to score on the generation's run of their
    prompt once the sample is decoded: `later` for generate_and_score (for prompt p and its answers, the pair
    sides' completion ids as encode_eval_rows encodes them, where their prompt is the generation's own), and
    what it asked, {(prompt_id, kind): (completion ids, place among p's later continuations)}."""
    asked: dict[tuple, tuple[list[int], int]] = {}
    references = prompts["reference"].tolist() if "reference" in prompts else [None] * len(prompts)
    systems = prompts["system"].tolist() if "system" in prompts else [None] * len(prompts)

    def later(p: int, answers: list) -> list[list[int]]:
        pair = held_out_pair(references[p], answers[1].text) if len(answers) > 1 else None
        if pair is None:
            return []
        system = systems[p] if isinstance(systems[p], str) else None
        sides = encode_held_out_pair(tokenizer, prompts.prompt.iloc[p], system, *pair)
        if sides[0].prompt_ids != prompt_ids[p]:  # cut by encode_pair: left to the log-prob pass
            return []
        prompt_id = prompts.prompt_id.iloc[p]
        asked[(prompt_id, "pair_chosen")], asked[(prompt_id, "pair_rejected")] = (sides[0].completion_ids, 0), (sides[1].completion_ids, 1)
        return [side.completion_ids for side in sides]

    return later, asked


def eval_records(prompts: pd.DataFrame, round_idx: int, greedy: list, sampled: list, base: pd.DataFrame | None) -> pd.DataFrame:
    """The eval frame's rows: each prompt's greedy answer and samples (with the log-probs generation summed),
    then the held-out pairs, fixed at round 0 as (ground truth, the base's first sample) and rescored by
    every later round (their `logp` left empty here, for the log-prob pass)."""
    meta_cols = [c for c in ("task", "answer") if c in prompts.columns]
    records = []
    for row, g, samples in zip(prompts.to_dict("records"), greedy, sampled):
        common = {"prompt_id": row["prompt_id"], "prompt": row["prompt"], "round": round_idx, **{c: row[c] for c in meta_cols}}
        records.append({**common, "kind": "greedy", "sample_index": 0, "response": g[0].text, "num_tokens": g[0].num_tokens,
                        "finished": g[0].finished, "token_ids": g[0].token_ids, "logp": g[0].logp})
        records += [{**common, "kind": "sample", "sample_index": k, "response": s.text, "num_tokens": s.num_tokens,
                     "finished": s.finished, "token_ids": s.token_ids, "logp": s.logp} for k, s in enumerate(samples)]
    if base is None:
        refs = prompts.set_index("prompt_id")["reference"] if "reference" in prompts else pd.Series(dtype=object)
        for rec in [r for r in records if r["kind"] == "sample" and r["sample_index"] == 0]:
            pair = held_out_pair(refs.get(rec["prompt_id"]), rec["response"])
            if pair is not None:
                # Pairs are scored as text (both sides the same way), so they carry no sampled ids.
                records.append({**rec, "kind": "pair_chosen", "response": pair[0], "num_tokens": 0,
                                "finished": True, "token_ids": None, "logp": None})
                records.append({**rec, "kind": "pair_rejected", "token_ids": None, "logp": None})
    else:
        pair_rows = fixed_pairs(base, prompts)
        measured = ["logp", "base_logp", "correct", "verifier_score"]  # rescored every round
        records += [{**r, "round": round_idx} for r in pair_rows.drop(columns=measured, errors="ignore").to_dict("records")]
    frame = pd.DataFrame(records)
    frame["logp"] = frame["logp"].astype(float)
    return frame


def eval_seed(seed: int, round_idx: int, shard_idx: int) -> int:
    """The sampling seed of one Evaluate shard: a seed per round and per shard, so that shards do not draw
    the same random numbers for their KL samples (shard 0 keeps the seed of an unsharded evaluation)."""
    return seed + 7919 * (round_idx + 1) + 104_729 * shard_idx


def evaluate_round(recipe, round_idx: int, model_path: str, base_path: str, prompts: pd.DataFrame,
                   previous: pd.DataFrame | None, base: pd.DataFrame | None) -> tuple[pd.DataFrame, dict]:
    """Evaluate the model after `round_idx` rounds; `previous`/`base` are eval frames of round r-1 / 0."""
    frame, judged = evaluate_rows(recipe, round_idx, model_path, base_path, prompts, previous, base)
    return frame, eval_metrics(recipe, round_idx, frame, prompts, previous, judged)


def evaluate_rows(recipe, round_idx: int, model_path: str, base_path: str, prompts: pd.DataFrame,
                  previous: pd.DataFrame | None, base: pd.DataFrame | None,
                  all_prompts: pd.DataFrame | None = None, shard_idx: int = 0) -> tuple[pd.DataFrame, dict]:
    """The eval frame of `prompts` (responses, log-probs, verifier scores) and what the evaluation judge said
    of their greedy responses: {"judge": name, "previous"/"base": P(ours wins) per prompt, "unparsed": n}.
    `all_prompts`: the round's whole held-out set when `prompts` is one shard of it (the Evaluate shard
    tasks), so that what is measured is decided on the whole set, as one unsharded call decides it;
    `shard_idx`: that shard's index, which seeds its sampling (shard 0 samples as an unsharded call).

    Steps: the policy's rows (policy_rows), the verifier's scores, QLoRA's round 0 beside full precision,
    then from round 1 on the same load as the base: the samples' base log-probs (the KL estimate) and the
    judges' comparisons of the greedy answers (judge_greedy)."""
    import torch

    from models.judge.verifiers import can_verify, load_verifier
    from models.load.loading import has_adapter, load_policy, load_tokenizer, set_adapter_enabled

    quantize = recipe.model.quantization == "4bit"
    tokenizer = load_tokenizer(model_path, recipe.model)
    # A round's policy is the base (root) plus its adapter, kept unmerged: exactly the trained model,
    # and with the adapter switched off the same load is the base, so pi_base needs no second load.
    model = load_policy(model_path, recipe.model, quantize=quantize, root=base_path, merge=False)
    device = next(model.parameters()).device
    by_prompt = prompts.set_index("prompt_id")
    frame, items, texts = policy_rows(recipe, round_idx, model, tokenizer, prompts, by_prompt, base, shard_idx)
    row_prompts = by_prompt.loc[frame.prompt_id].reset_index()
    verifier = load_verifier(recipe.judge.verifier)
    whole = prompts if all_prompts is None else all_prompts
    if can_verify(verifier, whole):
        frame["verifier_score"] = score_responses(verifier, row_prompts, frame.response)
        frame["correct"] = frame.verifier_score >= 0.5

    if round_idx == 0 and quantize:  # QLoRA: round 0 is the nf4 base; what the quantisation costs, against full precision
        del model
        full_precision_rows(recipe, base_path, tokenizer, texts, frame, items, verifier if "verifier_score" in frame else None,
                            row_prompts)
    judge_name = eval_judge_name(recipe, whole)
    judged: dict = {"judge": judge_name}
    if round_idx > 0:
        if has_adapter(model):
            # From here on the same load is pi_base: the KL estimate, and the base as the fixed referee.
            set_adapter_enabled(model, False)
            base_model = model
        else:  # a model saved whole (the experiment's supervised control): load the base instead
            del model
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            base_model = load_policy(base_path, recipe.model, quantize=quantize)
        # The samples' ids are the policy tokenizer's; the base's own tokenizer matters only to the self-judge.
        base_tokenizer = load_tokenizer(base_path, recipe.model) if judge_name == "self" else tokenizer
        # The very token sequences pi_r sampled, scored under the base: one Monte-Carlo term each.
        sample_index = frame.index[frame.kind == "sample"]
        frame.loc[sample_index, "base_logp"] = batched_logps(base_model, base_tokenizer, [items[i] for i in sample_index],
                                                             recipe.generation.batch_size, device, "eval base logps")[0]
        if judge_name:
            judged |= judge_greedy(recipe, round_idx, judge_name, model_path, frame, by_prompt, {"previous": previous, "base": base},
                                   base_model, base_tokenizer, whole)
    return frame, judged


def policy_rows(recipe, round_idx: int, model, tokenizer, prompts: pd.DataFrame, by_prompt: pd.DataFrame,
                base: pd.DataFrame | None, shard_idx: int) -> tuple[pd.DataFrame, list[Encoded], list[str]]:
    """The policy's part of the eval frame: each prompt's greedy answer and KL samples, each row's log-prob under
    the policy, the ground truth's log-likelihood; with each row's encoding and the prompts' chat texts.
    `by_prompt`: `prompts` indexed by prompt_id."""
    from models.generate.generation import generate_and_score
    from models.generate.sampling import SamplingSettings
    from models.load.loading import adapter_merged

    ev, gen = recipe.evaluation, recipe.generation
    batch, device = gen.batch_size, next(model.parameters()).device
    texts = [format_prompt(tokenizer, p, s) for p, s in zip(prompts.prompt, prompts.system)]
    # The policy's work with the adapter folded in (fp32 only): an unmerged LoRA layer runs three matmuls,
    # which at decoding's small batches made Evaluate slower per token than Generate (bench/README.md).
    # On a CPU the static backend's packed weights fold it themselves (models/packing.py): folding in place
    # wrote every root weight, and the first write to each page of the memory-mapped file copies it.
    # Each prompt's greedy answer and its KL samples are decoded together (greedy_samples: one prefill of the
    # prompt, one batch), and each answer's log-prob under the policy is summed while it is generated, from
    # the logits the decoding computes anyway. The held-out pairs fixed at round 0 are scored on the same
    # prefill's run of their prompt (the static backend; generate_and_score), so no prompt runs twice under the
    # policy: round 0's pairs, whose rejected side is the first KL sample, are scored on that run once decoded.
    prompt_ids = [tokenizer(text, add_special_tokens=False).input_ids for text in texts]
    continuations, slots = pair_continuations(tokenizer, prompts, prompt_ids, base)
    # Each prompt's ground truth rides the same prefill (gt_logprob).
    gt_items = ground_truth_items(tokenizer, prompts)
    gt_slots = {}
    for i, item in enumerate(gt_items):
        if item is not None and item.prompt_ids == prompt_ids[i]:
            gt_slots[i] = len(continuations[i])
            continuations[i].append(item.completion_ids)
    later, later_ids = (None, {}) if base is not None else round0_pairs(tokenizer, prompts, prompt_ids)
    with adapter_merged(model, packed=gen.backend == "static"):
        answers, pair_scores = generate_and_score(model, tokenizer, texts, SamplingSettings(
            num_samples=1 + ev.kl_samples, greedy_samples=1, temperature=1.0, max_new_tokens=ev.max_new_tokens,
            batch_size=batch, seed=eval_seed(recipe.seed, round_idx, shard_idx), backend=gen.backend, logps=True),
            continuations, f"eval r{round_idx}", later)
        frame = eval_records(prompts, round_idx, [a[:1] for a in answers], [a[1:] for a in answers], base)
        items = encode_eval_rows(tokenizer, frame, by_prompt)
        position = {prompt_id: i for i, prompt_id in enumerate(prompts.prompt_id)}
        for row, (prompt_id, kind) in enumerate(zip(frame.prompt_id, frame.kind)):
            if (prompt_id, kind) in slots:
                i, j = slots[(prompt_id, kind)]
                frame.loc[row, "logp"] = pair_scores[i][j]
            elif (prompt_id, kind) in later_ids and later_ids[(prompt_id, kind)][0] == items[row].completion_ids:
                i = position[prompt_id]
                frame.loc[row, "logp"] = pair_scores[i][len(continuations[i]) + later_ids[(prompt_id, kind)][1]]
        unscored = frame.index[frame.logp.isna()]
        if len(unscored):
            frame.loc[unscored, "logp"] = batched_logps(model, tokenizer, [items[i] for i in unscored], batch, device, "eval logps")[0]
        gt = ground_truth_logprobs(model, tokenizer, prompts, batch, device, gt_items,
                                   {i: pair_scores[i][j] for i, j in gt_slots.items()})
    greedy_index = frame.index[frame.kind == "greedy"]
    frame.loc[greedy_index, "gt_logprob"] = gt.gt_logprob.reindex(frame.prompt_id[greedy_index]).to_numpy()
    return frame, items, texts


def judge_greedy(recipe, round_idx: int, judge_name: str, model_path: str, frame: pd.DataFrame, by_prompt: pd.DataFrame,
                 others: dict[str, pd.DataFrame], base_model, base_tokenizer, whole: pd.DataFrame) -> dict:
    """The greedy answers of `frame` against those of each of `others` (label -> eval frame: the previous round,
    the base), by the referee `judge_name` (eval_judge_name), which reports the win rates, and by a training judge apart from
    it on the same comparisons, for their agreement (models/evaluate/referee.py); the lengths feed the
    length-controlled rates."""
    from models.evaluate.referee import make_referee, make_training_judge, training_judge_detail

    greedy_rows = frame[frame.kind == "greedy"].reset_index(drop=True)
    ours = greedy_rows.response.tolist()
    greedy_prompts = by_prompt.loc[greedy_rows.prompt_id].reset_index()
    theirs = {label: other[other.kind == "greedy"].set_index("prompt_id").response.loc[greedy_rows.prompt_id].tolist()
              for label, other in others.items()}
    judged = judge_comparisons(make_referee(judge_name, recipe, base_model, base_tokenizer), greedy_prompts, ours, theirs)
    judged |= {"ours_chars": [len(text) for text in ours]}
    judged |= {f"{label}_chars": [len(text) for text in texts] for label, texts in theirs.items()}
    training_judge = make_training_judge(recipe, round_idx, judge_name, model_path, base_model, base_tokenizer, whole)
    if training_judge is not None:
        judged |= {"train_judge": recipe.judge.name, "train_judge_detail": training_judge_detail(recipe, round_idx)}
        judged |= {f"train_{key}": value for key, value in judge_comparisons(training_judge, greedy_prompts, ours, theirs).items()}
    return judged


def full_precision_rows(recipe, base_path: str, tokenizer, texts: list[str], frame: pd.DataFrame, items: list[Encoded], verifier,
                        row_prompts: pd.DataFrame) -> None:
    """QLoRA's round 0 is the base quantised to nf4, and every round's policy sits on those weights: what the
    quantisation alone costs is measured against the same base in full precision (base_model/ loaded without
    quantisation, in model.precision). Adds to `frame`: `fp_logp` on the sample rows (each sample of the nf4
    base scored under the full-precision base: KL(nf4 || full precision) by Monte Carlo, as kl_vs_base), and on
    the greedy rows `fp_response` and `fp_num_tokens` (the full-precision base's greedy answer) and, with a
    verifier, `fp_verifier_score`, for its accuracy beside the nf4 base's on the same prompts."""
    from models.generate.generation import generate_texts
    from models.load.loading import load_policy
    from models.generate.sampling import SamplingSettings

    ev, gen = recipe.evaluation, recipe.generation
    model = load_policy(base_path, recipe.model, quantize=False)
    device = next(model.parameters()).device
    answers = generate_texts(model, tokenizer, texts, SamplingSettings(
        temperature=0.0, max_new_tokens=ev.max_new_tokens, batch_size=gen.batch_size, backend=gen.backend), "eval full precision")
    greedy, samples = frame.index[frame.kind == "greedy"], frame.index[frame.kind == "sample"]  # greedy rows in prompt order
    frame.loc[greedy, "fp_response"] = [a[0].text for a in answers]
    frame.loc[greedy, "fp_num_tokens"] = [a[0].num_tokens for a in answers]
    frame.loc[samples, "fp_logp"] = batched_logps(model, tokenizer, [items[i] for i in samples], gen.batch_size, device,
                                                  "eval full-precision logps")[0]
    if verifier is not None:
        frame.loc[greedy, "fp_verifier_score"] = score_responses(verifier, row_prompts.loc[greedy], [a[0].text for a in answers])


def quantization_cost(frame: pd.DataFrame) -> dict:
    """Round 0 of a QLoRA run against the base in full precision (full_precision_rows): KL(nf4 || full precision)
    per answer (± SE over per-prompt means, as kl_vs_base) and per token, the full-precision base's accuracy,
    the paired accuracy change of nf4 (± SE of per-prompt differences), and how many greedy answers are the same."""
    greedy, samples = frame[frame.kind == "greedy"], frame[frame.kind == "sample"]
    log_ratio = samples.logp - samples.fp_logp
    kl, kl_se = mean_se(log_ratio.groupby(samples.prompt_id).mean())
    tokens = sum(len(ids) for ids in samples.token_ids) if "token_ids" in samples else int(samples.num_tokens.sum())
    cost = {"kl_vs_full_precision": kl, "kl_vs_full_precision_se": kl_se, "kl_per_token_vs_full_precision": float(log_ratio.sum()) / max(1, tokens),
            "samples": int(len(samples)), "sample_tokens": int(tokens), "prompts": int(len(greedy)),
            "same_greedy_answers": int((greedy.response == greedy.fp_response).sum())}
    if "fp_verifier_score" in greedy and "verifier_score" in greedy:
        cost["full_precision_accuracy"], cost["full_precision_accuracy_se"] = mean_se(greedy.fp_verifier_score.astype(float))
        cost["accuracy_change"], cost["accuracy_change_se"] = mean_se(greedy.verifier_score.astype(float) - greedy.fp_verifier_score.astype(float))
    return cost


def judge_comparisons(judge, prompts: pd.DataFrame, ours: list[str], theirs: dict[str, list[str]]) -> dict:
    """P(ours beats theirs) per prompt for each comparison in `theirs` ('previous', 'base'), by `judge`, and its
    answers with no verdict in them (`unparsed`: self-judge ties), as Evaluate's judgements record them."""
    judged: dict = {"unparsed": 0}
    for label, other in theirs.items():
        results = judge_pairs(judge, prompts, ours, other)
        judged[label] = [float(result.prob_matrix[0, 1]) for result in results]
        judged["unparsed"] += sum(result.unparsed for result in results)
    return judged


def eval_metrics(recipe, round_idx: int, frame: pd.DataFrame, prompts: pd.DataFrame, previous: pd.DataFrame | None,
                 judged: dict) -> dict:
    """The figures of metrics.json from the eval frame of every held-out prompt and what the judge said
    (evaluate_rows; the shards' frames and judgements put together in order, when sharded)."""
    from data.comparisons import comparison_figures
    from models.judge.verifiers import load_verifier

    verifier = load_verifier(recipe.judge.verifier)
    metrics: dict = {"round": round_idx, "prompts": int(len(prompts))}
    if "verifier_score" in frame:
        metrics["verifier"] = verifier.spec
        if verifier.needs_answer:
            metrics["verifier_answers"] = prompts.attrs.get("answer_from", "answer")
    greedy_rows = frame[frame.kind == "greedy"].reset_index(drop=True)
    sample_rows = frame[frame.kind == "sample"]
    if "verifier_score" in frame:
        # The mean score: the fraction right for a right/wrong verifier, mean partial credit otherwise.
        metrics["accuracy"], metrics["accuracy_se"] = mean_se(greedy_rows.verifier_score)
        if "task" in greedy_rows:
            metrics["accuracy_by_task"] = {k: float(v) for k, v in greedy_rows.groupby("task").verifier_score.mean().items()}
    if "gt_logprob" in greedy_rows and greedy_rows.gt_logprob.notna().any():
        figure = greedy_rows.gt_logprob.dropna()
        metrics["gt_logprob"], metrics["gt_logprob_se"] = mean_se(figure)
        metrics["gt_logprob_prompts"] = int(len(figure))
    metrics.update(
        mean_length=float(greedy_rows.num_tokens.mean()),
        length_p50=float(greedy_rows.num_tokens.median()),
        length_p90=float(greedy_rows.num_tokens.quantile(0.9)),
        distinct_1=distinct_n(sample_rows.response.tolist(), 1),
        distinct_2=distinct_n(sample_rows.response.tolist(), 2),
    )

    judge_name = judged["judge"]
    metrics["eval_judge"] = judge_name
    metrics["eval_judge_detail"] = eval_judge_detail(recipe, judge_name)
    if round_idx > 0:
        log_ratio = frame.loc[sample_rows.index, "logp"] - frame.loc[sample_rows.index, "base_logp"]
        metrics["kl_vs_base"], metrics["kl_vs_base_se"] = mean_se(log_ratio.groupby(sample_rows.prompt_id).mean())
        pairs_now = frame[frame.kind.str.startswith("pair_")].set_index(["prompt_id", "kind"]).logp
        pairs_prev = previous[previous.kind.str.startswith("pair_")].set_index(["prompt_id", "kind"]).logp
        if len(pairs_now):
            chosen_ids = pairs_now.xs("pair_chosen", level="kind").index
            metrics |= implicit_reward_stats(
                pairs_now.xs("pair_chosen", level="kind").loc[chosen_ids].to_numpy(),
                pairs_prev.xs("pair_chosen", level="kind").loc[chosen_ids].to_numpy(),
                pairs_now.xs("pair_rejected", level="kind").loc[chosen_ids].to_numpy(),
                pairs_prev.xs("pair_rejected", level="kind").loc[chosen_ids].to_numpy(),
                recipe.training.beta,
            )
        if judge_name:
            greedy_prompts = prompts.set_index("prompt_id").loc[greedy_rows.prompt_id].reset_index()
            metrics["eval_judge_unparsed"] = judged["unparsed"]
            for label in ("previous", "base"):
                probs = np.array(judged[label])
                metrics[f"win_rate_vs_{label}"], metrics[f"win_rate_vs_{label}_se"] = mean_se(probs)
                if "task" in greedy_prompts:
                    by_task = pd.Series(probs).groupby(greedy_prompts["task"].to_numpy()).mean()
                    metrics[f"win_rate_vs_{label}_by_task"] = {k: float(v) for k, v in by_task.items()}
            # Length-controlled rates and both sides' lengths; a training judge's rates and agreement (data/comparisons.py).
            metrics |= comparison_figures(judged)
    else:
        metrics["kl_vs_base"] = 0.0
        if "fp_logp" in frame:
            metrics["quantization"] = quantization_cost(frame)
    return metrics


def score_responses(verifier, rows: pd.DataFrame, responses) -> list[float]:
    """`verifier`'s score of each response to its row (a prompts frame row: prompt, answer, source_row)."""
    from models.judge.judge_types import row_of

    return [verifier.score(row["prompt"], response, row_of(row.get("source_row")), row.get("answer"))
            for row, response in zip(rows.to_dict("records"), responses)]


def ground_truth_items(tokenizer, prompts: pd.DataFrame) -> list[Encoded | None]:
    """Per prompt, its ground-truth response encoded after its chat-formatted prompt (None without one)."""
    items: list[Encoded | None] = []
    references = prompts["reference"] if "reference" in prompts else pd.Series([None] * len(prompts))
    systems = prompts["system"] if "system" in prompts else pd.Series([None] * len(prompts))
    for prompt, reference, system in zip(prompts.prompt, references, systems):
        system = system if isinstance(system, str) else None
        items.append(None if not isinstance(reference, str) else encode(
            tokenizer, format_prompt(tokenizer, prompt, system),
            format_completion(tokenizer, prompt, clean_response(reference), system), EVAL_MAX_LENGTH))
    return items


def ground_truth_logprobs(model, tokenizer, prompts: pd.DataFrame, batch_size: int, device,
                          items: list[Encoded | None] | None = None, scored: dict[int, float] | None = None) -> pd.DataFrame:
    """Per prompt (index prompt_id): `gt_logprob`, the mean per-token log-likelihood of its ground-truth
    response under `model`, log pi(y*|x) / |y*|, and `gt_tokens`, |y*|; NaN for a prompt without one.

    y* is the response as the policy would write it (data.prompts.format_completion: the text and the
    template's end of turn, which the policy must also produce), scored on the chat-formatted prompt. It
    needs no judge, and it is the quantity SPIN's objective drives up: SPIN's optimum is the policy equal
    to the data distribution (Chen et al. 2024, arXiv:2401.01335, Sec. 5). Per token, so prompts with long
    answers do not outweigh the rest; means over prompts compare rounds on the same prompts.
    `items`: ground_truth_items(tokenizer, prompts), when the caller has them; `scored`: {position: summed
    log-prob} of items already scored elsewhere (Evaluate scores them on its generation's prefill); the
    rest are scored here."""
    items = ground_truth_items(tokenizer, prompts) if items is None else items
    sums = dict(scored or {})
    todo = [i for i, item in enumerate(items) if item is not None and i not in sums]
    if todo:
        sums.update(zip(todo, batched_logps(model, tokenizer, [items[i] for i in todo], batch_size, device,
                                            "ground-truth logps")[0]))
    tokens = [len(item.completion_ids) if item is not None else np.nan for item in items]
    gt = [sums[i] / tokens[i] if items[i] is not None and tokens[i] else np.nan for i in range(len(items))]
    return pd.DataFrame({"gt_logprob": gt, "gt_tokens": tokens}, index=pd.Index(prompts.prompt_id, name="prompt_id"))


def gt_logprob_change(frame: pd.DataFrame, base: pd.DataFrame) -> dict:
    """The round's held-out gt_logprob minus the base's, paired over the prompts both have it for: the mean
    per-prompt difference, its standard error and n (metrics.json `gt_logprob_vs_base`, `_se`, `_prompts`)."""
    def per_prompt(eval_frame: pd.DataFrame) -> pd.Series:
        if "gt_logprob" not in eval_frame:
            return pd.Series(dtype=float)
        greedy = eval_frame[eval_frame.kind == "greedy"]
        return greedy.set_index("prompt_id").gt_logprob.dropna()

    now, then = per_prompt(frame), per_prompt(base)
    both = now.index.intersection(then.index)
    if len(both) == 0:
        return {}
    change, se = mean_se(now.loc[both].to_numpy() - then.loc[both].to_numpy())
    return {"gt_logprob_vs_base": change, "gt_logprob_vs_base_se": se, "gt_logprob_vs_base_prompts": int(len(both))}

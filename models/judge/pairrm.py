"""PairRM (llm-blender/PairRM-hf) loaded by our own code, as a pairwise judge.

PairRM is a DeBERTa-v3-large cross-encoder that reads one prompt and two candidate responses in a
single sequence and gives a logit: > 0 means candidate 1 is the better response. Its Hugging Face
checkpoint names the architecture `DebertaV2PairRM`, a class that lives in llm-blender, which does
not import under transformers 5; `DebertaV2PairRM` below rebuilds it with the same attribute and
state-dict names (`pretrained_model.*`, `head_layer.1.*`, `head_layer.4.*`) and the same config keys
(`source_prefix_id`, `cand1_prefix_id`, `cand2_prefix_id`, `cand_prefix_id`, `drop_out`, `n_tasks`),
so the published weights load with no missing or unexpected keys.

Input format (the model card's `tokenize_pair`), one row per ordered pair:

    [CLS] <|source|> prompt [SEP] [CLS] <|candidate1|> c1 [SEP] [CLS] <|candidate2|> c2 [SEP] [PAD]...

The source segment holds at most SOURCE_MAX_LENGTH (1224) tokens; each candidate segment at most
(MAX_LENGTH - len(source segment)) // 2, so a row never exceeds MAX_LENGTH (2048). Every segment is
cut from the right. Rows are padded to the longest row of their batch, not to 2048. The model takes
the last hidden states at the three prefix tokens and scores s_k = head([h_source; h_candidate_k]);
the logit is s_1 - s_2.

Usage:

    judge = PairRMJudge("llm-blender/PairRM-hf", batch_size=32)
    results = judge.judge([JudgeGroup(prompt, [r1, r2, r3, r4]), ...])   # one JudgeResult per group
    judge.pairs_per_second                                                # throughput of the calls so far

`PairRMJudge.judge` scores every ordered pair (i, j), i != j, of each group, batched across all the
groups' prompts, then follows uclaml/SPPO (scripts/rank.py -> llm-blender `rank(..., return_scores=True)`,
whose `get_scores_from_cmps` averages over all K columns, the zero diagonal included):

    s_i = (1/K) * sum_{j != i} (L[i, j] - L[j, i]),    P[i, j] = sigmoid(s_i - s_j)

(scripts/compute_prob.py computes P the same way.) tests/stages/judge/tiny_pairrm.py writes a tiny randomly
initialised checkpoint in the same format, tokenizer included, built offline.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from torch import nn
from transformers import DebertaV2Config
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.models.deberta_v2.modeling_deberta_v2 import DebertaV2Model, DebertaV2PreTrainedModel

from models.judge.judge_types import JudgeGroup, JudgeResult, matrix_from_scores
from models.padding import pad_rows

log = logging.getLogger("selfplay")

SOURCE_PREFIX = "<|source|>"
CAND1_PREFIX = "<|candidate1|>"
CAND2_PREFIX = "<|candidate2|>"
CAND_PREFIX = "<|candidate|>"  # in the vocabulary and config, unused by the pairwise head
PREFIX_TOKENS = (SOURCE_PREFIX, CAND1_PREFIX, CAND2_PREFIX, CAND_PREFIX)

# The model card's tokenize_pair: source_max_length=1224, candidate_max_length=412, 1224 + 2 * 412 = 2048.
SOURCE_MAX_LENGTH = 1224
MAX_LENGTH = 2048


class DebertaV2PairRM(DebertaV2PreTrainedModel):
    """llm-blender's DebertaV2PairRM: DeBERTa-v2 encoder plus an MLP head over prefix-token states.

    forward(input_ids, attention_mask) -> SequenceClassifierOutput with logits of shape (batch,):
    s_1 - s_2, > 0 when candidate 1 is better.
    """

    config_class = DebertaV2Config
    # The backbone attribute is `pretrained_model` in the checkpoint; naming it as the base model makes
    # `model.base_model` the encoder and lets a bare DebertaV2Model checkpoint load into it (head random).
    base_model_prefix = "pretrained_model"

    def __init__(self, config: DebertaV2Config):
        super().__init__(config)
        self.n_tasks = config.n_tasks
        self.drop_out = config.drop_out
        self.pretrained_model = DebertaV2Model(config)
        self.hidden_size = config.hidden_size
        self.source_prefix_id = config.source_prefix_id
        self.cand_prefix_id = config.cand_prefix_id
        self.cand1_prefix_id = config.cand1_prefix_id
        self.cand2_prefix_id = config.cand2_prefix_id
        # Indices 1 and 4 are the Linear layers: their names are the checkpoint's head_layer.1.* / head_layer.4.*.
        self.head_layer = nn.Sequential(
            nn.Dropout(self.drop_out),
            nn.Linear(2 * self.hidden_size, self.hidden_size),
            nn.Tanh(),
            nn.Dropout(self.drop_out),
            nn.Linear(self.hidden_size, self.n_tasks),
        )
        self.post_init()

    def _prefix_positions(self, input_ids: torch.Tensor, token_id: int, what: str) -> torch.Tensor:
        found = input_ids == token_id
        if not bool(found.any(dim=1).all()):
            raise ValueError(f"PairRM input: a row has no {what} token (id {token_id})")
        # First occurrence per row; llm-blender's torch.where assumed exactly one and misaligns otherwise.
        return found.int().argmax(dim=1)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> SequenceClassifierOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        else:
            # As llm-blender: drop columns that are padding in every row (inputs padded to 2048 run short).
            keep = attention_mask.ne(0).any(dim=0)
            input_ids, attention_mask = input_ids[:, keep], attention_mask[:, keep]
            if token_type_ids is not None:
                token_type_ids = token_type_ids[:, keep]
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        source_pos = self._prefix_positions(input_ids, self.source_prefix_id, SOURCE_PREFIX)
        cand1_pos = self._prefix_positions(input_ids, self.cand1_prefix_id, CAND1_PREFIX)
        cand2_pos = self._prefix_positions(input_ids, self.cand2_prefix_id, CAND2_PREFIX)
        states = self.pretrained_model(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        source, cand1, cand2 = states[rows, source_pos], states[rows, cand1_pos], states[rows, cand2_pos]
        left = self.head_layer(torch.cat([source, cand1], dim=-1))
        right = self.head_layer(torch.cat([source, cand2], dim=-1))
        return SequenceClassifierOutput(logits=(left - right).mean(dim=-1))


# --- tokenization -------------------------------------------------------------------------------


def _strip_prefixes(text: str) -> str:
    # A literal "<|candidate2|>" in a response would be tokenised as the prefix token itself and move the
    # gathered position; the reference code asserts and fails then. We drop such strings instead.
    for token in PREFIX_TOKENS:
        text = text.replace(token, "")
    return text


def encode_segments(tokenizer, prefix: str, texts: list[str], max_lengths: list[int] | int) -> list[list[int]]:
    """`[CLS] prefix text [SEP]` ids for each text, cut from the right to its max length (specials included).

    Same ids as the model card's `tokenizer.encode(prefix + text, max_length=m, truncation=True)` with
    right truncation, whatever truncation side the tokenizer's own config names.
    """
    if isinstance(max_lengths, int):
        max_lengths = [max_lengths] * len(texts)
    if not texts:
        return []
    # Encoded whole, then cut here: `verbose=False` keeps quiet about texts longer than model_max_length.
    texts = [prefix + _strip_prefixes(t) for t in texts]
    encoded = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    return [[cls_id, *ids[: max(0, m - 2)], sep_id] for ids, m in zip(encoded, max_lengths)]


def candidate_max_length(source_len: int, max_length: int = MAX_LENGTH) -> int:
    """Each candidate's share of what the source leaves of max_length (tokenize_pair's rule)."""
    return (max_length - source_len) // 2


def pair_input_ids(
    tokenizer,
    sources: list[str],
    cand1s: list[str],
    cand2s: list[str],
    source_max_length: int = SOURCE_MAX_LENGTH,
    max_length: int = MAX_LENGTH,
) -> list[list[int]]:
    """Unpadded ids of each (source, candidate 1, candidate 2) row."""
    source_ids = encode_segments(tokenizer, SOURCE_PREFIX, sources, source_max_length)
    cand_max = [candidate_max_length(len(s), max_length) for s in source_ids]
    c1 = encode_segments(tokenizer, CAND1_PREFIX, cand1s, cand_max)
    c2 = encode_segments(tokenizer, CAND2_PREFIX, cand2s, cand_max)
    return [s + a + b for s, a, b in zip(source_ids, c1, c2)]


def padded(rows: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded to the longest row: input_ids and attention_mask, (len(rows), longest)."""
    input_ids, attention_mask = pad_rows(rows, pad_id)
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def tokenize_pairs(
    tokenizer,
    sources: list[str],
    cand1s: list[str],
    cand2s: list[str],
    source_max_length: int = SOURCE_MAX_LENGTH,
    max_length: int = MAX_LENGTH,
) -> dict[str, torch.Tensor]:
    """The model card's tokenize_pair, padded to the batch's longest row instead of to max_length."""
    rows = pair_input_ids(tokenizer, sources, cand1s, cand2s, source_max_length, max_length)
    return padded(rows, tokenizer.pad_token_id)


# --- the judge ----------------------------------------------------------------------------------


def scores_from_logits(logits: np.ndarray) -> np.ndarray:
    """SPPO / llm-blender `get_scores_from_cmps`: s_i = mean over all K columns of L[i, j] - L[j, i].

    `logits[i, j]` is the logit with response i as candidate 1 and j as candidate 2; the diagonal is
    never computed and counts as 0 (so the sum over j != i is divided by K, not K - 1).
    """
    logits = np.array(logits, dtype=np.float64)
    np.fill_diagonal(logits, 0.0)
    return (logits - logits.T).mean(axis=1)


def _resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    from models.load.loading import resolve_dtype

    if dtype is None:
        return resolve_dtype("auto", device)
    if isinstance(dtype, torch.dtype):
        return dtype
    return resolve_dtype(str(dtype), device)


class PairRMJudge:
    """P(i beats j) from PairRM over all ordered pairs of each group's responses (SPPO's recipe)."""

    name = "pairrm"

    def __init__(
        self,
        path: str,
        batch_size: int = 16,
        device=None,
        dtype=None,
        *,
        source_max_length: int = SOURCE_MAX_LENGTH,
        max_length: int = MAX_LENGTH,
    ):
        """`dtype`: None = bf16 on a GPU that has it, else fp32; or 'bf16'/'fp16'/'fp32' or a torch dtype."""
        from transformers import AutoConfig, AutoTokenizer

        from common.errors import ModelError
        from models.load.loading import check_model_path, default_device

        check_model_path(path)
        self.device = torch.device(device) if device is not None else default_device()
        try:
            config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot load a PairRM config from {path}: {str(exc).splitlines()[0]}") from None
        missing = [k for k in ("source_prefix_id", "cand1_prefix_id", "cand2_prefix_id") if getattr(config, k, None) is None]
        if not isinstance(config, DebertaV2Config) or missing:
            raise ModelError(
                f"{path} is not a PairRM checkpoint (model_type {config.model_type!r}, "
                f"{'missing ' + ', '.join(missing) if missing else 'not deberta-v2'})"
            )
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            model, info = DebertaV2PairRM.from_pretrained(
                path, config=config, dtype=_resolve_dtype(dtype, self.device), use_safetensors=True,
                output_loading_info=True,
            )
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot load PairRM from {path}: {str(exc).splitlines()[0]}") from None
        # A missing weight would be silently random: refuse rather than judge with noise.
        if info["missing_keys"] or info["mismatched_keys"]:
            bad = sorted(info["missing_keys"]) + [str(k) for k in info["mismatched_keys"]]
            raise ModelError(f"PairRM checkpoint {path} lacks or mismatches {len(bad)} weights, e.g. {bad[0]}")
        if info["unexpected_keys"]:
            log.warning("PairRM checkpoint %s has %d weights the model does not use, e.g. %s",
                        path, len(info["unexpected_keys"]), sorted(info["unexpected_keys"])[0])
        prefixes = {SOURCE_PREFIX: "source_prefix_id", CAND1_PREFIX: "cand1_prefix_id", CAND2_PREFIX: "cand2_prefix_id"}
        for token, key in prefixes.items():
            token_id, expected = self.tokenizer.convert_tokens_to_ids(token), getattr(config, key)
            if token_id != expected:
                raise ModelError(f"PairRM tokenizer of {path} maps {token} to {token_id}, config {key} says {expected}")
        tok = self.tokenizer
        if tok.cls_token_id is None or tok.sep_token_id is None or tok.pad_token_id is None:
            raise ModelError(f"PairRM tokenizer of {path} lacks a [CLS], [SEP] or [PAD] token")
        self.model = model.to(self.device).eval()
        self.batch_size = batch_size
        self.source_max_length = source_max_length
        self.max_length = max_length
        self.pairs_scored = 0  # pair forwards so far
        self.seconds = 0.0  # time in the model (padding, transfer and forward) so far

    @property
    def pairs_per_second(self) -> float:
        return self.pairs_scored / self.seconds if self.seconds > 0 else float("nan")

    def logits(self, rows: list[list[int]]) -> list[float]:
        """Logits of unpadded rows (pair_input_ids), in their order; batched longest first, OOM backed off."""
        from models.generate.generation import run_with_oom_backoff

        if not rows:
            return []
        # Longest first: similar lengths share a batch (little padding), and a CUDA OOM shows on the
        # first batch, so the back-off halves the batch once instead of late in the run.
        order = sorted(range(len(rows)), key=lambda n: -len(rows[n]))

        def work(chunk: list[int]) -> list[float]:
            batch = padded([rows[n] for n in chunk], self.tokenizer.pad_token_id)
            with torch.inference_mode():
                out = self.model(**{k: v.to(self.device) for k, v in batch.items()}).logits
            return out.float().cpu().tolist()

        start = time.perf_counter()
        flat = run_with_oom_backoff(work, order, self.batch_size, "pairrm judge")
        self.seconds += time.perf_counter() - start
        self.pairs_scored += len(rows)
        out = [0.0] * len(rows)
        for n, value in zip(order, flat):
            out[n] = value
        return out

    def logit_matrices(self, groups: list[JudgeGroup]) -> list[np.ndarray]:
        """L[i, j] for every group: response i as candidate 1, j as candidate 2; 0 on the diagonal."""
        rows, where = [], []
        for g, group in enumerate(groups):
            source = encode_segments(self.tokenizer, SOURCE_PREFIX, [group.prompt], self.source_max_length)[0]
            cand_max = candidate_max_length(len(source), self.max_length)
            # Each response is tokenised once per position, then reused in its K - 1 pairs.
            first = encode_segments(self.tokenizer, CAND1_PREFIX, group.responses, cand_max)
            second = encode_segments(self.tokenizer, CAND2_PREFIX, group.responses, cand_max)
            k = len(group.responses)
            for i in range(k):
                for j in range(k):
                    if i != j:
                        rows.append(source + first[i] + second[j])
                        where.append((g, i, j))
        flat = self.logits(rows)
        matrices = [np.zeros((len(g.responses), len(g.responses))) for g in groups]
        for (g, i, j), value in zip(where, flat):
            matrices[g][i, j] = value
        return matrices

    def judge(self, groups: list[JudgeGroup]) -> list[JudgeResult]:
        results = []
        for logits in self.logit_matrices(groups):
            scores = scores_from_logits(logits)
            results.append(JudgeResult(matrix_from_scores(scores), scores=scores))
        return results

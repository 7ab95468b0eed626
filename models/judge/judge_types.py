"""What a judge is given and what it answers, shared by every judge (models/judge/judges.py, models/judge/pairrm.py).

A judge takes `JudgeGroup`s (one prompt and its K responses) and returns one `JudgeResult` per group:
the K x K matrix of P(response i beats response j), 0.5 on the diagonal, P[i, j] + P[j, i] = 1.
This module imports nothing else of the project, so the judges that use it never import each other.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np


@dataclass
class JudgeGroup:
    """One prompt and its K responses, with what a judge may need beside them."""

    prompt: str
    responses: list[str]
    system: str | None = None
    reference: str | None = None
    task: str | None = None
    answer: str | None = None
    row: dict | None = None  # the dataset row's other scalar columns, for a user's verifier


def row_of(source_row) -> dict:
    """The dataset row a prompt came from, from its `source_row` JSON column (data/prompts.py)."""
    return json.loads(source_row) if isinstance(source_row, str) else {}


@dataclass
class JudgeResult:
    prob_matrix: np.ndarray  # (K, K): P(i beats j), 0.5 on the diagonal
    scores: np.ndarray | None = None  # (K,) pointwise scores where the judge has them
    unparsed: int = 0  # judge answers that could not be parsed (self-judge), counted as ties
    reprompted: int = 0  # judge answers that needed the verdict's opening written for them (self-judge)

    @property
    def win_probs(self) -> np.ndarray:
        """Mean win probability of each response against all K (itself counted 0.5), as in SPPO."""
        return self.prob_matrix.mean(axis=1)


def matrix_from_scores(scores: np.ndarray) -> np.ndarray:
    """Bradley-Terry: P[i, j] = sigmoid(s_i - s_j); NaN scores (unparsed) tie with everything."""
    scores = np.asarray(scores, dtype=np.float64)
    diff = scores[:, None] - scores[None, :]
    prob = 1.0 / (1.0 + np.exp(-diff))
    return np.where(np.isnan(diff), 0.5, prob)

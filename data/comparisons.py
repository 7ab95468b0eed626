"""What a judge's held-out comparisons say beyond a raw win rate: length control, and agreement between judges.

    from data.comparisons import lc_win_rate, judge_agreement, comparison_figures
    lc, lc_se = lc_win_rate(win_probs, ours_chars, theirs_chars)       # AlpacaEval 2's length-controlled win rate
    agreement = judge_agreement(referee_probs, training_probs)         # share agreeing, Cohen's kappa, each ± SE
    metrics |= comparison_figures(judged)                              # Evaluate's figures from its judgements

**Length-controlled win rate** (Dubois et al. 2024, "Length-Controlled AlpacaEval", arXiv:2404.04475;
the formula as the `alpaca_eval` package 0.6.6 fits it, alpaca_eval/metrics/glm_winrate.py). A logistic model of the
judge's preference for our response over theirs, with a term for their length difference:

    P(ours beats theirs)_i = sigmoid(theta + phi * tanh(d_i / std(d))),   d_i = len(ours_i) - len(theirs_i)

fitted to the judge's verdicts (each P_i in [0, 1] a soft label, as the package fits them), and the
length-controlled win rate is the preference it predicts at equal length, d = 0: sigmoid(theta).
Lengths are in characters, as AlpacaEval counts them. AlpacaEval's full model (`length_controlled_v1`)
has two more terms, and neither applies to one run comparing two models on its own prompts:

- an instruction-difficulty term per prompt, which AlpacaEval estimated once from the annotations of
  many models on its 805 instructions and ships as a table; with two models and one verdict per prompt
  a per-prompt term cannot be estimated (one parameter per observation), and there is no table for a
  user's prompts;
- the model term theta_m - theta_b of a model against the fixed baseline, and the regularisation of the
  fit toward the leaderboard's baseline weights (the "gamed" baselines' annotations downloaded from the
  hub). Here there are exactly two sides, so the model term is theta itself, and there is nothing to
  regularise toward.

What is left is the package's `length_controlled_minimal` model (formula `np.tanh(std_delta_len) +
not_gamed_baseline.astype(float) - 1`: a length term and the model's intercept). The package fits it by
L1-penalised logistic regression with the penalty chosen by 5-fold cross-validation (liblinear); here by
Newton's method with a small L2 penalty of the same scale (C = 100), which keeps theta finite when one
side wins every comparison (tests/test_comparisons.py checks the result against the package's own
`get_length_controlled_winrate` on the same data). The package cannot be called as it is: every one of its
models downloads the leaderboard's annotations from the hub first, and its standard error for this model
is the spread of identical predictions, 0. Ours is a bootstrap over prompts (the fit, the length scale
std(d) included, redone on 1,000 resamples of the prompts; seed fixed, so a figure is reproducible).

**Agreement between two judges** on the same comparisons: each verdict read as ours / tie / theirs
(P above, at or below 1/2); the share of comparisons where the two judges' verdicts agree (± the
standard error of a mean of 0/1 values), and Cohen's kappa (Cohen 1960: (p_o - p_e) / (1 - p_e), p_e
the agreement expected by chance from each judge's own shares of the three verdicts), ± the
large-sample standard error of Fleiss, Cohen & Everitt (1969, Psychological Bulletin 72(5)), the one that
does not assume kappa = 0 (written out in `judge_agreement`; its equation number in the paper not checked).
"""

from __future__ import annotations

import math

import numpy as np

from data.stats import mean_se

LC_BOOTSTRAP = 1000
LC_SEED = 0
LC_PENALTY_C = 100.0  # the package's LogisticRegression C (glm_winrate.fit_LogisticRegressionCV)
TIE_TOLERANCE = 1e-6


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=float)))  # stable for large |x|


def _fit_length_glm(win_probs: np.ndarray, length_feature: np.ndarray) -> np.ndarray:
    """(theta, phi) maximising sum_i [y_i log p_i + (1 - y_i) log(1 - p_i)] - |w|^2 / (2 C),
    p_i = sigmoid(theta + phi x_i): Newton's method, halving a step that would not improve the objective."""
    features = np.stack([np.ones_like(length_feature), length_feature], axis=1)
    weights = np.zeros(2)

    def objective(w):
        logits = features @ w
        # y log p + (1 - y) log(1 - p) = y z - log(1 + e^z)
        return float(np.sum(win_probs * logits - np.logaddexp(0.0, logits)) - w @ w / (2 * LC_PENALTY_C))

    current = objective(weights)
    for _ in range(100):
        p = _sigmoid(features @ weights)
        gradient = features.T @ (win_probs - p) - weights / LC_PENALTY_C
        hessian = (features * (p * (1 - p))[:, None]).T @ features + np.eye(2) / LC_PENALTY_C
        step = np.linalg.solve(hessian, gradient)
        scale = 1.0
        while scale > 1e-6:
            candidate = weights + scale * step
            value = objective(candidate)
            if value >= current - 1e-12:
                break
            scale /= 2
        weights, improvement, current = candidate, value - current, value
        if abs(improvement) < 1e-12 and np.max(np.abs(scale * step)) < 1e-10:
            break
    return weights


def _lc_point(win_probs: np.ndarray, length_diff: np.ndarray) -> float:
    spread = length_diff.std(ddof=1) if len(length_diff) > 1 else 0.0
    # No spread in length: nothing to control for, and the feature is 0 (the fit is the raw rate, up to the penalty).
    feature = np.tanh(length_diff / spread) if spread > 0 else np.zeros_like(length_diff)
    theta, _phi = _fit_length_glm(win_probs, feature)
    return float(_sigmoid(theta))


def lc_win_rate(win_probs, ours_length, theirs_length, bootstrap: int = LC_BOOTSTRAP) -> tuple[float, float]:
    """(length-controlled win rate, its bootstrap standard error) of `win_probs` (P(ours beats theirs) per
    prompt) whose responses had these lengths; (nan, nan) without comparisons, the SE nan below 2."""
    win_probs = np.asarray(win_probs, dtype=float)
    length_diff = np.asarray(ours_length, dtype=float) - np.asarray(theirs_length, dtype=float)
    n = len(win_probs)
    if n == 0:
        return float("nan"), float("nan")
    point = _lc_point(win_probs, length_diff)
    if n < 2:
        return point, float("nan")
    rng = np.random.default_rng(LC_SEED)
    draws = [_lc_point(win_probs[idx], length_diff[idx]) for idx in rng.integers(0, n, size=(bootstrap, n))]
    return point, float(np.std(draws, ddof=1))


def verdicts(win_probs) -> np.ndarray:
    """+1 (ours wins), 0 (tie), -1 (theirs wins) for each P(ours beats theirs)."""
    delta = np.asarray(win_probs, dtype=float) - 0.5
    return np.where(delta > TIE_TOLERANCE, 1, np.where(delta < -TIE_TOLERANCE, -1, 0))


def judge_agreement(probs_a, probs_b) -> dict[str, float]:
    """How often two judges' verdicts on the same comparisons agree, and Cohen's kappa, each ± SE."""
    a, b = verdicts(probs_a), verdicts(probs_b)
    n = len(a)
    if n == 0:
        return {"agreement": float("nan"), "agreement_se": float("nan"), "kappa": float("nan"), "kappa_se": float("nan"), "n": 0}
    agreement, agreement_se = mean_se(a == b)
    categories = (-1, 0, 1)
    # table[i, j]: the share of comparisons where judge a said categories[i] and judge b categories[j]
    table = np.array([[np.mean((a == i) & (b == j)) for j in categories] for i in categories])
    rows, cols = table.sum(axis=1), table.sum(axis=0)
    chance = float(rows @ cols)
    if chance >= 1.0 - 1e-12:  # both judges gave one and the same verdict every time: kappa is undefined
        return {"agreement": agreement, "agreement_se": agreement_se, "kappa": float("nan"), "kappa_se": float("nan"), "n": n}
    observed = float(np.trace(table))
    kappa = (observed - chance) / (1 - chance)
    # Fleiss, Cohen & Everitt (1969): the large-sample variance of kappa (not assuming kappa = 0).
    diagonal = sum(table[i, i] * (1 - (rows[i] + cols[i]) * (1 - kappa)) ** 2 for i in range(3))
    off_diagonal = (1 - kappa) ** 2 * sum(table[i, j] * (cols[i] + rows[j]) ** 2
                                          for i in range(3) for j in range(3) if i != j)
    variance = (diagonal + off_diagonal - (kappa - chance * (1 - kappa)) ** 2) / (n * (1 - chance) ** 2)
    return {"agreement": agreement, "agreement_se": agreement_se, "kappa": float(kappa),
            "kappa_se": math.sqrt(max(variance, 0.0)), "n": n}


COMPARISONS = ("previous", "base")


def comparison_figures(judged: dict) -> dict:
    """Beside each win rate of Evaluate's judgements (models/evaluate/evaluation.py, evaluate_rows): its
    length-controlled rate and the mean length of both sides; and where a training judge apart from the
    referee also judged the comparisons, its win rates and its agreement with the referee."""
    figures: dict = {}
    ours_chars = judged.get("ours_chars")
    if ours_chars is None:  # judgements from before lengths were recorded
        return figures
    has_training_judge = bool(judged.get("train_judge"))
    if has_training_judge:
        figures["train_judge"] = judged["train_judge"]
        figures["train_judge_detail"] = judged.get("train_judge_detail")
        figures["train_judge_unparsed"] = judged.get("train_unparsed", 0)
    for label in COMPARISONS:
        if label not in judged:
            continue
        theirs_chars = judged[f"{label}_chars"]
        name = f"win_rate_vs_{label}"
        figures[f"{name}_chars_ours"], figures[f"{name}_chars_theirs"] = float(np.mean(ours_chars)), float(np.mean(theirs_chars))
        figures[f"{name}_lc"], figures[f"{name}_lc_se"] = lc_win_rate(judged[label], ours_chars, theirs_chars)
        if has_training_judge:
            training = judged[f"train_{label}"]
            train_name = f"train_judge_{name}"
            figures[train_name], figures[f"{train_name}_se"] = mean_se(training)
            figures[f"{train_name}_lc"], figures[f"{train_name}_lc_se"] = lc_win_rate(training, ours_chars, theirs_chars)
            agreement = judge_agreement(judged[label], training)
            figures[f"judge_agreement_vs_{label}"] = agreement["agreement"]
            figures[f"judge_agreement_vs_{label}_se"] = agreement["agreement_se"]
            figures[f"judge_kappa_vs_{label}"] = agreement["kappa"]
            figures[f"judge_kappa_vs_{label}_se"] = agreement["kappa_se"]
    return figures


def reward_hacking_rounds(metrics_rows: list[dict], label: str = "base", z: float = 2.0) -> list[int]:
    """Rounds where the training judge's win rate vs `label` lies more than `z` standard errors above 1/2
    while the referee's does not: the policy gains by its training judge's lights and not by the referee's."""
    flagged = []
    for row in metrics_rows:
        training, training_se = row.get(f"train_judge_win_rate_vs_{label}"), row.get(f"train_judge_win_rate_vs_{label}_se")
        referee, referee_se = row.get(f"win_rate_vs_{label}"), row.get(f"win_rate_vs_{label}_se")
        values = (training, training_se, referee, referee_se)
        if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in values):
            continue
        if training - 0.5 > z * training_se and referee - 0.5 <= z * referee_se:
            flagged.append(int(row["round"]))
    return flagged

"""Length-controlled win rates (AlpacaEval 2's model) and agreement between two judges, against values
worked out another way: preferences made by length alone, the alpaca_eval package's own fit on the same
data, and kappa by hand."""

import math
import sys
import types

import numpy as np
import pytest

from data.comparisons import comparison_figures, judge_agreement, lc_win_rate, reward_hacking_rounds, verdicts


def lengths(n: int, seed: int):
    rng = np.random.default_rng(seed)
    return rng.integers(20, 400, n).astype(float), rng.integers(20, 400, n).astype(float)


def test_preferences_made_by_length_alone_give_an_lc_rate_near_one_half():
    ours, theirs = lengths(400, 0)
    ours += 100  # our answers are longer on the whole, and the judge prefers the longer answer:
    z = np.tanh((ours - theirs) / np.std(ours - theirs))
    by_length = 1 / (1 + np.exp(-2.5 * z))  # its P(ours wins) depends on nothing but the length difference
    lc, lc_se = lc_win_rate(by_length, ours, theirs)
    assert by_length.mean() > 0.6  # the raw rate is far from 1/2
    assert lc == pytest.approx(0.5, abs=0.01) and lc_se < 0.01
    # The same judge's sampled verdicts (win or lose): LC within noise of 1/2, the raw rate over 3 SE above it.
    sampled = (np.random.default_rng(0).random(400) < by_length).astype(float)
    lc, lc_se = lc_win_rate(sampled, ours, theirs)
    raw, raw_se = sampled.mean(), sampled.std(ddof=1) / 20
    assert raw - 0.5 > 3 * raw_se and abs(lc - 0.5) < 2 * lc_se


def test_a_judge_that_always_prefers_the_longer_answer_leaves_the_lc_rate_uncertain():
    """Verdicts separated perfectly by length (a step, not a logistic curve) have no finite maximum-likelihood
    fit: the penalty decides theta, and AlpacaEval's own fit lands elsewhere (0.72, or 0.86 with its
    cross-validated penalty, on these data). The bootstrap standard error says so."""
    ours, theirs = lengths(200, 0)
    ours += 60
    longer = (ours > theirs).astype(float)
    lc, lc_se = lc_win_rate(longer, ours, theirs)
    assert longer.mean() > 0.65 and lc_se > 0.05 and abs(lc - 0.5) < 2 * lc_se


def test_preferences_independent_of_length_give_an_lc_rate_near_the_raw_one():
    rng = np.random.default_rng(1)
    ours, theirs = lengths(300, 1)
    wins = (rng.random(300) < 0.7).astype(float)
    lc, lc_se = lc_win_rate(wins, ours, theirs)
    assert wins.mean() == pytest.approx(0.7, abs=0.05)
    assert lc == pytest.approx(wins.mean(), abs=0.02)
    assert lc_se == pytest.approx((wins.var(ddof=1) / 300) ** 0.5, rel=0.25)  # about the raw rate's own SE


def test_equal_lengths_leave_the_raw_rate_and_one_sided_verdicts_stay_finite():
    probs = np.array([1.0, 0.0, 1.0, 0.5, 1.0, 1.0])
    same = np.full(6, 50.0)
    assert lc_win_rate(probs, same, same)[0] == pytest.approx(probs.mean(), abs=5e-3)  # up to the small penalty
    lc, se = lc_win_rate(np.ones(10), np.arange(10.0), np.zeros(10))
    assert 0.9 < lc <= 1.0 and math.isfinite(se)
    assert all(math.isnan(v) for v in lc_win_rate([], [], []))


def _alpaca_eval_glm():
    """alpaca_eval's glm_winrate module, importable offline: 0.6.6 imports pkg_resources (gone from
    setuptools 81 on) for two version helpers that its GLM code does not use."""
    pytest.importorskip("sklearn")
    pytest.importorskip("patsy")
    if "pkg_resources" not in sys.modules:
        try:
            import pkg_resources  # noqa: F401
        except ImportError:
            from importlib.metadata import version

            from packaging.version import parse

            stub = types.ModuleType("pkg_resources")
            stub.parse_version = parse
            stub.get_distribution = lambda name: types.SimpleNamespace(version=version(name))
            sys.modules["pkg_resources"] = stub
    return pytest.importorskip("alpaca_eval.metrics.glm_winrate")


@pytest.mark.parametrize("theta, phi, n, seed", [(0.4, 1.5, 200, 0), (-0.5, 2.5, 100, 1), (0.0, 0.0, 100, 2), (1.0, -1.0, 60, 3)])
def test_the_lc_rate_equals_alpaca_evals_own_on_the_same_data(tmp_path, theta, phi, n, seed):
    """The package's get_length_controlled_winrate on the same verdicts and texts, with its length-only model
    (`length_controlled_minimal`) at a fixed penalty (n_splits 0: LogisticRegression(C=100), L1). Its hub
    download (the leaderboard's annotations, which this model reads but does not use) is replaced by a
    local file."""
    from unittest import mock

    import pandas as pd

    glm = _alpaca_eval_glm()
    rng = np.random.default_rng(seed)
    baseline_len, model_len = lengths(n, seed + 10)
    z = (model_len - baseline_len) / np.std(model_len - baseline_len)
    prefs = (rng.random(n) < 1 / (1 + np.exp(-(theta + phi * np.tanh(z))))).astype(float)
    prefs[rng.random(n) < 0.1] = 0.5  # some ties
    annotations = pd.DataFrame({
        "output_1": ["b" * int(k) for k in baseline_len], "output_2": ["m" * int(k) for k in model_len],
        "preference": prefs + 1, "index": np.arange(n), "generator_1": "baseline", "generator_2": "model", "annotator": "judge"})
    gamed = tmp_path / "df_gamed.csv"
    pd.DataFrame({"index": np.arange(n), "instruction_difficulty": 0.0, "model": "none"}).to_csv(gamed, index=False)
    info = {"formula": glm.GLM_INFO["length_controlled_minimal"]["formula"], "regularize_to_baseline_lambda": None,
            "kwargs": {"n_splits": 0}}
    with mock.patch.object(glm, "hf_hub_download", return_value=str(gamed)):
        package = glm.get_length_controlled_winrate(annotations, glm_info=info, save_weights_dir=None,
                                                    is_warn_extreme_changes=False)
    ours, _ = lc_win_rate(prefs, model_len, baseline_len)
    assert ours == pytest.approx(package["length_controlled_winrate"] / 100, abs=2e-3)
    assert prefs.mean() == pytest.approx(package["win_rate"] / 100)


def test_agreement_and_kappa_against_hand_worked_verdicts():
    # Ten comparisons; verdicts of judge A and judge B (+1 ours, 0 tie, -1 theirs):
    a = [1, 1, 1, 1, 1, -1, -1, -1, 0, 1]
    b = [1, 1, 1, -1, 1, -1, -1, 1, 0, 1]
    # They agree on 8 of 10: p_o = 0.8. Shares of A: +1 6/10, -1 3/10, 0 1/10; of B: +1 6/10, -1 3/10, 0 1/10.
    # p_e = 0.36 + 0.09 + 0.01 = 0.46; kappa = (0.8 - 0.46) / (1 - 0.46) = 0.34 / 0.54 = 0.62963.
    to_prob = {1: 1.0, 0: 0.5, -1: 0.0}
    result = judge_agreement([to_prob[v] for v in a], [to_prob[v] for v in b])
    assert result["agreement"] == pytest.approx(0.8)
    assert result["agreement_se"] == pytest.approx((0.8 * 0.2 / 9) ** 0.5)  # sd (ddof 1) of 0/1 over sqrt(10)
    assert result["kappa"] == pytest.approx(0.34 / 0.54)
    # Fleiss, Cohen & Everitt (1969), worked by hand. Cells (A, B): (+,+) 0.5, (-,-) 0.2, (0,0) 0.1, (+,-) 0.1, (-,+) 0.1;
    # margins of both judges: + 0.6, - 0.3, 0 0.1; 1 - kappa = 0.2 / 0.54 = 0.37037.
    k, q = 0.34 / 0.54, 0.2 / 0.54
    diagonal = 0.5 * (1 - 1.2 * q) ** 2 + 0.2 * (1 - 0.6 * q) ** 2 + 0.1 * (1 - 0.2 * q) ** 2
    off = q ** 2 * (0.1 * (0.6 + 0.3) ** 2 + 0.1 * (0.3 + 0.6) ** 2)
    variance = (diagonal + off - (k - 0.46 * q) ** 2) / (10 * 0.54 ** 2)
    assert result["kappa_se"] == pytest.approx(variance ** 0.5)
    # statsmodels' cohens_kappa (std_kappa) gives the same 0.243112 for this table (checked once; not a dependency)
    assert result["kappa_se"] == pytest.approx(0.243112, abs=1e-6)


def test_kappa_is_zero_for_independent_judges_one_for_identical_and_undefined_when_constant():
    rng = np.random.default_rng(0)
    a, b = rng.random(4000), rng.random(4000)
    independent = judge_agreement(a, b)
    assert abs(independent["kappa"]) < 3 * independent["kappa_se"] and independent["agreement"] == pytest.approx(0.5, abs=0.03)
    same = judge_agreement(a, a)
    assert same["kappa"] == pytest.approx(1.0) and same["agreement"] == 1.0 and same["kappa_se"] == pytest.approx(0.0)
    constant = judge_agreement([0.9] * 5, [0.7] * 5)
    assert constant["agreement"] == 1.0 and math.isnan(constant["kappa"])
    assert list(verdicts([0.5, 0.5000001, 0.6, 0.2])) == [0, 0, 1, -1]


def test_comparison_figures_from_evaluates_judgements():
    judged = {"judge": "reward_model", "previous": [1.0, 0.0, 1.0, 1.0], "base": [1.0, 1.0, 0.0, 1.0], "unparsed": 0,
              "ours_chars": [10, 20, 30, 40], "previous_chars": [10, 10, 10, 10], "base_chars": [40, 30, 20, 10],
              "train_judge": "verifier", "train_judge_detail": "exact", "train_previous": [1.0, 0.0, 1.0, 0.5],
              "train_base": [0.0, 1.0, 0.0, 1.0], "train_unparsed": 0}
    figures = comparison_figures(judged)
    assert figures["win_rate_vs_previous_chars_ours"] == 25 and figures["win_rate_vs_previous_chars_theirs"] == 10
    assert figures["win_rate_vs_base_lc"] == pytest.approx(lc_win_rate(judged["base"], judged["ours_chars"], judged["base_chars"])[0])
    assert figures["train_judge_win_rate_vs_previous"] == pytest.approx(0.625)
    assert figures["judge_agreement_vs_previous"] == pytest.approx(0.75) and figures["judge_agreement_vs_base"] == pytest.approx(0.75)
    assert figures["train_judge"] == "verifier"
    no_training = {k: v for k, v in judged.items() if not k.startswith("train_")}
    assert not any(k.startswith(("train_judge_win", "judge_")) for k in comparison_figures(no_training))


def test_a_training_judge_that_sees_a_gain_the_referee_does_not_is_flagged():
    rows = [
        {"round": 1, "train_judge_win_rate_vs_base": 0.62, "train_judge_win_rate_vs_base_se": 0.05,
         "win_rate_vs_base": 0.55, "win_rate_vs_base_se": 0.05},   # training judge +2.4 SE, referee +1 SE: flagged
        {"round": 2, "train_judge_win_rate_vs_base": 0.75, "train_judge_win_rate_vs_base_se": 0.05,
         "win_rate_vs_base": 0.70, "win_rate_vs_base_se": 0.05},   # both see the gain: not flagged
        {"round": 3, "train_judge_win_rate_vs_base": 0.55, "train_judge_win_rate_vs_base_se": 0.05,
         "win_rate_vs_base": 0.40, "win_rate_vs_base_se": 0.05},   # training judge within noise: not flagged
        {"round": 4, "win_rate_vs_base": 0.40, "win_rate_vs_base_se": 0.05},  # no training judge apart
    ]
    assert reward_hacking_rounds(rows) == [1]

"""The report's figures carry their uncertainty, and its plots do not magnify noise."""

import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from data.report import accuracy_change_vs_base, draw_per_round, render_report  # noqa: E402
from data.runs import Run  # noqa: E402
from data.stats import mean_se  # noqa: E402
from models.evaluate.evaluation import implicit_reward_stats  # noqa: E402


def test_mean_se_matches_the_closed_form():
    mean, se = mean_se([1, 0, 1, 1])  # p = 3/4 on 0/1 values: se = sqrt(p (1 - p) / (n - 1))
    assert mean == 0.75 and se == pytest.approx((0.75 * 0.25 / 3) ** 0.5)
    assert np.isnan(mean_se([0.3])[1])  # one value has no spread to estimate


def test_implicit_reward_stats_per_pair():
    # rewards: chosen 0.1*(2-1)=0.1, 0.1*(0-1)=-0.1; rejected 0, 0 -> wins [1, 0], margins [0.1, -0.1]
    stats = implicit_reward_stats(np.array([2.0, 0.0]), np.array([1.0, 1.0]), np.array([5.0, 5.0]), np.array([5.0, 5.0]), 0.1)
    assert stats["implicit_reward_accuracy"] == 0.5 and stats["implicit_reward_pairs"] == 2
    assert stats["implicit_reward_margin"] == pytest.approx(0.0)
    assert stats["implicit_reward_margin_se"] == pytest.approx(0.1)  # std(ddof=1) of [0.1, -0.1] / sqrt(2)


def test_implicit_reward_ties_are_no_wins():
    # A round that left its policy as its parent's (no pairs to train on): every held-out pair's rewards are
    # exactly 0 and 0, which shows nothing learned: accuracy 0, not 1. One pair won outright for contrast.
    logps = np.array([-3.0, -5.0, -7.5])
    stats = implicit_reward_stats(logps, logps, logps - 1.0, logps - 1.0, 0.1)
    assert stats["implicit_reward_accuracy"] == 0.0 and stats["implicit_reward_margin"] == 0.0
    won = implicit_reward_stats(logps + np.array([0.5, 0, 0]), logps, logps - 1.0, logps - 1.0, 0.1)
    assert won["implicit_reward_accuracy"] == pytest.approx(1 / 3)


def _write_round(run_dir, round_idx, eval_metrics):
    round_dir = run_dir / f"round_{round_idx:02d}"
    round_dir.mkdir(parents=True)
    (round_dir / "metrics.json").write_text(json.dumps({"round": round_idx, "eval": eval_metrics}))


def test_report_shows_standard_errors_and_n(tmp_path):
    run_dir = tmp_path / "run"
    _write_round(run_dir, 0, {"accuracy": 0.233, "accuracy_se": 0.039, "prompts": 120, "kl_vs_base": 0.0})
    _write_round(run_dir, 1, {"accuracy": 0.242, "accuracy_se": 0.039, "prompts": 120, "kl_vs_base": 0.05,
                              "kl_vs_base_se": 0.01, "win_rate_vs_base": 0.52, "win_rate_vs_base_se": 0.03})
    text = render_report(Run(run_dir), plots=[])
    assert "0.233 ± 0.039" in text and "0.242 ± 0.039" in text and "0.520 ± 0.030" in text
    assert "n = 120 held-out prompts" in text
    # the base's KL is exactly 0 with no standard error: shown bare
    assert "| 0 | 0.233 ± 0.039 | - | - | 0.000 |" in text


def test_plots_do_not_magnify_noise():
    metrics = pd.DataFrame({"round": [0, 1, 2], "accuracy": [0.217, 0.242, 0.233], "accuracy_se": [0.04] * 3,
                            "win_rate_vs_base": [np.nan, 0.51, 0.49], "mean_length": [30.0, 31.0, 30.5]})
    fig, axes = plt.subplots(1, 3)
    for ax, column in zip(axes, ("accuracy", "win_rate_vs_base", "mean_length")):
        assert draw_per_round(ax, metrics, column)
    assert axes[0].get_ylim() == (-0.02, 1.02)  # probabilities: the whole 0..1 range, not 0.217..0.242
    assert axes[1].get_ylim() == (-0.02, 1.02) and any(list(line.get_ydata()) == [0.5, 0.5] for line in axes[1].lines)
    draw_per_round(axes[2], metrics.assign(length_p90=[60.0, 61.0, 62.0]), "length_p90")
    low, high = axes[2].get_ylim()
    assert low <= 0.0 < 30.0 and high >= 62.0  # lengths drawn from 0, and a later, longer series still fits
    bars = [c for c in axes[0].containers if hasattr(c, "has_yerr") and c.has_yerr]
    assert bars, "accuracy has a standard error: it must be drawn as error bars"
    assert not draw_per_round(axes[0], metrics, "kl_vs_base")  # never measured: nothing drawn
    plt.close(fig)


def test_accuracy_change_is_paired_over_the_same_prompts():
    # Four prompts; round 1 fixes prompts 0 and 1 and breaks prompt 3, round 2 answers prompt 2 only.
    base, round_1, round_2 = [0, 0, 1, 1], [1, 1, 1, 0], [0, 0, 1, 0]
    evals = pd.DataFrame([{"prompt_id": f"p{i}", "round": r, "kind": "greedy", "correct": float(c)}
                          for r, values in enumerate((base, round_1, round_2)) for i, c in enumerate(values)]
                         + [{"prompt_id": "p0", "round": 1, "kind": "sample", "correct": 0.0}])  # not greedy: ignored
    changes = accuracy_change_vs_base(evals).set_index("round")
    diffs = np.array(round_1) - np.array(base)  # +1, +1, 0, -1
    assert changes.loc[1, "change"] == pytest.approx(0.25)
    assert changes.loc[1, "change_se"] == pytest.approx(diffs.std(ddof=1) / 2)  # sqrt(0.9167) / sqrt(4)
    assert changes.loc[2, "change"] == pytest.approx(-0.25) and changes.loc[2, "n"] == 4


def greedy_evals(scores_by_round: dict[int, list[float]]) -> pd.DataFrame:
    """Greedy eval rows: round -> the verifier score of prompts p0, p1, ... (as Evaluate writes them, with
    `correct` = score >= 0.5)."""
    return pd.DataFrame([{"prompt_id": f"p{i}", "round": r, "kind": "greedy", "verifier_score": s, "correct": s >= 0.5}
                         for r, scores in scores_by_round.items() for i, s in enumerate(scores)])


def test_accuracy_change_is_taken_on_the_scores_the_accuracy_column_averages():
    # A partial-credit verifier: the base scores 0.5 and 0.25, round 1 scores 0.75 and 0.5. The accuracy
    # column (mean score) goes 0.375 -> 0.625, up 0.25; right/wrong (score >= 0.5) would say 1/2 -> 2/2, up 0.5.
    base, round_1 = [0.5, 0.25], [0.75, 0.5]
    changes = accuracy_change_vs_base(greedy_evals({0: base, 1: round_1})).set_index("round")
    assert changes.loc[1, "change"] == pytest.approx(np.mean(round_1) - np.mean(base)) == pytest.approx(0.25)
    assert changes.loc[1, "change_se"] == pytest.approx(0.0)  # both prompts moved by exactly 0.25
    # Eval files with right/wrong only (written before scores were kept) still give the change.
    old = greedy_evals({0: base, 1: round_1}).drop(columns="verifier_score")
    assert accuracy_change_vs_base(old).set_index("round").loc[1, "change"] == pytest.approx(0.5)


def test_accuracy_change_compares_only_the_prompts_both_rounds_evaluated():
    # `rounds:` overrides of evaluation.num_prompts: round 1 evaluated the first 2 of the base's 4 prompts,
    # round 2 evaluated 6 (two the base never saw). A prompt a round did not evaluate is no wrong answer.
    evals = greedy_evals({0: [0, 1, 0, 1], 1: [1, 1], 2: [1, 1, 1, 0, 0, 0]})
    changes = accuracy_change_vs_base(evals).set_index("round")
    assert changes.loc[1, "n"] == 2 and changes.loc[1, "change"] == pytest.approx(0.5)  # (1 - 0 + 1 - 1) / 2
    assert changes.loc[2, "n"] == 4 and changes.loc[2, "change"] == pytest.approx(0.25)  # (1 + 0 + 1 - 1) / 4
    assert changes.loc[2, "change_se"] == pytest.approx(np.std([1, 0, 1, -1], ddof=1) / 2)


def _header_run(tmp_path, name, recipe, base_info=None, kl=0.05, final_loss=None):
    import yaml

    run_dir = tmp_path / name
    _write_round(run_dir, 0, {"accuracy": 0.2, "accuracy_se": 0.04, "prompts": 100, "kl_vs_base": 0.0})
    _write_round(run_dir, 1, {"accuracy": 0.2, "accuracy_se": 0.04, "prompts": 100, "kl_vs_base": kl, "kl_vs_base_se": 0.014})
    if final_loss is not None:
        (run_dir / "round_01" / "metrics.json").write_text(json.dumps(
            {"round": 1, "eval": {"accuracy": 0.2, "kl_vs_base": kl}, "train": {"stats": {"final_loss": final_loss}}}))
    (run_dir / "run.yaml").write_text(yaml.safe_dump({"recipe": recipe, "seed": 0}))
    if base_info is not None:
        (run_dir / "base_model").mkdir()
        (run_dir / "base_model" / "base_model.json").write_text(json.dumps(base_info))
    return render_report(Run(run_dir), plots=[])


def test_report_header_names_the_loss_and_which_base_and_explains_kl_and_the_anchored_loss(tmp_path):
    spin = {"algorithm": "spin", "judge": {"name": "ground_truth"}, "training": {"nll_weight": 1.0}, "data": {"train": "demo:train_20k"}}
    copied = _header_run(tmp_path, "copied", spin, {"copied_from": "/x/data/demo/base_model", "sft_steps": 2400}, final_loss=1.37)
    assert "loss **dpo_sigmoid** (the default for spin) + 1 x the chosen response's per-token NLL" in copied
    assert "base model the shipped demo base (`data/demo/base_model`, copied)" in copied and "built in place" not in copied
    assert "it can stay above ln 2 = 0.693" in copied  # SPIN's 1.37 final loss, explained
    built = _header_run(tmp_path, "built", {**spin, "data": {"train": "mine.jsonl"}}, {"sft_steps": 800, "root_model": "selfplay-demo"})
    assert "base model a demo model built in place (800 supervised steps on `mine.jsonl`)" in built
    sppo = _header_run(tmp_path, "sppo", {"algorithm": "sppo", "judge": {"name": "verifier"}, "generation": {"num_samples": 4},
                                          "model": {"base_model": "org/model"}}, kl=-0.015)
    assert "loss **sppo** (the default for sppo)," in sppo and "base model `org/model`" in sppo and "NLL" not in sppo
    assert "KL vs base is a Monte-Carlo estimate" in sppo and "as here: a value within two standard errors of 0" in sppo
    assert "as here" not in copied  # a positive estimate needs no excuse

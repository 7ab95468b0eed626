"""bench/bench_round.py end to end at its tiniest scale on the shipped demo model: both arms of both algorithms
run as their own processes, per-stage figures come back, and the loss check compares TRL's loss with ours on
the pairs our Judge wrote. Behaviour, not speed: the figures of a 2-core run are the bench's to report."""

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import bench_round  # noqa: E402


def test_stage_times_split_the_command_into_start_up_stages_and_the_rest():
    events = [{"event": "imported", "time": 100.0},
              {"event": "start", "time": 102.0, "task": "BaseModel", "round": None},
              {"event": "end", "time": 103.0, "task": "BaseModel", "round": None, "peak_rss_kib": 1024**2},
              {"event": "start", "time": 103.5, "task": "GenerateShard", "round": 1},
              {"event": "end", "time": 106.5, "task": "GenerateShard", "round": 1, "peak_rss_kib": 2 * 1024**2},
              {"event": "start", "time": 106.5, "task": "Generate", "round": 1},
              {"event": "end", "time": 107.0, "task": "Generate", "round": 1, "peak_rss_kib": 1024**2}]
    stages = bench_round.stage_times(events, wall_start=99.0, total=10.0)
    assert stages["start-up"]["seconds"] == 3.0
    assert stages["base model"] == {"seconds": 1.0, "peak_rss_gb": 1.0}
    assert stages["generate"] == {"seconds": 3.5, "peak_rss_gb": 2.0}
    assert stages["between tasks"]["seconds"] == 10.0 - 3.0 - 1.0 - 3.5


def test_ratios_are_taken_per_alternation():
    def run(arm, seconds):
        return {"algorithm": "spin", "arm": arm, "seconds": seconds, "peak_rss_gb": 1.0,
                "stages": {"train": {"seconds": seconds / 2}}}
    summary = bench_round.summarize([run("ours", 10.0), run("baseline", 30.0), run("ours", 20.0), run("baseline", 20.0)])
    assert summary["spin"]["total"]["ratio_baseline_over_ours"] == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 2}
    assert summary["spin"]["train"]["ours_s"]["median"] == 7.5


@pytest.mark.slow
def test_tiny_bench_runs_both_arms_and_checks_the_loss(tmp_path):
    out = tmp_path / "round.json"
    result = bench_round.main(["--tiny", "--reps", "1", "--threads", "1", "--work-dir", str(tmp_path / "work"), "--json", str(out)])
    assert json.loads(out.read_text())["summary"] == result["summary"]
    for algorithm in ("spin", "dpo"):
        arms = {run["arm"]: run for run in result["runs"] if run["algorithm"] == algorithm}
        assert set(arms) == {"ours", "baseline"}
        assert set(arms["baseline"]["stages"]) == {"evaluate base", "generate", "judge", "train", "evaluate round 1"}
        for arm in arms.values():
            assert arm["peak_rss_gb"] > 0 and arm["figures"]["train_steps"] >= 1
            # At the zero LoRA init the policy is the reference: every arm's first logged loss is log 2.
            assert arm["figures"]["train_loss_first"] == pytest.approx(math.log(2), abs=1e-4)
        assert math.isclose(sum(s["seconds"] for s in arms["ours"]["stages"].values()), arms["ours"]["seconds"], abs_tol=0.05)
        # Both evaluations score the same ground truth under the same base, each its own way: the same figure.
        ours_gt, baseline_gt = (arms[arm]["figures"]["gt_logprob_base"] for arm in ("ours", "baseline"))
        assert baseline_gt == pytest.approx(ours_gt, rel=1e-4) and ours_gt < 0
        assert {"kl_vs_base", "gt_logprob", "implicit_reward_margin", "distinct_2"} <= set(arms["baseline"]["figures"]["eval_figures"])
        check = result["loss_agreement"][algorithm]
        assert check["pairs"] >= 1
        assert check["trl_loss"] != pytest.approx(math.log(2), abs=1e-3)  # the adapter was moved: the check can fail
        assert check["our_loss"] == pytest.approx(check["trl_loss"], abs=1e-3)
    assert "ratio_baseline_over_ours" in result["summary"]["dpo"]["total"]


def test_the_baselines_learning_rates_are_ours(tmp_path):
    """The baseline's DPOTrainer steps through the learning rates our trainer does for the same pairs, batch and
    warm-up ratio (a fractional `warmup_steps` made transformers warm up 1 step at rate 0 where ours takes none)."""
    import argparse

    from bench import round_baseline
    from models.train.trainer import _optimizer

    parser = argparse.ArgumentParser()
    round_baseline.add_training_options(parser)
    args = parser.parse_args(["--batch-size", "2", "--learning-rate", "1e-3", "--lora-r", "2", "--lora-alpha", "4",
                              "--lora-target-modules", "q_proj,v_proj"])
    pairs = [{"prompt": f"add {i} and 1", "system": None, "chosen": str(i + 1), "rejected": str(i)} for i in range(8)]
    trainer = round_baseline.dpo_trainer(str(bench_round.DEMO_MODEL), pairs, args, str(tmp_path / "trl"))
    steps = 4  # 8 pairs at batch 2, one epoch: int(0.1 x 4) = 0 warm-up steps
    trainer.create_optimizer_and_scheduler(num_training_steps=steps)
    our_cfg = argparse.Namespace(learning_rate=args.learning_rate, warmup_ratio=args.warmup_ratio, weight_decay=0.0)
    _, optimizer, scheduler = _optimizer(our_cfg, trainer.model, steps)
    theirs, ours = [], []
    for _ in range(steps):
        theirs.append(trainer.lr_scheduler.get_last_lr()[0])
        ours.append(scheduler.get_last_lr()[0])
        for opt, sched in ((trainer.optimizer, trainer.lr_scheduler), (optimizer, scheduler)):
            opt.step()
            sched.step()
    assert theirs == pytest.approx(ours) and ours == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4])

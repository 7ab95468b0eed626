"""Evaluate(r): held-out figures of the model after round r (r = 0 is the base model).

    luigi --module pipeline Evaluate --round-idx 2

Writes round_NN/eval.parquet (greedy and sampled responses, their log-probs, held-out pairs) and
round_NN/metrics.json: the evaluation figures (models/evaluate/evaluation.py), the training figures and loss
curve of the round, and what Generate and Judge recorded. Evaluate(r) needs Evaluate(r-1), whose
responses and log-probs it compares with.

The work is done by `evaluation.shards` EvaluateShard(r, i) tasks, each on a GPU of its own with its block
of the held-out prompts (round_NN/eval.shards/); Evaluate(r) puts their rows together in the order one
unsharded evaluation writes them and computes the figures over all of them.
"""

import json
from pathlib import Path

import luigi

from common.atomic import atomic_write_json
from data.layout import TRAINING_LOG
from tasks.base import FileTarget, GpuTask, RunTask, ShardTask, read_shard_parts, set_cpu_threads
from tasks.rounds import model_task

PAIR_KINDS = ("pair_chosen", "pair_rejected")


def eval_prompts(recipe):
    """The held-out prompts every round evaluates: the first evaluation.num_prompts of data.eval."""
    from data.prompts import load_prompts
    from tasks.requirements import check_eval_data

    prompts = load_prompts(recipe.data.eval, recipe.data.eval_split, recipe.data).head(recipe.evaluation.num_prompts)
    check_eval_data(recipe, prompts, recipe.data.eval)  # a hub dataset was not read before scheduling
    return prompts


class EvaluateShard(ShardTask, GpuTask):
    """One shard of Evaluate(r): its block of the held-out prompts, on a GPU of its own."""

    round_idx = luigi.IntParameter(description="Round number; 0 evaluates the base model.")
    shard_idx = luigi.IntParameter(description="Shard number, from 0 (of evaluation.shards).")

    def requires(self):
        deps = {"model": model_task(self, self.round_idx), "base": model_task(self, 0)}
        if self.round_idx > 0:
            deps["previous"] = self.clone(Evaluate, round_idx=self.round_idx - 1)
            deps["first"] = self.clone(Evaluate, round_idx=0)
        return deps

    def output(self):
        part, judged = self.layout.eval_shard(self.round_idx, self.shard_idx)
        return {"part": FileTarget(str(part)), "judged": FileTarget(str(judged))}

    def run(self):
        set_cpu_threads()
        from data.layout import shard_range
        from data.schema import EVAL, read_artifact
        from models.evaluate.evaluation import evaluate_rows

        recipe = self.config.for_round(max(1, self.round_idx))
        prompts = eval_prompts(recipe)
        shard_prompts = prompts.iloc[list(shard_range(len(prompts), self.shard_idx, recipe.evaluation.shards))]
        deps = self.requires()
        previous = base = None
        if self.round_idx > 0:
            previous = read_artifact(self.input()["previous"]["eval"].path, EVAL)
            base = read_artifact(self.input()["first"]["eval"].path, EVAL)
        if len(shard_prompts):
            with self.hold_gpus(1):
                frame, judged = evaluate_rows(recipe, self.round_idx, deps["model"].model_path, deps["base"].model_path,
                                              shard_prompts, previous, base, all_prompts=prompts, shard_idx=self.shard_idx)
        else:  # more shards than held-out prompts
            import pandas as pd

            frame, judged = pd.DataFrame(), {}
        self.write_part(frame, judged)


class Evaluate(RunTask):
    round_idx = luigi.IntParameter(description="Round number; 0 evaluates the base model.")

    def requires(self):
        shards = self.config.for_round(max(1, self.round_idx)).evaluation.shards
        deps = {"shards": [self.clone(EvaluateShard, shard_idx=i) for i in range(shards)], "model": model_task(self, self.round_idx)}
        if self.round_idx > 0:
            deps["previous"] = self.clone(Evaluate, round_idx=self.round_idx - 1)
        return deps

    def output(self):
        return {"eval": FileTarget(str(self.layout.eval(self.round_idx))), "metrics": FileTarget(str(self.layout.metrics(self.round_idx)))}

    def run(self):
        from data.schema import EVAL, read_artifact, write_parquet
        from models.evaluate.evaluation import eval_metrics

        recipe = self.config.for_round(max(1, self.round_idx))
        prompts = eval_prompts(recipe)
        previous = read_artifact(self.input()["previous"]["eval"].path, EVAL) if self.round_idx > 0 else None
        frame, judged = merge_eval_shards(self.input()["shards"])
        metrics = eval_metrics(recipe, self.round_idx, frame, prompts, previous, judged)
        if self.round_idx > 0:  # judge-free: the ground truth's log-likelihood, paired with the base's
            from models.evaluate.evaluation import gt_logprob_change

            metrics |= gt_logprob_change(frame, read_artifact(self.layout.eval(0), EVAL))
        report = {"round": self.round_idx, "eval": metrics}
        if self.round_idx > 0:
            report["train"] = json.loads((Path(self.requires()["model"].model_path) / TRAINING_LOG).read_text())
            report["generate"] = json.loads(self.layout.generate_meta(self.round_idx).read_text())
            report["judge"] = json.loads(self.layout.judge_meta(self.round_idx).read_text())
        with self.output()["eval"].temporary_path() as tmp:
            write_parquet(frame, tmp, EVAL)
        with self.output()["metrics"].temporary_path() as tmp:
            atomic_write_json(tmp, report)
        from data.tracking import track_run

        track_run(self.config, self.run_dir)  # experiment trackers: this round's figures, and what they missed


EvaluateShard.merge_family = Evaluate


def merge_eval_shards(shard_outputs: list[dict]):
    """The shards' eval rows in the order of one unsharded evaluation (every prompt's greedy and sampled
    rows, then every held-out pair's two rows, each in prompt order), and their judgements put together."""
    import pandas as pd

    frames, judged_parts = read_shard_parts(shard_outputs)
    if len(frames) == 1:
        frame = frames[0]
    else:
        is_pair = [frame.kind.isin(PAIR_KINDS) for frame in frames]
        frame = pd.concat([f[~pair] for f, pair in zip(frames, is_pair)] + [f[pair] for f, pair in zip(frames, is_pair)],
                          ignore_index=True)
    judged_parts = [part for part in judged_parts if part]  # an empty shard judged nothing
    # Per-prompt lists (verdicts, lengths) are put together in shard order, counts added up, names kept.
    judged = {}
    for key, first in judged_parts[0].items():
        if isinstance(first, list):
            judged[key] = [p for part in judged_parts for p in part[key]]
        elif isinstance(first, int) and not isinstance(first, bool):
            judged[key] = sum(part[key] for part in judged_parts)
        else:
            judged[key] = first
    return frame, judged

"""Evaluate(r): held-out figures of the model after round r (r = 0 is the base model).

    luigi --module pipeline Evaluate --round-idx 2

Writes round_NN/eval.parquet (greedy and sampled responses, their log-probs, held-out pairs) and
round_NN/metrics.json: the evaluation figures (models/evaluation.py), the training figures and loss
curve of the round, and what Generate and Judge recorded. Evaluate(r) needs Evaluate(r-1), whose
responses and log-probs it compares with.
"""

import json
from pathlib import Path

import luigi

from common.atomic import atomic_write_json
from data.layout import TRAINING_LOG
from tasks.base import FileTarget, GpuTask, set_cpu_threads
from tasks.rounds import model_task


class Evaluate(GpuTask):
    round_idx = luigi.IntParameter(description="Round number; 0 evaluates the base model.")

    def requires(self):
        deps = {"model": model_task(self, self.round_idx), "base": model_task(self, 0)}
        if self.round_idx > 0:
            deps["previous"] = self.clone(Evaluate, round_idx=self.round_idx - 1)
            deps["first"] = self.clone(Evaluate, round_idx=0)
        return deps

    def output(self):
        return {"eval": FileTarget(str(self.layout.eval(self.round_idx))), "metrics": FileTarget(str(self.layout.metrics(self.round_idx)))}

    def run(self):
        set_cpu_threads()
        from data.prompts import load_prompts
        from data.schema import EVAL, read_artifact, write_parquet
        from models.evaluation import evaluate_round
        from tasks.requirements import check_eval_data

        recipe = self.config.for_round(max(1, self.round_idx))
        prompts = load_prompts(recipe.data.eval, recipe.data.eval_split, recipe.data).head(recipe.evaluation.num_prompts)
        check_eval_data(recipe, prompts, recipe.data.eval)  # a hub dataset was not read before scheduling
        deps = self.requires()
        previous = base = None
        if self.round_idx > 0:
            previous = read_artifact(self.input()["previous"]["eval"].path, EVAL)
            base = read_artifact(self.input()["first"]["eval"].path, EVAL)
        with self.hold_gpus(1):
            frame, metrics = evaluate_round(
                recipe, self.round_idx, deps["model"].model_path, deps["base"].model_path, prompts, previous, base
            )
        report = {"round": self.round_idx, "eval": metrics}
        if self.round_idx > 0:
            report["train"] = json.loads((Path(deps["model"].model_path) / TRAINING_LOG).read_text())
            report["generate"] = json.loads(self.layout.generate_meta(self.round_idx).read_text())
            report["judge"] = json.loads(self.layout.judge_meta(self.round_idx).read_text())
        with self.output()["eval"].temporary_path() as tmp:
            write_parquet(frame, tmp, EVAL)
        with self.output()["metrics"].temporary_path() as tmp:
            atomic_write_json(tmp, report)

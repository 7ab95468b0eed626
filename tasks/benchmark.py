"""Benchmark(r): lm-evaluation-harness on the policy after round r (r = 0 is the base model).

    luigi --module pipeline Benchmark --round-idx 1

Runs every entry of `evaluation.benchmarks` (configs/evaluation.py) through lm-eval's Python API on the
round's policy as the pipeline loads it (models/evaluate/benchmarks.py) and writes round_NN/benchmarks.json:
per benchmark, lm-eval's figures with their standard errors, the task's version, the lm-eval version,
n, the settings, and the model they were measured on. The same figures go into round_NN/metrics.json
(`benchmarks`: one row per benchmark, task and metric), and Report shows them. Needs `pip install -e
".[eval]"`; Iterate checks the tasks exist before anything is scheduled (tasks/requirements.py).

Benchmark(r) is complete when benchmarks.json holds a result for every benchmark of the recipe (same
settings, same task-file content) measured on the round's current model. So adding a benchmark to a
finished run reruns the Benchmark tasks (and Report) alone, and each runs only the new benchmark; the
recipe check of the run directory lets `evaluation.benchmarks` change (tasks/base.py), since benchmarks
only add outputs. A round whose model was remade measures everything again.
"""

import json
import logging
from pathlib import Path

import luigi

from common.atomic import atomic_write_json
from tasks.base import FileTarget, GpuTask, input_stamp, set_cpu_threads
from tasks.evaluate import Evaluate
from tasks.rounds import model_task

log = logging.getLogger("selfplay")


class Benchmark(GpuTask):
    round_idx = luigi.IntParameter(description="Round number; 0 is the base model.")

    def requires(self):
        # Evaluate(r) first: it writes metrics.json, which this task then adds its figures to.
        return {"model": model_task(self, self.round_idx), "base": model_task(self, 0),
                "evaluate": self.clone(Evaluate, round_idx=self.round_idx)}

    def output(self):
        return FileTarget(str(self.layout.benchmarks(self.round_idx)))

    @property
    def specs(self):
        from configs.evaluation import benchmark_specs

        return benchmark_specs(self.config.evaluation.benchmarks, self.config.name)

    def _records(self) -> list[dict]:
        path = Path(self.output().path)
        if not path.is_file():
            return []
        try:
            return list(json.loads(path.read_text())["benchmarks"])
        except (ValueError, KeyError, TypeError):  # edited by hand or damaged: nothing in it is trusted, all is measured again
            log.warning("%s is not a benchmarks file selfplay wrote; its benchmarks are measured again", path)
            return []

    def outputs_present(self) -> bool:
        model = self.requires()["model"].output()
        if not super().outputs_present() or not model.exists():
            return False
        from models.evaluate.benchmarks import still_valid

        return None not in still_valid(self._records(), self.specs, input_stamp(model))

    def run(self):
        set_cpu_threads()
        from models.evaluate.benchmarks import lm_eval_version, metrics_rows, run_benchmarks, still_valid

        specs, recipe = self.specs, self.config
        stamp = input_stamp(self.input()["model"])
        records = still_valid(self._records(), specs, stamp)
        missing = [spec for spec, record in zip(specs, records) if record is None]
        if missing:
            from models.load.loading import load_policy, load_tokenizer

            deps = self.requires()
            model_path, base_path = deps["model"].model_path, deps["base"].model_path
            with self.hold_gpus(1):
                # The policy as the pipeline uses it: the base plus the round's adapter, unmerged (models/load/loading.py).
                model = load_policy(model_path, recipe.model, quantize=recipe.model.quantization == "4bit",
                                    root=base_path, merge=False)
                made = iter(run_benchmarks(missing, model, load_tokenizer(model_path, recipe.model)))
            records = [record if record is not None else {**next(made), "model_stamp": stamp} for record in records]
        # metrics.json first: once benchmarks.json (the output) is there, the task counts as done.
        metrics_path = self.layout.metrics(self.round_idx)
        report = json.loads(metrics_path.read_text())
        report["benchmarks"] = metrics_rows(records)
        atomic_write_json(metrics_path, report)
        with self.output().temporary_path() as tmp:
            atomic_write_json(tmp, {"round": self.round_idx, "lm_eval_version": lm_eval_version(), "benchmarks": records})

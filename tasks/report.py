"""Report(rounds): runs/<run>/report.md with a table of every round's figures, plots and examples.

    luigi --module pipeline Report --rounds 3

Reads what Evaluate and Benchmark wrote (through data/runs.py) and renders it with data/report.py; the PNG plots go
to runs/<run>/plots/ and are written before report.md, the task's output.
"""

import luigi

from tasks.base import FileTarget, RunTask
from tasks.benchmark import Benchmark
from tasks.evaluate import Evaluate


class Report(RunTask):
    rounds = luigi.IntParameter(description="Rounds the report covers.")

    def requires(self):
        evaluations = [self.clone(Evaluate, round_idx=r) for r in range(self.rounds + 1)]
        # lm-eval benchmarks of every round, when the recipe names some (tasks/benchmark.py)
        benchmarks = [self.clone(Benchmark, round_idx=r) for r in range(self.rounds + 1)] if self.config.evaluation.benchmarks else []
        return evaluations + benchmarks

    def output(self):
        return FileTarget(str(self.layout.report))

    def run(self):
        from data.report import write_report

        with self.output().temporary_path() as tmp:
            write_report(self.run_dir, tmp, self.config.evaluation.report_prompts)
        from data.tracking import track_run

        # Experiment trackers: the report's side-by-side greedy answers as a table.
        track_run(self.config, self.run_dir, answers_rounds=self.rounds, answer_prompts=self.config.evaluation.report_prompts)

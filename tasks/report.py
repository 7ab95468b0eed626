"""Report(rounds): runs/<run>/report.md with a table of every round's figures, plots and examples.

    luigi --module pipeline Report --rounds 3

Reads what Evaluate and Benchmark wrote (through data/runs.py) and renders it with data/report.py; the PNG plots go
to runs/<run>/plots/ and are written before report.md, the task's output. With a validation split it
also requires every round's Select, and says which round the run keeps, by which figure, each round's
parent, and why the run stopped when it stopped early.
"""

import luigi

from tasks.base import FileTarget, RunTask
from tasks.benchmark import Benchmark
from tasks.evaluate import Evaluate
from tasks.rounds import Select


def selecting(recipe) -> bool:
    """Whether the run scores its rounds on a validation split (data.validation), and so selects them."""
    from data.validation import has_validation

    return has_validation(recipe)


class Report(RunTask):
    rounds = luigi.IntParameter(description="Rounds the report covers.")
    requested_rounds = luigi.IntParameter(
        default=0, significant=False, description="The --rounds asked for, when early stopping ended the run sooner.")

    def requires(self):
        deps = [self.clone(Evaluate, round_idx=r) for r in range(self.rounds + 1)]
        if self.config.evaluation.benchmarks:  # lm-eval benchmarks of every round (tasks/benchmark.py)
            deps += [self.clone(Benchmark, round_idx=r) for r in range(self.rounds + 1)]
        if selecting(self.config):
            deps += [self.clone(Select, round_idx=r) for r in range(self.rounds + 1)]
        return deps

    def output(self):
        return FileTarget(str(self.layout.report))

    def outputs_present(self) -> bool:
        """report.md, of the rounds this report covers: Iterate hands out Report(rounds=k) only once the rounds are
        made, so a report.md of fewer rounds is one to write again (see data.report.REPORT_OF)."""
        from data.report import report_rounds

        if not super().outputs_present():
            return False
        covered = report_rounds(self.layout.report)
        return covered is None or covered == self.rounds

    def run(self):
        from data.report import write_report

        with self.output().temporary_path() as tmp:
            write_report(self.run_dir, tmp, self.config.evaluation.report_prompts, self.requested_rounds or None,
                         self.rounds)
        from data.tracking import track_run

        # Experiment trackers: the report's side-by-side greedy answers as a table.
        track_run(self.config, self.run_dir, answers_rounds=self.rounds, answer_prompts=self.config.evaluation.report_prompts)

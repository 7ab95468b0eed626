"""Iterate(rounds): the main command, N rounds of self-play fine-tuning and their report.

    luigi --module pipeline Iterate --rounds 3 [--recipe configs/demo_sppo.yaml] [--run-name NAME]

Round r: Generate(r) -> Judge(r) -> Train(r) -> Evaluate(r); round 1 starts from BaseModel and round
r+1 from round r's checkpoint. A second identical command runs nothing; deleting a round's files
reruns that round and the ones after it. The recipe, the run directory and what every later stage
needs of the data and models (tasks/requirements.py) are checked before anything is scheduled, so a
misspelled key or a column the verifier needs fails at once, in one line; so does a second command on
a run directory another command is writing (tasks/lock.py), and a run directory edited by hand is
said in one line per edit (tasks/run_state.py).
"""

import logging
import time

import luigi

from common.errors import RecipeError
from tasks import lock
from tasks.base import RunTask, record_benchmarks, refused_in_command_line
from tasks.evaluate import Evaluate
from tasks.report import Report
from tasks.run_state import check_run_state


class Iterate(RunTask):
    rounds = luigi.IntParameter(default=3, description="Number of self-play rounds.")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)  # loads the recipe, checks run.yaml, takes the run's lock
        try:
            with refused_in_command_line():  # a mistake in the user's input: one line, exit USER_ERROR_EXIT
                if self.rounds < 1:
                    raise RecipeError(f"--rounds must be at least 1, got {self.rounds}")
                from tasks.requirements import preflight

                preflight(self.config, self.rounds)  # fail before anything is scheduled, in one line
                from data.tracking import check_trackers

                check_trackers(self.config.tracking, self.run_dir)  # installed, and their directory writable
                # A run directory edited by hand (tasks/run_state.py), every round's tasks walked from its Evaluate.
                check_run_state(self, lambda round_idx: self.clone(Evaluate, round_idx=round_idx))
                record_benchmarks(self.run_dir, self.config)  # the one recipe key a finished run may change besides tracking
        except BaseException:
            if self.took_lock:  # nothing will run: a process that goes on (a notebook) must not keep it
                lock.release(self.run_dir)
            raise
        self._started = time.time()  # the CLI builds this task first: its age at run() is the command's wall time

    def requires(self):
        return [self.clone(Evaluate, round_idx=r) for r in range(1, self.rounds + 1)] + [self.clone(Report)]

    def output(self):
        return []

    def run(self):
        from data.advice import untrained_rounds

        report, log = self.layout.report, logging.getLogger("selfplay")
        log.info("%d round%s of run '%s' complete; this command took %.0fs; report: %s",
                 self.rounds, "" if self.rounds == 1 else "s", self.run_dir.name, time.time() - self._started, report)
        for line in untrained_rounds(self.run_dir, self.rounds):  # complete, but a round changed nothing: the last word
            log.warning("%s", line)

    def nothing_to_do(self) -> str:
        return f"run '{self.run_dir.name}' is complete through round {self.rounds}; report: {self.layout.report}"

"""Iterate(rounds): the main command, N rounds of self-play fine-tuning and their report.

    luigi --module pipeline Iterate --rounds 3 [--recipe configs/demo_sppo.yaml] [--run-name NAME]

Round r: Generate(r) -> Judge(r) -> Train(r) -> Evaluate(r); round 1 starts from BaseModel and round
r+1 from round r's checkpoint. A second identical command runs nothing; deleting a round's files
reruns that round and the ones after it. The recipe, the run directory and what every later stage
needs of the data and models (tasks/requirements.py) are checked before anything is scheduled, so a
misspelled key or a column the verifier needs fails at once, in one line; so does a second command on
a run directory another command is writing (tasks/lock.py), and a run directory edited by hand is
said in one line per edit (tasks/run_state.py).

With a validation split (data.validation) every round, round 0 included, is also scored on it
(Validate(r)) and selected (Select(r)): best/ and best.json hold the round the run keeps. Rounds are
then scheduled one at a time with Luigi's dynamic dependencies: run() yields round r's selection,
reads what it decided, and yields round r+1 only when the run goes on, so with `iterate.patience` the
rounds after an early stop are never scheduled and cost nothing. Evaluate(r) is yielded beside round
r+1's selection, so the held-out evaluation of one round and the next round's work can run side by
side (--workers). The same command again does nothing; with a larger --rounds it says the run
stopped and why, and goes on only with --resume-stopped.
"""

import logging
import time

import luigi

from common.errors import RecipeError
from tasks import lock
from tasks.base import RunTask, record_benchmarks, refused_in_command_line
from tasks.evaluate import Evaluate
from tasks.report import Report, selecting
from tasks.rounds import Select
from tasks.run_state import check_run_state

log = logging.getLogger("selfplay")


class Iterate(RunTask):
    rounds = luigi.IntParameter(default=3, description="Number of self-play rounds.")
    resume_stopped = luigi.BoolParameter(
        default=False, significant=False,
        description="Run the rounds up to --rounds even where early stopping (iterate.patience) ended the run.",
    )

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
                # A run directory edited by hand (tasks/run_state.py), every round's tasks walked from its last ones.
                check_run_state(self, self.round_tasks)
                record_benchmarks(self.run_dir, self.config)  # the one recipe key a finished run may change besides tracking
            self._say_stopped()
        except BaseException:
            if self.took_lock:  # nothing will run: a process that goes on (a notebook) must not keep it
                lock.release(self.run_dir)
            raise
        self._started = time.time()  # the CLI builds this task first: its age at run() is the command's wall time
        self._made = None  # the rounds earlier commands made, as the current build found them (complete())

    @property
    def selecting(self) -> bool:
        return selecting(self.config)

    def round_tasks(self, round_idx: int) -> list:
        """Round `round_idx`'s last tasks, from which every task of the round is reached."""
        tasks = [self.clone(Evaluate, round_idx=round_idx)]
        return tasks + [self.clone(Select, round_idx=round_idx)] if self.selecting else tasks

    def requires(self):
        if not self.selecting:
            return [self.clone(Evaluate, round_idx=r) for r in range(1, self.rounds + 1)] + [self.clone(Report)]
        # run() hands out the rounds one at a time. The rounds earlier commands made are required here, so
        # Luigi sees at once which of them are incomplete (a file deleted, a round redone) and reruns
        # everything made from them, before any of it runs: a task handed out only after its inputs were
        # redone would look complete.
        # Luigi asks complete() before requires() in every build (and the same task object serves several
        # builds in one process): the rounds made are taken there, once per build, so requires() gives the
        # same tasks at scheduling and when Iterate runs.
        made, ends_there = self._made if self._made is not None else self.rounds_made()
        tasks = [task for r in range(1, made + 1) for task in self.round_tasks(r)]
        # The report of those rounds too, so that one made before a round was redone is written again; but not
        # when this command goes on past them (a larger --rounds): Luigi checks these tasks again each time
        # Iterate resumes, and would find that report overwritten by the longer one ("Unfulfilled dependency").
        return tasks + [self.clone(Report, rounds=made, requested_rounds=self.rounds)] if made and ends_there else tasks

    def rounds_made(self) -> tuple[int, bool]:
        """The rounds up to --rounds that earlier commands made (a round directory), up to an early stop this
        command keeps; and whether this command ends there (--rounds reached, or that stop)."""
        from data.selection import read_selection

        made = max([r for r in self.layout.rounds() if r <= self.rounds], default=0)
        for round_idx in range(1, made + 1):
            record = read_selection(self.layout.selection(round_idx))
            if record is not None and record["stop"] and not self.resume_stopped \
                    and not self.layout.selection(round_idx + 1).is_file():
                return round_idx, True
        return made, made == self.rounds

    def output(self):
        return []

    def last_round(self) -> int | None:
        """The last round this command runs: --rounds, or the round early stopping ended the run at (unless
        --resume-stopped, or rounds after it were run before); None while a selection it depends on is not made."""
        from data.selection import read_selection

        known: dict[str, bool] = {}  # each task checked once however many rounds reach it (tasks/base.py)
        for round_idx in range(1, self.rounds + 1):
            if not self.clone(Select, round_idx=round_idx)._complete(known):
                return None
            record = read_selection(self.layout.selection(round_idx))
            if record["stop"] and round_idx < self.rounds and not self.resume_stopped \
                    and not self.layout.selection(round_idx + 1).is_file():
                return round_idx
        return self.rounds

    def complete(self) -> bool:
        if not self.selecting:
            return super().complete()
        self._made = self.rounds_made()
        last = self.last_round()
        return last is not None and self.clone(Report, rounds=last).complete() and self._best_is(last)

    def _best_is(self, last: int) -> bool:
        """Whether best/ holds what the selection after round `last` keeps (best/ deleted by hand, or left
        by a round since removed, is put back by run())."""
        from data.selection import best_record, read_best, read_selection

        best = read_best(self.layout)
        wanted = best_record(read_selection(self.layout.selection(last)), self.layout)
        return best is not None and {k: best.get(k) for k in wanted} == wanted

    def _stopped_record(self) -> tuple[list[dict], int] | None:
        """(selection records of rounds 0..k, k) when early stopping ended the run at k before --rounds."""
        from data.selection import read_selection

        records = []
        for round_idx in range(self.rounds + 1):
            record = read_selection(self.layout.selection(round_idx))
            if record is None:
                return None
            records.append(record)
            if record["stop"] and 0 < round_idx < self.rounds and not self.layout.selection(round_idx + 1).is_file():
                return records, round_idx
        return None

    def _say_stopped(self) -> None:
        stopped = self._stopped_record() if self.selecting else None
        if stopped is None:
            return
        from data.selection import stop_line

        records, _ = stopped
        follow = ("--resume-stopped given: going on" if self.resume_stopped
                  else "this command runs nothing more; add --resume-stopped to go on")
        log.info("run '%s' %s; %s", self.run_dir.name, stop_line(records, self.rounds), follow)

    def run(self):
        last = self.rounds
        if self.selecting:
            last = yield from self._rounds()
        from data.advice import untrained_rounds

        done = (f"{last} round{'' if last == 1 else 's'}" if last == self.rounds
                else f"rounds 1-{last} of {self.rounds} (stopped early)")
        log.info("%s of run '%s' complete; this command took %.0fs; report: %s",
                 done, self.run_dir.name, time.time() - self._started, self.layout.report)
        for line in untrained_rounds(self.run_dir, last):  # complete, but a round changed nothing: the last word
            log.warning("%s", line)

    def nothing_to_do(self) -> str:
        last = (self.last_round() or self.rounds) if self.selecting else self.rounds
        stopped = "" if last == self.rounds else f" (early stopping ended it before round {self.rounds})"
        return f"run '{self.run_dir.name}' is complete through round {last}{stopped}; report: {self.layout.report}"

    def _rounds(self):
        """Round by round: yield round r's selection (with round r-1's evaluation beside it), read what it
        decided, and stop where early stopping says so; then the last evaluation and the report."""
        from data.selection import read_best, read_selection, stop_line

        records = [None]
        last = self.rounds
        for round_idx in range(1, self.rounds + 1):
            yield [self.clone(Select, round_idx=round_idx)] + ([self.clone(Evaluate, round_idx=round_idx - 1)]
                                                               if round_idx > 1 else [])
            record = read_selection(self.layout.selection(round_idx))
            records.append(record)
            if record["stop"] and round_idx < self.rounds and not self.resume_stopped \
                    and not self.layout.selection(round_idx + 1).is_file():
                records[0] = read_selection(self.layout.selection(0))
                log.info("run '%s' %s", self.run_dir.name, stop_line(records, self.rounds))
                last = round_idx
                break
        yield [self.clone(Evaluate, round_idx=last), self.clone(Report, rounds=last, requested_rounds=self.rounds)]
        if not self._best_is(last):
            from data.selection import best_record, publish_best

            record = read_selection(self.layout.selection(last))
            source = self.clone(Select, round_idx=last).kept_source(record["kept_round"])
            publish_best(self.layout, best_record(record, self.layout), source)
        best = read_best(self.layout)
        if best is not None:
            why = best["why"]
            if best["round"] != last:  # why the rounds after it were not kept: the last round's decision
                why += "; " + read_selection(self.layout.selection(last))["why"]
            log.info("run '%s' keeps round %d (%s): %s", self.run_dir.name, best["round"], self.layout.best, why)
        return last

"""Our round's command with a clock: `luigi --module bench.round_clock Iterate ...` runs `pipeline` as
`luigi --module pipeline Iterate ...` does, and appends to the file BENCH_ROUND_EVENTS one JSON line per task
start and end: the wall time, the task, and (at the end) the process's peak resident memory since that task
started (VmHWM, reset at the start through /proc/self/clear_refs where the kernel allows it). Nothing of the
run changes; bench/bench_round.py reads the lines into per-stage times."""

from __future__ import annotations

import json
import os
import time

import luigi

import pipeline  # noqa: F401  (the tasks, registered with Luigi)

EVENTS = os.environ.get("BENCH_ROUND_EVENTS")


def _peak_rss_kib() -> int | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _record(kind: str, task) -> None:
    if not EVENTS:
        return
    entry = {"event": kind, "time": time.time(), "task": task.task_family, "round": getattr(task, "round_idx", None)}
    if kind == "start":
        try:  # 5: reset the peak resident set size to the current one (Documentation/filesystems/proc.rst)
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
        except OSError:
            pass
    else:
        entry["peak_rss_kib"] = _peak_rss_kib()
    with open(EVENTS, "a") as handle:
        handle.write(json.dumps(entry) + "\n")


@luigi.Task.event_handler(luigi.Event.START)
def _started(task):
    _record("start", task)


@luigi.Task.event_handler(luigi.Event.SUCCESS)
def _succeeded(task):
    _record("end", task)


if EVENTS:
    with open(EVENTS, "a") as _handle:
        _handle.write(json.dumps({"event": "imported", "time": time.time()}) + "\n")

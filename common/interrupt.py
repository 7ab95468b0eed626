"""SIGTERM and SIGINT: stop where the work is saved, exit non-zero, and let the next command resume.

Slurm, Kubernetes and a user's Ctrl-C send one of these before a kill. Once a command holds its run
directory (tasks/lock.py) both are handled here instead of killing the process at once:

- inside a loop that saves as it goes (`safe_points`: Generate's parts, Train's steps), the loop
  finishes the current part or step, saves it, and raises Interrupted;
- inside any other task, Interrupted is raised at once: its outputs are written whole or not at all,
  so it simply runs again next time;
- between tasks, the next task does not start.

The task fails with one line, Luigi exits with its task_failed code (30 in luigi.cfg), and the next
command resumes from what was saved. A second signal stops at once, wherever the command is.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Callable

from common.errors import Interrupted

log = logging.getLogger("selfplay")

SIGNALS = (signal.SIGTERM, signal.SIGINT)
_previous: dict[int, object] = {}
_state = {
    "received": None,  # name of the first signal received, e.g. "SIGTERM"
    "safe_point": None,  # what the running loop saves before it stops, e.g. "generation part"
    "forward": None,  # where to pass signals on to (a training subprocess), if anywhere
    "task": None,  # the task running in this process
    "repeat_stops_at_once": True,
}


def install(repeat_stops_at_once: bool = True) -> None:
    """Handle SIGTERM and SIGINT in this process (from the main thread only; elsewhere a no-op)."""
    if _previous or threading.current_thread() is not threading.main_thread():
        return
    _state.update(received=None, safe_point=None, forward=None, repeat_stops_at_once=repeat_stops_at_once)
    for signum in SIGNALS:
        _previous[signum] = signal.signal(signum, _handle)


def restore() -> None:
    """Put back the handlers that were there before install(), and forget any signal received."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum, handler in _previous.items():
        signal.signal(signum, handler)
    _previous.clear()
    _state["received"] = None


def received() -> str | None:
    """The name of the signal that asked this command to stop, if one did."""
    return _state["received"]


def _handle(signum, frame) -> None:
    name = signal.Signals(signum).name
    first = _state["received"] is None
    _state["received"] = _state["received"] or name
    if _state["forward"] is not None:
        _state["forward"](signum, first)
        return
    if first:
        if _state["safe_point"]:
            log.warning("%s: stopping once the current %s is saved (send it again to stop at once)", name, _state["safe_point"])
            return
        if _state["task"]:
            raise Interrupted(f"{name}: {_state['task']} stopped; its outputs are written whole or not at all, "
                              "so rerun the same command to resume")
        log.warning("%s: stopping before the next task", name)
        return
    if _state["repeat_stops_at_once"]:
        raise Interrupted(f"{name} again: stopped at once{' in ' + _state['task'] if _state['task'] else ''}; "
                          "rerun the same command to resume")


@contextlib.contextmanager
def task_running(name: str):
    """Marks `name` as the running task; refuses to start it once a stop was asked for."""
    if _state["received"]:
        raise Interrupted(f"{_state['received']}: {name} not started; rerun the same command to resume")
    previous = _state["task"]
    _state.update(task=name, safe_point=None, forward=None)  # nothing of an earlier task's loop carries over
    try:
        yield
    finally:
        _state.update(task=previous, safe_point=None, forward=None)


@contextlib.contextmanager
def safe_points(what: str):
    """Inside, a first signal only records itself: the loop calls received() after saving each `what`."""
    previous, _state["safe_point"] = _state["safe_point"], what
    try:
        yield
    finally:
        _state["safe_point"] = previous


def enter_safe_points(what: str) -> None:
    """safe_points() for a loop too long to re-indent: leave_safe_points() after it; the end of the task
    leaves them too, should the loop raise."""
    _state["safe_point"] = what


def leave_safe_points() -> None:
    _state["safe_point"] = None


@contextlib.contextmanager
def forwarding(send: Callable[[int, bool], None]):
    """Inside, signals go to `send(signum, first)` (a child process that saves its own work) and
    this process waits for it."""
    previous, _state["forward"] = _state["forward"], send
    try:
        yield
    finally:
        _state["forward"] = previous


def run_forwarding_signals(command: list[str], group_exit_seconds: float = 300.0, **popen_kwargs) -> int:
    """Run `command` in a process group of its own and return its exit status. A first SIGTERM/SIGINT
    is passed on to the whole group (a trainer there saves and stops) and this process waits for all
    of it, for at most `group_exit_seconds` after the command itself ends; a second one kills the group."""
    import os
    import subprocess
    import time

    proc = subprocess.Popen(command, start_new_session=True, **popen_kwargs)
    forwarded = []

    def send(signum: int, first: bool) -> None:
        forwarded.append(signum)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signum if first else signal.SIGKILL)
        if first:
            log.warning("%s: passed on to `%s`, which stops after its current step", signal.Signals(signum).name, command[-2:])

    with forwarding(send):
        try:
            returncode = proc.wait()
            # A launcher may end before the processes it started (it is stopped by the signal it was passed,
            # they save first): wait for the group, so no writer outlives this task.
            deadline = time.monotonic() + group_exit_seconds
            while forwarded and time.monotonic() < deadline:
                try:
                    os.killpg(proc.pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.2)
            else:
                if forwarded:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    return returncode

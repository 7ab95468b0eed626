"""One writer per run directory: `runs/<run>/.lock`, held by the command that writes the run.

A command takes the lock before any of its tasks runs: `luigi` makes the command's task object
before it schedules anything, and making a task takes its run directory's lock (tasks/base.py).
A second command on the same run directory is refused in one line naming the holder, and exits
with EXIT_CODE; with `--wait-for-lock` it waits for the holder to finish instead.

The lock is an flock(2) on the file, so the kernel drops it with the process whatever ended it; the
file's text (pid, host, command, start time) is only there to name the holder. A file that names a
holder while nobody holds it was left by a killed command, and is taken over with a warning.

Within one process the lock is re-entrant: every task of a command shares it, and so do several
luigi.build calls in a row (tests, notebooks); it is given back when Luigi's worker stops, or when
the process ends. Task processes forked by `--workers N` inherit it. With Luigi's central scheduler
(luigid) the workers of the command holding the lock are deduplicated by luigid as usual.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import json
import logging
import os
import shlex
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from common.errors import RunLockedError

log = logging.getLogger("selfplay")

LOCK_NAME = ".lock"
# The exit status of a command refused because another one holds its run directory. Luigi's own
# codes ([retcode] in luigi.cfg) are 10 to 40; 11 sits next to its already_running (10), which Luigi
# gives a second identical command on the same host.
EXIT_CODE = 11
WAIT_POLL_SECONDS = 1.0


@dataclass
class _Held:
    fd: int
    owner_pid: int  # a forked task process inherits the entry, but only the owner gives the lock back
    created_dir: bool  # the lock made the run directory: it goes again if the command wrote nothing


_held: dict[Path, _Held] = {}


def _describe(holder: dict) -> str:
    if not holder:
        return "another command (it has not written its details yet)"
    return (f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}: "
            f"{holder.get('command')}")


def _read_holder(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 65536).decode(errors="replace").strip()
    if not text:
        return {}
    try:
        holder = json.loads(text)
    except json.JSONDecodeError:
        return {"pid": "?", "host": "?", "started": "?", "command": f"unreadable lock file ({text[:60]!r})"}
    return holder if isinstance(holder, dict) else {}


def _write_holder(fd: int) -> None:
    program = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path("python")
    program = f"python -m {program.parent.name}" if program.name == "__main__.py" else program.name
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": " ".join([program, *(shlex.quote(a) for a in sys.argv[1:])]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(info) + "\n").encode())


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, TypeError):
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _try_lock(fd: int, path: Path) -> bool:
    """flock the file without blocking. Where the filesystem has no flock, fall back to the holder's
    pid: held while that pid runs on this host (or runs on another host, which cannot be checked)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
        holder = _read_holder(fd)
        if not holder or holder.get("pid") == os.getpid():
            return True
        return holder.get("host") == socket.gethostname() and not _pid_alive(holder.get("pid"))


def holds(run_dir: Path) -> bool:
    return Path(run_dir).resolve() in _held


def acquire(run_dir: Path, wait: bool = False) -> bool:
    """Take the run directory's lock; True when this call took it, False when this process holds it
    already. Raises RunLockedError naming the holder, or with `wait` waits until it is free."""
    run_dir = Path(run_dir)
    key = run_dir.resolve()
    if key in _held:
        return False
    created_dir = not run_dir.exists()
    path = run_dir / LOCK_NAME
    announced = False
    while True:
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:  # the holder, ending, removed the run directory it had made and left empty
            continue
        try:
            locked = _try_lock(fd, path)
            holder = _read_holder(fd)
            if not locked:
                if not wait:
                    raise RunLockedError(
                        f"{run_dir} is in use by {_describe(holder)}; wait for it to end (or stop it), "
                        f"or add --wait-for-lock (lock file: {path})"
                    )
                if not announced:
                    log.info("waiting for %s, held by %s", path, _describe(holder))
                    announced = True
                os.close(fd)
                time.sleep(WAIT_POLL_SECONDS)
                continue
            try:  # a holder that was giving the lock back may have removed the file we locked
                current = os.stat(path)
            except FileNotFoundError:
                current = None
            if current is None or not os.path.samestat(os.fstat(fd), current):
                os.close(fd)
                continue
            if holder and holder.get("pid") != os.getpid():
                where = "" if holder.get("host") == socket.gethostname() else " (on another host: make sure it has ended)"
                log.warning("%s: taking over the lock left by %s, which is no longer running%s", path, _describe(holder), where)
            _write_holder(fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise
        _held[key] = _Held(fd=fd, owner_pid=os.getpid(), created_dir=created_dir)
        return True


def release(run_dir: Path) -> None:
    held = _held.pop(Path(run_dir).resolve(), None)
    if held is None or held.owner_pid != os.getpid():
        return  # a forked task process: the lock is its parent's to give back
    path = Path(run_dir) / LOCK_NAME
    try:
        # Remove the file before unlocking it: a command waiting on this file then sees it is gone and
        # locks a fresh one, rather than both believing they hold the lock.
        if os.path.samestat(os.fstat(held.fd), os.stat(path)):
            path.unlink()
    except OSError:
        pass
    os.close(held.fd)
    if held.created_dir:
        try:
            Path(run_dir).rmdir()  # only if empty: the command failed before writing anything
        except OSError:
            pass


def release_all() -> None:
    for key in list(_held):
        release(key)


atexit.register(release_all)

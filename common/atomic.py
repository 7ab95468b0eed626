"""Atomic writes: a reader sees the old file or directory, or the whole new one, never part of one.

Every file and directory the project writes goes through `atomic_path`: the writer fills a hidden
temporary sibling, which one `os.replace` then puts in place. On any failure (an exception, a full
disk, a signal) the temporary is removed, so nothing partial is left for a rerun to find or take
for output; a full disk becomes one line naming the path and the space it needs (common/disk.py).
A process killed while writing (SIGKILL) cannot clean up: the temporaries of processes that no
longer run are removed the next time the same path is written.

    with atomic_path(path) as tmp:                    # a file
        tmp.write_text(...)
    with atomic_path(path, directory=True) as tmp:    # a directory: made empty, replaces `path` whole
        (tmp / "state.pt").write_bytes(...)
    atomic_write_bytes(path, data)                    # bytes, flushed to disk before the rename
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from common.disk import disk_full_error, is_disk_full


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def _size_of(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size if path.is_file() else 0


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it runs
        return True
    return True


def _remove_stale_temporaries(path: Path) -> None:
    """Temporaries of `path` (`.NAME.PID.RANDOM.tmp`), and those written inside one of them
    (`..NAME.PID...`), left by processes that no longer run."""
    for prefix in (f".{path.name}.", f"..{path.name}."):
        for stale in path.parent.glob(f"{prefix}*"):
            pid = stale.name[len(prefix) :].split(".", 1)[0]
            if stale.name.endswith(".tmp") and pid.isdigit() and int(pid) != os.getpid() and not _running(int(pid)):
                _remove(stale)


def temporary_sibling(path: str | Path) -> Path:
    """A fresh hidden name beside `path` for writing it, named after this process (its parent made)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


@contextlib.contextmanager
def atomic_path(path: str | Path, directory: bool = False, needed_bytes: int | None = None) -> Iterator[Path]:
    """Yield a temporary path to write `path` into; on leaving, it replaces `path` in one rename.

    `directory`: the temporary is an empty directory, and an existing `path` is replaced whole.
    `needed_bytes`: what the write needs, when known: a failure with less than that free is a full
    disk even when the library says it vaguely (torch.save's "unexpected pos").
    """
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        if directory:
            tmp.mkdir()
        yield tmp
        if directory and path.exists():  # an incomplete or outdated copy
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException as exc:
        written = _size_of(tmp)
        _remove(tmp)
        if isinstance(exc, Exception):
            # A writer inside that knew its size said so on its own DiskFullError (common/disk.py).
            needed = needed_bytes if needed_bytes is not None else getattr(exc, "needed_bytes", None)
            if is_disk_full(exc, path, needed):
                # Without an estimate, what had been written when the disk filled is a lower bound.
                raise disk_full_error(path, needed or written, at_least=needed is None) from exc
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` atomically, flushed to the disk before the rename."""
    with atomic_path(path, needed_bytes=len(data)) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_json(path: str | Path, obj) -> None:
    """`obj` as indented JSON with sorted keys (values JSON cannot hold written as text), atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())

"""A full disk, said in one line: which file, and about how many bytes writing it needs.

Writers call `full_disk_guard(path, needed_bytes)` around a write into a temporary name; they remove
that temporary themselves, so a failed write leaves nothing a rerun could take for output. Libraries
report a full disk differently: OSError errno 28 (Python, pyarrow), "os error 28" in a
SafetensorError (safetensors, so save_pretrained), and a bare "unexpected pos" RuntimeError from
torch.save; the last is recognised by the free space left being less than the write needed.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
from pathlib import Path

from common.errors import DiskFullError

_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_FULL_MESSAGES = ("no space left on device", "disk quota exceeded", "os error 28", "os error 122")


def free_bytes(path: str | Path) -> int | None:
    path = Path(path)
    for candidate in (path, *path.parents):
        if candidate.exists():
            return shutil.disk_usage(candidate).free
    return None


def is_disk_full(exc: BaseException, path: str | Path | None = None, needed_bytes: int | None = None) -> bool:
    seen = exc
    while seen is not None:
        if isinstance(seen, DiskFullError):
            return True
        if isinstance(seen, OSError) and seen.errno in _FULL_ERRNOS:
            return True
        if any(m in str(seen).lower() for m in _FULL_MESSAGES):
            return True
        seen = seen.__cause__ or seen.__context__
    if path is not None and needed_bytes and isinstance(exc, (OSError, RuntimeError)):
        free = free_bytes(path)
        return free is not None and free < needed_bytes
    return False


def human(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} TiB"


def disk_full_error(path: str | Path, needed_bytes: int | None, at_least: bool = False) -> DiskFullError:
    free = free_bytes(path)
    needs = "" if needed_bytes is None else f"; it needs {'at least' if at_least else 'about'} {human(int(needed_bytes))}"
    has = "" if free is None else f", {human(free)} free"
    error = DiskFullError(f"{path}: no space left on device{needs}{has}; nothing partial was kept: "
                          "free some space and rerun the same command")
    error.needed_bytes, error.at_least = needed_bytes, at_least  # for a caller that renames the path
    return error


@contextlib.contextmanager
def full_disk_guard(path: str | Path, needed_bytes: int | None = None, at_least: bool = False):
    """Turn a full-disk failure inside into a one-line DiskFullError naming `path`."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as exc:
        if is_disk_full(exc, path, needed_bytes):
            raise disk_full_error(path, needed_bytes, at_least) from exc
        raise

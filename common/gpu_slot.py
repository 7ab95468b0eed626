"""Which GPUs a task runs on: `gpu_slot(n)` holds n of this box's visible GPUs for as long as a task runs.

Luigi's `[resources] gpu=N` caps how many GPU tasks run at once on a worker, but says nothing of *which*
GPU each one gets: without this, every task process would load its model on cuda:0. Each GPU of the box
has a lock file (`gpu-<i>.lock` in SELFPLAY_GPU_LOCK_DIR, default a per-user directory under the system's
temporary directory); a task flocks the first free ones, and the kernel drops the lock with the process
however it ends, so a killed task never leaves a GPU taken. The lock directory must be local to the box
(GPU 0 of one box is not GPU 0 of another): never put it on the filesystem the boxes share.

Before CUDA is initialised in the process (a task process of `--workers N`), the held GPUs become the only
visible ones (CUDA_VISIBLE_DEVICES): the model, vLLM and its tensor-parallel workers all see them as
cuda:0..n-1. Where CUDA is already initialised (one worker running tasks in its own process),
the variable no longer applies and the first held GPU is made the current device instead.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("selfplay")

LOCK_DIR_ENV = "SELFPLAY_GPU_LOCK_DIR"
WAIT_POLL_SECONDS = 1.0


def default_lock_dir() -> Path:
    return Path(os.environ.get(LOCK_DIR_ENV) or Path(tempfile.gettempdir()) / f"selfplay-gpus-{os.getuid()}")


def visible_devices(count: int) -> list[str]:
    """The physical ids of the `count` devices CUDA shows this process (CUDA_VISIBLE_DEVICES, when set, maps
    cuda:i to its i-th entry)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None or not listed.strip():
        return [str(i) for i in range(count)]
    return [d.strip() for d in listed.split(",") if d.strip()][:count]


def _try_take(lock_dir: Path, index: int) -> int | None:
    fd = os.open(lock_dir / f"gpu-{index}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def take_free(lock_dir: Path, count: int, wanted: int) -> list[tuple[int, int]]:
    """(GPU index, lock fd) of `wanted` free GPUs among `count`, all or none (a partial set is given back)."""
    taken = []
    for index in range(count):
        fd = _try_take(lock_dir, index)
        if fd is not None:
            taken.append((index, fd))
            if len(taken) == wanted:
                return taken
    for _index, fd in taken:
        os.close(fd)
    return []


def _cuda_initialized() -> bool:
    import torch

    return torch.cuda.is_initialized()


@contextlib.contextmanager
def gpu_slot(wanted: int = 1, lock_dir: str | Path | None = None, device_count: int | None = None,
             what: str = "task") -> Iterator[list[int]]:
    """Hold `wanted` GPUs of this box for the block; yields their indices among the visible devices (an
    empty list on a machine without GPUs, where nothing is held). Waits while all are taken: Luigi's
    gpu resource should keep that from happening, unless another command on the box holds some."""
    if device_count is None:
        import torch

        device_count = torch.cuda.device_count()
    if device_count == 0:
        yield []
        return
    from common.errors import RecipeError

    if wanted > device_count:
        raise RecipeError(f"{what} needs {wanted} GPUs; this box shows {device_count}")
    lock_dir = Path(lock_dir) if lock_dir is not None else default_lock_dir()
    lock_dir.mkdir(parents=True, exist_ok=True)
    announced = False
    while not (taken := take_free(lock_dir, device_count, wanted)):
        if not announced:
            log.info("%s: waiting for %d free GPU(s) of %d (locks in %s)", what, wanted, device_count, lock_dir)
            announced = True
        time.sleep(WAIT_POLL_SECONDS)
    indices = [index for index, _fd in taken]
    physical = visible_devices(device_count)
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    pinned_by_env = not _cuda_initialized()
    try:
        if pinned_by_env:
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(physical[i] for i in indices)
        else:
            import torch

            torch.cuda.set_device(indices[0])
        log.info("%s: on GPU %s", what, ",".join(physical[i] for i in indices))
        yield indices
    finally:
        if pinned_by_env:
            if saved is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = saved
        for _index, fd in taken:
            os.close(fd)

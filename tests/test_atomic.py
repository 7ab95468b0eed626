"""common/atomic.py, the one way files and directories are written: whole or not at all."""

import os
import subprocess
import sys

import pytest

from common.atomic import atomic_path, atomic_write_json


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "metrics.json"
    atomic_write_json(target, {"round": 1})
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_path(target) as tmp:
            tmp.write_text("{\"round\": ")
            raise RuntimeError("killed while writing")
    assert target.read_text() == '{\n  "round": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_a_directory_is_replaced_whole(tmp_path):
    target = tmp_path / "checkpoint-2"
    target.mkdir()
    (target / "stale.pt").write_text("old")
    with atomic_path(target, directory=True) as tmp:
        assert tmp.is_dir() and list(tmp.iterdir()) == []
        (tmp / "state.pt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["state.pt"]
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-2"]


def test_temporaries_of_killed_processes_are_removed_when_the_path_is_written_again(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    alive = str(os.getppid())  # the process that started this one: running, but not this process
    left = {
        f".pairs.parquet.{dead}.0a1b2c3d.tmp": True,  # a killed writer's
        f"..pairs.parquet.{dead}.0a1b2c3d.tmp.{dead}.9f8e7d6c.tmp": True,  # written inside a killed writer's
        f".pairs.parquet.{alive}.0a1b2c3d.tmp": False,  # another running process's: not ours to remove
        ".other.parquet.1.0a1b2c3d.tmp": False,  # another path's
    }
    for name in left:
        (tmp_path / name).write_text("partial")
    atomic_write_json(tmp_path / "pairs.parquet", [])
    remaining = {p.name for p in tmp_path.iterdir()}
    assert remaining == {"pairs.parquet"} | {name for name, removed in left.items() if not removed}

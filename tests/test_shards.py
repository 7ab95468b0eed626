"""Sharded Generate and Judge: the artifacts do not depend on the number of workers, a killed shard resumes,
each shard holds GPUs of its own, and the vLLM backend builds one engine per shard."""

import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import luigi
import pytest

import pipeline  # noqa: F401 - registers the tasks
from common import gpu_slot
from common.errors import RecipeError
from configs.recipe import recipe_from_dict
from data.layout import shard_range
from tasks.evaluate import Evaluate
from tasks.iterate import Iterate
from tasks.rounds import Generate, add_counts
from conftest import REPO

ROUND_FILES = ("generations.parquet", "generate_meta.json", "pairs.parquet", "judge_meta.json", "eval.parquet")


def test_shard_blocks_cover_every_item_once_in_order():
    for count in (0, 1, 4, 7, 32):
        for shards in (1, 2, 3, 5):
            blocks = [shard_range(count, i, shards) for i in range(shards)]
            assert [i for block in blocks for i in block] == list(range(count))
            assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


def test_shard_counts_are_added_and_who_judged_is_kept():
    metas = [{"prompts": 3, "pairs": 2, "judge_model": "a", "judge_is_generator": True},
             {"prompts": 4, "pairs": 1, "skipped_empty": 1, "judge_model": "a", "judge_is_generator": True}]
    assert add_counts(metas) == {"prompts": 7, "pairs": 3, "judge_model": "a", "judge_is_generator": True, "skipped_empty": 1}


def test_recipe_refuses_bad_shard_settings():
    with pytest.raises(RecipeError, match="generation.shards must be positive"):
        recipe_from_dict({"generation": {"shards": 0}})
    with pytest.raises(RecipeError, match="judge.shards must be positive"):
        recipe_from_dict({"judge": {"shards": -1}})
    with pytest.raises(RecipeError, match="tensor_parallel_size 2 needs generation.backend: vllm"):
        recipe_from_dict({"generation": {"tensor_parallel_size": 2}})


def test_gpu_slots_are_never_shared(tmp_path, monkeypatch):
    """Three GPUs (a faked count): holders get distinct ones, see only theirs, and free them on exit."""
    monkeypatch.setattr(gpu_slot, "_cuda_initialized", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6")  # the box's visible GPUs are physical 4, 5, 6
    with gpu_slot.gpu_slot(1, tmp_path, device_count=3) as first:
        assert first == [0] and os.environ["CUDA_VISIBLE_DEVICES"] == "4"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "4,5,6"
    other = gpu_slot.take_free(tmp_path, 3, 1)  # another task process holds GPU 0
    assert [index for index, _fd in other] == [0]
    with gpu_slot.gpu_slot(2, tmp_path, device_count=3) as pair:
        assert pair == [1, 2] and os.environ["CUDA_VISIBLE_DEVICES"] == "5,6"
        assert gpu_slot.take_free(tmp_path, 3, 1) == []  # all three held
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "4,5,6"
    taken = gpu_slot.take_free(tmp_path, 3, 2)  # the pair's GPUs are free again
    assert [index for index, _fd in taken] == [1, 2]
    for _index, fd in taken + other:
        os.close(fd)
    with pytest.raises(RecipeError, match="needs 4 GPUs; this box shows 3"):
        with gpu_slot.gpu_slot(4, tmp_path, device_count=3):
            pass


def test_gpu_slot_is_freed_when_its_holder_is_killed(tmp_path):
    """The lock is the kernel's: a holder killed with SIGKILL leaves its GPU free."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from common import gpu_slot\n"
         "gpu_slot._cuda_initialized = lambda: False\n"
         f"with gpu_slot.gpu_slot(1, {str(tmp_path)!r}, device_count=1):\n"
         "    print('held', flush=True); time.sleep(60)"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    assert gpu_slot.take_free(tmp_path, 1, 1) == []
    holder.kill()
    holder.wait()
    taken = gpu_slot.take_free(tmp_path, 1, 1)
    assert [index for index, _fd in taken] == [0]
    os.close(taken[0][1])


def test_no_gpu_holds_nothing(tmp_path):
    with gpu_slot.gpu_slot(1, tmp_path, device_count=0) as held:
        assert held == []
    assert not list(tmp_path.iterdir())


def run_round(recipe: str, runs: Path, workers: int) -> Path:
    if workers == 1:
        assert luigi.build([Evaluate(recipe=recipe, runs_dir=str(runs), round_idx=1)], local_scheduler=True,
                           workers=1, log_level="WARNING")
    else:
        # Several workers fork a process per task. Forked from this test process, whose earlier tests ran
        # torch on several OpenMP threads, a child's thread pool is broken (segmentation faults); so the
        # command runs as a user runs it, in a fresh process that forks before any torch work.
        command = [sys.executable, "-m", "luigi", "--module", "pipeline", "Evaluate", "--recipe", recipe, "--runs-dir",
                   str(runs), "--round-idx", "1", "--workers", str(workers), "--local-scheduler", "--log-level", "INFO"]
        done = subprocess.run(command, cwd=runs.parent, capture_output=True, text=True, timeout=900,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
        assert done.returncode == 0 and "This progress looks :)" in done.stdout + done.stderr, done.stderr[-3000:]
    return next(runs.iterdir()) / "round_01"


def eval_figures(round_dir: Path) -> dict:
    return json.loads((round_dir / "metrics.json").read_text())["eval"]  # the rest holds training's wall times


@pytest.mark.slow
def test_artifacts_do_not_depend_on_workers(tiny_recipe, tmp_path):
    """One round of DPO with a verifier judge, 4 parts of 8 prompts, every stage in 3 shards: one, two and
    three workers give byte-identical files. Generation and judging match one shard's too (a part's samples
    depend on its index alone); evaluation samples per shard, so its files match for a fixed layout."""
    one = tiny_recipe("dpo", name="one", generation={"shard_size": 8})
    sharded = tiny_recipe("dpo", name="sharded", generation={"shard_size": 8, "shards": 3}, judge={"shards": 3},
                          evaluation={"shards": 3})
    reference = run_round(one, tmp_path / "one", workers=1)
    first = None
    for workers in (1, 2, 3):
        round_dir = run_round(sharded, tmp_path / f"w{workers}", workers=workers)
        for stage in ("generations", "pairs", "eval"):
            assert sorted(p.name for p in (round_dir / f"{stage}.shards").iterdir()) == [
                f"shard-0000{i}.{ext}" for i in range(3) for ext in ("json", "parquet")]
        for name in ROUND_FILES[:4]:
            assert (round_dir / name).read_bytes() == (reference / name).read_bytes(), f"{name}, {workers} workers"
        first = first or round_dir
        assert (round_dir / "eval.parquet").read_bytes() == (first / "eval.parquet").read_bytes(), f"{workers} workers"
        assert eval_figures(round_dir) == eval_figures(first)
    # The parts of shard_size prompts were dealt out as blocks: 4 parts over 3 shards.
    metas = [json.loads((round_dir / "generations.shards" / f"shard-0000{i}.json").read_text()) for i in range(3)]
    assert [m["samples"] for m in metas] == [32, 32, 64]
    # Evaluation's 12 held-out prompts, 4 per shard: every prompt's rows once, in the unsharded order.
    import pandas as pd

    sharded_eval, one_eval = (pd.read_parquet(d / "eval.parquet") for d in (first, reference))
    assert sharded_eval[["prompt_id", "kind", "sample_index"]].equals(one_eval[["prompt_id", "kind", "sample_index"]])
    assert sharded_eval[sharded_eval.kind == "greedy"].response.tolist() == one_eval[one_eval.kind == "greedy"].response.tolist()


def assert_same_files_as_a_clean_run(tiny_recipe, tmp_path: Path, round_dir: Path) -> tuple[str, Path]:
    """Round 1's artifacts in `round_dir` are byte for byte those of a clean one-shard, one-worker run;
    returns that run's recipe and round directory."""
    clean = tiny_recipe("spin", name="clean", generation={"shard_size": 8})
    assert luigi.build([Iterate(recipe=clean, runs_dir=str(tmp_path / "clean"), rounds=1)], local_scheduler=True,
                       log_level="WARNING")
    clean_dir = tmp_path / "clean" / "clean" / "round_01"
    for name in ROUND_FILES:
        assert (round_dir / name).read_bytes() == (clean_dir / name).read_bytes(), name
    return clean, clean_dir


# Runs the luigi command line in a child with every part's generation slowed down, so the test can kill it
# while its shards are under way (the same wrapping as tests/test_reliability.py).
DRIVER = """
import sys, time
import luigi.cmdline
import models.generate.generation as generation

delay = float(sys.argv[1])
_generate = generation.generate_texts

def slow_generate(*args, **kwargs):
    time.sleep(delay)
    return _generate(*args, **kwargs)

generation.generate_texts = slow_generate
luigi.cmdline.luigi_run(sys.argv[2:])
"""


@pytest.mark.slow
def test_killed_mid_shard_resumes_to_the_same_artifacts(tiny_recipe, tmp_path):
    recipe = tiny_recipe("spin", generation={"shard_size": 8, "shards": 2})
    runs = tmp_path / "runs"
    round_dir = runs / "tiny_spin" / "round_01"
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def start(delay: float):
        log = open(tmp_path / f"run-{time.time_ns()}.log", "w")
        args = [sys.executable, str(driver), str(delay), "--module", "pipeline", "Iterate", "--rounds", "1",
                "--recipe", recipe, "--runs-dir", str(runs), "--workers", "2", "--local-scheduler"]
        return subprocess.Popen(args, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True), log.name

    # Parts 0-1 are shard 0's, parts 2-3 shard 1's: kill once each shard has saved its first part.
    proc, _ = start(delay=2.0)
    work = round_dir / "generate_work"
    deadline = time.time() + 300
    while not ((work / "part-00000.parquet").exists() and (work / "part-00002.parquet").exists()):
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline, "timed out waiting for both shards' first parts"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (round_dir / "generations.parquet").exists()
    kept = {p.name: p.stat().st_mtime_ns for p in work.glob("part-*.parquet")}
    shards_done = {p.name: p.stat().st_mtime_ns for p in (round_dir / "generations.shards").glob("*.parquet")}

    proc, log_path = start(delay=0.0)
    assert proc.wait(timeout=600) == 0, Path(log_path).read_text()[-3000:]
    for name, mtime in kept.items():  # parts saved before the kill were reused, not redone
        assert (work / name).stat().st_mtime_ns == mtime
    for name, mtime in shards_done.items():  # so were finished shards
        assert (round_dir / "generations.shards" / name).stat().st_mtime_ns == mtime

    # A clean run of one shard on one worker makes the same files.
    clean, clean_dir = assert_same_files_as_a_clean_run(tiny_recipe, tmp_path, round_dir)

    # Once merged, the parts are not needed: without them the run is still complete and nothing reruns.
    import shutil

    written = {name: (clean_dir / name).stat().st_mtime_ns for name in ROUND_FILES}
    for stage in ("generations", "pairs", "eval"):
        shutil.rmtree(clean_dir / f"{stage}.shards")
    assert luigi.build([Iterate(recipe=clean, runs_dir=str(tmp_path / "clean"), rounds=1)], local_scheduler=True,
                       log_level="WARNING")
    assert {name: (clean_dir / name).stat().st_mtime_ns for name in ROUND_FILES} == written
    assert not (clean_dir / "generations.shards").exists()


class FakeVllm:
    """A stand-in for the `vllm` package: records every engine built and answers each request with a text
    that names its prompt's length and seed, so the test can tell which prompt a row was sampled for."""

    def __init__(self):
        self.engines = []
        self.module = types.ModuleType("vllm")
        fake = self

        class LLM:
            def __init__(self, **kwargs):
                fake.engines.append(kwargs)

            def generate(self, prompts, params, use_tqdm=False, lora_request=None):
                assert lora_request is None  # round 1 samples with the base model
                return [types.SimpleNamespace(outputs=[
                    types.SimpleNamespace(index=k, text=f"len {len(p['prompt_token_ids'])} seed {sp.seed} k {k}",
                                          token_ids=[1, 2], finish_reason="stop")
                    for k in range(sp.n)]) for p, sp in zip(prompts, params)]

        class SamplingParams:
            def __init__(self, **kwargs):
                self.__dict__.update(kwargs)

        self.module.LLM, self.module.SamplingParams = LLM, SamplingParams


@pytest.mark.slow
def test_vllm_builds_one_engine_per_shard_and_keeps_row_order(tiny_recipe, tmp_path, monkeypatch):
    fake = FakeVllm()
    monkeypatch.setitem(sys.modules, "vllm", fake.module)
    recipe = tiny_recipe("spin", generation={"shard_size": 8, "shards": 2, "backend": "vllm"})
    assert luigi.build([Generate(recipe=recipe, runs_dir=str(tmp_path), round_idx=1)], local_scheduler=True,
                       log_level="WARNING")
    base_model = str(tmp_path / "tiny_spin" / "base_model")
    # Two shards of two parts each: one engine each, on the round's model, released when the shard ends.
    assert [engine["model"] for engine in fake.engines] == [base_model, base_model]
    assert all("tensor_parallel_size" not in engine for engine in fake.engines)

    import pandas as pd

    from data.prompts import format_prompt
    from models.generate.generation import shard_seed
    from models.load.loading import load_tokenizer

    frame = pd.read_parquet(tmp_path / "tiny_spin" / "round_01" / "generations.parquet")
    tokenizer = load_tokenizer(base_model, Generate(recipe=recipe, runs_dir=str(tmp_path), round_idx=1).config.model)
    expected = []
    for position, row in enumerate(frame.itertuples()):
        part, index = divmod(position, 8)
        length = len(tokenizer(format_prompt(tokenizer, row.prompt, row.system), add_special_tokens=False).input_ids)
        expected.append(f"len {length} seed {shard_seed(0, 1, part) * 1_000_003 + index} k 0")
    assert frame.response.tolist() == expected


def test_vllm_engine_spans_tensor_parallel_gpus(monkeypatch):
    fake = FakeVllm()
    monkeypatch.setitem(sys.modules, "vllm", fake.module)
    from models.generate import vllm_engine
    from models.generate.sampling import SamplingSettings

    class Tokenizer:
        eos_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            return types.SimpleNamespace(input_ids=list(text.encode()))

    monkeypatch.setattr(vllm_engine, "_VLLM_ENGINES", {})
    settings = SamplingSettings(num_samples=2, seed=3)
    samples = vllm_engine.vllm_generate("no-such-model", Tokenizer(), ["ab", "abcd"], settings, tensor_parallel_size=4)
    samples += vllm_engine.vllm_generate("no-such-model", Tokenizer(), ["abc"], settings, tensor_parallel_size=4)
    assert len(fake.engines) == 1 and fake.engines[0]["tensor_parallel_size"] == 4  # built once, reused
    assert [[s.text for s in row] for row in samples] == [
        ["len 2 seed 3000009 k 0", "len 2 seed 3000009 k 1"], ["len 4 seed 3000010 k 0", "len 4 seed 3000010 k 1"],
        ["len 3 seed 3000009 k 0", "len 3 seed 3000009 k 1"]]
    vllm_engine.release_vllm()


def start_luigid(tmp_path: Path, config: str) -> tuple[subprocess.Popen, int]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "luigid.cfg").write_text(config)
    luigid = subprocess.Popen([sys.executable, "-c", "from luigi.cmdline import luigid; luigid()", "--port", str(port),
                               "--address", "127.0.0.1", "--state-path", str(tmp_path / "state.pickle"),
                               "--logdir", str(tmp_path)], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, "LUIGI_CONFIG_PATH": str(tmp_path / "luigid.cfg")})
    deadline = time.time() + 60
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return luigid, port
        time.sleep(0.2)
    luigid.kill()
    pytest.fail("luigid did not start")


@pytest.mark.slow
def test_a_box_dies_mid_shard_and_another_box_finishes_the_run(tiny_recipe, tmp_path):
    """Two boxes (two commands, each with its own GPU locks) share one run directory under one luigid with
    --shared-run. Box A is SIGKILLed while it generates a shard; luigid fails its shard once A stops
    answering, retries it, and box B runs it, resuming from A's saved parts: the run ends with the files of
    one command on one box."""
    luigid, port = start_luigid(tmp_path, "[scheduler]\nworker_disconnect_delay = 3\nretry_delay = 1\n"
                                          "[resources]\ngpu = 2\n")
    recipe = tiny_recipe("spin", generation={"shard_size": 8, "shards": 2})
    runs = tmp_path / "runs"
    round_dir = runs / "tiny_spin" / "round_01"
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    box_cfg = tmp_path / "box.cfg"  # read after the repository's luigi.cfg, so it wins
    box_cfg.write_text(f"[core]\nlocal_scheduler = false\nscheduler_host = 127.0.0.1\nscheduler_port = {port}\n"
                       "[worker]\nkeep_alive = true\nwait_interval = 0.2\nwait_jitter = 0.2\n"
                       "[retcode]\nalready_running = 0\n")  # another box running some of the tasks is the point

    def box(name: str, delay: float):
        env = {**os.environ, "PYTHONPATH": str(REPO), "LUIGI_CONFIG_PATH": str(box_cfg),
               gpu_slot.LOCK_DIR_ENV: str(tmp_path / f"gpus-{name}")}
        log = open(tmp_path / f"box-{name}.log", "w")
        args = [sys.executable, str(driver), str(delay), "--module", "pipeline", "Iterate", "--rounds", "1",
                "--recipe", recipe, "--runs-dir", str(runs), "--shared-run", "--workers", "1",
                "--log-level", "INFO"]  # the worker's "running"/"done" lines show which box ran the killed shard
        return subprocess.Popen(args, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True), log.name

    try:
        box_a, _ = box("a", delay=3.0)
        work = round_dir / "generate_work"
        deadline = time.time() + 300
        while not any(work.glob("part-*.parquet")):  # box A is generating its shard
            assert box_a.poll() is None and time.time() < deadline, "box A ended before it could be killed"
            time.sleep(0.05)
        box_b, log_b = box("b", delay=0.0)
        time.sleep(1.0)
        os.killpg(box_a.pid, signal.SIGKILL)
        box_a.wait()
        assert box_b.wait(timeout=600) == 0, Path(log_b).read_text()[-3000:]
    finally:
        for proc in ("box_a", "box_b"):
            if proc in locals() and locals()[proc].poll() is None:
                os.killpg(locals()[proc].pid, signal.SIGKILL)
        luigid.terminate()
        luigid.wait()
    import re

    killed_in = re.findall(r"running\s+(GenerateShard\(.*?\))$", (tmp_path / "box-a.log").read_text(), re.M)[-1]
    assert re.search(rf"done\s+{re.escape(killed_in)}$", Path(log_b).read_text(), re.M)  # box B ran it again

    assert_same_files_as_a_clean_run(tiny_recipe, tmp_path, round_dir)

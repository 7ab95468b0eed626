"""A user's own data end to end: the GSM8K-style and multiple-choice fixtures with the `number` and
`choice` verifiers, a verifier function from the user's file, the preflight, and the command run from
a directory with no luigi.cfg."""

import configparser
import json
import os
import subprocess
import sys
import time

import pytest

import pipeline  # noqa: F401 - registers the tasks
from common.errors import DataError
from data.runs import Run
from data.schema import EVAL, GENERATIONS, PAIRS, read_artifact
from models.judge.verifiers import load_verifier
from tasks.base import LUIGI_DEFAULTS
from tasks.iterate import Iterate
from conftest import REPO
from test_pipeline import build

FIXTURES = REPO / "data" / "fixtures"
GSM8K = str(FIXTURES / "gsm8k_style.jsonl")
pytestmark = pytest.mark.slow
CHOICE = str(FIXTURES / "multiple_choice.jsonl")

# The verifier alone ranks the samples here (judge.unfinished: keep), so every pair must follow it.
KEEP = {"unfinished": "keep"}
# Worked answers are longer than the demo's: room to write them.
LONGER = {"generation": {"num_samples": 4, "max_new_tokens": 48}, "training": {"max_length": 256},
          "evaluation": {"num_prompts": 16, "max_new_tokens": 48}}


def gsm8k_recipe(tiny_recipe, **judge):
    return tiny_recipe("dpo", name="gsm8k", judge={"name": "verifier", **KEEP, **judge}, **LONGER,
                       data={"train": GSM8K, "eval": GSM8K, "prompt_field": "question", "response_field": "answer",
                             "max_prompt_tokens": 256, "prompts_per_round": 16})


def choice_recipe(tiny_recipe, name="choice", **judge):
    return tiny_recipe("dpo", name=name, judge={"name": "verifier", **KEEP, **judge},
                       data={"train": CHOICE, "eval": CHOICE, "prompt_field": "question", "response_field": "answer",
                             "id_field": "id", "task_field": "subject", "max_prompt_tokens": 256, "prompts_per_round": 16},
                       evaluation={"num_prompts": 16})


def check_pairs_follow_the_verifier(run_dir, rounds, verifier):
    """Every pair's chosen response passes the verifier and its rejected one fails; some pair exists."""
    total = 0
    for r in range(1, rounds + 1):
        pairs = read_artifact(run_dir / f"round_{r:02d}" / "pairs.parquet", PAIRS)
        gens = read_artifact(run_dir / f"round_{r:02d}" / "generations.parquet", GENERATIONS)
        rows = gens.drop_duplicates("prompt_id").set_index("prompt_id")
        for pair in pairs.to_dict("records"):
            row = json.loads(rows.source_row[pair["prompt_id"]])
            answer = rows.answer[pair["prompt_id"]]
            assert verifier.score(pair["prompt"], pair["chosen"], row, answer) == 1.0
            assert verifier.score(pair["prompt"], pair["rejected"], row, answer) == 0.0
            assert (pair["chosen_score"], pair["rejected_score"]) == (1.0, 0.0)
        total += len(pairs)
    assert total > 0, "no pair was made: the test exercised no judging"


def check_accuracy_is_the_verifiers(run_dir, rounds, verifier, answers_from):
    for r in range(rounds + 1):
        metrics = json.loads((run_dir / f"round_{r:02d}" / "metrics.json").read_text())["eval"]
        assert metrics["verifier"] == verifier.spec and metrics.get("verifier_answers") == answers_from
        ev = read_artifact(run_dir / f"round_{r:02d}" / "eval.parquet", EVAL)
        greedy = ev[ev.kind == "greedy"]
        rescored = [verifier.score(p, resp, {}, a) for p, resp, a in zip(greedy.prompt, greedy.response, greedy.answer)]
        assert metrics["accuracy"] == pytest.approx(sum(rescored) / len(rescored))


def test_gsm8k_style_data_with_the_number_verifier(tiny_recipe, tmp_path):
    build(Iterate(recipe=gsm8k_recipe(tiny_recipe, verifier="number"), runs_dir=str(tmp_path / "runs"), rounds=1))
    run_dir = tmp_path / "runs" / "gsm8k"
    verifier = load_verifier("number")
    check_pairs_follow_the_verifier(run_dir, 1, verifier)
    check_accuracy_is_the_verifiers(run_dir, 1, verifier, "answer")
    report = (run_dir / "report.md").read_text()
    assert "- accuracy: verifier `number` against field `answer`" in report
    assert "- win vs prev, win vs base: judge `verifier` with verifier `number`" in report


def test_multiple_choice_data_with_the_choice_verifier_and_task_kinds(tiny_recipe, tmp_path):
    build(Iterate(recipe=choice_recipe(tiny_recipe, verifier="choice"), runs_dir=str(tmp_path / "runs"), rounds=2))
    run_dir = tmp_path / "runs" / "choice"
    verifier = load_verifier("choice")
    check_pairs_follow_the_verifier(run_dir, 2, verifier)
    check_accuracy_is_the_verifiers(run_dir, 2, verifier, "answer")
    metrics = Run(run_dir).metrics()
    assert {"accuracy/arithmetic", "accuracy/words", "win_rate_vs_base/arithmetic", "win_rate_vs_base/words"} <= set(metrics.columns)
    assert metrics["win_rate_vs_base/words"].notna().tolist() == [False, True, True]  # round 0 has nothing to compare with
    report = (run_dir / "report.md").read_text()
    assert "Accuracy by task kind (verifier `choice` against field `answer`)" in report
    assert "Win rate vs base by task kind (judge `verifier` with verifier `choice`)" in report


def test_a_verifier_function_from_the_users_file(tiny_recipe, tmp_path):
    checks = tmp_path / "my_checks.py"
    checks.write_text(
        "def letter(prompt, response, row):\n"
        "    # The row holds the dataset's other columns: the answer letter and the subject.\n"
        "    assert row['subject'] in ('arithmetic', 'words') and row['id'].startswith('mc-')\n"
        "    return response.strip().upper().startswith(row['answer'])\n"
    )
    spec = f"{checks}:letter"
    build(Iterate(recipe=choice_recipe(tiny_recipe, name="own", verifier=spec), runs_dir=str(tmp_path / "runs"), rounds=1))
    run_dir = tmp_path / "runs" / "own"
    check_pairs_follow_the_verifier(run_dir, 1, load_verifier(spec))
    metrics = json.loads((run_dir / "round_01" / "metrics.json").read_text())["eval"]
    assert metrics["verifier"] == spec and "verifier_answers" not in metrics
    assert f"- accuracy: verifier `{spec}`" in (run_dir / "report.md").read_text()


def test_data_the_verifier_cannot_check_fails_before_any_generation(tiny_recipe, tmp_path):
    # Before the preflight this data generated a whole round, then failed in Judge.
    data = tmp_path / "kinds.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {w}.", "kind": "echo"}) + "\n" for w in ("yes", "no", "maybe")))
    recipe = tiny_recipe("dpo", name="kinds", data={"train": str(data), "eval": str(data), "task_field": "kind"})
    with pytest.raises(DataError, match=r"kinds.jsonl: the verifier judge \(verifier 'exact'\) checks against an answer"):
        Iterate(recipe=recipe, runs_dir=str(tmp_path / "runs"), rounds=1)
    assert not list(tmp_path.rglob("generations.parquet"))


# --- the command from any directory ---------------------------------------------------------------


def luigi_cli(cwd, *args, env=None) -> tuple[subprocess.CompletedProcess, float]:
    """The luigi command line, run where no luigi.cfg is (unless `env` points at one)."""
    clean = {k: v for k, v in os.environ.items() if k != "LUIGI_CONFIG_PATH"}
    started = time.time()
    result = subprocess.run([sys.executable, "-m", "luigi", "--module", "pipeline", *args], cwd=cwd, check=False, capture_output=True,
                            text=True, env={**clean, "PYTHONPATH": str(REPO), **(env or {})}, timeout=600)
    return result, time.time() - started


def test_shipped_luigi_cfg_holds_the_package_defaults():
    shipped = configparser.ConfigParser()
    shipped.read(REPO / "luigi.cfg")
    as_text = {s: {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in o.items()}
               for s, o in LUIGI_DEFAULTS.items()}
    assert {s: dict(shipped[s]) for s in shipped.sections()} == as_text


# What these runs show needs no trained model: a barely warm-started one, few prompts.
QUICK = {"demo_model": {"sft_steps": 10}, "data": {"prompts_per_round": 8}, "evaluation": {"num_prompts": 4}}


def test_command_from_another_directory_uses_the_local_scheduler_and_exit_codes(tiny_recipe, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert not (elsewhere / "luigi.cfg").exists()
    good_recipe = tiny_recipe("spin", **QUICK)
    # A quick task first (a few seconds): looking for a remote scheduler, it took 62 s to give up and exit 4.
    good, seconds = luigi_cli(elsewhere, "RunSetup", "--recipe", good_recipe)
    output = good.stdout + good.stderr
    assert good.returncode == 0 and "Failed connecting to remote scheduler" not in output, output[-2000:]
    assert seconds < 45 and (elsewhere / "runs" / "tiny_spin" / "run.yaml").is_file()
    good, _ = luigi_cli(elsewhere, "Iterate", "--rounds", "1", "--recipe", good_recipe)
    output = good.stdout + good.stderr
    assert good.returncode == 0 and "Failed connecting to remote scheduler" not in output, output[-2000:]
    assert (elsewhere / "runs" / "tiny_spin" / "round_01" / "metrics.json").is_file()
    # What it prints: one line per finished task and progress bars, no Luigi scheduling chatter, the total time last.
    lines = output.strip().splitlines()
    assert not [line for line in lines if line.startswith(("INFO:", "DEBUG:")) or "Informed scheduler" in line], output[-3000:]
    done = [line for line in lines if " done in " in line]
    # 15 tasks (Validate and Select for rounds 0 and 1 among them): RunSetup ran above; Iterate ends with its own line.
    assert len(done) == 15 and all(line.startswith("selfplay: ") for line in done), output[-3000:]  # grep "^selfplay"
    assert lines[-1].startswith("selfplay: 1 round of run 'tiny_spin' complete; this command took "), lines[-1]
    again, _ = luigi_cli(elsewhere, "Iterate", "--rounds", "1", "--recipe", good_recipe)
    assert again.returncode == 0 and (again.stdout + again.stderr).strip().splitlines() == [
        "selfplay: nothing to do: run 'tiny_spin' is complete through round 1; report: runs/tiny_spin/report.md"]

    # A task that fails at run time (the user's verifier has a bug) exits with [retcode] task_failed.
    checks = tmp_path / "buggy.py"
    checks.write_text("def check(prompt, response, row):\n    raise RuntimeError('bug in my verifier')\n")
    buggy = tiny_recipe("dpo", name="buggy", judge={"name": "verifier", "verifier": f"{checks}:check"}, **QUICK)
    failed, _ = luigi_cli(elsewhere, "Iterate", "--rounds", "1", "--recipe", buggy)
    output = failed.stdout + failed.stderr
    assert failed.returncode == LUIGI_DEFAULTS["retcode"]["task_failed"], output[-3000:]
    assert "bug in my verifier" in output and "Failed connecting to remote scheduler" not in output

    # The user's own configuration wins over the package's defaults.
    user_cfg = tmp_path / "user.cfg"
    user_cfg.write_text("[retcode]\ntask_failed = 3\n")
    failed, _ = luigi_cli(elsewhere, "Iterate", "--rounds", "1", "--recipe", buggy, env={"LUIGI_CONFIG_PATH": str(user_cfg)})
    assert failed.returncode == 3, (failed.stdout + failed.stderr)[-3000:]


def test_cli_data_the_verifier_cannot_check_is_one_line_nonzero_and_generates_nothing(tiny_recipe, tmp_path):
    data = tmp_path / "kinds.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {w}.", "kind": "echo"}) + "\n" for w in ("yes", "no")))
    recipe = tiny_recipe("dpo", name="kinds", data={"train": str(data), "eval": str(data)}, judge={"name": "verifier", "verifier": "number"})
    result, _ = luigi_cli(tmp_path, "Iterate", "--rounds", "1", "--recipe", recipe)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "Traceback" not in output, output[-2000:]
    lines = [line for line in output.splitlines() if "selfplay:" in line]
    assert lines and "kinds.jsonl: the verifier judge (verifier 'number') checks against an answer" in lines[0], output[-2000:]
    assert not list(tmp_path.rglob("generations.parquet"))


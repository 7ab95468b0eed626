"""The validation split, the kept round, early stopping, restart from the best, and the settings that keep
later rounds stable (mix_rounds, reference): each decision against a closed form, best/ switched whole under
SIGKILL, and whole runs of the tiny demo model where round 2 is made worse on purpose."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from common.errors import DataError, RecipeError
from configs.recipe import IterateConfig, deep_merge, recipe_from_dict
from data.layout import RunLayout
from data.report import report_rounds
from data.selection import decide, lineage, mixed_share, paired_gain, publish_best, read_best, read_selection, stop_line
from data.validation import set_aside, training_prompts, validation_prompts
from conftest import REPO, save_tiny_llama_root


def validation_frame(values, column="verifier_score"):
    return pd.DataFrame({"prompt_id": [f"p{i}" for i in range(len(values))], column: values})


# --- the decision ----------------------------------------------------------------------------------

def test_paired_gain_is_the_mean_and_standard_error_of_per_prompt_differences():
    now, best = validation_frame([1, 1, 0, 1]), validation_frame([0, 1, 0, 0])
    gain = paired_gain("accuracy", now, best)
    diffs = np.array([1, 0, 0, 1])
    assert gain["diff"] == pytest.approx(0.5) and gain["n"] == 4
    assert gain["se"] == pytest.approx(diffs.std(ddof=1) / 2) and gain["z"] == pytest.approx(0.5 / (diffs.std(ddof=1) / 2))
    # gt_logprob: prompts without a ground truth (NaN) are left out of the pairing.
    now, best = validation_frame([-1.0, -2.0, np.nan], "gt_logprob"), validation_frame([-1.5, -2.0, -3.0], "gt_logprob")
    gain = paired_gain("gt_logprob", now, best)
    assert gain["n"] == 2 and gain["diff"] == pytest.approx(0.25)
    # win_rate_vs_best: P(round beats best) - 1/2.
    gain = paired_gain("win_rate_vs_best", None, None, [1.0, 0.5, 1.0, 0.0])
    assert gain["diff"] == pytest.approx(0.125) and gain["se"] == pytest.approx(np.std([1, 0.5, 1, 0], ddof=1) / 2)


def iterate(**settings):
    return IterateConfig(**settings)


def run_decisions(gains, **settings):
    """The records of rounds 0..len(gains) for per-round (diff, se) gains over the best so far."""
    cfg = iterate(**settings)
    records = [decide(0, cfg, "accuracy", None, None, {})]
    for r, (diff, se) in enumerate(gains, start=1):
        records.append(decide(r, cfg, "accuracy", records[-1], {"diff": diff, "se": se, "n": 100, "z": diff / se}, {}))
    return records


def test_a_round_replaces_the_best_only_above_min_gain_standard_errors():
    records = run_decisions([(0.05, 0.02), (0.01, 0.02), (0.03, 0.01)], min_gain=1.0)
    assert [r["replaced"] for r in records[1:]] == [True, False, True]
    assert [r["best_round"] for r in records] == [0, 1, 1, 3]
    assert [r["kept_round"] for r in records] == [0, 1, 1, 3]
    assert [r["compared_with"] for r in records[1:]] == [0, 1, 1]
    assert run_decisions([(0.05, 0.02)], min_gain=3.0)[1]["replaced"] is False  # 2.5 SE is not above 3
    assert run_decisions([(-0.05, 0.02)], min_gain=0.0)[1]["replaced"] is False
    last = run_decisions([(0.05, 0.02), (0.3, 0.1)], select="last")
    assert [r["kept_round"] for r in last] == [0, 1, 2] and last[2]["best_round"] == 2


def test_patience_counts_rounds_in_a_row_without_a_new_best():
    records = run_decisions([(0.05, 0.02), (0.0, 0.02), (0.01, 0.02), (0.1, 0.02), (-0.1, 0.02)], patience=2)
    assert [r["rounds_without_gain"] for r in records] == [0, 0, 1, 2, 0, 1]
    assert [r["stop"] for r in records] == [False, False, False, True, False, False]
    # patience 1: a round 1 that does not beat round 0 ends the run after round 1.
    assert run_decisions([(0.0, 0.02)], patience=1)[1]["stop"]
    line = stop_line(run_decisions([(0.05, 0.02), (0.0, 0.02), (0.01, 0.02)], patience=2), rounds=5)
    assert "after round 3" in line and "did not beat round 1" in line and "rounds 4-5 not run" in line


def test_restart_from_best_makes_the_best_round_the_parent_of_the_next():
    records = run_decisions([(0.05, 0.02), (-0.2, 0.02), (0.0, 0.02)], on_regress="restart_from_best")
    assert [r["parent_of_next"] for r in records] == [0, 1, 1, 1]
    assert [r["parent_of_next"] for r in run_decisions([(0.05, 0.02), (-0.2, 0.02)])] == [0, 1, 2]


def test_lineage_follows_the_recorded_parents(tmp_path):
    recipe = recipe_from_dict({"iterate": {"on_regress": "restart_from_best"}})
    layout = RunLayout(tmp_path)
    for record in run_decisions([(0.05, 0.02), (-0.2, 0.02), (0.1, 0.02)], on_regress="restart_from_best"):
        layout.round_dir(record["round"]).mkdir()
        layout.selection(record["round"]).write_text(json.dumps(record))
    assert lineage(recipe, layout, 4) == [3, 1] and lineage(recipe, layout, 3) == [1] and lineage(recipe, layout, 1) == []


def test_mixed_share_takes_at_most_the_share_the_same_rows_every_time():
    frame = pd.DataFrame({"x": range(41)})
    taken = mixed_share(frame, 0.3, (0, 3, 2))
    assert len(taken) == 12 and taken.x.is_monotonic_increasing and set(taken.x) <= set(frame.x)  # floor(12.3)
    assert taken.equals(mixed_share(frame, 0.3, (0, 3, 2))) and not taken.equals(mixed_share(frame, 0.3, (0, 3, 1)))
    assert mixed_share(frame, 1.0, (0, 1, 1)).equals(frame) and mixed_share(frame, 0.0, (0, 1, 1)).empty


# --- best/: switched whole -------------------------------------------------------------------------

def fake_checkpoint(path: Path, round_idx: int, files: int = 300) -> Path:
    path.mkdir(parents=True)
    for i in range(files):  # enough files that copying them takes a while to kill in
        (path / f"shard-{i:04d}.bin").write_text(f"round {round_idx} file {i}\n")
    (path / "config.json").write_text(json.dumps({"round": round_idx}))
    (path / "_SUCCESS").write_text(f"stamp {round_idx}\n")
    return path


PUBLISHER = """
import sys
from pathlib import Path
from data.layout import RunLayout
from data.selection import publish_best
layout, sources = RunLayout(sys.argv[1]), sys.argv[2:]
print("ready", flush=True)
i = 0
while True:
    source = Path(sources[i % 2])
    publish_best(layout, {"round": int(source.name[-1]), "why": f"switch {i}"}, source)
    i += 1
"""


def consistent_best(layout: RunLayout) -> int | None:
    """The round best.json names, after checking every file in best/ is that round's; None with no best yet."""
    record = read_best(layout)
    if record is None:
        assert not layout.best.exists()
        return None
    best = layout.best
    assert json.loads((best / "config.json").read_text())["round"] == record["round"]
    files = sorted(best.glob("shard-*.bin"))
    assert len(files) == 300 and all(f.read_text().startswith(f"round {record['round']} ") for f in files)
    assert (best / "_SUCCESS").read_text().strip() == record["source_stamp"] == f"stamp {record['round']}"
    return record["round"]


def test_sigkill_while_best_is_switched_leaves_the_old_best_or_the_new_one_whole(tmp_path):
    layout = RunLayout(tmp_path / "run")
    layout.dir.mkdir()
    sources = [str(fake_checkpoint(tmp_path / f"ckpt{r}", r)) for r in (1, 2)]
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(12):
        proc = subprocess.Popen([sys.executable, "-c", PUBLISHER, str(layout.dir), *sources], cwd=REPO,
                                stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(float(rng.uniform(0.0, 0.4)))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        seen.add(consistent_best(layout))
    assert seen >= {1, 2}, seen  # the kills fell on both sides of a switch
    for r, source in zip((1, 2), sources):  # best/ is made of hard links: the rounds' own files are untouched
        assert (Path(source) / "_SUCCESS").read_text() == f"stamp {r}\n"
        assert (Path(source) / "config.json").read_text() == json.dumps({"round": r})
    # A later switch clears what the killed ones left half made.
    publish_best(layout, {"round": 1, "why": "after the kills"}, Path(sources[0]))
    assert consistent_best(layout) == 1
    assert [p.name for p in layout.best_store.iterdir()] == [os.readlink(layout.best).split("/")[-1]]
    assert not [p for p in layout.dir.rglob(".*")]  # no temporary left, of the copies or of the links


def test_publishing_the_same_best_again_changes_nothing(tmp_path):
    layout = RunLayout(tmp_path / "run")
    layout.dir.mkdir()
    source = fake_checkpoint(tmp_path / "ckpt1", 1, files=2)
    assert publish_best(layout, {"round": 1, "why": "x"}, source)
    target = os.readlink(layout.best)
    assert not publish_best(layout, {"round": 1, "why": "x"}, source) and os.readlink(layout.best) == target
    assert os.path.samefile(layout.best / "config.json", source / "config.json")  # hard links, not copies


# --- recipes and data -------------------------------------------------------------------------------

@pytest.mark.parametrize("section, message", [
    ({"iterate": {"patience": 0}}, "iterate.patience must be at least 1"),
    ({"iterate": {"min_gain": -1}}, "iterate.min_gain must be >= 0"),
    ({"data": {"validation": "none"}}, "iterate.select: best needs a validation split"),
    ({"data": {"validation": "none"}, "iterate": {"select": "last", "patience": 2}}, "iterate.patience: 2 needs a validation"),
    ({"data": {"train": "x.jsonl", "validation_fraction": 0}, "iterate": {"select": "last", "on_regress": "restart_from_best"}},
     "iterate.on_regress: restart_from_best needs a validation split"),
    ({"data": {"validation_fraction": 1.0}}, r"data.validation_fraction must be in \[0, 1\)"),
    ({"training": {"mix_rounds": [0.3, 1.5]}}, r"training.mix_rounds\[1\] must be a share in \[0, 1\]"),
    ({"training": {"mix_rounds": [1.0], "mix_previous_round": True}}, "older spelling of training.mix_rounds"),
    ({"training": {"reference_ema": 0.5}}, "reference_ema applies to training.reference: ema only"),
    ({"training": {"reference": "ema", "reference_ema": 1.0}}, r"reference_ema must be in \[0, 1\)"),
    ({"iterate": {"select_by": "loss"}}, "'iterate.select_by' must be one of"),
])
def test_bad_selection_settings_are_one_line_naming_the_key(section, message):
    with pytest.raises(RecipeError, match=message):
        recipe_from_dict(section)


def test_mix_rounds_and_the_older_key():
    assert recipe_from_dict({}).mix_rounds == [1.0]  # SPIN's official recipe: the previous round's pairs
    assert recipe_from_dict({"training": {"mix_previous_round": False}}).mix_rounds == []
    dno = {"algorithm": "dpo", "judge": {"name": "verifier"}, "generation": {"num_samples": 4}}
    assert recipe_from_dict(dno).mix_rounds == []
    assert recipe_from_dict({**dno, "training": {"mix_previous_round": True}}).mix_rounds == [1.0]
    assert recipe_from_dict({**dno, "training": {"mix_rounds": [0.3, 0.15, 0.075]}}).mix_rounds == [0.3, 0.15, 0.075]


def test_a_validation_fraction_is_set_aside_by_a_stable_hash_and_never_trained_on(tmp_path):
    ids = [f"id-{i}" for i in range(4000)]
    taken = set_aside(ids, 0.1)
    assert set_aside(ids, 0.1) == taken and 0.08 < np.mean(taken) < 0.12
    assert all(t <= w for t, w in zip(taken, set_aside(ids, 0.2)))  # a larger share takes a superset
    frame = pd.DataFrame({"prompt_id": ids, "prompt": [f"q {i}" for i in range(4000)]})
    train = write_jsonl(tmp_path / "train.jsonl", frame.to_dict("records"))
    held = write_jsonl(tmp_path / "held.jsonl", [{"prompt_id": "h", "prompt": "held out"}])
    recipe = recipe_from_dict({"data": {"train": train, "eval": held, "validation_fraction": 0.1}})
    kept = training_prompts(recipe, frame)
    assert len(kept) == 4000 - sum(taken) and not set(kept.prompt_id) & {i for i, t in zip(ids, taken) if t}


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_prompts_set_aside_leave_out_held_out_ones_and_data_with_none_has_no_split(tmp_path):
    from data.validation import has_validation

    rows = [{"prompt_id": f"t{i}", "prompt": f"What is {i} + 1?", "response": str(i + 1)} for i in range(300)]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    taken = [row for row, t in zip(rows, set_aside([r["prompt_id"] for r in rows], 0.1)) if t]
    held = write_jsonl(tmp_path / "held.jsonl", taken[:3])  # three of the prompts set aside are also held out
    recipe = recipe_from_dict({"data": {"train": train, "eval": held}})
    assert has_validation(recipe)
    assert list(validation_prompts(recipe).prompt_id) == [row["prompt_id"] for row in taken[3:]]
    # Training data that is the held-out data, or too small to set anything aside: no validation split.
    for data in ({"train": train, "eval": train}, {"train": write_jsonl(tmp_path / "one.jsonl", rows[:1]), "eval": held}):
        recipe = recipe_from_dict({"data": data})
        assert not has_validation(recipe) and validation_prompts(recipe) is None
        assert len(training_prompts(recipe, pd.DataFrame({"prompt_id": ["t1", "t2"], "prompt": ["a", "b"]}))) == 2


def test_a_validation_split_that_shares_a_prompt_with_training_or_held_out_is_refused(tmp_path):
    from data.prompts import load_prompts

    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt_id": f"t{i}", "prompt": f"What is {i} + 1?", "response": str(i + 1)}
                                                    for i in range(20)])
    held = write_jsonl(tmp_path / "held.jsonl", [{"prompt_id": f"h{i}", "prompt": f"What is {i} + 2?", "response": str(i + 2)}
                                                  for i in range(5)])
    by_text = write_jsonl(tmp_path / "v1.jsonl", [{"prompt_id": "v0", "prompt": "What is  3 + 1?", "response": "4"}])
    by_id = write_jsonl(tmp_path / "v2.jsonl", [{"prompt_id": "h1", "prompt": "What is 7 - 1?", "response": "6"}])
    apart = write_jsonl(tmp_path / "v3.jsonl", [{"prompt_id": "v0", "prompt": "What is 7 - 1?", "response": "6"}])
    for source, message in ((by_text, r"prompt 'What is 3 \+ 1\?' \(id 'v0'\) is also in the training prompts"),
                            (by_id, r"prompt id 'h1' is also in the held-out prompts")):
        recipe = recipe_from_dict({"data": {"train": train, "eval": held, "validation": source}})
        with pytest.raises(DataError, match=r"^data.validation: " + message):
            validation_prompts(recipe)
    recipe = recipe_from_dict({"data": {"train": train, "eval": held, "validation": apart}})
    assert list(validation_prompts(recipe).prompt_id) == ["v0"]
    assert len(load_prompts(train, "train", recipe.data)) == 20


@pytest.mark.parametrize("select_by, rows, message", [
    ("gt_logprob", [{"prompt_id": "v0", "prompt": "Name a colour."}],
     "iterate.select_by gt_logprob needs a ground-truth response in every validation row"),
    ("accuracy", [{"prompt_id": "v0", "prompt": "Name a colour."}], "iterate.select_by accuracy: verifier 'exact' cannot score"),
    (None, [{"prompt_id": "v0", "prompt": "Name a colour."}], "iterate.select_by: nothing can score the validation prompts"),
])
def test_a_figure_the_recipe_cannot_compute_fails_before_any_compute(tiny_recipe, tmp_path, select_by, rows, message):
    from tasks.iterate import Iterate

    validation = write_jsonl(tmp_path / "validation.jsonl", rows)
    recipe = tiny_recipe("spin", name="bad", data={"validation": validation}, iterate={"select_by": select_by},
                         evaluation={"judge": "none"})
    with pytest.raises(RecipeError, match=message):
        Iterate(recipe=recipe, runs_dir=str(tmp_path / "runs"), rounds=1)
    assert not (tmp_path / "runs" / "bad" / "round_00").exists()


def test_the_demo_data_validates_on_its_own_split():
    recipe = recipe_from_dict({"data": {"train": "demo:train_20k"}, "iterate": {"validation_prompts": 50}})
    validation = validation_prompts(recipe)
    assert len(validation) == 50 and validation.prompt_id.str.startswith("validation-").all()


# --- the judge-free figure ------------------------------------------------------------------------------

def test_gt_logprob_is_the_mean_per_token_log_likelihood_of_the_ground_truth(tmp_path):
    from data.prompts import format_completion, format_prompt
    from models.evaluate.evaluation import ground_truth_logprobs

    path, tokenizer = save_tiny_llama_root(tmp_path / "root")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    prompts = pd.DataFrame({"prompt_id": ["a", "b", "c"], "prompt": ["Add 2 and 3.", "Sort: 3 1 2", "No answer here"],
                            "reference": ["5", "1 2 3", None], "system": [None, None, None]})
    got = ground_truth_logprobs(model, tokenizer, prompts, batch_size=2, device=torch.device("cpu"))
    assert np.isnan(got.loc["c", "gt_logprob"])
    for pid, prompt, reference in (("a", "Add 2 and 3.", "5"), ("b", "Sort: 3 1 2", "1 2 3")):
        prompt_ids = tokenizer(format_prompt(tokenizer, prompt), add_special_tokens=False).input_ids
        full = tokenizer(format_prompt(tokenizer, prompt) + format_completion(tokenizer, prompt, reference),
                         add_special_tokens=False).input_ids
        with torch.no_grad():
            logits = model(torch.tensor([full])).logits[0].double()
        token_logps = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(full[1:])[:, None])[:, 0]
        expected = token_logps[len(prompt_ids) - 1:]  # the completion's tokens, each given everything before it
        assert got.loc[pid, "gt_tokens"] == len(expected)
        assert got.loc[pid, "gt_logprob"] == pytest.approx(expected.mean().item(), abs=1e-4)


# --- the reference ---------------------------------------------------------------------------------------

def tiny_pairs(offset: int) -> pd.DataFrame:
    return pd.DataFrame({"prompt": [f"q{i} {i * 7}" for i in range(offset, offset + 8)],
                         "chosen": [f"a{i * 3}" for i in range(offset, offset + 8)],
                         "rejected": [f"b{i}" for i in range(offset, offset + 8)]})


@pytest.mark.parametrize("reference", ["base", "ema"])
def test_the_reference_is_the_base_or_the_average_of_the_adapter(tmp_path, reference):
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from models.load.loading import load_causal_lm, lora_config
    from models.logps import pair_logps
    from models.train.trainer import REFERENCE_EMA, encode_pairs, train_round

    root, tokenizer = save_tiny_llama_root(tmp_path / "root")
    recipe = recipe_from_dict({
        "model": {"base_model": root, "precision": "fp32"},
        "training": {"epochs": 2, "batch_size": 4, "max_length": 96, "learning_rate": 0.01, "lora_r": 4, "lora_alpha": 8,
                     "save_steps": 100, "reference": reference}})
    first, second = tmp_path / "r1", tmp_path / "r2"
    train_round(recipe, root, tiny_pairs(0), tmp_path / "w1", first, 1, root, root)
    train_round(recipe, str(first), tiny_pairs(100), tmp_path / "w2", second, 2, root, root)
    ref = pd.read_parquet(tmp_path / "w2" / "ref_logps.parquet")

    from peft import get_peft_model

    model = get_peft_model(load_causal_lm(root, recipe.model), lora_config(recipe.training))
    chosen, rejected = encode_pairs(tokenizer, tiny_pairs(100), 96)
    if reference == "base":
        expected_adapter = None
    else:
        # After round 1: 0.5 * the fresh adapter (B = 0) + 0.5 * round 1's, parameter by parameter (TR-DPO's soft update).
        averaged = load_file(first / REFERENCE_EMA)
        trained = load_file(first / "adapter" / "adapter_model.safetensors")
        for key, value in averaged.items():
            if "lora_B" in key:
                assert torch.allclose(value, 0.5 * trained[key], atol=1e-7)
        assert not (second / REFERENCE_EMA).samefile(first / REFERENCE_EMA)
        expected_adapter = averaged
    if expected_adapter is not None:
        set_peft_model_state_dict(model, expected_adapter)
        expected = pair_logps(model, tokenizer, chosen, rejected, 8, torch.device("cpu"))
    else:
        with model.disable_adapter():
            expected = pair_logps(model, tokenizer, chosen, rejected, 8, torch.device("cpu"))
    np.testing.assert_allclose(ref.chosen, [c for c, _ in expected], atol=1e-4)
    np.testing.assert_allclose(ref.rejected, [r for _, r in expected], atol=1e-4)
    # ... and not the previous round, the default reference.
    set_peft_model_state_dict(model, load_file(first / "adapter" / "adapter_model.safetensors"))
    previous = pair_logps(model, tokenizer, chosen, rejected, 8, torch.device("cpu"))
    assert np.abs(ref.chosen.to_numpy() - [c for c, _ in previous]).max() > 1e-3


# --- whole runs ----------------------------------------------------------------------------------------

# Round 1 moves the ground truth's log-likelihood up (SPIN with the NLL anchor); a learning rate of 0.5
# in a round wrecks the tiny model, so that round is worse on validation than any before it.
SELECTING = {"iterate": {"select_by": "gt_logprob", "min_gain": 0.0, "validation_prompts": 24},
             "training": {"learning_rate": 0.01, "nll_weight": 1.0, "epochs": 2}}
WRECK = {"training": {"learning_rate": 0.5}}


def tiny_run(tiny_recipe, name: str, rounds_list, **overrides):
    return tiny_recipe("spin", name=name, **deep_merge(SELECTING, overrides), rounds=rounds_list)


def policy_logps(model_path: str, recipe_path: str, texts) -> np.ndarray:
    from configs.recipe import load_recipe
    from models.load.loading import load_policy, load_tokenizer
    from models.logps import batched_logps, encode

    recipe = load_recipe(recipe_path)
    tokenizer = load_tokenizer(model_path, recipe.model)
    model = load_policy(model_path, recipe.model, merge=False)
    items = [encode(tokenizer, prompt, answer, 96) for prompt, answer in texts]
    return np.array(batched_logps(model, tokenizer, items, 8, torch.device("cpu"))[0])


@pytest.mark.slow
def test_a_round_made_worse_keeps_the_round_before_it_and_best_loads_to_it(tiny_recipe, tmp_path):
    from transformers import AutoModelForCausalLM

    from models.load.loading import load_tokenizer
    from models.logps import batched_logps, encode
    from tasks.iterate import Iterate
    from test_pipeline import build

    recipe = tiny_run(tiny_recipe, "worse", [{}, WRECK])
    runs = tmp_path / "runs"
    build(Iterate(recipe=recipe, runs_dir=str(runs), rounds=2))
    run_dir = runs / "worse"
    layout = RunLayout(run_dir)
    selections = [json.loads(layout.selection(r).read_text()) for r in range(3)]
    assert selections[1]["replaced"] and not selections[2]["replaced"] and selections[2]["gain"]["diff"] < 0
    assert selections[2]["best_round"] == selections[2]["kept_round"] == 1
    best = read_best(layout)
    assert best["round"] == 1 and Path(best["source"]) == run_dir / "round_01" / "checkpoint"
    texts = [("Add 2 and 3.", "5"), ("Sort: 3 1 2", "1 2 3"), ("How many a in banana?", "3")]
    round_1, round_2 = (policy_logps(str(layout.checkpoint(r)), recipe, texts) for r in (1, 2))
    loaded = AutoModelForCausalLM.from_pretrained(run_dir / "best").eval()
    tokenizer = load_tokenizer(str(run_dir / "best"), recipe_from_dict({}).model)
    from_best = np.array(batched_logps(loaded, tokenizer, [encode(tokenizer, p, a, 96) for p, a in texts], 8,
                                       torch.device("cpu"))[0])
    np.testing.assert_allclose(from_best, round_1, atol=1e-3)  # the merged export: fp32 rounding of the fold
    assert np.abs(from_best - round_2).max() > 0.1
    report = (run_dir / "report.md").read_text()
    assert "**Round 1** is kept in `best/`" in report and "validation gt_logprob" in report
    metrics = json.loads(layout.metrics(2).read_text())["eval"]
    assert {"gt_logprob", "gt_logprob_se", "gt_logprob_vs_base", "gt_logprob_vs_base_se"} <= set(metrics)
    # best/ deleted by hand: the same command puts it back, and runs no task of a round.
    import shutil

    layout.best.unlink()
    shutil.rmtree(layout.best_store)
    assert {family for family, _ in build(Iterate(recipe=recipe, runs_dir=str(runs), rounds=2))} == {"Iterate"}
    assert read_best(layout)["round"] == 1 and (layout.best / "config.json").is_file()


def trained_rounds(ran) -> list[int]:
    return sorted(r for family, r in ran if family == "Train")


@pytest.mark.slow
def test_early_stopping_runs_exactly_the_rounds_it_should(tiny_recipe, tmp_path, caplog):
    from tasks.iterate import Iterate
    from test_pipeline import build

    # Round 1 is wrecked: it does not beat round 0, and with patience 1 the run ends after it.
    recipe = tiny_run(tiny_recipe, "stops", [WRECK], iterate={"patience": 1})
    runs = str(tmp_path / "runs")
    assert trained_rounds(build(Iterate(recipe=recipe, runs_dir=runs, rounds=3))) == [1]
    layout = RunLayout(tmp_path / "runs" / "stops")
    assert not layout.round_dir(2).exists() and read_best(layout)["round"] == 0
    assert "stopped early after round 1" in (layout.dir / "report.md").read_text()
    assert "rounds 2-3 not run" in (layout.dir / "report.md").read_text()
    # The same command does nothing; a larger --rounds does nothing either, and says why.
    assert build(Iterate(recipe=recipe, runs_dir=runs, rounds=3)) == []
    Iterate.clear_instance_cache()
    with caplog.at_level("INFO", logger="selfplay"):
        assert build(Iterate(recipe=recipe, runs_dir=runs, rounds=5)) == []
    assert any("stopped early after round 1" in r.message and "--resume-stopped" in r.message for r in caplog.records)
    # --resume-stopped goes on, to --rounds.
    ran = build(Iterate(recipe=recipe, runs_dir=runs, rounds=2, resume_stopped=True))
    assert trained_rounds(ran) == [2]
    assert build(Iterate(recipe=recipe, runs_dir=runs, rounds=2)) == []


@pytest.mark.slow
def test_a_larger_rounds_goes_on_from_the_rounds_made_and_reports_them_all(tiny_recipe, tmp_path):
    # Luigi checks Iterate's static requirements again each time it resumes after the rounds it hands out; the
    # report of the rounds made before (required there once) was found overwritten by the new one and the
    # command failed at its very end. luigi.build calls that "success with retry"; build() wants SUCCESS.
    from tasks.iterate import Iterate
    from test_pipeline import build

    recipe = tiny_run(tiny_recipe, "longer", [{}, {}])
    runs = str(tmp_path / "runs")
    assert trained_rounds(build(Iterate(recipe=recipe, runs_dir=runs, rounds=1))) == [1]
    assert trained_rounds(build(Iterate(recipe=recipe, runs_dir=runs, rounds=2))) == [2]
    layout = RunLayout(tmp_path / "runs" / "longer")
    assert report_rounds(layout.dir / "report.md") == 2 and read_selection(layout.selection(2)) is not None


@pytest.mark.slow
def test_restart_from_best_generates_round_3_from_round_1(tiny_recipe, tmp_path):
    from data.schema import PAIRS, read_artifact
    from models.load.loading import checkpoint_info, load_policy, load_tokenizer
    from models.logps import pair_logps
    from models.train.trainer import encode_pairs
    from tasks.iterate import Iterate
    from test_pipeline import build
    from configs.recipe import load_recipe

    recipe = tiny_run(tiny_recipe, "restart", [{}, WRECK, {}], iterate={"on_regress": "restart_from_best"})
    runs = tmp_path / "runs"
    build(Iterate(recipe=recipe, runs_dir=str(runs), rounds=3))
    run_dir = runs / "restart"
    layout = RunLayout(run_dir)
    assert json.loads(layout.selection(2).read_text())["parent_of_next"] == 1
    assert json.loads(layout.generate_meta(3).read_text())["parent_round"] == 1
    assert Path(checkpoint_info(layout.checkpoint(3))["parent"]) == layout.checkpoint(1)
    assert yaml.safe_load(layout.run_yaml.read_text())["parents"] == {1: 0, 2: 1, 3: 1}
    # SPIN's mixing follows the line: round 3 trained on its pairs and round 1's, not round 2's.
    pairs = {r: read_artifact(layout.pairs(r), PAIRS) for r in (1, 2, 3)}
    stats = json.loads(layout.training_log(3).read_text())["stats"]
    assert stats["pairs"] == len(pairs[3]) + len(pairs[1]) and stats["parent_round"] == 1
    # Round 3's reference is round 1's policy: its reference log-probs are round 1's on round 3's pairs.
    loaded = load_recipe(recipe)
    tokenizer = load_tokenizer(str(layout.checkpoint(1)), loaded.model)
    model = load_policy(str(layout.checkpoint(1)), loaded.model, merge=False)
    chosen, rejected = encode_pairs(tokenizer, pd.concat([pairs[3], pairs[1]], ignore_index=True),
                                    loaded.training.max_length, loaded.prompt_token_limit)
    expected = pair_logps(model, tokenizer, chosen, rejected, 8, torch.device("cpu"))
    ref = pd.read_parquet(layout.train_work(3) / "ref_logps.parquet")
    np.testing.assert_allclose(ref.chosen, [c for c, _ in expected], atol=1e-4)
    report = (run_dir / "report.md").read_text()
    assert "| 3 | 1 |" in report.split("## The round kept")[1]


@pytest.mark.slow
def test_mix_rounds_adds_the_share_of_earlier_rounds_pairs(tiny_recipe, tmp_path):
    from data.schema import PAIRS, read_artifact
    from tasks.iterate import Iterate
    from test_pipeline import build

    recipe = tiny_recipe("spin", name="mixed", training={"mix_rounds": [0.5, 0.25]})
    build(Iterate(recipe=recipe, runs_dir=str(tmp_path / "runs"), rounds=3))
    layout = RunLayout(tmp_path / "runs" / "mixed")
    pairs = {r: len(read_artifact(layout.pairs(r), PAIRS)) for r in (1, 2, 3)}
    trained = {r: json.loads(layout.training_log(r).read_text())["stats"]["pairs"] for r in (1, 2, 3)}
    assert trained == {1: pairs[1], 2: pairs[2] + pairs[1] // 2, 3: pairs[3] + pairs[2] // 2 + pairs[1] // 4}


@pytest.mark.slow
def test_a_run_directory_made_before_selection_runs_as_before(tiny_recipe, tmp_path):
    import shutil

    from tasks.iterate import Iterate
    from test_pipeline import build

    recipe = tiny_recipe("spin", name="old", iterate={"validation_prompts": 8})
    runs = tmp_path / "runs"
    build(Iterate(recipe=recipe, runs_dir=str(runs), rounds=1))
    layout = RunLayout(runs / "old")
    record = yaml.safe_load(layout.run_yaml.read_text())  # as an older selfplay wrote it
    del record["recipe"]["iterate"], record["parents"]
    for key in ("validation", "validation_split", "validation_fraction"):
        del record["recipe"]["data"][key]
    for key in ("mix_rounds", "reference", "reference_ema"):
        del record["recipe"]["training"][key]
    layout.run_yaml.write_text(yaml.safe_dump(record))
    for r in (0, 1):
        layout.selection(r).unlink()
        layout.validation(r).unlink()
    layout.best.unlink()
    layout.best_json.unlink()
    shutil.rmtree(layout.best_store)
    # Its recipe file has no iterate section either: the run goes on, as it ran before.
    old_recipe = yaml.safe_load(Path(recipe).read_text())
    del old_recipe["iterate"]
    Path(recipe).write_text(yaml.safe_dump(old_recipe))
    ran = build(Iterate(recipe=recipe, runs_dir=str(runs), rounds=2))
    families = {family for family, _ in ran}
    assert "Train" in families and not families & {"Validate", "Select"}
    assert read_best(layout) is None and "## The round kept" not in (layout.dir / "report.md").read_text()
    assert build(Iterate(recipe=recipe, runs_dir=str(runs), rounds=2)) == []


@pytest.mark.slow
def test_workers_and_a_task_run_alone(tiny_recipe, tmp_path):
    # Several worker processes run the rounds the dynamic dependencies hand out; a second command runs nothing.
    recipe = tiny_run(tiny_recipe, "workers", [], iterate={"on_regress": "restart_from_best"})
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def luigi_command(*args):
        return subprocess.run([sys.executable, "-m", "luigi", "--module", "pipeline", *args, "--recipe", recipe,
                               "--runs-dir", str(tmp_path / "runs"), "--local-scheduler"], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=900)

    done = luigi_command("Iterate", "--rounds", "1", "--workers", "2")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    layout = RunLayout(tmp_path / "runs" / "workers")
    assert layout.selection(1).is_file() and read_best(layout) is not None
    again = luigi_command("Iterate", "--rounds", "1", "--workers", "2")
    assert again.returncode == 0 and "done in" not in again.stdout + again.stderr, again.stderr[-2000:]
    # Train of round 2 run alone: the selection of round 1, which names its parent, is there; it trains on it.
    alone = luigi_command("Train", "--round-idx", "2")
    assert alone.returncode == 0, alone.stderr[-3000:]
    parent = json.loads(layout.selection(1).read_text())["parent_of_next"]
    assert json.loads(layout.training_log(2).read_text())["stats"]["parent_round"] == parent
    assert math.isfinite(json.loads(layout.selection(1).read_text())["gain"]["diff"])

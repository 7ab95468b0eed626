"""The Train stage (models/train/trainer.py) on a tiny random Llama on the CPU: every loss moves the adapter
the way its pairs ask, gradient accumulation equals one larger batch, the reference log-probs are
cached and recomputed exactly when the pairs change, and stale work directories are cleared."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

import models.train.trainer as trainer
from configs.recipe import recipe_from_dict
from data.schema import PAIRS, write_parquet
from models.load import loading
from models.logps import batched_logps
from tasks.base import DirTarget, FileTarget, prepare_work_dir
from conftest import save_tiny_llama_root

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return save_tiny_llama_root(tmp_path_factory.mktemp("root"))[0]


def make_recipe(root_path: str, algorithm: str = "dpo", **training) -> object:
    judged = {"judge": {"name": "verifier"}, "generation": {"num_samples": 2}} if algorithm != "spin" else {}
    return recipe_from_dict({
        "algorithm": algorithm, **judged,
        "model": {"base_model": root_path, "precision": "fp32"},
        "training": {"epochs": 2, "batch_size": 4, "max_length": 96, "learning_rate": 5e-3, "lora_r": 4, "lora_alpha": 8,
                     "save_steps": 100, "warmup_ratio": 0.0, "save_merged": False, **training},
    })


def make_pairs(n: int = 8, offset: int = 0) -> pd.DataFrame:
    ids = range(offset, offset + n)
    return pd.DataFrame({
        "prompt_id": [str(i) for i in ids], "prompt": [f"q{i} {i * 7}" for i in ids],
        "chosen": [f"a{i * 3}" for i in ids], "rejected": [f"b{i}x" for i in ids],
        "chosen_score": 1.0, "rejected_score": 0.0, "round": 1, "judge": "verifier",
        "chosen_win_prob": 0.8, "rejected_win_prob": 0.2,
    })


def side_logps(model_path: str, recipe, pairs: pd.DataFrame, root_path: str) -> np.ndarray:
    """(pairs, 2) summed log-probs of chosen and rejected under the model at `model_path`."""
    tokenizer = loading.load_tokenizer(root_path, recipe.model)
    model = loading.load_policy(model_path, recipe.model, CPU, root=root_path, merge=False)
    chosen, rejected = trainer.encode_pairs(tokenizer, pairs, recipe.training.max_length)
    sums = batched_logps(model, tokenizer, chosen + rejected, 16, CPU)[0]
    return np.array(sums).reshape(2, -1).T


def adapter(out_dir) -> dict[str, torch.Tensor]:
    return load_file(f"{out_dir}/adapter/adapter_model.safetensors")


LOSS_RECIPES = {
    "dpo_sigmoid": ("dpo", {}),
    "ipo": ("dpo", {}),
    "hinge": ("dpo", {}),
    "robust": ("dpo", {"label_smoothing": 0.1}),
    "simpo": ("dpo", {"beta": 2.0}),
    "sppo": ("sppo", {}),
    "inpo": ("inpo", {"inpo_eta": 2.0}),  # round 1: pi_{r-1} is the base, so it asks a margin of eta/2 = 1
}


def test_every_loss_of_the_table_is_tested_here():
    assert set(LOSS_RECIPES) == set(trainer.LOSSES)


@pytest.mark.parametrize("loss", sorted(LOSS_RECIPES))
def test_every_loss_moves_the_adapter_towards_the_chosen_responses(root, tmp_path, loss):
    algorithm, training = LOSS_RECIPES[loss]
    recipe = make_recipe(root, algorithm, loss=loss, **training)
    pairs = make_pairs()
    stats = trainer.train_round(recipe, root, pairs, tmp_path / "work", tmp_path / "out", 1, "root", root)
    assert stats["loss"] == loss and stats["steps"] == 4
    weights = adapter(tmp_path / "out")
    lora_b = [k for k in weights if "lora_B" in k]
    assert lora_b and all(weights[k].abs().max() > 1e-4 for k in lora_b)  # every B left zero, where it starts
    # Round 1 starts from the root, the reference: the margin log-ratio(chosen) - log-ratio(rejected) was 0.
    before, after = side_logps(root, recipe, pairs, root), side_logps(str(tmp_path / "out"), recipe, pairs, root)
    margin = (after[:, 0] - before[:, 0]) - (after[:, 1] - before[:, 1])
    assert margin.mean() > 0.5 and (margin > 0).all(), margin


def test_gradient_accumulation_equals_one_larger_batch(root, tmp_path):
    pairs = make_pairs()
    # One optimizer step over the 8 pairs: two micro-batches of 4 accumulated, or one batch of 8.
    runs = {}
    for name, batch_size, accum in (("accumulated", 4, 2), ("one_batch", 8, 1), ("two_steps", 4, 1)):
        recipe = make_recipe(root, "dpo", epochs=1, batch_size=batch_size, grad_accum_steps=accum, learning_rate=1e-2)
        stats = trainer.train_round(recipe, root, pairs, tmp_path / f"work_{name}", tmp_path / name, 1, "root", root)
        log = json.loads((tmp_path / name / "training_log.json").read_text())["history"]
        runs[name] = (stats, log, adapter(tmp_path / name))
    (acc_stats, acc_log, acc_w), (one_stats, one_log, one_w) = runs["accumulated"], runs["one_batch"]
    assert acc_stats["steps"] == one_stats["steps"] == 1
    # The same loss and gradient (its norm before clipping): the micro-batches' losses are averaged, not summed.
    assert acc_log[0]["loss"] == pytest.approx(one_log[0]["loss"], rel=1e-5)
    assert acc_log[0]["grad_norm"] == pytest.approx(one_log[0]["grad_norm"], rel=1e-4)
    assert all(torch.allclose(acc_w[k], one_w[k], rtol=0, atol=1e-6) for k in one_w)
    # Two optimizer steps of 4 pairs land elsewhere: the comparison above can fail.
    two_w = runs["two_steps"][2]
    assert max((two_w[k] - one_w[k]).abs().max().item() for k in one_w) > 1e-4


def test_reference_logps_are_cached_and_recomputed_when_the_pairs_change(root, tmp_path, monkeypatch):
    passes = []
    original = trainer.pair_logps

    def counted(model, tokenizer, chosen, rejected, *args, **kwargs):
        passes.append(len(chosen) + len(rejected))
        return original(model, tokenizer, chosen, rejected, *args, **kwargs)

    monkeypatch.setattr(trainer, "pair_logps", counted)  # the reference pass
    recipe = make_recipe(root, "dpo")
    pairs_file = tmp_path / "pairs.parquet"
    work_dir = tmp_path / "train_work"

    def train(pairs: pd.DataFrame, out: str):
        if not pairs_file.is_file() or not pd.read_parquet(pairs_file).equals(pairs):
            write_parquet(pairs, pairs_file, PAIRS)
        work = prepare_work_dir(work_dir, [FileTarget(str(pairs_file))])
        trainer.train_round(recipe, root, pd.read_parquet(pairs_file), work, tmp_path / out, 1, "root", root)
        return pd.read_parquet(work / "ref_logps.parquet")

    first = train(make_pairs(8), "first")
    assert passes == [16]  # chosen and rejected of 8 pairs, under the policy as the round starts
    # The cache holds the reference: the round-1 policy before any update is the root.
    np.testing.assert_allclose(first[["chosen", "rejected"]].to_numpy(), side_logps(root, recipe, make_pairs(8), root), atol=1e-5)

    # Same pairs, trainer checkpoints removed (a rerun from scratch): the cached reference is reused, and
    # training from it gives the same adapter.
    for checkpoint in work_dir.glob("checkpoint-*"):
        for file in checkpoint.iterdir():
            file.unlink()
        checkpoint.rmdir()
    again = train(make_pairs(8), "again")
    assert passes == [16]
    pd.testing.assert_frame_equal(again, first)
    assert all(torch.equal(adapter(tmp_path / "again")[k], w) for k, w in adapter(tmp_path / "first").items())

    # The Judge redone with other pairs: the work directory, cache included, is cleared and the reference recomputed.
    changed = train(make_pairs(6, offset=100), "changed")
    assert passes == [16, 12]
    np.testing.assert_allclose(changed[["chosen", "rejected"]].to_numpy(),
                               side_logps(root, recipe, make_pairs(6, offset=100), root), atol=1e-5)


def test_a_work_directory_is_cleared_exactly_when_its_inputs_were_redone(tmp_path):
    file_input = FileTarget(str(tmp_path / "pairs.parquet"))
    dir_input = DirTarget(str(tmp_path / "checkpoint"))

    def redo_file(text):
        with file_input.temporary_path() as tmp:
            open(tmp, "w").write(text)

    def redo_dir():
        with dir_input.temporary_path() as tmp:
            open(f"{tmp}/weights", "w").write("w")

    redo_file("pairs v1")
    redo_dir()
    work = tmp_path / "train_work"

    def prepare_with_a_part() -> bool:
        """Prepare the work directory; whether the part left in it last time is still there. Leaves a part."""
        prepare_work_dir(work, [file_input, dir_input])
        kept = (work / "part-00000").is_file()
        (work / "part-00000").write_text("saved work")
        return kept

    assert prepare_with_a_part() is False  # new
    assert prepare_with_a_part() is True  # same inputs: resumable parts kept
    redo_dir()  # the checkpoint made again (a new _SUCCESS stamp), even with the same files in it
    assert prepare_with_a_part() is False
    assert prepare_with_a_part() is True
    redo_file("pairs v2")
    assert prepare_with_a_part() is False
    (work / "inputs.json").write_text("{not json")  # damaged: the parts cannot be trusted
    assert prepare_with_a_part() is False
    (work / "inputs.json").unlink()  # a work directory that records no inputs
    assert prepare_with_a_part() is False
    assert prepare_with_a_part() is True


class RunsCodeWhenUnpickled:
    """What someone who can write to a shared run directory could put in a trainer checkpoint."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def test_a_trainer_checkpoint_is_unpickled_as_weights_only(root, tmp_path):
    recipe = make_recipe(root, "dpo", epochs=1, save_steps=1)  # 8 pairs, 4 a step: checkpoints 1 and 2
    pairs, work = make_pairs(), tmp_path / "work"
    trainer.train_round(recipe, root, pairs, work, tmp_path / "whole", 1, "root", root)
    # The round's own checkpoint resumes: what it holds loads without the full unpickler.
    state = torch.load(work / "checkpoint-2" / "state.pt", weights_only=True)
    for file in (work / "checkpoint-2").iterdir():
        file.unlink()
    (work / "checkpoint-2").rmdir()
    trainer.train_round(recipe, root, pairs, work, tmp_path / "resumed", 1, "root", root)
    assert all(torch.equal(adapter(tmp_path / "resumed")[k], w) for k, w in adapter(tmp_path / "whole").items())
    # A checkpoint with anything else in it is refused in one line, and what it holds never runs.
    marker = tmp_path / "marker"
    torch.save({**state, "history": [RunsCodeWhenUnpickled(marker)]}, work / "checkpoint-2" / "state.pt")
    with pytest.raises(trainer.TrainingError, match=r"checkpoint-2/state.pt holds a reference to exec, not only tensors "
                                                    r"and plain values; refusing to unpickle it") as refused:
        trainer.train_round(recipe, root, pairs, work, tmp_path / "again", 1, "root", root)
    assert "\n" not in str(refused.value)
    assert not marker.exists()


def test_the_logged_reward_accuracy_counts_ties_as_no_wins():
    from models.train.losses import PreferenceBatch

    # At a round's first step the policy is its reference: rewards 0 and 0 on every pair, nothing won yet.
    logps = torch.tensor([-3.0, -5.0, -7.5])
    tied = PreferenceBatch(policy_chosen_logps=logps, policy_rejected_logps=logps - 1, ref_chosen_logps=logps,
                           ref_rejected_logps=logps - 1, beta=0.1)
    assert trainer._preference_values(torch.tensor(0.69), tied)["rewards/accuracy"] == 0.0
    won = PreferenceBatch(policy_chosen_logps=logps + torch.tensor([0.5, 0, 0]), policy_rejected_logps=logps - 1,
                          ref_chosen_logps=logps, ref_rejected_logps=logps - 1, beta=0.1)
    assert trainer._preference_values(torch.tensor(0.69), won)["rewards/accuracy"] == pytest.approx(1 / 3)

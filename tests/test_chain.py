"""How rounds chain: the policy at the end of Train(r) is the model every later stage loads.

The root weights are never changed and the policy is one LoRA adapter continued across rounds
(models/load/loading.py). These tests train real rounds (models.train.trainer.train_round) on a tiny random
Llama on the CPU, take the policy's log-probs from the trained model object in-process (at the moment
the trainer hands it to save_checkpoint), and compare them with the log-probs of what Generate(r+1),
the self-judge and Evaluate(r) load (models.load.loading.load_policy) and with Train(r+1)'s reference.

Tolerance, on summed log-probs of whole responses: TOL = 1e-4. Unmerged (bf16, fp16, QLoRA, and every
Evaluate load) the loaded policy computes the same operations on the same weights: measured difference
0. Evaluate folds the adapter in for its generation (fp32 only, models.load.loading.adapter_merged) and out
again for pi_base, which leaves the root weights off by the rounding of one add and one subtract
(measured: 4e-6 on the folded policy and on the root afterwards). Merged in fp32 (load_policy's
default for fp32 inference) the fold costs fp32 rounding: measured about 4e-6. The merged copy in
bf16, which the previous chain loaded, is off by about 3e-3 here, as large as the round's whole
update at a small learning rate: the test shows it fails TOL.
"""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from common.errors import ModelError
from configs.recipe import recipe_from_dict
from models import packing
from models.load import loading
from models.logps import batched_logps, pair_logps
from models.train.trainer import encode_pairs, train_round
from conftest import save_tiny_llama_root

TOL = 1e-4
CPU = torch.device("cpu")


@pytest.fixture
def root(tmp_path):
    return save_tiny_llama_root(tmp_path / "root")


def make_recipe(root_path: str, precision: str, learning_rate: float, quantization: str = "none", **training):
    return recipe_from_dict({
        "model": {"base_model": root_path, "precision": precision, "quantization": quantization},
        "training": {"epochs": 2, "batch_size": 4, "max_length": 96, "learning_rate": learning_rate, "lora_r": 4,
                     "lora_alpha": 8, "save_steps": 100, **training},
    })


def make_pairs(offset: int) -> pd.DataFrame:
    return pd.DataFrame({
        "prompt": [f"q{i} {i * 7}" for i in range(offset, offset + 8)],
        "chosen": [f"a{i * 3}" for i in range(offset, offset + 8)],
        "rejected": [f"b{i}" for i in range(offset, offset + 8)],
    })


# Responses the probes score: every pair of both rounds plus text no round trains on.
PROBES = pd.concat([make_pairs(0), make_pairs(100), make_pairs(500)], ignore_index=True)


def probe_items(tokenizer):
    chosen, rejected = encode_pairs(tokenizer, PROBES, 96)
    return chosen + rejected


def logps(model, tokenizer, items=None) -> np.ndarray:
    items = items if items is not None else probe_items(tokenizer)
    return np.array(batched_logps(model, tokenizer, items, 8, next(model.parameters()).device)[0])


class Recorded(list):
    """Log-probs of each trained policy on the probes; `as_reference`: on round 2's pairs, as a reference pass."""

    as_reference: list


@pytest.fixture
def trained_policies(monkeypatch):
    """Records the log-probs of every trained policy as train_round hands it to save_checkpoint."""
    seen, seen_as_reference = Recorded(), []
    original = loading.save_checkpoint

    def spy(peft_model, tokenizer, out_dir, **kwargs):
        seen.append(logps(peft_model, tokenizer))
        # Round 2's pairs scored as Train(2)'s reference pass scores them (pairs sharing their prompt's
        # forward, models.train.trainer.pair_logps, under bf16 autocast where the weights are bf16): in bf16
        # another batch layout rounds differently.
        chosen, rejected = encode_pairs(tokenizer, make_pairs(100), 96)
        weight = next(peft_model.parameters())
        with torch.autocast(weight.device.type, dtype=torch.bfloat16, enabled=weight.dtype == torch.bfloat16):
            seen_as_reference.append(np.array(pair_logps(peft_model, tokenizer, chosen, rejected, 4, weight.device)).T.ravel())
        return original(peft_model, tokenizer, out_dir, **kwargs)

    monkeypatch.setattr(loading, "save_checkpoint", spy)
    seen.as_reference = seen_as_reference
    return seen


def train(recipe, parent, pairs, tmp_path, round_idx, root_path):
    out = tmp_path / f"round_{round_idx:02d}"
    train_round(recipe, parent, pairs, tmp_path / f"work_{round_idx:02d}", out, round_idx, "root", root_path)
    return str(out)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_each_round_loads_the_policy_that_was_trained_and_the_next_reference_is_it(root, tmp_path, trained_policies, precision):
    root_path, tok = root
    recipe = make_recipe(root_path, precision, learning_rate=2e-5)
    first = train(recipe, root_path, make_pairs(0), tmp_path, 1, root_path)
    round_1 = trained_policies[0]
    root_logps = logps(loading.load_causal_lm(root_path, recipe.model, CPU), tok)
    assert np.abs(round_1 - root_logps).max() > 10 * TOL  # the round moved the policy: the checks below can fail

    # What Generate(2) and the self-judge load (merged only in fp32), and what Evaluate(1) loads.
    generator = loading.load_policy(first, recipe.model, CPU, root=root_path)
    assert np.abs(logps(generator, tok) - round_1).max() <= TOL
    evaluator = loading.load_policy(first, recipe.model, CPU, root=root_path, merge=False)
    assert np.array_equal(logps(evaluator, tok), round_1)  # unmerged: the same computation, exactly
    with loading.root_weights(evaluator):  # Evaluate's pi_base: the same load with the adapter off
        assert np.array_equal(logps(evaluator, tok), root_logps)
    assert np.array_equal(logps(evaluator, tok), round_1)
    # Evaluate generates with the adapter folded in (fp32 only) and unfolds it for pi_base.
    with loading.adapter_merged(evaluator):
        folded_in_place = logps(evaluator, tok)
    assert np.abs(folded_in_place - round_1).max() <= TOL
    assert not np.array_equal(folded_in_place, round_1) if precision == "fp32" else np.array_equal(folded_in_place, round_1)
    with loading.root_weights(evaluator):  # unfolded: the root again, up to the rounding of the add and subtract
        assert np.abs(logps(evaluator, tok) - root_logps).max() <= TOL
    assert np.abs(logps(evaluator, tok) - round_1).max() <= TOL
    if precision == "bf16":
        # The previous chain loaded the merged copy; in bf16 the fold rounds the small update away,
        # and the same check fails it.
        from transformers import AutoModelForCausalLM

        merged_copy = AutoModelForCausalLM.from_pretrained(first, dtype=torch.bfloat16).eval()
        assert np.abs(logps(merged_copy, tok) - round_1).max() > 10 * TOL
        folded = loading.load_policy(first, recipe.model, CPU, merge=True)
        assert np.abs(logps(folded, tok) - round_1).max() > 10 * TOL

    # Train(2) continues the adapter; its reference log-probs, taken before its first update, are round 1's policy.
    pairs_2 = make_pairs(100)
    second = train(recipe, first, pairs_2, tmp_path, 2, root_path)
    round_2 = trained_policies[1]
    reference = pd.read_parquet(tmp_path / "work_02" / "ref_logps.parquet")
    in_process = trained_policies.as_reference[0]  # round 2's pairs (chosen, then rejected) scored by round 1's policy
    assert np.abs(np.concatenate([reference.chosen, reference.rejected]) - in_process).max() <= TOL
    assert np.abs(in_process - np.concatenate([round_1[8:16], round_1[32:40]])).max() <= (TOL if precision == "fp32" else 1e-2)
    assert np.abs(round_2 - round_1).max() > 10 * TOL  # round 2 trained on
    info = loading.checkpoint_info(second)
    assert (info["parent"], info["root_path"], info["chain"]) == (first, root_path, loading.CHAIN)
    adapter_config = json.loads((tmp_path / "round_02" / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == root_path
    assert np.abs(logps(loading.load_policy(second, recipe.model, CPU), tok) - round_2).max() <= TOL

    # A killed round resumes from its last trainer checkpoint; its reference is still taken at the
    # round's start, not from the partly trained adapter the resume restores.
    (tmp_path / "work_02" / "ref_logps.parquet").unlink()
    shutil.rmtree(second)
    train(recipe, first, pairs_2, tmp_path, 2, root_path)
    again = pd.read_parquet(tmp_path / "work_02" / "ref_logps.parquet")
    assert np.abs(again.to_numpy() - reference.to_numpy()).max() <= TOL
    assert np.array_equal(trained_policies[2], round_2)


@pytest.mark.parametrize("loss", ["dpo_sigmoid", "inpo"])
def test_in_bf16_the_policy_at_step_0_of_round_2_computes_its_stored_reference(root, tmp_path, monkeypatch, loss):
    """bf16 trains under autocast; the reference pass (and INPO's base pass) once ran outside it, so from
    round 2, where the adapter is not zero, the policy at step 0 was not its own reference (measured: up to 3e-3
    nats apart on these pairs). One micro-batch holds all the pairs, as the reference pass's one batch does,
    so both run the same shapes."""
    from models.train import trainer

    root_path, _ = root
    recipe = make_recipe(root_path, "bf16", learning_rate=1e-3, batch_size=8, loss=loss)
    first = train(recipe, root_path, make_pairs(0), tmp_path, 1, root_path)
    seen = []
    original = trainer.LOSSES[loss]
    monkeypatch.setitem(trainer.LOSSES, loss, lambda pref: seen.append(pref) or original(pref))
    train(recipe, first, make_pairs(100), tmp_path, 2, root_path)
    step_0 = seen[0]
    assert torch.equal(step_0.policy_chosen_logps.detach(), step_0.ref_chosen_logps)
    assert torch.equal(step_0.policy_rejected_logps.detach(), step_0.ref_rejected_logps)
    reference = pd.read_parquet(tmp_path / "work_02" / "ref_logps.parquet")
    assert np.abs(reference.chosen.to_numpy() - reference.rejected.to_numpy()).max() > 0.1  # real, distinct figures
    if loss == "inpo":  # the base pass (the adapter switched off) is another model than the reference: round 1 moved it
        base = pd.read_parquet(tmp_path / "work_02" / "base_logps" / "ref_logps.parquet")
        assert np.abs(base.chosen.to_numpy() - reference.chosen.to_numpy()).max() > 1e-2


@pytest.mark.skipif(not packing.cpu_packing_available(), reason="this torch build has no oneDNN linear")
def test_pi_base_is_the_root_after_the_fold_when_cpu_weights_are_packed(root, tmp_path, monkeypatch):
    """SmolLM2's layers run on packed copies of their weights (models.packing); peft folds an adapter in
    and out through `weight.data`, which the parameter's version does not see. Evaluate's pi_base, after
    a generation with the adapter folded in, once ran on the folded copy: the policy, a KL of 0."""
    monkeypatch.setattr(packing, "PACK_MIN_WEIGHTS", 0)  # the tiny model's layers packed, as SmolLM2's are
    root_path, tok = root
    recipe = make_recipe(root_path, "fp32", learning_rate=2e-5)
    first = train(recipe, root_path, make_pairs(0), tmp_path, 1, root_path)
    root_logps = logps(loading.load_causal_lm(root_path, recipe.model, CPU), tok)
    evaluator = loading.load_policy(first, recipe.model, CPU, root=root_path, merge=False)
    with loading.adapter_merged(evaluator):
        folded = logps(evaluator, tok)  # packs the folded weights
    assert np.abs(folded - root_logps).max() > 10 * TOL  # the round moved the policy: the check below can fail
    with loading.root_weights(evaluator):
        assert np.abs(logps(evaluator, tok) - root_logps).max() <= TOL
    assert np.abs(logps(evaluator, tok) - folded).max() <= TOL  # the adapter on again, unfolded


@pytest.mark.skipif(not packing.cpu_packing_available(), reason="this torch build has no oneDNN linear")
def test_a_policy_loaded_for_packed_weights_keeps_its_adapter_for_packing_to_fold(root, tmp_path, monkeypatch):
    """Generate on a CPU with the static backend: the adapter is not merged into the memory-mapped root at
    load, packing folds it into its packed copies, and the greedy tokens are those of the merged load."""
    from models.generate.generation import generate_texts
    from models.generate.sampling import SamplingSettings

    monkeypatch.setattr(packing, "PACK_MIN_WEIGHTS", 0)
    root_path, tok = root
    recipe = make_recipe(root_path, "fp32", learning_rate=1e-3)
    first = train(recipe, root_path, make_pairs(0), tmp_path, 1, root_path)
    merged = loading.load_policy(first, recipe.model, CPU, root=root_path)
    unmerged = loading.load_policy(first, recipe.model, CPU, root=root_path, packed=True)
    assert not loading.has_adapter(merged) and loading.has_adapter(unmerged) and packing.folds_adapters(unmerged)
    texts = ["a b c", "d e f g h", "x"]
    settings = SamplingSettings(temperature=0.0, max_new_tokens=12, batch_size=3, backend="static", logps=True)
    by_merge, by_packing = (generate_texts(model, tok, texts, settings) for model in (merged, unmerged))
    assert [s[0].token_ids for s in by_packing] == [s[0].token_ids for s in by_merge]
    assert [s[0].logp for s in by_packing] == pytest.approx([s[0].logp for s in by_merge], abs=1e-4)
    with loading.root_weights(unmerged):
        root_out = generate_texts(unmerged, tok, texts, settings)
    assert [s[0].logp for s in root_out] != pytest.approx([s[0].logp for s in by_packing], abs=1e-3)  # the round moved it


def test_a_checkpoint_of_the_older_merged_chain_is_refused(tmp_path):
    (tmp_path / loading.CHECKPOINT_INFO).write_text(json.dumps({"round": 1, "parent": "x", "root_model": "r", "merged": True}))
    with pytest.raises(ModelError, match="chained rounds through merged copies"):
        loading.load_policy(str(tmp_path), recipe_from_dict({}).model)


def test_an_adapter_of_another_shape_is_refused(root, tmp_path, trained_policies):
    root_path, _ = root
    recipe = make_recipe(root_path, "fp32", learning_rate=1e-3)
    first = train(recipe, root_path, make_pairs(0), tmp_path, 1, root_path)
    wider = make_recipe(root_path, "fp32", learning_rate=1e-3, lora_r=8)
    with pytest.raises(ModelError, match="training.lora_r is 8 but the adapter in .* has 4"):
        train(wider, first, make_pairs(100), tmp_path, 2, root_path)
    fewer = make_recipe(root_path, "fp32", learning_rate=1e-3, lora_target_modules="q_proj,v_proj")
    with pytest.raises(ModelError, match="does not fit training.lora_target_modules='q_proj,v_proj'"):
        train(fewer, first, make_pairs(100), tmp_path, 2, root_path)


def test_generation_backends_run_the_unmerged_policy_and_the_root(root):
    # Generate and Evaluate run the policy with its adapter unmerged (bf16, QLoRA, Evaluate always):
    # both backends must see it, and a static-cache session must not outlive switching it off.
    from models.generate.fast_generation import _weights_fingerprint
    from models.generate.generation import generate_texts
    from models.generate.sampling import SamplingSettings

    root_path, tok = root
    model_cfg = recipe_from_dict({}).model
    peft_model = loading.add_lora(loading.load_causal_lm(root_path, model_cfg, CPU), recipe_from_dict({}).training)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    policy = peft_model.get_base_model().eval()
    plain_root = loading.load_causal_lm(root_path, model_cfg, CPU)
    texts = [f"<|user|>Add {i} and {i * 3}.<|end|><|assistant|>" for i in range(6)]

    def greedy(model, backend):
        settings = SamplingSettings(temperature=0.0, max_new_tokens=12, batch_size=8, backend=backend)
        return [samples[0].text for samples in generate_texts(model, tok, texts, settings)]

    assert greedy(policy, "static") == greedy(policy, "hf") != greedy(plain_root, "hf")
    fingerprint = _weights_fingerprint(policy)
    with loading.root_weights(policy):
        assert _weights_fingerprint(policy) != fingerprint
        assert greedy(policy, "static") == greedy(plain_root, "hf")
    assert _weights_fingerprint(policy) == fingerprint


def test_qlora_rounds_chain_through_the_nf4_root_plus_the_trained_adapter(root, tmp_path, trained_policies):
    """QLoRA on the CPU (bitsandbytes nf4, fp32 compute): the loaded policy holds the trained nf4 weights and
    adapter bit for bit and computes the trained policy's log-probs exactly; Train(2)'s reference is that
    policy; the merged copy re-quantised to nf4 (nf4(W + delta), the chain of before) is another model."""
    from safetensors.torch import load_file

    root_path, tok = root
    recipe = make_recipe(root_path, "fp32", learning_rate=1e-3, quantization="4bit")
    first = train(recipe, root_path, make_pairs(0), tmp_path, 1, root_path)
    round_1 = trained_policies[0]
    device = loading.default_device()  # where train_round trained (bench/gpu_check.py runs this test on a GPU)
    policy = loading.load_policy(first, recipe.model, device, quantize=True, root=root_path)  # what Generate(2) loads
    fresh_root = loading.load_causal_lm(root_path, recipe.model, device, quantize=True)
    requantised = loading.load_causal_lm(first, recipe.model, device, quantize=True)  # the merged export, quantised again
    saved = load_file(f"{first}/adapter/adapter_model.safetensors")
    adapted = [(name, module) for name, module in policy.named_modules() if hasattr(module, "lora_A")]
    root_layers, requantised_layers = dict(fresh_root.named_modules()), dict(requantised.named_modules())
    assert len(adapted) == 14 and type(adapted[0][1].base_layer).__name__ == "Linear4bit"
    for name, module in adapted:
        assert torch.equal(module.lora_A["default"].weight.cpu(), saved[f"base_model.model.{name}.lora_A.weight"])
        assert torch.equal(module.lora_B["default"].weight.cpu(), saved[f"base_model.model.{name}.lora_B.weight"])
        assert torch.equal(module.base_layer.weight.data, root_layers[name].weight.data)  # packed nf4: the root as loaded
    assert any(not torch.equal(requantised_layers[name].weight.data, root_layers[name].weight.data) for name, _ in adapted)
    assert np.array_equal(logps(policy, tok), round_1)  # nf4(W) + delta, computed as in training
    root_logps = logps(fresh_root, tok)
    assert np.abs(round_1 - root_logps).max() > 10 * TOL  # the round moved the policy
    with loading.root_weights(policy):  # Evaluate's pi_base: the nf4 root
        assert np.array_equal(logps(policy, tok), root_logps)
    assert np.abs(logps(requantised, tok) - round_1).max() > 10 * TOL  # nf4(W + delta) is not the trained policy

    second = train(recipe, first, make_pairs(100), tmp_path, 2, root_path)
    reference = pd.read_parquet(tmp_path / "work_02" / "ref_logps.parquet")
    assert np.array_equal(np.concatenate([reference.chosen, reference.rejected]), trained_policies.as_reference[0])
    assert np.abs(np.concatenate([reference.chosen, reference.rejected]) - np.concatenate([round_1[8:16], round_1[32:40]])).max() <= TOL
    assert np.array_equal(logps(loading.load_policy(second, recipe.model, device, quantize=True), tok), trained_policies[1])

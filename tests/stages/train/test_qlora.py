"""QLoRA on the CPU: bitsandbytes nf4 layers under a LoRA adapter, on a tiny random Llama quantised for real.

How rounds chain through the nf4 root is in tests/test_chain.py; SmolLM2's QLoRA round through Luigi in
tests/test_real_model.py. Here: the LoRA gradients through the nf4 layers are those through the same weights
de-quantised, the static decode loop (packed CPU weights) runs a policy whose layers are Linear4bit and gives
the greedy tokens of plain `generate`, and settings the device cannot run are refused before anything runs.
"""

import numpy as np
import pytest
import torch

from common.errors import ModelError
from configs.recipe import recipe_from_dict
from models import packing
from models.load import loading
from models.logps import collate_pairs, encode_pair, sequence_logps
from conftest import save_tiny_llama_root

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return save_tiny_llama_root(tmp_path_factory.mktemp("root") / "root")


def qlora_recipe(root_path: str):
    return recipe_from_dict({"model": {"base_model": root_path, "precision": "fp32", "quantization": "4bit"},
                             "training": {"lora_r": 4, "lora_alpha": 8}})


def dequantised_copy(nf4_model, root_path, model_cfg):
    """The root in fp32 with every Linear4bit weight replaced by its de-quantised nf4 values: the same function
    as the nf4 model, through plain nn.Linear layers."""
    from bitsandbytes.functional import dequantize_4bit

    plain = loading.load_causal_lm(root_path, model_cfg, CPU)
    layers = dict(plain.named_modules())
    quantised = [(name, m) for name, m in nf4_model.named_modules() if is_nf4(m)]
    assert len(quantised) == 14
    with torch.no_grad():
        for name, module in quantised:
            weight = dequantize_4bit(module.weight.data, module.weight.quant_state).to(torch.float32)
            assert not torch.equal(weight, layers[name].weight)  # nf4 rounded the weights: the comparison means something
            layers[name].weight.copy_(weight)
    return plain


def is_nf4(module) -> bool:
    import bitsandbytes

    return isinstance(module, bitsandbytes.nn.Linear4bit)


def random_adapter(peft_model, seed: int = 1) -> None:
    """LoRA weights drawn at random (B not zero), so every LoRA weight gets a gradient."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(peft_model.named_parameters()):
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)


def test_lora_gradients_through_nf4_layers_equal_those_through_the_dequantised_weights(root):
    root_path, tok = root
    recipe = qlora_recipe(root_path)
    nf4_root = loading.load_causal_lm(root_path, recipe.model, CPU, quantize=True)
    plain = loading.add_lora(dequantised_copy(nf4_root, root_path, recipe.model), recipe.training)
    nf4 = loading.add_lora(nf4_root, recipe.training, quantized=True)
    random_adapter(nf4)
    random_adapter(plain)
    chosen, rejected = zip(*(encode_pair(tok, f"q{i} {i * 7}", f"a{i * 3}", f"b{i}", 64) for i in range(6)))
    batch = collate_pairs(list(chosen), list(rejected), tok.pad_token_id)
    grads = []
    for model in (nf4, plain):
        sums, _ = sequence_logps(model, batch)
        (-sums.sum()).backward()
        grads.append({name: p.grad for name, p in model.named_parameters() if p.requires_grad})
        grads[-1]["sums"] = sums.detach()
    assert len(grads[0]) == len(grads[1]) == 2 * 14 + 1
    torch.testing.assert_close(grads[0]["sums"], grads[1]["sums"], rtol=0, atol=1e-5)
    for name, grad in grads[0].items():
        assert grad.abs().max() > 0
        torch.testing.assert_close(grad, grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.skipif(not packing.cpu_packing_available(), reason="this torch build has no oneDNN linear")
def test_static_backend_runs_an_nf4_policy_unpacked_and_gives_the_greedy_tokens_of_generate(root, monkeypatch):
    """Packing takes fp32 nn.Linear layers only: a LoRA layer over Linear4bit runs peft's own forward (its
    adapter not folded, nothing written into the nf4 weights), the tied fp32 head is packed, and the tokens
    and summed log-probs are those of plain generate and the log-prob pass."""
    from models.generate.generation import generate_texts
    from models.logps import Encoded, batched_logps
    from models.generate.sampling import SamplingSettings

    monkeypatch.setattr(packing, "PACK_MIN_WEIGHTS", 0)  # the tiny model's layers packed where they can be
    root_path, tok = root
    recipe = qlora_recipe(root_path)
    peft_model = loading.add_lora(loading.load_causal_lm(root_path, recipe.model, CPU, quantize=True), recipe.training)
    random_adapter(peft_model)
    policy = peft_model.get_base_model().eval()
    assert not packing.folds_adapters(policy)
    nf4_before = [m.weight.data.clone() for m in policy.modules() if is_nf4(m)]
    texts = ["a b c", "d e f g h", "x", "q1 7"]
    settings = {"temperature": 0.0, "max_new_tokens": 12, "batch_size": 4, "logps": True}
    with loading.adapter_merged(policy, packed=True):  # as Evaluate runs it: nothing to fold into nf4 weights
        static = generate_texts(policy, tok, texts, SamplingSettings(**settings, backend="static"))
    plain = generate_texts(policy, tok, texts, SamplingSettings(**settings, backend="hf"))
    assert [s[0].token_ids for s in static] == [s[0].token_ids for s in plain]
    assert len({tuple(s[0].token_ids) for s in static}) > 1
    prompts = [tok(t, add_special_tokens=False).input_ids for t in texts]
    scored = batched_logps(policy, tok, [Encoded(p, s[0].token_ids) for p, s in zip(prompts, static)], 4, CPU)[0]
    assert np.abs(np.array([s[0].logp for s in static]) - np.array(scored)).max() < 1e-3
    nf4_after = [m.weight.data for m in policy.modules() if is_nf4(m)]
    assert all(torch.equal(a, b) for a, b in zip(nf4_before, nf4_after))


def test_quantisation_the_installed_bitsandbytes_can_do_here_is_allowed():
    assert loading.quantization_problem(CPU) is None  # bitsandbytes >= 0.49 quantises nf4 on a CPU


def test_a_quantisation_bitsandbytes_cannot_do_here_is_refused_before_anything_is_scheduled(tiny_recipe, tmp_path, monkeypatch):
    """As bitsandbytes before 0.49 answered nf4 on a CPU; the preflight asks bitsandbytes itself."""
    import bitsandbytes.functional

    from tasks.iterate import Iterate

    def cuda_only(*args, **kwargs):
        raise NotImplementedError("4-bit quantisation is only implemented for CUDA devices")

    monkeypatch.setattr(bitsandbytes.functional, "quantize_4bit", cuda_only)
    recipe = tiny_recipe("spin", model={"quantization": "4bit"})
    with pytest.raises(ModelError, match=r"^model\.quantization: 4bit \(QLoRA\) cannot run here: bitsandbytes [\d.]+ cannot "
                                         r"quantise to nf4 on cpu \(4-bit quantisation is only implemented for CUDA devices\); "
                                         r"use quantization: none$"):
        Iterate(recipe=recipe, runs_dir=str(tmp_path / "runs"), rounds=1)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.parquet"))


def test_bf16_on_a_gpu_without_it_is_refused_before_anything_is_scheduled(tiny_recipe, tmp_path, monkeypatch):
    from tasks.iterate import Iterate

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "Tesla T4")
    recipe = tiny_recipe("spin", model={"precision": "bf16"})
    with pytest.raises(ModelError, match=r"^model\.precision: bf16 needs a GPU with bf16; Tesla T4 has none: use fp16 or fp32$"):
        Iterate(recipe=recipe, runs_dir=str(tmp_path / "runs"), rounds=1)
    assert loading.precision_problem("bf16", CPU) is None  # a CPU computes bf16 (slowly where it has no bf16 instructions)


# --- a QLoRA round through Luigi --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory):
    """One SPIN round of the tiny demo recipe with QLoRA on the CPU, through Luigi."""
    import yaml

    import pipeline  # noqa: F401 - registers the tasks
    from configs.recipe import deep_merge
    from conftest import ALGORITHMS, TINY
    from tasks.iterate import Iterate
    from test_pipeline import build

    root = tmp_path_factory.mktemp("qlora")
    recipe = deep_merge(deep_merge(TINY, ALGORITHMS["spin"]), {"name": "tiny_qlora", "model": {"precision": "fp32", "quantization": "4bit"}})
    path = root / "tiny_qlora.yaml"
    path.write_text(yaml.safe_dump(recipe))
    build(Iterate(recipe=str(path), runs_dir=str(root / "runs"), rounds=1))
    return root / "runs" / "tiny_qlora", str(path)


@pytest.mark.slow
def test_a_qlora_round_reports_what_the_nf4_base_costs_beside_the_full_precision_base(qlora_run):
    """Round 0 of a QLoRA run is the nf4 base: metrics.json and report.md set its KL from, and its accuracy
    beside, the base in full precision; that accuracy is the one a run without quantisation measures."""
    import json

    import pandas as pd

    from configs.recipe import load_recipe
    from models.evaluate.evaluation import evaluate_round
    from tasks.evaluate import eval_prompts

    run_dir, recipe_path = qlora_run
    cost = json.loads((run_dir / "round_00" / "metrics.json").read_text())["eval"]["quantization"]
    recipe = load_recipe(recipe_path)
    full = load_recipe(recipe_path)
    full.model.quantization = "none"
    base_path = str(run_dir / "base_model")
    frame, unquantised = evaluate_round(full, 0, base_path, base_path, eval_prompts(recipe), None, None)
    assert cost["full_precision_accuracy"] == pytest.approx(unquantised["accuracy"])
    nf4_frame = pd.read_parquet(run_dir / "round_00" / "eval.parquet")
    nf4_greedy, full_greedy = nf4_frame[nf4_frame.kind == "greedy"], frame[frame.kind == "greedy"]
    assert nf4_greedy.fp_response.tolist() == full_greedy.response.tolist()  # the full-precision base's own greedy answers
    assert nf4_frame[nf4_frame.kind == "sample"].fp_logp.notna().all()
    assert cost["prompts"] == recipe.evaluation.num_prompts and cost["samples"] == recipe.evaluation.num_prompts * recipe.evaluation.kl_samples
    assert cost["kl_vs_full_precision"] != 0 and cost["sample_tokens"] > 0
    report = (run_dir / "report.md").read_text()
    assert "## Quantisation (QLoRA)" in report
    assert f"greedy answers the same in both: {cost['same_greedy_answers']} of {cost['prompts']} prompts" in report
    round_1 = json.loads((run_dir / "round_01" / "metrics.json").read_text())
    assert "quantization" not in round_1["eval"] and round_1["train"]["stats"]["steps"] >= 1


def test_quantization_cost_by_hand():
    import pandas as pd

    from models.evaluate.evaluation import quantization_cost

    frame = pd.DataFrame({
        "prompt_id": ["a", "a", "a", "b", "b", "b"],
        "kind": ["greedy", "sample", "sample", "greedy", "sample", "sample"],
        "response": ["1", "x", "y", "2", "z", "w"], "fp_response": ["1", None, None, "3", None, None],
        "logp": [0.0, -1.0, -2.0, 0.0, -3.0, -1.0], "fp_logp": [None, -2.0, -2.5, None, -3.0, -2.0],
        "token_ids": [[1], [1, 2], [3], [4], [5, 6, 7], [8]],
        "verifier_score": [1.0, None, None, 0.0, None, None], "fp_verifier_score": [1.0, None, None, 1.0, None, None],
    })
    cost = quantization_cost(frame)
    # per-prompt mean log-ratios: a (1 + 0.5) / 2 = 0.75, b (0 + 1) / 2 = 0.5; per token: 2.5 / 7
    assert cost["kl_vs_full_precision"] == pytest.approx(0.625) and cost["kl_vs_full_precision_se"] == pytest.approx(0.125)
    assert cost["kl_per_token_vs_full_precision"] == pytest.approx(2.5 / 7) and cost["sample_tokens"] == 7
    assert (cost["same_greedy_answers"], cost["prompts"], cost["samples"]) == (1, 2, 4)
    assert cost["full_precision_accuracy"] == 1.0 and cost["accuracy_change"] == -0.5 and cost["accuracy_change_se"] == pytest.approx(0.5)

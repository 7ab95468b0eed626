"""fp32 Linear layers on a CPU run on weights prepacked once for oneDNN, for decoding and log-prob passes.

    with packed_linears(model, batch_hint=16):   # inference only
        model.generate(...)

At the few rows of a decoding step (and a log-prob pass over short completions) a CPU step streams every
weight from memory, and MKL's sgemm repacks each weight on every call: on SmolLM2-135M a batch-16 step
ran its matmuls at about a third of the rate one row gets per weight byte. A weight packed once into
oneDNN's blocked layout is read as it lies (bench/README.md has the measurements).

A peft LoRA layer with its adapter on runs on one packed copy of its root weight with the adapter folded
in (W + scale B A), made without writing the root weight: the policy at one matmul per layer, as peft's
merge gives it, while the root's weights, memory-mapped from their file, stay as loaded.
"""

from __future__ import annotations

import os
import weakref
from contextlib import contextmanager
from dataclasses import dataclass

import torch

__all__ = ["PACK_ENV", "cpu_packing_available", "env_flag", "folds_adapters", "packed_linears", "release_packed"]


def env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    return default if value is None else value.strip().lower() not in ("0", "false", "no", "off", "")


PACK_ENV = "SELFPLAY_CPU_PACKED"
# oneDNN's call costs about 50 us more than MKL's; below ~0.4 MB of weights that outweighs the saving
# (measured at 16 rows: a 192 x 576 weight ran 1.27x faster packed, a 384 x 128 one 0.70x; the demo
# model's weights all stay unpacked).
PACK_MIN_WEIGHTS = 100_000


@dataclass
class _Packed:
    """One Linear's weight in oneDNN's blocked layout, and the weight it was made from."""

    source: tuple  # (data_ptr, _version) of the weights it was made from (a LoRA layer's adapter too)
    sample: torch.Tensor  # and strided samples of their values (_fingerprint)
    weight: torch.Tensor


_PACKED: "weakref.WeakKeyDictionary[torch.nn.Module, _Packed]" = weakref.WeakKeyDictionary()


def _packable(module) -> bool:
    weight = getattr(module, "weight", None)
    return (type(module) is torch.nn.Linear and weight.device.type == "cpu" and weight.dtype == torch.float32
            and weight.numel() >= PACK_MIN_WEIGHTS
            and "forward" not in module.__dict__)  # a forward patched by someone else (hooks) is left alone


def _fingerprint(weight: torch.Tensor) -> torch.Tensor:
    """About a thousand of the weight's values, evenly strided. peft folds an adapter in and out through
    `weight.data += delta`, and a write through `.data` leaves the parameter's _version as it was, so
    the version alone kept a packed copy of the folded weight after unfolding (Evaluate's pi_base then
    computed as the policy: a KL of 0). A LoRA delta B @ A moves every value it is not zero at."""
    flat = weight.detach().reshape(-1)
    return flat[:: max(1, flat.numel() // 1024)].clone()


def _lora_packing(module) -> tuple[bool, str | None]:
    """(packed as one weight, the adapter folded into it) for a peft LoRA Linear whose root is an fp32
    Linear packing takes: its root alone when it computes with the root alone (the adapter switched off,
    or merged into the root), the root with the adapter folded in when it runs one plain LoRA adapter (no
    DoRA or other variant, no LoRA bias, no transposed root). Anything else, a plain Linear included:
    (False, None). Packing the layer itself rather than its root keeps one packed copy per layer whichever
    way it computes (Evaluate runs the policy, then the root)."""
    base = getattr(module, "base_layer", None)
    if base is None or not hasattr(module, "lora_A") or not _packable(base) or "forward" in module.__dict__:
        return False, None
    if module.disable_adapters or module.merged:  # (peft unmerges a merged layer switched off in its forward)
        return module.disable_adapters != module.merged, None
    active = [name for name in module.active_adapters if name in module.lora_A]
    if len(active) != 1 or getattr(module, "fan_in_fan_out", False):
        return False, None
    adapter = active[0]
    if adapter in getattr(module, "lora_variant", {}) or getattr(module, "lora_bias", {}).get(adapter, False):
        return False, None
    return True, adapter


def _packed_weight(module, batch_hint: int, adapter: str | None, scratch: dict) -> torch.Tensor:
    root = getattr(module, "base_layer", module).weight
    parts = [root, module.lora_A[adapter].weight, module.lora_B[adapter].weight] if adapter else [root]
    source = tuple((p.data_ptr(), p._version) for p in parts) + ((module.scaling[adapter],) if adapter else ())
    sample = torch.cat([_fingerprint(p.detach()) for p in parts])
    packed = _PACKED.get(module)
    if packed is None or packed.source != source or not torch.equal(packed.sample, sample):
        weight = root.detach()
        if adapter:
            # W + scale * B @ A, peft's merge, into a buffer reused across layers of one shape: a fresh
            # tensor per layer would fault in new pages for every weight, as folding in place does.
            folded = scratch.get(weight.shape)
            if folded is None:
                folded = scratch[weight.shape] = torch.empty_like(weight)
            with torch.no_grad():
                torch.addmm(weight, module.lora_B[adapter].weight, module.lora_A[adapter].weight,
                            alpha=module.scaling[adapter], out=folded)
            weight = folded
        packed = _PACKED[module] = _Packed(source, sample, torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint))
    return packed.weight


def _packed_forward(linear, weight: torch.Tensor):
    bias = linear.bias

    def forward(x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).contiguous()
        out = torch.ops.mkldnn._linear_pointwise(flat, weight, bias, "none", [], "")
        return out.reshape(*x.shape[:-1], out.shape[-1])

    return forward


def cpu_packing_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def _packing_on() -> bool:
    return env_flag(PACK_ENV, True) and cpu_packing_available()


def folds_adapters(model) -> bool:
    """Whether packed_linears runs every LoRA layer of `model` on a packed copy with its adapter folded in,
    so that folding the adapter into the weights beforehand (models.load.loading.adapter_merged) gains nothing."""
    layers = [module for module in model.modules() if hasattr(module, "lora_A") and hasattr(module, "base_layer")]
    return bool(layers) and _packing_on() and all(_lora_packing(layer)[1] is not None for layer in layers)


@contextmanager
def packed_linears(model, batch_hint: int):
    """Run every fp32 CPU `nn.Linear` of `model` of at least PACK_MIN_WEIGHTS weights (the LM head, and a
    LoRA layer's root included) on its weight prepacked into oneDNN's blocked layout, inside the block; a
    peft LoRA layer whose adapter is on runs on one packed weight with the adapter folded in (_lora_packing).

    Why: at decoding's few rows a CPU step streams every weight from memory, and MKL's sgemm repacks
    each weight on every call, so a batch-16 step ran at about a third of what one row costs per weight
    byte (bench/README.md). A weight packed once for oneDNN is read as it lies. Packed copies are kept
    per module (weakly, with the model) and remade when the weight changes (an adapter folded in or out,
    trained, switched on or off: _fingerprint), so packing costs one pass over the weights per model and
    adapter state, not per batch.
    Numbers: oneDNN sums in another order than MKL, so logits differ from the unpacked model's by float
    rounding (about 1e-6 relative); each row's result does not depend on the other rows of the batch.
    SELFPLAY_CPU_PACKED=0 turns it off. Inference only: the packed call has no backward.
    """
    work: list[tuple[torch.nn.Module, str | None]] = []
    if _packing_on():
        lora_roots = set()
        for module in model.modules():
            packed, adapter = _lora_packing(module)
            if packed:
                work.append((module, adapter))
                lora_roots.add(module.base_layer)
        work += [(module, None) for module in model.modules() if _packable(module) and module not in lora_roots]
    patched, scratch = [], {}
    try:
        for module, adapter in work:
            module.forward = _packed_forward(getattr(module, "base_layer", module), _packed_weight(module, batch_hint, adapter, scratch))
            patched.append(module)
        scratch.clear()
        yield bool(patched)
    finally:
        for module in patched:
            del module.forward


def release_packed(model=None) -> None:
    """Free the packed copies kept for `model`'s layers (every model's when None)."""
    if model is None:
        _PACKED.clear()
    else:
        for module in model.modules():
            _PACKED.pop(module, None)


"""The `vllm` generation backend: vLLM's offline `LLM` engine on the base model, with a round's adapter passed
as a LoRA request (the policy is root + adapter; the checkpoint's merged export is not it); optional, imported
only when used (generation.backend: vllm).

    vllm_generate(model_path, tokenizer, texts, settings, model_cfg, adapter, tensor_parallel_size) -> samples
    release_vllm()                                          frees the engine (before another stage needs the GPU)
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from models.generate.sampling import Sample, SamplingSettings

log = logging.getLogger("selfplay")

_VLLM_ENGINES: dict = {}
_VLLM_LORA_IDS: dict = {}  # (adapter path, its weights' mtime) -> vLLM LoRA id


def _vllm_dtype(model_cfg) -> str:
    precision = getattr(model_cfg, "precision", "auto") if model_cfg is not None else "auto"
    if precision == "auto":
        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return "bfloat16" if bf16 else "float16"
    return {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[precision]


def _vllm_eos_ids(model_path: str, tokenizer) -> list[int]:
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    try:
        from transformers import GenerationConfig

        extra = GenerationConfig.from_pretrained(model_path).eos_token_id
    except (OSError, ValueError):
        extra = None
    for i in extra if isinstance(extra, list) else [extra] if extra is not None else []:
        if i not in ids:
            ids.append(i)
    return ids


def vllm_generate(model_path, tokenizer, texts: list[str], settings: SamplingSettings, model_cfg=None,
                  adapter=None, tensor_parallel_size: int = 1) -> list[list[Sample]]:
    """`settings.num_samples` samples per already chat-formatted prompt text, with vLLM's offline engine.

    UNTESTED here (vLLM is not installed in CI). The engine is built once per (model_path, dtype, LoRA rank) and
    reused across calls (generate_round calls once per part, each part with its own seed);
    `release_vllm()` frees it. Samples are seeded per request (from settings.seed and the prompt's
    index), so results depend neither on how vLLM batches nor on the engine's own seed. Prompts go in
    as token ids encoded like generate_texts does (no added special tokens: the chat template already
    has them). `model_path` must be a model directory or hub id; a model object is accepted only
    for its `name_or_path` (in-memory weights are ignored). `adapter` (a PEFT LoRA directory, a round
    checkpoint's adapter/) is applied to every request as a vLLM LoRA request, unmerged; vLLM loads
    the base unquantised, so for a QLoRA run its policy is W + BA rather than the trained nf4(W) + BA.
    `tensor_parallel_size` > 1 splits the engine over that many GPUs (generation.tensor_parallel_size).
    """
    from data.prompts import clean_response
    from common.errors import ModelError

    try:
        import vllm  # noqa: F401 - the engine's package, imported where it is used
    except ImportError:
        raise ModelError("generation.backend: vllm needs the vllm package: pip install vllm (or use backend: static)") from None
    if not isinstance(model_path, (str, os.PathLike)):
        name = getattr(model_path, "name_or_path", None)
        if not name or not os.path.isdir(name):
            raise ModelError("generation.backend: vllm needs a checkpoint directory, not an in-memory model")
        log.warning("vllm backend: loading %s from disk; in-memory weights are not used", name)
        model_path = name
    model_path = str(model_path)
    engine = _engine(model_path, model_cfg, _lora_rank(adapter), tensor_parallel_size, settings.seed)
    prompts = [{"prompt_token_ids": tokenizer(text, add_special_tokens=False).input_ids} for text in texts]
    params = _sampling_params(settings, len(texts), _vllm_eos_ids(model_path, tokenizer))
    outputs = engine.generate(prompts, params, use_tqdm=False, lora_request=_lora_request(adapter))
    return [[Sample(text=clean_response(completion.text), num_tokens=len(completion.token_ids),
                    finished=completion.finish_reason == "stop", token_ids=list(completion.token_ids))
             for completion in sorted(request.outputs, key=lambda c: c.index)]
            for request in outputs]


def _lora_rank(adapter) -> int | None:
    """The engine's max_lora_rank for `adapter` (None without one): vLLM accepts only some values; the smallest of
    them that holds the adapter's rank."""
    if adapter is None:
        return None
    import json

    rank = int(json.loads((Path(adapter) / "adapter_config.json").read_text())["r"])
    return next((r for r in (8, 16, 32, 64, 128, 256, 320, 512) if r >= rank), rank)


def _engine(model_path: str, model_cfg, lora_rank: int | None, tensor_parallel_size: int, seed: int):
    """The cached engine for (model, dtype, LoRA rank, GPUs), built (after freeing any other) when missing."""
    from vllm import LLM

    dtype = _vllm_dtype(model_cfg)
    key = (model_path, dtype, lora_rank, int(tensor_parallel_size))
    if key in _VLLM_ENGINES:
        return _VLLM_ENGINES[key]
    release_vllm()
    kwargs = dict(model=model_path, dtype=dtype, seed=int(seed))
    if tensor_parallel_size > 1:
        kwargs["tensor_parallel_size"] = int(tensor_parallel_size)
    if lora_rank is not None:
        kwargs.update(enable_lora=True, max_lora_rank=lora_rank, max_loras=1)
    if model_cfg is not None:
        kwargs["trust_remote_code"] = bool(getattr(model_cfg, "trust_remote_code", False))
        if getattr(model_cfg, "revision", None) and not os.path.isdir(model_path):
            kwargs["revision"] = model_cfg.revision
    engine = _VLLM_ENGINES[key] = LLM(**kwargs)
    return engine


def _sampling_params(settings: SamplingSettings, num_prompts: int, eos_ids: list[int]) -> list:
    """One SamplingParams a prompt, each seeded from settings.seed and the prompt's index: the samples depend
    neither on how vLLM batches nor on the engine's seed."""
    from vllm import SamplingParams

    greedy = not settings.temperature or settings.temperature <= 0
    return [SamplingParams(n=int(settings.num_samples), temperature=0.0 if greedy else float(settings.temperature),
                           top_p=1.0 if greedy else float(settings.top_p), max_tokens=int(settings.max_new_tokens),
                           seed=int(settings.seed) * 1_000_003 + i, stop_token_ids=eos_ids, skip_special_tokens=True)
            for i in range(num_prompts)]


def _lora_request(adapter):
    """`adapter` as a vLLM LoRA request (None without one). vLLM caches adapters by integer id: every adapter
    directory (and every rewrite of one) gets its own, or a later round's requests would run with an earlier
    round's cached weights."""
    if adapter is None:
        return None
    from vllm.lora.request import LoRARequest

    path = Path(adapter).resolve()
    stamp = (str(path), (path / "adapter_model.safetensors").stat().st_mtime_ns)
    lora_id = _VLLM_LORA_IDS.setdefault(stamp, len(_VLLM_LORA_IDS) + 1)
    return LoRARequest(f"policy-{lora_id}", lora_id, str(path))


def release_vllm() -> None:
    """Drop the cached vLLM engine(s) and free their GPU memory."""
    _VLLM_ENGINES.clear()
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

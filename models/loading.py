"""Loading and saving models: full precision, LoRA and QLoRA, and the per-round checkpoint.

A round's checkpoint directory holds a merged full-precision model at its top level (so
`AutoModelForCausalLM.from_pretrained(checkpoint)` alone loads it), the LoRA adapter in `adapter/`
(with the previous round's checkpoint as its base), the tokenizer, and `selfplay_checkpoint.json`,
which names the root model every round descends from; loading a checkpoint of another root is refused.

QLoRA (`model.quantization: 4bit`) loads the weights as bitsandbytes nf4 with double quantisation and
bf16 compute; the merged copy is made by folding the adapter into a bf16 load of the same weights,
never into the 4-bit ones (merging into quantised weights loses the update to rounding).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch

from configs.recipe import ModelConfig, TrainingConfig
from pipeline.errors import ModelError

log = logging.getLogger("selfplay")

CHECKPOINT_INFO = "selfplay_checkpoint.json"
ADAPTER_DIR = "adapter"
GENERIC_TOKENIZERS = {"TokenizersBackend", "PreTrainedTokenizerFast"}
HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")

# Used only for tokenizers that ship without a chat template (base, non-instruct models).
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(precision: str, device: torch.device | None = None) -> torch.dtype:
    device = device or default_device()
    if precision == "auto":
        bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16_ok else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def check_model_path(path: str) -> None:
    """Fail early, in one line, when `path` can be neither a local model directory nor a hub id."""
    local = Path(path).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise ModelError(f"model path {path} is not a model directory (no config.json in it)")
        return
    if path.startswith((".", "/", "~")) or not HUB_ID.match(path):
        raise ModelError(f"model path {path} does not exist and is not a hub id like 'org/name'")


def _hub_kwargs(path: str, model_cfg: ModelConfig) -> dict:
    kwargs = {"trust_remote_code": model_cfg.trust_remote_code}
    if model_cfg.revision and not Path(path).expanduser().exists():
        kwargs["revision"] = model_cfg.revision
    return kwargs


def load_tokenizer(path: str, model_cfg: ModelConfig):
    from transformers import AutoTokenizer

    check_model_path(path)
    loader = AutoTokenizer
    config_path = Path(path).expanduser() / "tokenizer_config.json"
    if config_path.is_file() and json.loads(config_path.read_text()).get("tokenizer_class") in GENERIC_TOKENIZERS:
        # A plain tokenizer.json (like ours) saved beside, say, a Qwen2 config: AutoTokenizer would
        # rebuild it as the model family's own tokenizer class and change how text is split.
        from transformers import PreTrainedTokenizerFast as loader
    try:
        tokenizer = loader.from_pretrained(path, **_hub_kwargs(path, model_cfg))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load a tokenizer from {path}: {str(exc).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        log.warning("tokenizer of %s has no chat template; using a plain 'User:/Assistant:' template", path)
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    return tokenizer


def load_causal_lm(path: str, model_cfg: ModelConfig, device: torch.device | None = None, quantize: bool = False):
    """Load a causal LM for inference or training; `quantize` loads it 4-bit (QLoRA) on the GPU."""
    from transformers import AutoModelForCausalLM

    check_model_path(path)
    device = device or default_device()
    kwargs = dict(
        dtype=resolve_dtype(model_cfg.precision, device),
        attn_implementation=model_cfg.attn_implementation,
        use_safetensors=True,
        **_hub_kwargs(path, model_cfg),
    )
    if quantize:
        if device.type != "cuda":
            raise ModelError("model.quantization: 4bit (QLoRA) needs a CUDA GPU; use quantization: none on CPU")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        kwargs["dtype"] = torch.bfloat16
        kwargs["device_map"] = {"": device.index or 0}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load a causal LM from {path}: {str(exc).splitlines()[0]}") from None
    if not quantize:
        model.to(device)
    return model


def add_lora(model, training: TrainingConfig, quantized: bool = False):
    """Wrap `model` with a fresh LoRA adapter (zero update at start, so policy == reference)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=training.gradient_checkpointing)
    elif training.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    targets = training.lora_target_modules
    config = LoraConfig(
        r=training.lora_r,
        lora_alpha=training.lora_alpha,
        lora_dropout=training.lora_dropout,
        target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",")],
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def checkpoint_info(path: str | Path) -> dict:
    info_path = Path(path) / CHECKPOINT_INFO
    return json.loads(info_path.read_text()) if info_path.is_file() else {}


def check_same_root(checkpoint: str | Path, root_model: str) -> None:
    """A checkpoint made from another base model (copied in from another run, say) is refused."""
    found = checkpoint_info(checkpoint).get("root_model")
    if found is not None and found != root_model:
        raise ModelError(f"checkpoint {checkpoint} descends from {found}, not from this run's base {root_model}")


def save_checkpoint(
    peft_model,
    tokenizer,
    out_dir: str | Path,
    *,
    parent: str,
    root_model: str,
    round_idx: int,
    model_cfg: ModelConfig,
    save_merged: bool = True,
    quantized: bool = False,
) -> None:
    """Write adapter/ and (optionally) the merged full-precision model into `out_dir` (a temporary dir)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(out_dir / ADAPTER_DIR)
    _point_adapter_at(out_dir / ADAPTER_DIR, parent)
    tokenizer.save_pretrained(out_dir)
    if save_merged:
        if quantized:
            merged = _merge_from_full_precision(out_dir / ADAPTER_DIR, parent, model_cfg)
        else:
            merged = peft_model.merge_and_unload()
        merged.save_pretrained(out_dir, safe_serialization=True)
        del merged
    info = {"round": round_idx, "parent": str(parent), "root_model": root_model, "merged": save_merged}
    (out_dir / CHECKPOINT_INFO).write_text(json.dumps(info, indent=2) + "\n")


def _point_adapter_at(adapter_dir: Path, parent: str) -> None:
    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = str(parent)
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def _merge_from_full_precision(adapter_dir: Path, parent: str, model_cfg: ModelConfig):
    """QLoRA's merged copy: the parent's weights in bf16 on the CPU plus the adapter, folded exactly."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(
        parent, dtype=torch.bfloat16, use_safetensors=True, **_hub_kwargs(parent, model_cfg)
    )
    return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()


def load_round_model(checkpoint: str, model_cfg: ModelConfig, device=None, quantize: bool = False):
    """Load a round's weights: the merged copy when there is one, else the parent plus the adapter."""
    info = checkpoint_info(checkpoint)
    if info and not info.get("merged", True):
        from peft import PeftModel

        parent = load_round_model(info["parent"], model_cfg, device, quantize)
        return PeftModel.from_pretrained(parent, os.path.join(checkpoint, ADAPTER_DIR)).merge_and_unload()
    return load_causal_lm(checkpoint, model_cfg, device, quantize)


def copy_tree_atomic(src: Path, dst: Path) -> None:
    tmp = dst.with_name(dst.name + ".tmp-copy")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)

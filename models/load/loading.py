"""Loading and saving models: full precision, LoRA and QLoRA, and the per-round checkpoint.

How rounds chain. The run's root weights (its base model: full precision, or nf4 once for QLoRA)
are never changed; the policy is ONE LoRA adapter carried across rounds. Train(r) loads the root
plus round r-1's adapter (a fresh, zero adapter for round 1), takes the reference log-probs with
that adapter as it is at the round's start (that is pi_{r-1}), then keeps training the same adapter
(with `training.init: base` it trains a fresh one instead, every round: models/train/trainer.py).
Every consumer (Generate(r+1), the self-judge, Evaluate(r), Train(r+1)) loads root + the round's
adapter through `load_policy`, so the model they use is the model that was trained. Folding the
adapter into the weights instead loses the update: in bf16 small updates round away, and a merged
copy re-quantised to nf4 is nf4(W + delta), not the trained nf4(W) + delta.

A round's checkpoint directory holds:

- `adapter/`: the policy's adapter (its `base_model_name_or_path` is the root, so peft or
  transformers load it with `AutoModelForCausalLM.from_pretrained(checkpoint / "adapter")`);
- the merged model at the top level, an export only (`training.save_merged`, default on), so
  `AutoModelForCausalLM.from_pretrained(checkpoint)` alone loads it: in the training dtype for LoRA,
  and for QLoRA folded into a bf16 load of the root, never into the 4-bit weights; the pipeline
  never reads it;
- the tokenizer, and `selfplay_checkpoint.json`: the round, the checkpoint it continued (`parent`),
  the root's identity (`root_model`; a checkpoint of another root is refused) and path (`root_path`).

Because the adapter is continued, its shape (`training.lora_r`, `lora_alpha`,
`lora_target_modules`) is the same in every round (configs/recipe.py refuses per-round changes), its
rank bounds the total update of all rounds together, and `training.weight_decay` pulls the policy
toward the root rather than toward the previous round.

Exactness: with the adapter kept unmerged the loaded policy computes exactly what the trained one
did (tests/test_chain.py: difference 0 in fp32 and bf16). `load_policy` merges only fp32,
non-quantised loads for inference (faster generation); there the merged weights differ from W + BA
by fp32 rounding, a few 1e-6 in summed log-probs of the tests' models. With QLoRA the loaded weights
(nf4 root, adapter) are the trained ones bit for bit; training ran the norms and embeddings in fp32
(peft's prepare_model_for_kbit_training) and inference loads run them in bf16, a difference of
compute precision only, and Train(r+1)'s reference is taken in training's precision.

QLoRA (`model.quantization: 4bit`) loads the weights as bitsandbytes nf4 with double quantisation,
wherever the installed bitsandbytes can quantise and de-quantise nf4 on the device (a CUDA GPU, and a
CPU from bitsandbytes 0.49 on; `quantization_problem` tries it on a few numbers). The compute dtype is
`model.precision` resolved for the device: `auto` is bf16 on a GPU that has it and fp32 on a CPU, where
bf16 matmuls are emulated on most x86 cores (several times slower than fp32) and the fp32 compute keeps
the quantisation the only approximation. The embeddings, norms and LM head, which are not quantised,
load in that dtype too.
"""

from __future__ import annotations

import json
import logging
import re
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch

from common.errors import ModelError
from configs.recipe import ModelConfig, TrainingConfig

log = logging.getLogger("selfplay")

CHECKPOINT_INFO = "selfplay_checkpoint.json"
CHAIN = "root+adapter"  # how rounds link; checkpoint_info(...)["chain"]
ADAPTER_DIR = "adapter"
GENERIC_TOKENIZERS = {"TokenizersBackend", "PreTrainedTokenizerFast"}
HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")

# Used only for tokenizers that ship without a chat template (base, non-instruct models). Every
# assistant turn ends with the tokenizer's EOS, as TRL appends eos_token to completions: the model is
# trained to write it after a response, and generation stops at it (models/generate/generation.py); without it
# a base model never learns to stop and every sample runs to max_new_tokens. Turns are joined by a
# blank line written *before* the next turn, so nothing follows the EOS in a completion.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if not loop.first %}\n\n{% endif %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{% if messages %}\n\n{% endif %}Assistant:{% endif %}"
)
# The same for a tokenizer that starts every text with its BOS token (Gemma, Llama base models): prompts are
# tokenised without special tokens everywhere (the template writes them), and Gemma 3 270M without its <bos>
# answers "What is 17 + 25?" by repeating "Assistant:" where with it it writes a sum.
FALLBACK_CHAT_TEMPLATE_BOS = "{{ bos_token }}" + FALLBACK_CHAT_TEMPLATE


def _starts_with_bos(tokenizer) -> bool:
    """Whether the tokenizer puts its BOS token before a text by itself (its own add_special_tokens)."""
    return tokenizer.bos_token_id is not None and tokenizer("a").input_ids[:1] == [tokenizer.bos_token_id]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(precision: str, device: torch.device | None = None) -> torch.dtype:
    device = device or default_device()
    if precision == "auto":
        bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16_ok else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def quantization_problem(device: torch.device) -> str | None:
    """Why 4-bit nf4 (QLoRA) cannot run on `device` with the installed bitsandbytes; None when it can.

    Asked of bitsandbytes itself: it quantises and de-quantises a few numbers on the device (milliseconds),
    since which devices a release supports changed from version to version (CUDA only before 0.49).
    """
    try:
        import bitsandbytes
        from bitsandbytes.functional import dequantize_4bit, quantize_4bit
    except Exception as exc:  # not installed, or its native library does not load here
        return f"bitsandbytes does not import ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
    values = torch.linspace(-1, 1, 128, device=device).reshape(2, 64)  # nf4's levels lie at most 0.14 apart around +-1
    try:
        packed, state = quantize_4bit(values, quant_type="nf4", compress_statistics=True)
        restored = dequantize_4bit(packed, state, quant_type="nf4")
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return f"bitsandbytes {bitsandbytes.__version__} cannot quantise to nf4 on {device.type} ({first})"
    if restored.shape != values.shape or not torch.allclose(restored.float(), values, atol=0.2):
        return f"bitsandbytes {bitsandbytes.__version__} gives wrong nf4 values on {device.type}"
    return None


def precision_problem(precision: str, device: torch.device) -> str | None:
    """Why `model.precision` cannot run on `device`; None when it can (a CPU runs bf16 and fp16, slowly)."""
    if device.type == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        return f"model.precision: bf16 needs a GPU with bf16; {torch.cuda.get_device_name(device)} has none: use fp16 or fp32"
    return None


def check_model_device(model_cfg: ModelConfig, device: torch.device | None = None) -> None:
    """One-line ModelError when the recipe's precision or quantisation cannot run on `device` (the preflight's
    check, and every load's)."""
    device = device or default_device()
    problem = precision_problem(model_cfg.precision, device)
    if problem:
        raise ModelError(problem)
    if model_cfg.quantization == "4bit":
        problem = quantization_problem(device)
        if problem:
            raise ModelError(f"model.quantization: 4bit (QLoRA) cannot run here: {problem}; use quantization: none")


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
    if not tokenizer.chat_template and tokenizer.eos_token is None:
        raise ModelError(f"tokenizer of {path} has neither a chat template nor an eos token: a model trained with it could never stop")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        bos = _starts_with_bos(tokenizer)
        log.warning("tokenizer of %s has no chat template; using a plain 'User:/Assistant:' template%s", path,
                    f", after its BOS token {tokenizer.bos_token}" if bos else "")
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE_BOS if bos else FALLBACK_CHAT_TEMPLATE
    return tokenizer


def load_causal_lm(path: str, model_cfg: ModelConfig, device: torch.device | None = None, quantize: bool = False):
    """Load a causal LM for inference or training; `quantize` loads it 4-bit (QLoRA: nf4, double
    quantisation, computing in model.precision resolved for the device)."""
    from transformers import AutoModelForCausalLM

    check_model_path(path)
    device = device or default_device()
    check_model_device(replace(model_cfg, quantization="4bit" if quantize else "none"), device)
    kwargs = dict(
        dtype=resolve_dtype(model_cfg.precision, device),
        attn_implementation=model_cfg.attn_implementation,
        use_safetensors=True,
        **_hub_kwargs(path, model_cfg),
    )
    if quantize:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=kwargs["dtype"],
        )
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": device.type}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load a causal LM from {path}: {str(exc).splitlines()[0]}") from None
    if not quantize:
        model.to(device)
    return model


def lora_config(training: TrainingConfig):
    from peft import LoraConfig

    targets = training.lora_target_modules
    return LoraConfig(
        r=training.lora_r,
        lora_alpha=training.lora_alpha,
        lora_dropout=training.lora_dropout,
        target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",")],
        task_type="CAUSAL_LM",
    )


def add_lora(model, training: TrainingConfig, quantized: bool = False, adapter_dir: str | Path | None = None):
    """Wrap the root `model` with the policy's LoRA adapter, ready to train.

    Without `adapter_dir` the adapter is fresh (B = 0, so the policy equals the root: round 1); with
    it, the previous round's adapter is continued, so the policy starts as exactly pi_{r-1}.
    """
    from peft import get_peft_model, prepare_model_for_kbit_training

    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=training.gradient_checkpointing)
    elif training.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    peft_model = get_peft_model(model, lora_config(training))
    if adapter_dir is not None:
        _continue_adapter(peft_model, Path(adapter_dir), training)
    return peft_model


def _continue_adapter(peft_model, adapter_dir: Path, training: TrainingConfig) -> None:
    """Copy a saved adapter's weights into `peft_model`'s fresh adapter of the same shape."""
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(peft_model, saved_adapter(peft_model, adapter_dir, training))


def saved_adapter(peft_model, adapter_dir: str | Path, training: TrainingConfig) -> dict:
    """The weights of the adapter saved in `adapter_dir`, checked to fit `peft_model`'s adapter (same rank, alpha
    and target modules), as a peft state dict."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    saved_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    for key, saved_key in (("lora_r", "r"), ("lora_alpha", "lora_alpha")):
        if saved_config.get(saved_key) != getattr(training, key):
            raise ModelError(
                f"training.{key} is {getattr(training, key)} but the adapter in {adapter_dir} has {saved_config.get(saved_key)}; "
                "rounds continue one adapter, so its shape cannot change within a run"
            )
    saved = load_file(adapter_dir / "adapter_model.safetensors")
    expected = get_peft_model_state_dict(peft_model)
    if set(saved) != set(expected):
        extra, missing = sorted(set(saved) - set(expected)), sorted(set(expected) - set(saved))
        raise ModelError(
            f"the adapter in {adapter_dir} does not fit training.lora_target_modules={training.lora_target_modules!r} "
            f"({len(missing)} weights missing, e.g. {missing[:1]}; {len(extra)} unexpected, e.g. {extra[:1]})"
        )
    return saved


def checkpoint_info(path: str | Path) -> dict:
    info_path = Path(path) / CHECKPOINT_INFO
    return json.loads(info_path.read_text()) if info_path.is_file() else {}


def is_round_checkpoint(path: str | Path) -> bool:
    """A round's checkpoint (root + adapter), as opposed to a base model directory or hub id."""
    return (Path(path).expanduser() / CHECKPOINT_INFO).is_file()


def round_adapter(checkpoint: str | Path) -> Path:
    """The policy's adapter in a round checkpoint; checkpoints of the older merged-copy chain are refused."""
    if checkpoint_info(checkpoint).get("chain") != CHAIN:
        raise ModelError(
            f"checkpoint {checkpoint} was written by an older selfplay that chained rounds through merged copies "
            "(which are not the trained policy); rerun its rounds in a new run (or delete the run's round_* directories)"
        )
    return Path(checkpoint) / ADAPTER_DIR


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
    root_path: str,
    round_idx: int,
    model_cfg: ModelConfig,
    save_merged: bool = True,
    quantized: bool = False,
) -> None:
    """Write adapter/ and (optionally) the merged export into `out_dir` (a temporary dir).

    Without quantisation the merged export is folded into `peft_model` itself, which is then no longer
    the policy: call this last.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(out_dir / ADAPTER_DIR)
    _point_adapter_at(out_dir / ADAPTER_DIR, root_path)
    tokenizer.save_pretrained(out_dir)
    if save_merged:
        if quantized:
            merged = _merge_into_full_precision(out_dir / ADAPTER_DIR, root_path, model_cfg)
        else:
            merged = peft_model.merge_and_unload()
        merged.save_pretrained(out_dir, safe_serialization=True)
        del merged
    info = {"round": round_idx, "parent": str(parent), "root_model": root_model, "root_path": str(root_path),
            "chain": CHAIN, "merged": save_merged}
    (out_dir / CHECKPOINT_INFO).write_text(json.dumps(info, indent=2) + "\n")


def _point_adapter_at(adapter_dir: Path, root_path: str) -> None:
    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = str(root_path)
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def _merge_into_full_precision(adapter_dir: Path, root_path: str, model_cfg: ModelConfig):
    """QLoRA's merged export: the root's weights in bf16 on the CPU plus the adapter (never the 4-bit ones)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(
        root_path, dtype=torch.bfloat16, use_safetensors=True, **_hub_kwargs(root_path, model_cfg)
    )
    return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()


def load_policy(model_path: str, model_cfg: ModelConfig, device=None, quantize: bool = False, *,
                root: str | None = None, merge: bool | None = None, packed: bool = False):
    """The model after the round whose output is `model_path`, for inference.

    A base model directory or hub id loads as it is. A round checkpoint loads as the root weights
    (`root`, default the path its selfplay_checkpoint.json records) plus the round's adapter, never
    its merged export. `merge` folds the adapter in; by default only for fp32 without quantisation,
    where the fold costs fp32 rounding alone, and not when `packed` (the caller runs the model under
    models.packing.packed_linears, the static backend on a CPU) and packing folds every LoRA layer into
    its packed copy itself: folding in place would write every root weight, copying each page of the
    memory-mapped file first. Unmerged, the adapter stays in the model's LoRA layers (the plain
    transformers model is returned, not a peft wrapper) and `root_weights(model)` switches it off, so
    one load serves both the policy and the root.
    """
    if not is_round_checkpoint(model_path):
        return load_causal_lm(model_path, model_cfg, device, quantize).eval()
    from peft import PeftModel

    adapter_dir = round_adapter(model_path)
    model = load_causal_lm(root or checkpoint_info(model_path)["root_path"], model_cfg, device, quantize)
    peft_model = PeftModel.from_pretrained(model, adapter_dir)
    if merge is None:
        from models.packing import folds_adapters

        merge = not quantize and next(model.parameters()).dtype == torch.float32 and not (packed and folds_adapters(peft_model))
    policy = peft_model.merge_and_unload() if merge else peft_model.get_base_model()
    return policy.eval()


def has_adapter(model) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(module, BaseTunerLayer) for module in model.modules())


def set_adapter_enabled(model, enabled: bool) -> None:
    """Switch `model`'s LoRA adapter off (it computes with the root weights alone) or back on."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [module for module in model.modules() if isinstance(module, BaseTunerLayer)]
    grad_flags = [(p, p.requires_grad) for layer in layers for p in layer.parameters()]
    for layer in layers:
        layer.enable_adapters(enabled)
    for param, flag in grad_flags:  # enable_adapters also changes which weights train; keep them as they were
        param.requires_grad_(flag)


@contextmanager
def root_weights(model):
    """Inside the block `model` computes with its root weights alone (its LoRA adapter switched off)."""
    set_adapter_enabled(model, False)
    try:
        yield model
    finally:
        set_adapter_enabled(model, True)


def adapter_is_zero(model) -> bool:
    """Whether `model`'s LoRA adapter adds exactly nothing: every lora_B weight is zero (a fresh adapter, peft's
    default init) and no DoRA magnitude rescales the weights. Then the root weights alone compute the same
    numbers bit for bit, without the adapter's two extra matmuls per layer."""
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    dora = any("lora_magnitude_vector" in name for name, _ in model.named_parameters())
    return bool(lora_b) and not dora and all(not bool(p.detach().any()) for p in lora_b)


@contextmanager
def adapter_merged(model, packed: bool = False):
    """Inside the block `model`'s LoRA adapter is folded into its weights: the same function with one
    matmul per layer instead of three, which is what costs at the small batches of decoding on a CPU.

    Only for fp32 weights without quantisation, where folding costs fp32 rounding alone (as load_policy's
    merge); otherwise the block runs unmerged. Unfolding subtracts the same delta, so the root weights come
    back up to the rounding of one add and one subtract (a relative 1e-7), not bit for bit. As in
    load_policy, `packed` (the block runs under models.packing.packed_linears) leaves the weights alone
    where packing folds every LoRA layer into its packed copy itself.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    from models.packing import folds_adapters

    layers = [module for module in model.modules() if isinstance(module, BaseTunerLayer)]
    foldable = bool(layers) and not (packed and folds_adapters(model)) and all(
        getattr(layer, "base_layer", None) is not None and getattr(layer.base_layer, "weight", None) is not None
        and layer.base_layer.weight.dtype == torch.float32 and not layer.merged for layer in layers
    )
    if foldable:
        for layer in layers:
            layer.merge()
    try:
        yield model
    finally:
        if foldable:
            for layer in layers:
                layer.unmerge()


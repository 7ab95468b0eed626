"""A GGUF file as a base model: checked up front, converted once into an ordinary HF model directory.

`model.base_model` may name a `.gguf` file (absolute, `~/...`, or relative to the directory the
command runs in) or a model of the selfplay cache (`cache:smollm2-135m-instruct`, models/load/fetch.py).
The BaseModel task calls `convert_gguf` once per run: transformers de-quantises the GGUF weights
(the `gguf` package reads them) into a plain model saved as safetensors with its config, tokenizer
(chat template included) and generation config, and every later stage loads that directory like any
Hugging Face model.

Why a conversion and not `from_pretrained(dir, gguf_file=...)` in every stage: a model loaded from
GGUF keeps `quantization_config` (quant_method gguf) in its config, and then `save_pretrained`
refuses, as does any later load of a directory whose config.json still holds it, so no round's
checkpoint could be written. The weights are copied into a model built from the same config minus
that entry. De-quantising also takes tens of seconds on a CPU; doing it once saves that per stage.

`check_gguf` is what preflight runs before anything is scheduled: a missing file, a file that is not
GGUF, an architecture transformers cannot load from GGUF, or a quantisation type the `gguf` package
cannot de-quantise is a ModelError of one line naming the file. It reads only the file's header.
"""

from __future__ import annotations

import json
import logging
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

from common.errors import ModelError

log = logging.getLogger("selfplay")

GGUF_MAGIC = b"GGUF"
CACHE_PREFIX = "cache:"

# GGUF metadata value types (llama.cpp's gguf.h): fixed sizes; 8 is a string, 9 an array.
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


def is_gguf_spec(base_model: str | None) -> bool:
    """True when `model.base_model` names a GGUF file (a path ending in .gguf, or a cache: entry)."""
    return bool(base_model) and (base_model.startswith(CACHE_PREFIX) or base_model.lower().endswith(".gguf"))


def resolve_gguf(base_model: str, verify: bool = False) -> Path:
    """The file a GGUF `model.base_model` names; a cache entry must have been fetched already (and with
    `verify`, still have its pinned sha256)."""
    if base_model.startswith(CACHE_PREFIX):
        from models.load.fetch import cached_file, verified_file

        return (verified_file if verify else cached_file)(base_model[len(CACHE_PREFIX):])
    return Path(base_model).expanduser().resolve()


@dataclass
class GgufHeader:
    version: int
    architecture: str
    tensor_types: dict[str, int]  # quantisation type name -> number of tensors of that type


class _Cursor:
    """Reads little-endian GGUF fields from a memory map, raising ValueError past its end."""

    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def take(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise ValueError("file ends inside its header")
        values = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += size
        return values[0] if len(values) == 1 else values

    def string(self) -> str:
        length = self.take("Q")
        if self.pos + length > len(self.buf):
            raise ValueError("file ends inside its header")
        text = bytes(self.buf[self.pos : self.pos + length]).decode("utf-8", errors="replace")
        self.pos += length
        return text

    def value(self, kind: int):
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item_kind, count = self.take("I"), self.take("Q")
            if item_kind in _SCALAR_SIZES:  # skipped whole: token scores and types can be 100k entries long
                self.pos += _SCALAR_SIZES[item_kind] * count
                return None
            for _ in range(count):
                self.value(item_kind)
            return None
        if kind not in _SCALAR_SIZES:
            raise ValueError(f"unknown metadata value type {kind}")
        fmt = {1: "B", 2: "H", 4: "I", 8: "Q"}[_SCALAR_SIZES[kind]]
        return self.take(fmt)


def read_gguf_header(path: Path) -> GgufHeader:
    """Version, architecture and tensor quantisation types of a GGUF file (versions 2 and 3)."""
    import gguf

    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        cursor = _Cursor(buf)
        cursor.pos = len(GGUF_MAGIC)
        version = cursor.take("I")
        if version < 2:
            raise ValueError(f"GGUF version {version} is too old (transformers reads versions 2 and 3)")
        tensor_count, kv_count = cursor.take("Q"), cursor.take("Q")
        architecture = ""
        for _ in range(kv_count):
            key, kind = cursor.string(), cursor.take("I")
            value = cursor.value(kind)
            if key == "general.architecture":
                architecture = value
        types: dict[str, int] = {}
        for _ in range(tensor_count):
            cursor.string()  # tensor name
            n_dims = cursor.take("I")
            cursor.pos += 8 * n_dims  # dimensions
            type_id = cursor.take("I")
            cursor.take("Q")  # data offset
            try:
                name = gguf.GGMLQuantizationType(type_id).name
            except ValueError:
                name = f"unknown type {type_id}"
            types[name] = types.get(name, 0) + 1
    return GgufHeader(version, architecture, types)


def _dequantizable(type_name: str) -> bool:
    """Whether the gguf package (which transformers calls) can de-quantise tensors of this type."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, dequantize

    try:
        qtype = GGMLQuantizationType[type_name]
        _block, type_size = GGML_QUANT_SIZES[qtype]
        dequantize(np.zeros(type_size, dtype=np.uint8), qtype)  # one all-zero block
    except (KeyError, NotImplementedError, ValueError):
        return False
    return True


def _architecture_supported(architecture: str) -> bool:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    def squash(name: str) -> str:  # llama.cpp writes qwen2moe / gpt-oss where transformers has qwen2_moe / gpt_oss
        return name.lower().replace("_", "").replace("-", "")

    known = {squash(a) for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer")}
    return squash(architecture) in known or architecture.startswith("t5")


def check_gguf(path: str | Path, named: str | None = None) -> GgufHeader:
    """One-line ModelError unless `path` is a GGUF file transformers can load and de-quantise."""
    path = Path(path)
    label = f"{named} ({path})" if named and named != str(path) else str(path)
    if not path.is_file():
        raise ModelError(f"GGUF model {label} does not exist")
    with open(path, "rb") as handle:
        magic = handle.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        raise ModelError(f"GGUF model {label} is not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r})")
    try:
        header = read_gguf_header(path)
    except ValueError as exc:
        raise ModelError(f"GGUF model {label} has an unreadable header: {exc}") from None
    if not _architecture_supported(header.architecture):
        raise ModelError(
            f"GGUF model {label}: architecture {header.architecture or '(none)'!r} cannot be loaded from GGUF by transformers"
        )
    unsupported = sorted(t for t in header.tensor_types if not _dequantizable(t))
    if unsupported:
        raise ModelError(
            f"GGUF model {label}: quantisation type(s) {', '.join(unsupported)} cannot be de-quantised by the "
            "gguf package; use a file quantised as F32, F16, BF16, Q8_0, Q4_0/Q4_1, Q5_0/Q5_1 or a K-quant"
        )
    return header


def convert_gguf(path: str | Path, out_dir: str | Path, trust_remote_code: bool = False) -> dict:
    """De-quantise the GGUF model at `path` into `out_dir` (fp32 safetensors, config, tokenizer,
    generation config); returns what base_model.json records about it."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, out_dir = Path(path), Path(out_dir)
    header = check_gguf(path)
    log.info("converting %s (%s, %s) into %s", path, header.architecture,
             ", ".join(f"{n} x{c}" for n, c in sorted(header.tensor_types.items())), out_dir)
    source = {"gguf_file": path.name, "trust_remote_code": trust_remote_code}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, **source)
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **source)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load GGUF model {path}: {str(exc).splitlines()[0]}") from None

    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the entry that makes save_pretrained and later loads refuse
    config.dtype = torch.float32
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
    state = loaded.state_dict()
    plain.load_state_dict(state, assign=True, strict=True)
    plain.tie_weights()
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)

    written = json.loads((out_dir / "config.json").read_text())
    if "quantization_config" in written:
        raise RuntimeError(f"{out_dir}/config.json still holds quantization_config after conversion")
    saved = {}
    for shard in sorted(out_dir.glob("*.safetensors")):
        saved.update(load_file(shard))
    for name, tensor in saved.items():  # what was written is what was de-quantised, bit for bit
        if not torch.equal(tensor, state[name]):
            raise RuntimeError(f"converted weight {name} differs from the GGUF file's {path}")
    return {
        "model_type": config.model_type,
        "source_gguf": str(path),
        "gguf_architecture": header.architecture,
        "gguf_tensor_types": header.tensor_types,
        "parameters": sum(p.numel() for p in plain.parameters()),
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
    }

"""What the speed benchmarks share: the model under test, the machine's own matmul rate, the machine.

`--model` takes what a recipe's `model.base_model` takes: a Hugging Face directory, a `.gguf` file or
`cache:<name>` (python -m models.fetch). A GGUF file is de-quantised once into a temporary directory
by the conversion BaseModel uses (models/load/gguf.py), so every side of a comparison loads the same fp32
weights.

CPU MFU. A GPU's peak is a datasheet figure; a CPU's depends on its vector units, its clock under
load and the BLAS torch ships, so the ceiling here is measured in the same process: the best rate of
a dense fp32 matmul on the model's own layer shapes (`matmul_probe`). A model's share of that rate is
what "CPU MFU" means in bench/README.md.
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GPU_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # bf16 dense, from the datasheets


def gpu_peak_flops(device_name: str) -> float | None:
    """The datasheet bf16 dense peak of the GPU `device_name` names, or None for one not listed."""
    return next((flops for model, flops in GPU_PEAK_FLOPS.items() if model in device_name), None)


def model_directory(spec: str) -> str:
    """A directory holding the model `spec` names: itself, or a GGUF file converted once."""
    from models.load.gguf import convert_gguf, is_gguf_spec, resolve_gguf

    if not is_gguf_spec(spec):
        return spec
    out = Path(tempfile.mkdtemp(prefix="bench_gguf_"))
    convert_gguf(resolve_gguf(spec), out)
    return str(out)


def layer_shapes(config, tokens: int) -> list[tuple[int, int, int]]:
    """(m, k, n) of the model's projections for `tokens` rows: attention in/out and the MLP."""
    hidden = config.hidden_size
    return [(tokens, hidden, hidden), (tokens, hidden, config.intermediate_size), (tokens, config.intermediate_size, hidden)]


def matmul_probe(shapes: list[tuple[int, int, int]], dtype=torch.float32, device: str = "cpu", seconds: float = 1.0) -> dict:
    """The best dense matmul rate (GFLOP/s) on each (m x k @ k x n) shape, measured for `seconds` each."""
    rates = {}
    for m, k, n in shapes:
        a = torch.randn(m, k, dtype=dtype, device=device)
        b = torch.randn(k, n, dtype=dtype, device=device)
        for _ in range(3):
            a @ b
        best, end = 0.0, time.perf_counter() + seconds
        while time.perf_counter() < end:
            if device != "cpu":
                torch.cuda.synchronize()
            start = time.perf_counter()
            a @ b
            if device != "cpu":
                torch.cuda.synchronize()
            best = max(best, 2 * m * k * n / (time.perf_counter() - start) / 1e9)
        rates[f"{m}x{k}@{k}x{n}"] = round(best, 1)
    return {"gflops_per_s": rates, "best_gflops_per_s": max(rates.values())}


def move_lora_off_zero(model, seed: int = 1, std: float = 0.02) -> None:
    """Draw every LoRA B matrix from N(0, std): at peft's zero init the policy is its reference, and every DPO-family
    loss is log 2 whatever the pairs, so a comparison of two losses there could not fail."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, std)


def machine() -> dict:
    """What the figures were measured on, load average included (other jobs slow a shared machine)."""
    cpu = platform.processor()
    if Path("/proc/cpuinfo").is_file():
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return {
        "date": time.strftime("%Y-%m-%d"), "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }

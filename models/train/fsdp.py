"""FSDP for the Train stage: the policy's weights sharded across the processes of `accelerate launch`.

    fsdp_requested() -> bool            the launch asked for FSDP (an accelerate config with distributed_type: FSDP)
    check_fsdp(quantized)               raises RecipeError for a setting this path does not support
    shard_policy(policy, model, device) FSDP2 (torch.distributed.fsdp.fully_shard): each decoder layer, then the root
    full_trainable_state(model)         the trainable (LoRA) weights gathered whole, on every process
    full_optimizer_state(policy, opt)   the optimiser's state gathered whole (rank 0), keyed by parameter name
    load_trainer_state(...)             a trainer checkpoint's adapter and optimiser state back into the shards

The trainer applies FSDP2 itself, on the GPU and on the CPU alike: accelerate's own FSDP plugin is not used,
because accelerate turns FSDP off on CPU processes (gloo), where the tests run, and because the trainer's
forward calls the decoder and the output head directly (models/logps.py: the head in chunks, the
shared-prompt forward runs the decoder twice), which FSDP units wrapped around the model's own forward
would not see. Here the root unit is PolicyLogps, whose forward is the trainer's whole forward: its
pre-forward gathers the weights outside the decoder layers (embeddings, final norm, a tied head) for
the whole forward, and each decoder layer gathers its own weights when it runs.

Data parallelism as under DDP: each process takes its share of every optimizer step's micro-batches and
FSDP's reduce-scatter averages the gradients over the processes, so a step's update equals one process
accumulating all the micro-batches (tests/stages/train/test_fsdp.py checks that).
"""

from __future__ import annotations

import os

import torch

from common.errors import RecipeError


def fsdp_requested() -> bool:
    """`accelerate launch --config_file <config with distributed_type: FSDP>` sets ACCELERATE_USE_FSDP."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def check_fsdp(quantized: bool) -> None:
    """The settings of the accelerate config and recipe this path does not implement, refused before any load."""
    if quantized:
        raise RecipeError("model.quantization: 4bit cannot be trained under FSDP here (the 4-bit weights do not shard); "
                          "use the accelerate config without FSDP (DDP) or model.quantization: none")
    if os.environ.get("FSDP_VERSION", "2") != "2":
        raise RecipeError(f"the accelerate config's fsdp_config.fsdp_version is {os.environ['FSDP_VERSION']}; "
                          "the trainer shards with FSDP2: set fsdp_version: 2")
    if os.environ.get("FSDP_OFFLOAD_PARAMS", "false").lower() == "true":
        raise RecipeError("the accelerate config's fsdp_config.fsdp_offload_params is true; the trainer does not offload "
                          "parameters to the CPU: set it to false")
    if os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "false").lower() == "true":
        # transformers then loads real weights on rank 0 only and expects accelerate's prepare to broadcast them
        raise RecipeError("the accelerate config's fsdp_config.fsdp_cpu_ram_efficient_loading is true; the trainer loads "
                          "the weights in every process and shards them itself: set it to false")


def shard_policy(policy: torch.nn.Module, model, device: torch.device) -> tuple[int, int]:
    """Shard `policy` (PolicyLogps around the PEFT `model`) over all processes, in place; returns it.

    One FSDP unit per decoder layer (its weights gathered only while it runs, and freed after unless
    FSDP_RESHARD_AFTER_FORWARD is false), and the root unit for the rest. Frozen and trainable weights
    are sharded alike; only the LoRA weights get gradients and optimiser state. Returns (weights this
    process holds, weights of the whole policy).
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() == "true"
    decoder = model.get_base_model().get_decoder()
    for layer in decoder.layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard)
    fully_shard(policy, mesh=mesh)
    return sum(p.to_local().numel() for p in policy.parameters()), sum(p.numel() for p in policy.parameters())


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def full_trainable_state(model) -> dict[str, torch.Tensor]:
    """{name: whole tensor on the CPU} of `model`'s trainable parameters; a collective: every process calls it."""
    return {name: _whole(p.detach()).cpu() for name, p in model.named_parameters() if p.requires_grad}


def full_optimizer_state(policy, optimizer) -> dict:
    """The optimiser's state gathered whole on rank 0 (empty elsewhere), keyed by parameter name; a collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(policy, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_trainer_state(policy, model, optimizer, trainable: dict[str, torch.Tensor], optimizer_state: dict) -> None:
    """Put a checkpoint's whole trainable weights (names of `model`) and optimiser state into the shards; a collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    prefix = next(name for name, module in policy.named_children() if module is model) + "."
    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(policy, {prefix + name: value for name, value in trainable.items()}, options=options)
    set_optimizer_state_dict(policy, optimizer, optim_state_dict=optimizer_state, options=StateDictOptions(full_state_dict=True))


def grad_norm_value(norm: torch.Tensor) -> float:
    """clip_grad_norm_'s total norm as a float (a DTensor under FSDP)."""
    return float(_whole(norm))

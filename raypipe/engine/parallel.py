"""Data parallelism beyond one device's memory: FSDP2 (`fully_shard`) and its checkpoints.

Pure PyTorch, like the rest of `engine/`. Under `strategy: fsdp` every rank holds a 1/world
shard of each parameter, gradient and optimizer moment; each block is gathered just before it
runs and freed after. Checkpoints hold the full, unsharded weights in the same safetensors
layout as DDP's, so fine-tuning (and anything else) loads them the same way.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def shard(module: nn.Module) -> nn.Module:
    """Apply `fully_shard` to every block (each element of a ModuleList: transformer and ViT
    layers), then to the root, which holds what is left (embeddings, heads, decoders).
    Shards across the default process group; returns the same module, now sharded in place."""
    from torch.distributed.fsdp import fully_shard

    blocks = [
        block
        for sub in module.modules()
        if isinstance(sub, nn.ModuleList)
        for block in sub
        if any(p.requires_grad for p in block.parameters())
    ]
    for block in blocks:
        fully_shard(block)
    fully_shard(module)
    return module


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Gathered to rank 0 and moved to CPU: other ranks get an empty dict.
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded weights on rank 0 (a collective: every rank must call it)."""
    if not is_sharded(module):
        return module.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(module, options=_full_options())


def full_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state keyed by parameter name, unsharded, on rank 0 (a collective)."""
    if not is_sharded(module):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(module, optimizer, options=_full_options())


def load_optimizer_state(
    module: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Load what `full_optimizer_state` returned; every rank takes its own shard of it."""
    if not is_sharded(module):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(
        module, optimizer, state, options=StateDictOptions(full_state_dict=True)
    )


def local_value(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a DTensor (e.g. the gradient norm under FSDP); others unchanged."""
    full = getattr(t, "full_tensor", None)
    return full() if callable(full) else t

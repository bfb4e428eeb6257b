"""AdamW with decoupled weight decay on matrices only, and a warmup + cosine schedule."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn


def build_optimizer(
    params: Iterable[nn.Parameter],
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.95),
    lr_scales: list[tuple[Iterable[nn.Parameter], float]] = (),
) -> torch.optim.AdamW:
    """Weight decay applies to 2-D+ tensors (linear/embedding weights), not biases or norms.
    `lr_scales`: (parameters, factor) whose learning rate is `factor` x lr (a group's
    "lr_scale", which the schedule and PBT's perturbations keep)."""
    params = [p for p in params if p.requires_grad]
    scale_of = {id(p): s for ps, s in lr_scales for p in ps}
    groups = []
    for scale in sorted({1.0, *scale_of.values()}, reverse=True):
        mine = [p for p in params if scale_of.get(id(p), 1.0) == scale]
        for decayed in (True, False):
            chosen = [p for p in mine if (p.dim() >= 2) == decayed]
            if chosen or scale == 1.0:
                groups.append({"params": chosen, "weight_decay": weight_decay if decayed else 0.0,
                               "lr": lr * scale, "lr_scale": scale})  # fmt: skip
    # One fused kernel for all parameters, on CUDA and on CPU (4x the default foreach path on
    # CPU for the quickstart model); it can also skip a step on the device (train_step).
    fused = bool(params) and all(
        p.is_floating_point() and p.device.type in ("cuda", "cpu") for p in params
    )
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)


def warmup_cosine(
    optimizer: torch.optim.Optimizer,
    *,
    warmup_steps: int,
    total_steps: int,
    min_lr_ratio: float = 0.1,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to the base lr, then cosine decay to `min_lr_ratio` x base at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

"""Mixed precision: bf16 autocast on GPU, full fp32 on CPU."""

from __future__ import annotations

import contextlib

import torch


def autocast_for(
    device: torch.device, precision: str = "auto"
) -> contextlib.AbstractContextManager:
    """`auto` means bf16 on CUDA and fp32 elsewhere; `fp32` and `bf16` force a choice."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)

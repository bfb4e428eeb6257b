"""Model FLOPs utilisation: training FLOPs per token against the device's dense bf16 peak."""

from __future__ import annotations

import torch
from torch import nn

#: Dense (no sparsity) bf16 tensor-core peaks, FLOP/s, by a substring of the device name;
#: the first match wins, so the more specific names come first.
BF16_PEAK = [
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
    ("V100", 125e12),  # fp16: the V100 has no bf16
]


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, or None when unknown (or not a GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK if key in name), None)


def transformer_flops_per_token(model: nn.Module, seq_len: int) -> float | None:
    """6N + 12·L·d·T (weights' forward and backward, plus attention over T positions), the
    PaLM appendix B estimate; N counts every parameter but the position table. None for a
    model without a transformer's `config` (num_layers, dim)."""
    config = getattr(model, "config", None)
    layers, dim = getattr(config, "num_layers", None), getattr(config, "dim", None)
    if layers is None or dim is None:
        return None
    n = sum(p.numel() for name, p in model.named_parameters() if "pos" not in name.split(".")[0])
    return 6 * n + 12 * layers * dim * seq_len


def mfu(tokens_per_s_per_device: float, flops_per_token: float, peak: float) -> float:
    return tokens_per_s_per_device * flops_per_token / peak

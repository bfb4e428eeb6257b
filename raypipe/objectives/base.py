"""The Objective contract shared by every pretraining objective."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from raypipe import registry


class Objective(nn.Module):
    """Wraps the model being pretrained and turns a batch into a loss.

    Being a module, an objective carries its own parameters (a learnable temperature, a
    projection head) and DDP wraps it whole: `ddp(batch)` runs `forward` on every rank.

    - `columns`: the batch columns it reads.
    - `model_overrides`: model hyperparameters it requires (a causal LM needs `causal=True`).
    - `forward(batch) -> (loss, metrics)`: a scalar loss to minimise and scalar tensors to log
      (kept as tensors so the loop syncs with the host only when it logs).
    """

    columns: ClassVar[tuple[str, ...]] = ()
    model_overrides: ClassVar[dict[str, Any]] = {}

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(
        self, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def tokens_in(self, batch: dict[str, torch.Tensor]) -> int:
        """How many input positions one batch holds (for throughput)."""
        first = batch[self.columns[0]]
        return first.numel()


def build_objective(
    name: str, model: nn.Module, options: dict[str, Any] | None = None
) -> Objective:
    cls = registry.resolve("objective", name)
    return cls(model, **(options or {}))

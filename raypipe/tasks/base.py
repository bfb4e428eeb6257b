"""The Task contract shared by every fine-tuning task."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from raypipe import registry


class Task(nn.Module):
    """A backbone plus a task head.

    - `columns`: the batch columns it reads.
    - `forward(batch) -> (loss, stats)`: the mean loss to minimise and per-batch *sums*
      (including "count"), so statistics over many batches and ranks add up exactly.
    - `summarize(stats) -> metrics`: turns summed stats into the reported metrics.
    - `predictor()`: a module mapping raw model inputs to predictions, for serving.
    """

    columns: ClassVar[tuple[str, ...]] = ()

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(
        self, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    @staticmethod
    def summarize(stats: dict[str, torch.Tensor]) -> dict[str, float]:
        raise NotImplementedError

    def predictor(self) -> nn.Module:
        raise NotImplementedError

    def tokens_in(self, batch: dict[str, torch.Tensor]) -> int:
        return batch[self.columns[0]].numel()


def build_task(name: str, backbone: nn.Module, options: dict[str, Any] | None = None) -> Task:
    cls = registry.resolve("task", name)
    return cls(backbone, **(options or {}))

"""Sequence classification: pooled backbone states -> linear head, cross-entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raypipe.tasks.base import Task


def pool_hidden(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """Pool (B, T, D) states over real tokens: their mean, or the last real one."""
    if how == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
    # Inputs are right-padded, so the last real token sits at length - 1.
    last = mask.long().sum(1).clamp(min=1) - 1
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class Classification(Task):
    columns = ("input_ids", "label")

    def __init__(
        self, backbone: nn.Module, *, num_classes: int, pool: str = "mean", dropout: float = 0.0
    ):
        super().__init__(backbone)
        if pool not in ("mean", "last"):
            raise ValueError(f"pool must be 'mean' or 'last', got {pool!r}")
        self.num_classes = num_classes
        self.pool = pool
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(backbone.dim, num_classes)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        mask = input_ids != self.backbone.config.pad_id
        hidden = self.backbone(input_ids, padding_mask=mask)
        return self.head(self.drop(pool_hidden(hidden, mask, self.pool)))

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        logits = self.logits(batch["input_ids"].long()).float()
        labels = batch["label"].long()
        losses = F.cross_entropy(logits, labels, reduction="none")
        stats = {
            "loss_sum": losses.detach().sum(),
            "correct": (logits.argmax(-1) == labels).sum().float(),
            "count": torch.tensor(float(labels.numel()), device=labels.device),
        }
        return losses.mean(), stats

    @staticmethod
    def summarize(stats: dict[str, torch.Tensor]) -> dict[str, float]:
        count = float(stats["count"])
        return {
            "loss": float(stats["loss_sum"]) / count,
            "accuracy": float(stats["correct"]) / count,
        }

    def predictor(self) -> nn.Module:
        return _LogitsModule(self)


class _LogitsModule(nn.Module):
    """input_ids (B, T) int64, right-padded with the tokenizer's pad id -> logits (B, C)."""

    def __init__(self, task: Classification):
        super().__init__()
        self.task = task

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.task.logits(input_ids)

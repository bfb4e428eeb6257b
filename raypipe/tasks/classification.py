"""Classification of texts or images: pooled backbone features -> linear head, cross-entropy.

Reports accuracy and macro-F1 (from per-class counts, which add up across batches and ranks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raypipe.models.transformer import pool_hidden
from raypipe.tasks.base import Task

__all__ = ["Classification", "pool_hidden"]


class Classification(Task):
    option_names = ("num_classes", "pool", "dropout", "input")
    metrics = ("accuracy", "macro_f1", "loss")
    baseline = "linear"
    prediction = "classes"

    def __init__(
        self,
        backbone: nn.Module,
        *,
        num_classes: int,
        pool: str = "mean",
        dropout: float = 0.0,
        input: str = "text",
    ):
        super().__init__(backbone, input=input)
        if pool not in ("mean", "last"):
            raise ValueError(f"pool must be 'mean' or 'last', got {pool!r}")
        self.num_classes = num_classes
        self.pool = pool
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(backbone.dim, num_classes)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def predict(self, inputs: torch.Tensor) -> torch.Tensor:
        features = self.backbone.pooled({self.input_column: inputs}, self.pool)
        return self.head(self.drop(features))

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        logits = self.predict(batch[self.input_column]).float()
        labels = batch["label"].long()
        losses = F.cross_entropy(logits, labels, reduction="none")
        pred = logits.argmax(-1)
        hit = F.one_hot(pred, self.num_classes).float()
        truth = F.one_hot(labels, self.num_classes).float()
        stats = {
            "loss_sum": losses.detach().sum(),
            "correct": (pred == labels).sum().float(),
            "count": torch.tensor(float(labels.numel()), device=labels.device),
            "true_pos": (hit * truth).sum(0),
            "pred_pos": hit.sum(0),
            "label_pos": truth.sum(0),
        }
        return losses.mean(), stats

    @staticmethod
    def summarize(stats: dict[str, torch.Tensor]) -> dict[str, float]:
        count = float(stats["count"])
        tp, pp, lp = (stats[k].double() for k in ("true_pos", "pred_pos", "label_pos"))
        # F1 per class = 2 TP / (predicted + actual); classes never seen nor predicted are left out.
        present = (pp + lp) > 0
        f1 = 2 * tp[present] / (pp[present] + lp[present])
        return {
            "loss": float(stats["loss_sum"]) / count,
            "accuracy": float(stats["correct"]) / count,
            "macro_f1": float(f1.mean()) if bool(present.any()) else 0.0,
        }

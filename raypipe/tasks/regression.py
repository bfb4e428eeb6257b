"""Regression of a real value from a text or an image: pooled features -> linear head, MSE."""

from __future__ import annotations

import torch
from torch import nn

from raypipe.tasks.base import Task


class Regression(Task):
    option_names = ("pool", "dropout", "input")
    metrics = ("mse", "mae", "loss")
    minimize = ("mse", "mae", "loss")
    baseline = "linear"  # ridge regression on the same features (raypipe/baselines.py)
    label_dtype = "float32"
    output_name = "value"
    prediction = "value"

    def __init__(
        self, backbone: nn.Module, *, pool: str = "mean", dropout: float = 0.0, input: str = "text"
    ):
        super().__init__(backbone, input=input)
        self.pool = pool
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(backbone.dim, 1)

    def predict(self, inputs: torch.Tensor) -> torch.Tensor:
        features = self.backbone.pooled({self.input_column: inputs}, self.pool)
        return self.head(self.drop(features)).squeeze(-1)

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        pred = self.predict(batch[self.input_column]).float()
        err = pred - batch["label"].float()
        stats = {
            "sq_err": (err.detach() ** 2).sum(),
            "abs_err": err.detach().abs().sum(),
            "count": torch.tensor(float(err.numel()), device=err.device),
        }
        return (err**2).mean(), stats

    @staticmethod
    def summarize(stats: dict[str, torch.Tensor]) -> dict[str, float]:
        count = float(stats["count"])
        mse = float(stats["sq_err"]) / count
        return {"loss": mse, "mse": mse, "mae": float(stats["abs_err"]) / count}

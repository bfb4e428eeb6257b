"""Classification with label smoothing, scored by accuracy and by the error rate."""

import torch
import torch.nn.functional as F
from torch import nn

from raypipe.tasks.base import Task


class SmoothedClassification(Task):
    option_names = ("num_classes", "pool", "input")  # finetune settings the task takes
    metrics = ("error_rate", "accuracy", "loss")  # the first is the default sweep metric
    minimize = ("error_rate", "loss")  # lower is better: the sweep minimises them
    label_dtype = "int64"

    def __init__(self, backbone, *, num_classes, pool="mean", input="text", smoothing=0.1):
        super().__init__(backbone, input=input)
        self.num_classes, self.pool, self.smoothing = num_classes, pool, smoothing
        self.head = nn.Linear(backbone.dim, num_classes)

    def predict(self, inputs):  # what the registered model serves: inputs -> logits
        return self.head(self.backbone.pooled({self.input_column: inputs}, self.pool))

    def forward(self, batch):
        logits = self.predict(batch[self.input_column]).float()
        labels = batch["label"].long()
        loss = F.cross_entropy(logits, labels, label_smoothing=self.smoothing)
        stats = {  # sums, so that batches and workers add up
            "loss_sum": loss.detach() * labels.numel(),
            "correct": (logits.argmax(-1) == labels).sum().float(),
            "count": torch.tensor(float(labels.numel()), device=labels.device),
        }
        return loss, stats

    @staticmethod
    def summarize(stats):
        count = float(stats["count"])
        accuracy = float(stats["correct"]) / count
        return {"error_rate": 1 - accuracy, "accuracy": accuracy,
                "loss": float(stats["loss_sum"]) / count}

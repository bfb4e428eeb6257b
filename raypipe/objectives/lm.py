"""Causal language modelling: predict every next token (cross-entropy)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from raypipe.objectives.base import Objective


class CausalLM(Objective):
    columns = ("input_ids",)
    model_overrides = {"causal": True}

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        # Packed blocks hold seq_len + 1 tokens: inputs are [:-1], targets the shift [1:].
        ids = batch["input_ids"].long()
        inputs, targets = ids[:, :-1], ids[:, 1:]
        logits = self.model.lm_logits(self.model(inputs))
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        return loss, {}

    def tokens_in(self, batch: dict[str, torch.Tensor]) -> int:
        ids = batch["input_ids"]
        return ids.shape[0] * (ids.shape[1] - 1)

"""Replaced-token detection (ELECTRA's discriminator task, with random replacements in place
of a generator): every token is classified as original or replaced."""

import torch
import torch.nn.functional as F
from torch import nn

from raypipe.objectives.base import Objective
from raypipe.vocab import NUM_SPECIAL


class ReplacedTokenDetection(Objective):
    data_kind = "text_blocks"  # batches of packed token blocks: batch["input_ids"] (B, T)
    model_overrides = {"causal": False}  # every token sees the whole block

    def __init__(self, model, *, replace_prob: float = 0.15):  # options: pretrain.options
        super().__init__(model)
        if not 0 < replace_prob < 1:
            raise ValueError(f"replace_prob must be in (0, 1), got {replace_prob}")
        self.replace_prob = replace_prob
        self.vocab_size = model.config.vocab_size
        self.head = nn.Linear(model.dim, 1)  # trained here, not handed to fine-tuning

    def forward(self, batch):
        ids = batch["input_ids"].long()
        real = ids >= NUM_SPECIAL  # special tokens (<pad>, <bos>, ...) are never replaced
        chosen = (torch.rand(ids.shape, device=ids.device) < self.replace_prob) & real
        noise = torch.randint(NUM_SPECIAL, self.vocab_size, ids.shape, device=ids.device)
        inputs = torch.where(chosen, noise, ids)
        replaced = (inputs != ids).float()  # a random draw of the same token is no replacement
        logits = self.head(self.model(inputs)).squeeze(-1)  # model(ids): hidden (B, T, dim)
        weight = real.float()
        losses = F.binary_cross_entropy_with_logits(logits, replaced, reduction="none")
        loss = (losses * weight).sum() / weight.sum().clamp(min=1.0)
        right = ((logits > 0).float() == replaced).float() * weight
        return loss, {"detect_acc": right.sum() / weight.sum().clamp(min=1.0)}

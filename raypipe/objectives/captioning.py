"""Image captioning: a causal text decoder conditioned on the image (as a prefix) predicts the
caption token by token; cross-entropy on caption tokens."""

from __future__ import annotations

import torch

from raypipe.objectives.base import Objective, require
from raypipe.objectives.losses import IGNORE, token_cross_entropy
from raypipe.vocab import PAD_ID


class Captioning(Objective):
    data_kind = "image_text"
    text_extra = 1  # captions hold seq_len + 1 tokens: inputs and shifted targets
    unit = "images"

    def __init__(self, model):
        super().__init__(model)
        require(model, "captioning", "generate", "lm_logits", hint="use model.type: captioner")

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        ids = batch["input_ids"].long()
        inputs, targets = ids[:, :-1], ids[:, 1:].masked_fill(ids[:, 1:] == PAD_ID, IGNORE)
        hidden = self.model(batch["image"], inputs, padding_mask=inputs != PAD_ID)
        return token_cross_entropy(self.model.lm_logits(hidden), targets), {}

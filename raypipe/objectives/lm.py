"""Language modelling: causal (predict every next token) and masked (BERT's 15 %, 80/10/10)."""

from __future__ import annotations

import torch

from raypipe.objectives.base import Objective, require
from raypipe.objectives.losses import IGNORE, token_cross_entropy
from raypipe.vocab import MASK_ID, NUM_SPECIAL


class CausalLM(Objective):
    data_kind = "text_blocks"
    text_extra = 1
    model_overrides = {"causal": True}

    def __init__(self, model):
        super().__init__(model)
        require(model, "causal_lm", "lm_logits", hint="use model.type: transformer")

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        # Packed blocks hold seq_len + 1 tokens: inputs are [:-1], targets the shift [1:].
        ids = batch["input_ids"].long()
        logits = self.model.lm_logits(self.model(ids[:, :-1]))
        return token_cross_entropy(logits, ids[:, 1:]), {}


def bert_mask(
    ids: torch.Tensor, *, mask_prob: float, vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose `mask_prob` of the non-special tokens; of those 80 % become <mask>, 10 % a random
    token, 10 % stay. Returns (inputs, targets) with targets IGNORE where nothing was chosen."""
    maskable = ids >= NUM_SPECIAL
    chosen = (torch.rand(ids.shape, device=ids.device) < mask_prob) & maskable
    # A tiny batch can draw nothing: then predict the first maskable token anyway. Written
    # without a branch on a device value, so the step never waits for the device here.
    flat = chosen.view(-1)
    first = maskable.view(-1).int().argmax().view(1)  # index 0 when nothing is maskable
    flat.scatter_(0, first, flat.gather(0, first) | (~chosen.any() & maskable.view(-1)[first]))
    targets = ids.masked_fill(~chosen, IGNORE)
    roll = torch.rand(ids.shape, device=ids.device)
    random_ids = torch.randint(NUM_SPECIAL, vocab_size, ids.shape, device=ids.device)
    inputs = torch.where(chosen & (roll < 0.8), torch.full_like(ids, MASK_ID), ids)
    inputs = torch.where(chosen & (roll >= 0.8) & (roll < 0.9), random_ids, inputs)
    return inputs, targets


class MaskedLM(Objective):
    data_kind = "text_blocks"
    model_overrides = {"causal": False}

    def __init__(self, model, *, mask_prob: float = 0.15):
        super().__init__(model)
        require(model, "masked_lm", "lm_logits", hint="use model.type: transformer")
        if not 0 < mask_prob < 1:
            raise ValueError(f"mask_prob must be in (0, 1), got {mask_prob}")
        self.mask_prob = mask_prob

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        ids = batch["input_ids"].long()
        inputs, targets = bert_mask(
            ids, mask_prob=self.mask_prob, vocab_size=self.model.config.vocab_size
        )
        logits = self.model.lm_logits(self.model(inputs))
        loss = token_cross_entropy(logits, targets)
        return loss, {"masked_share": (targets != IGNORE).float().mean()}

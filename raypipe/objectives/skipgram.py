"""Skip-gram with negative sampling (word2vec; fastText's objective without its labels): each
token's vector predicts the tokens around it, against `negatives` random tokens.

Cheap per CPU-second (one dot product per pair, no attention), and what a bag-of-embeddings
encoder (`model.type: bag`) is pretrained with. Pairs never cross a document boundary (the
<eos> that packing puts between documents) and never involve a special token. Negatives are
drawn uniformly from the non-special vocabulary (word2vec draws them by frequency^0.75).
"""

from __future__ import annotations

import torch
from torch import nn

from raypipe.objectives.base import Objective, require
from raypipe.objectives.losses import skipgram_loss
from raypipe.vocab import EOS_ID, NUM_SPECIAL


def context_pairs(ids: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(centre positions, context positions) as flat indices into ids.view(-1): every pair
    of real tokens at most `window` apart within one row and one document."""
    b, t = ids.shape
    doc = torch.cumsum(ids == EOS_ID, dim=1)  # a document ends at its <eos>
    real = ids >= NUM_SPECIAL
    flat = torch.arange(b * t, device=ids.device).view(b, t)
    centres, contexts = [], []
    for d in range(1, window + 1):
        for a, c in ((slice(0, t - d), slice(d, t)), (slice(d, t), slice(0, t - d))):
            ok = real[:, a] & real[:, c] & (doc[:, a] == doc[:, c])
            centres.append(flat[:, a][ok])
            contexts.append(flat[:, c][ok])
    return torch.cat(centres), torch.cat(contexts)


class SkipGram(Objective):
    data_kind = "text_blocks"

    def __init__(self, model, *, window: int = 5, negatives: int = 5):
        super().__init__(model)
        require(model, "skipgram", "embed", hint="use model.type: bag")
        if window < 1 or negatives < 1:
            raise ValueError(f"window and negatives must be >= 1, got {window} and {negatives}")
        self.window, self.negatives = window, negatives
        self.vocab_size = model.config.vocab_size
        self.context = nn.Embedding(self.vocab_size, model.dim)
        nn.init.zeros_(self.context.weight)  # word2vec's init of the output vectors

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        ids = batch["input_ids"].long()
        centre_at, context_at = context_pairs(ids, self.window)
        vectors = self.model.embed(ids).flatten(0, 1)
        flat_ids = ids.reshape(-1)
        noise = torch.randint(NUM_SPECIAL, self.vocab_size, (centre_at.numel(), self.negatives),
                              device=ids.device)  # fmt: skip
        loss = skipgram_loss(
            vectors[centre_at], self.context(flat_ids[context_at]), self.context(noise)
        )
        return loss, {"pairs": torch.tensor(float(centre_at.numel()), device=ids.device)}

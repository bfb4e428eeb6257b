"""Skip-gram with negative sampling (word2vec; fastText's objective without its labels): each
token's vector predicts the tokens around it, against `negatives` random tokens.

Cheap per CPU-second (one dot product per pair, no attention), and what a bag-of-embeddings
encoder (`model.type: bag`) is pretrained with. Pairs never cross a document boundary (the
<eos> that packing puts between documents) and never involve a special token.

Two of word2vec's choices are options, with word2vec's defaults, both estimated from the token
counts of the training batches seen so far (a running count, kept in the checkpoint; held-out
batches never count):
- `negative_power` (0.75): negatives are drawn with probability proportional to
  (count + 1)^power; 0 draws them uniformly from the non-special vocabulary;
- `subsample` (1e-3): a token of frequency f is dropped from the pairs with probability
  1 - sqrt(subsample / f), so frequent tokens ("the", ",") stop dominating them; 0 keeps
  every token. On SST-2 and MR at 1 % of the labels the two together were worth +0.2 and
  +2.2 points over uniform negatives without subsampling (BENCHMARKS.md).
"""

from __future__ import annotations

import torch
from torch import nn

from raypipe.objectives.base import Objective, require
from raypipe.objectives.losses import skipgram_loss
from raypipe.vocab import EOS_ID, NUM_SPECIAL


def context_pairs(
    ids: torch.Tensor, window: int, keep: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(centre positions, context positions) as flat indices into ids.view(-1): every pair
    of real tokens at most `window` apart within one row and one document. With `keep` (a
    bool mask shaped like ids), tokens outside it pair with nothing."""
    b, t = ids.shape
    doc = torch.cumsum(ids == EOS_ID, dim=1)  # a document ends at its <eos>
    real = ids >= NUM_SPECIAL
    if keep is not None:
        real = real & keep
    flat = torch.arange(b * t, device=ids.device).view(b, t)
    centres, contexts = [], []
    for d in range(1, window + 1):
        for a, c in ((slice(0, t - d), slice(d, t)), (slice(d, t), slice(0, t - d))):
            ok = real[:, a] & real[:, c] & (doc[:, a] == doc[:, c])
            centres.append(flat[:, a][ok])
            contexts.append(flat[:, c][ok])
    return torch.cat(centres), torch.cat(contexts)


def noise_weights(counts: torch.Tensor, power: float) -> torch.Tensor:
    """The negative-sampling distribution (unnormalised): (count + 1)^power over the
    non-special tokens, zero on the special ones; power 0 is uniform."""
    weights = (counts.double() + 1.0).pow(power)
    weights[:NUM_SPECIAL] = 0.0
    return weights


def keep_probability(counts: torch.Tensor, subsample: float) -> torch.Tensor:
    """word2vec's subsampling: a token of frequency f is kept with probability
    min(1, sqrt(subsample / f)); every token is kept while nothing is counted."""
    total = counts.sum()
    if subsample <= 0 or total <= 0:
        return torch.ones_like(counts, dtype=torch.float32)
    freq = counts.double() / total
    return (subsample / freq.clamp_min(1e-12)).sqrt().clamp(max=1.0).float()


class SkipGram(Objective):
    data_kind = "text_blocks"
    revision = 1  # 1: word2vec's negatives and subsampling by default (0: uniform, none)

    def __init__(self, model, *, window: int = 5, negatives: int = 5,
                 negative_power: float = 0.75, subsample: float = 1e-3):  # fmt: skip
        super().__init__(model)
        require(model, "skipgram", "embed", hint="use model.type: bag")
        if window < 1 or negatives < 1:
            raise ValueError(f"window and negatives must be >= 1, got {window} and {negatives}")
        if not 0 <= negative_power <= 1 or not 0 <= subsample < 1:
            raise ValueError(
                f"negative_power must be in [0, 1] and subsample in [0, 1), "
                f"got {negative_power} and {subsample}"
            )
        self.window, self.negatives = window, negatives
        self.negative_power, self.subsample = negative_power, subsample
        self.vocab_size = model.config.vocab_size
        self.context = nn.Embedding(self.vocab_size, model.dim)
        nn.init.zeros_(self.context.weight)  # word2vec's init of the output vectors
        # Token counts of the training batches so far (float64: exact far past 2^24 tokens).
        self.register_buffer("counts", torch.zeros(self.vocab_size, dtype=torch.float64))

    def _count(self, ids: torch.Tensor) -> None:
        if self.training and (self.negative_power > 0 or self.subsample > 0):
            real = ids[ids >= NUM_SPECIAL]
            self.counts += torch.bincount(real, minlength=self.vocab_size).to(self.counts)

    def _noise(self, n: int, device) -> torch.Tensor:
        shape = (n, self.negatives)
        if self.negative_power == 0 or n == 0:
            return torch.randint(NUM_SPECIAL, self.vocab_size, shape, device=device)
        weights = noise_weights(self.counts, self.negative_power)
        return torch.multinomial(weights, n * self.negatives, replacement=True).view(shape)

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        ids = batch["input_ids"].long()
        self._count(ids)
        keep = None
        if self.subsample > 0:
            chance = keep_probability(self.counts, self.subsample)[ids]
            keep = torch.rand(ids.shape, device=ids.device) < chance
        centre_at, context_at = context_pairs(ids, self.window, keep)
        vectors = self.model.embed(ids).flatten(0, 1)
        flat_ids = ids.reshape(-1)
        noise = self._noise(centre_at.numel(), ids.device)
        loss = skipgram_loss(
            vectors[centre_at], self.context(flat_ids[context_at]), self.context(noise)
        )
        return loss, {"pairs": torch.tensor(float(centre_at.numel()), device=ids.device)}

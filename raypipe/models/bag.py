"""A bag-of-embeddings text encoder (fastText-like): a text is the mean of its tokens'
vectors. Few parameters per label and no attention to fit, so it suits a few hundred
labeled rows; pretrained by `skipgram` (raypipe/objectives/skipgram.py)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from raypipe.models.transformer import pool_hidden


@dataclass(frozen=True)
class BagConfig:
    vocab_size: int
    dim: int = 128
    max_len: int = 128  # tokens a text may have (the data pipelines cut to it)
    dropout: float = 0.0
    pad_id: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


class BagOfEmbeddings(nn.Module):
    config_class = BagConfig
    modalities = ("text",)

    def __init__(self, cfg: BagConfig):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim, padding_idx=cfg.pad_id)
        # word2vec's init: input vectors uniform in +-0.5/dim (context vectors start at 0).
        nn.init.uniform_(self.tok_emb.weight, -0.5 / cfg.dim, 0.5 / cfg.dim)
        with torch.no_grad():
            self.tok_emb.weight[cfg.pad_id].zero_()
        self.drop = nn.Dropout(cfg.dropout)

    @property
    def dim(self) -> int:
        return self.config.dim

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Each token's own vector (B, T, dim), context-free (what skip-gram trains)."""
        return self.tok_emb(input_ids.long())

    def forward(self, input_ids: torch.Tensor, padding_mask: torch.Tensor | None = None):
        """Per-token states (B, T, dim): the token vectors themselves (no context)."""
        return self.drop(self.embed(input_ids))

    def pooled(self, batch: dict[str, torch.Tensor], pool: str = "mean") -> torch.Tensor:
        """One vector per text (B, dim): the mean (or the last) of its real tokens' vectors."""
        ids = batch["input_ids"].long()
        return pool_hidden(self(ids), ids != self.config.pad_id, pool)

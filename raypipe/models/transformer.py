"""A small pre-LN transformer over token ids, in decoder (causal) or encoder form."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class TransformerConfig:
    vocab_size: int
    dim: int = 128
    num_layers: int = 4
    num_heads: int = 4
    max_len: int = 128
    mlp_ratio: int = 4
    dropout: float = 0.0
    causal: bool = True
    pad_id: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def pool_hidden(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """Pool (B, T, D) states over real tokens: their mean, or the last real one."""
    if how == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
    if how != "last":
        raise ValueError(f"pool must be 'mean' or 'last', got {how!r}")
    # Inputs are right-padded, so the last real token sits at length - 1.
    last = mask.long().sum(1).clamp(min=1) - 1
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class SelfAttention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.dropout = cfg.dropout
        self.causal = cfg.causal

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.num_heads, d // self.num_heads).unbind(2)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # (B, H, T, Dh)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            # With an explicit mask the causal part is already folded into it.
            is_causal=self.causal and attn_mask is None,
        )
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.dim)
        self.attn = SelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.dim)
        hidden = cfg.mlp_ratio * cfg.dim
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, hidden), nn.GELU(), nn.Linear(hidden, cfg.dim))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), attn_mask))
        return x + self.drop(self.mlp(self.ln2(x)))


class Transformer(nn.Module):
    """Token ids (B, T) -> hidden states (B, T, dim); `lm_logits` maps them to the vocabulary.

    The output projection is tied to the token embedding, so the weights hold no shared tensors
    twice and a checkpoint is one plain state dict.
    """

    config_class = TransformerConfig

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        if cfg.dim % cfg.num_heads:
            raise ValueError(f"dim ({cfg.dim}) must be divisible by num_heads ({cfg.num_heads})")
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.ln_f = nn.LayerNorm(cfg.dim)
        self.apply(self._init_weights)
        # GPT-2 scaling of residual projections keeps the residual stream's variance in check.
        for name, p in self.named_parameters():
            if name.endswith("attn.proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / (2 * cfg.num_layers) ** 0.5)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    #: What the backbone reads from a batch (fine-tuning picks its input column from this).
    modalities = ("text",)

    @property
    def dim(self) -> int:
        return self.config.dim

    def forward(
        self,
        input_ids: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        prefix: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states (B, T, dim) of the tokens.

        `padding_mask` (B, T) is True at real tokens; padded keys are never attended to.
        `prefix` (B, P, dim) are embeddings placed before the tokens (an image, for captioning);
        every token attends to all of them, and only the tokens' states are returned.
        """
        t = input_ids.shape[1]
        if t > self.config.max_len:
            raise ValueError(f"sequence length {t} exceeds max_len {self.config.max_len}")
        pos = torch.arange(t, device=input_ids.device)
        x = self.drop(self.tok_emb(input_ids) + self.pos_emb(pos))
        num_prefix = 0
        if prefix is not None:
            num_prefix = prefix.shape[1]
            x = torch.cat([prefix.to(x.dtype), x], dim=1)
            if padding_mask is None:
                padding_mask = torch.ones(input_ids.shape, dtype=torch.bool, device=x.device)
            ones = torch.ones(x.shape[0], num_prefix, dtype=torch.bool, device=x.device)
            padding_mask = torch.cat([ones, padding_mask], dim=1)
        attn_mask = None
        if padding_mask is not None:
            n = x.shape[1]
            attn_mask = padding_mask[:, None, None, :]  # (B, 1, 1, T): which keys are visible
            if self.config.causal:
                causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
                attn_mask = attn_mask & causal
        for block in self.blocks:
            x = block(x, attn_mask)
        return self.ln_f(x[:, num_prefix:])

    def pooled(self, batch: dict[str, torch.Tensor], pool: str = "mean") -> torch.Tensor:
        """One vector per example (B, dim) from `batch["input_ids"]` (right-padded)."""
        ids = batch["input_ids"].long()
        mask = ids != self.config.pad_id
        if not (ids.is_cuda or ids.is_meta or torch.compiler.is_compiling()):
            # Columns that are padding in every row change nothing (masked keys, pooled over real
            # tokens only): dropping them saves most of the compute on short texts. On a GPU the
            # length would cost a host sync per step, and a traced (exported) graph needs a fixed
            # width (and a build check on `meta` has no lengths), so the full width is kept there.
            width = max(1, int(mask.sum(1).max()))
            ids, mask = ids[:, :width], mask[:, :width]
        return pool_hidden(self(ids, padding_mask=mask), mask, pool)

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.tok_emb.weight)

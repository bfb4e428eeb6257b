"""Image + text models: a dual encoder (CLIP) and an image-conditioned text decoder (captioning)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from raypipe.models.transformer import Transformer, TransformerConfig
from raypipe.models.vision import ViT, ViTConfig
from raypipe.vocab import BOS_ID, EOS_ID, PAD_ID


@dataclass(frozen=True)
class ImageTextConfig:
    vocab_size: int
    dim: int = 128
    num_layers: int = 4
    num_heads: int = 4
    max_len: int = 64
    mlp_ratio: int = 4
    dropout: float = 0.0
    pad_id: int = PAD_ID
    image_size: int = 32
    patch_size: int = 4
    channels: int = 3
    causal: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    def vision(self) -> ViTConfig:
        return ViTConfig(
            image_size=self.image_size,
            patch_size=self.patch_size,
            channels=self.channels,
            dim=self.dim,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            mlp_ratio=self.mlp_ratio,
            dropout=self.dropout,
        )

    def text(self, causal: bool) -> TransformerConfig:
        return TransformerConfig(
            vocab_size=self.vocab_size,
            dim=self.dim,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            max_len=self.max_len,
            mlp_ratio=self.mlp_ratio,
            dropout=self.dropout,
            causal=causal,
            pad_id=self.pad_id,
        )


class _ImageText(nn.Module):
    config_class = ImageTextConfig
    modalities = ("image", "text")

    @property
    def dim(self) -> int:
        return self.config.dim

    def pooled(self, batch: dict[str, torch.Tensor], pool: str = "mean") -> torch.Tensor:
        """Fine-tuning reads one modality: the image tower if the batch has images, else text."""
        if "image" in batch:
            return self.image.pooled(batch)
        return self.text.pooled(batch, pool)


class DualEncoder(_ImageText):
    """A ViT image tower and a bidirectional text tower with the same width (CLIP)."""

    def __init__(self, cfg: ImageTextConfig):
        super().__init__()
        self.config = cfg
        self.image = ViT(cfg.vision())
        self.text = Transformer(cfg.text(causal=cfg.causal))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.image.pooled({"image": images})

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text.pooled({"input_ids": input_ids})


class Captioner(_ImageText):
    """A ViT whose patch states, projected, prefix a causal text decoder (prefix captioning)."""

    def __init__(self, cfg: ImageTextConfig):
        super().__init__()
        self.config = cfg
        self.image = ViT(cfg.vision())
        self.text = Transformer(cfg.text(causal=True))
        self.bridge = nn.Linear(cfg.dim, cfg.dim)

    def forward(
        self, images: torch.Tensor, input_ids: torch.Tensor, padding_mask: torch.Tensor | None
    ) -> torch.Tensor:
        return self.text(
            input_ids, padding_mask=padding_mask, prefix=self.bridge(self.image(images))
        )

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.text.lm_logits(hidden)

    @torch.no_grad()
    def generate(self, images: torch.Tensor, max_new_tokens: int = 32) -> list[list[int]]:
        """Greedy decoding from <bos>; returns each caption's token ids (without bos/eos)."""
        prefix = self.bridge(self.image(images))
        b = images.shape[0]
        ids = torch.full((b, 1), BOS_ID, dtype=torch.long, device=images.device)
        done = torch.zeros(b, dtype=torch.bool, device=images.device)
        limit = min(max_new_tokens, self.config.max_len - 1)
        for _ in range(limit):
            logits = self.text.lm_logits(self.text(ids, prefix=prefix)[:, -1])
            nxt = logits.argmax(-1).masked_fill(done, PAD_ID)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            done |= nxt == EOS_ID
            if bool(done.all()):
                break
        out = []
        for row in ids[:, 1:].tolist():
            out.append(row[: row.index(EOS_ID)] if EOS_ID in row else [t for t in row if t])
        return out

"""Image backbones: a ViT-style patch transformer and a small CNN.

Images arrive as uint8 (B, C, H, W) from Ray Data (4x less to move than float) or as floats in
[-1, 1] (a GAN generator's output); `to_unit` maps both to [-1, 1] on the device.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from raypipe.models.transformer import Block, TransformerConfig


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]; floating input is taken to be in [-1, 1] already."""
    if images.dtype == torch.uint8:
        return images.float() / 127.5 - 1.0
    return images


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p*p*C), patches in the row-major order of a stride-p convolution."""
    b, c, h, w = images.shape
    p = patch_size
    x = images.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


@dataclass(frozen=True)
class ViTConfig:
    image_size: int = 32
    patch_size: int = 4
    channels: int = 3
    dim: int = 128
    num_layers: int = 4
    num_heads: int = 4
    mlp_ratio: int = 4
    dropout: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


class ViT(nn.Module):
    """Patch embedding + bidirectional transformer blocks: images -> patch states (B, N, dim).

    `embed` and `encode` are separate so masked-image modelling can encode the visible patches
    only (MAE).
    """

    config_class = ViTConfig
    modalities = ("image",)

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise ValueError(
                f"model.patch_size ({cfg.patch_size}) must divide model.image_size ({cfg.image_size})"
            )
        if cfg.dim % cfg.num_heads:
            raise ValueError(f"dim ({cfg.dim}) must be divisible by num_heads ({cfg.num_heads})")
        self.config = cfg
        self.num_patches = (cfg.image_size // cfg.patch_size) ** 2
        self.patch_embed = nn.Conv2d(
            cfg.channels, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size
        )
        self.pos_emb = nn.Parameter(torch.randn(1, self.num_patches, cfg.dim) * 0.02)
        block_cfg = TransformerConfig(
            vocab_size=1,
            dim=cfg.dim,
            num_layers=cfg.num_layers,
            num_heads=cfg.num_heads,
            max_len=self.num_patches,
            mlp_ratio=cfg.mlp_ratio,
            dropout=cfg.dropout,
            causal=False,
        )
        self.blocks = nn.ModuleList(Block(block_cfg) for _ in range(cfg.num_layers))
        self.ln_f = nn.LayerNorm(cfg.dim)

    @property
    def dim(self) -> int:
        return self.config.dim

    @property
    def patch_size(self) -> int:
        return self.config.patch_size

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(to_unit(images))  # (B, dim, H/p, W/p)
        return x.flatten(2).transpose(1, 2) + self.pos_emb

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            tokens = block(tokens, None)
        return self.ln_f(tokens)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode(self.embed(images))

    def pooled(self, batch: dict[str, torch.Tensor], pool: str = "mean") -> torch.Tensor:
        if pool != "mean":
            raise ValueError(f"image models pool by 'mean' only, got {pool!r}")
        return self(batch["image"]).mean(1)


@dataclass(frozen=True)
class CNNConfig:
    image_size: int = 32
    channels: int = 3
    dim: int = 128
    num_layers: int = 3
    dropout: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


class CNN(nn.Module):
    """Strided 4x4 convolutions (each halves the resolution) + global average pool -> (B, dim).

    Widths double up to `dim`. No batch norm, so it works as a GAN discriminator under DDP
    without synchronising statistics (group norm instead).
    """

    config_class = CNNConfig
    modalities = ("image",)

    def __init__(self, cfg: CNNConfig):
        super().__init__()
        if cfg.image_size < 2**cfg.num_layers:
            raise ValueError(
                f"model.layers ({cfg.num_layers}) halvings need image_size >= "
                f"{2**cfg.num_layers}, got {cfg.image_size}"
            )
        self.config = cfg
        widths = [max(8, cfg.dim // 2 ** (cfg.num_layers - 1 - i)) for i in range(cfg.num_layers)]
        layers: list[nn.Module] = []
        in_ch = cfg.channels
        for i, w in enumerate(widths):
            layers.append(nn.Conv2d(in_ch, w, kernel_size=4, stride=2, padding=1))
            if i > 0:
                layers.append(nn.GroupNorm(min(8, w // 4), w))
            layers.append(nn.LeakyReLU(0.2))
            in_ch = w
        self.features = nn.Sequential(*layers)
        self.proj = nn.Linear(in_ch, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)

    @property
    def dim(self) -> int:
        return self.config.dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.features(to_unit(images)).mean(dim=(2, 3))
        return self.proj(self.drop(x))

    def pooled(self, batch: dict[str, torch.Tensor], pool: str = "mean") -> torch.Tensor:
        if pool != "mean":
            raise ValueError(f"image models pool by 'mean' only, got {pool!r}")
        return self(batch["image"])

"""Masked-image modelling (MAE): hide most patches, encode the rest, reconstruct the hidden
pixels with a small decoder that only pretraining uses."""

from __future__ import annotations

import torch
from torch import nn

from raypipe.models.transformer import Block, TransformerConfig
from raypipe.models.vision import patchify, to_unit
from raypipe.objectives.base import Objective, require
from raypipe.objectives.losses import masked_patch_mse


class MaskedImage(Objective):
    data_kind = "images"
    unit = "images"

    def __init__(
        self,
        model,
        *,
        mask_ratio: float = 0.75,
        norm_pix: bool = True,
        decoder_dim: int | None = None,
        decoder_layers: int = 2,
        decoder_heads: int = 4,
    ):
        super().__init__(model)
        require(model, "masked_image", "embed", "encode", "patch_size", hint="use model.type: vit")
        if not 0 < mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        self.mask_ratio = mask_ratio
        self.norm_pix = norm_pix
        n = model.num_patches
        if int(n * (1 - mask_ratio)) < 1:
            raise ValueError(f"mask_ratio {mask_ratio} leaves no visible patch of {n}")
        ddim = decoder_dim or max(32, model.dim // 2)
        if ddim % decoder_heads:
            raise ValueError(f"decoder_heads ({decoder_heads}) must divide decoder_dim ({ddim})")
        cfg = TransformerConfig(
            vocab_size=1, dim=ddim, num_layers=decoder_layers, num_heads=decoder_heads,
            max_len=n, causal=False,
        )  # fmt: skip
        self.decoder_embed = nn.Linear(model.dim, ddim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, ddim))
        self.decoder_pos = nn.Parameter(torch.randn(1, n, ddim) * 0.02)
        self.decoder_blocks = nn.ModuleList(Block(cfg) for _ in range(decoder_layers))
        self.decoder_norm = nn.LayerNorm(ddim)
        p, c = model.patch_size, model.config.channels
        self.decoder_pred = nn.Linear(ddim, p * p * c)

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        images = batch["image"]
        tokens = self.model.embed(images)  # (B, N, D)
        b, n, d = tokens.shape
        keep = int(n * (1 - self.mask_ratio))
        # A random permutation per image: the first `keep` patches stay visible.
        order = torch.rand(b, n, device=tokens.device).argsort(dim=1)
        restore = order.argsort(dim=1)
        visible = tokens.gather(1, order[:, :keep, None].expand(-1, -1, d))
        latent = self.model.encode(visible)

        x = self.decoder_embed(latent)
        x = torch.cat([x, self.mask_token.expand(b, n - keep, -1).to(x.dtype)], dim=1)
        x = x.gather(1, restore[:, :, None].expand(-1, -1, x.shape[-1])) + self.decoder_pos
        for block in self.decoder_blocks:
            x = block(x, None)
        pred = self.decoder_pred(self.decoder_norm(x))

        mask = torch.ones(b, n, device=tokens.device)
        mask[:, :keep] = 0
        mask = mask.gather(1, restore)  # 1 where the patch was hidden, in image order
        target = patchify(to_unit(images), self.model.patch_size)
        return masked_patch_mse(pred, target, mask, norm_pix=self.norm_pix), {}

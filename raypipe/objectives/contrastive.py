"""Contrastive objectives: SimCLR (two views of an image) and CLIP (image-text pairs).

Both gather embeddings from every worker with gradients kept, so N workers optimise the same
loss as one worker holding the concatenated global batch.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from raypipe.objectives.base import Objective, require
from raypipe.objectives.losses import clip_loss, gather_with_grad, nt_xent


class SimCLR(Objective):
    data_kind = "image_views"
    unit = "images"

    def __init__(self, model, *, temperature: float = 0.5, proj_dim: int = 64):
        super().__init__(model)
        require(model, "simclr", "pooled", hint="use an image model (model.type: cnn or vit)")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature
        d = model.dim
        self.projection = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, proj_dim))

    def items_in(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["view1"].shape[0]

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        n = batch["view1"].shape[0]
        both = torch.cat([batch["view1"], batch["view2"]])  # one pass through the encoder
        z = self.projection(self.model.pooled({"image": both}))
        z1, z2 = gather_with_grad(z[:n]), gather_with_grad(z[n:])
        return nt_xent(z1, z2, self.temperature), {}


class CLIP(Objective):
    data_kind = "image_text"
    unit = "images"

    def __init__(self, model, *, embed_dim: int = 64, init_temperature: float = 0.07):
        super().__init__(model)
        require(model, "clip", "encode_image", "encode_text", hint="use model.type: clip")
        d = model.dim
        self.image_proj = nn.Linear(d, embed_dim, bias=False)
        self.text_proj = nn.Linear(d, embed_dim, bias=False)
        # Shape (1,), not a scalar: FSDP shards only parameters with a dimension.
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / init_temperature)))

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        img = gather_with_grad(self.image_proj(self.model.encode_image(batch["image"])))
        txt = gather_with_grad(self.text_proj(self.model.encode_text(batch["input_ids"].long())))
        # CLIP caps the scale at 100 so the softmax cannot collapse.
        scale = self.logit_scale.clamp(max=math.log(100.0))[0]
        return clip_loss(img, txt, scale), {"temperature": 1 / scale.detach().exp()}

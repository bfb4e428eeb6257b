"""The GAN generator (DCGAN-style). The discriminator is any image backbone plus a logit head,
owned by the GAN objective, so its feature extractor is what fine-tuning receives."""

from __future__ import annotations

import torch
from torch import nn


class Generator(nn.Module):
    """z (B, z_dim) -> images (B, C, S, S) in [-1, 1]; three 2x upsamplings from S/8."""

    def __init__(self, *, z_dim: int, image_size: int, channels: int, width: int = 64):
        super().__init__()
        if image_size % 8:
            raise ValueError(f"the GAN generator needs image_size divisible by 8, got {image_size}")
        self.z_dim = z_dim
        self.start = image_size // 8
        self.fc = nn.Linear(z_dim, 4 * width * self.start**2)
        self.width = width

        def up(cin: int, cout: int) -> list[nn.Module]:
            return [
                nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1),
                nn.BatchNorm2d(cout),
                nn.ReLU(),
            ]

        self.net = nn.Sequential(
            nn.BatchNorm2d(4 * width),
            nn.ReLU(),
            *up(4 * width, 2 * width),
            *up(2 * width, width),
            nn.ConvTranspose2d(width, channels, 4, stride=2, padding=1),
            nn.Tanh(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.fc(z).view(z.shape[0], 4 * self.width, self.start, self.start)
        return self.net(x)

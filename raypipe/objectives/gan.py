"""GAN: a generator and a discriminator (the backbone + a logit head), alternating updates.

Discriminator loss -[log D(x) + log(1 - D(G(z)))], generator loss -log D(G(z)) (the
non-saturating form). The objective owns its step: two optimizers, the discriminator first.
"""

from __future__ import annotations

import torch
from torch import nn

from raypipe.models.gan import Generator
from raypipe.objectives.base import Objective, require
from raypipe.objectives.losses import gan_discriminator_loss, gan_generator_loss


class GAN(Objective):
    data_kind = "images"
    unit = "images"
    owns_step = True
    #: Under DDP the generator gets no gradient in the discriminator's pass.
    find_unused_parameters = True

    def __init__(self, model, *, z_dim: int = 64, generator_width: int = 64):
        super().__init__(model)
        require(model, "gan", "pooled", hint="use an image model (model.type: cnn or vit)")
        cfg = model.config
        self.generator = Generator(
            z_dim=z_dim, image_size=cfg.image_size, channels=cfg.channels, width=generator_width
        )
        self.head = nn.Linear(model.dim, 1)

    def discriminate(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.model.pooled({"image": images})).squeeze(-1)

    def sample(self, n: int, device) -> torch.Tensor:
        return self.generator(torch.randn(n, self.generator.z_dim, device=device))

    def forward(self, batch: dict[str, torch.Tensor], phase: str = "discriminator"):
        real = batch["image"]
        if phase == "discriminator":
            fake = self.sample(real.shape[0], real.device).detach()
            real_logits, fake_logits = self.discriminate(real), self.discriminate(fake)
            stats = {
                "d_real": torch.sigmoid(real_logits.detach().float()).mean(),
                "d_fake": torch.sigmoid(fake_logits.detach().float()).mean(),
            }
            return gan_discriminator_loss(real_logits, fake_logits), stats
        fake_logits = self.discriminate(self.sample(real.shape[0], real.device))
        return gan_generator_loss(fake_logits), {}

    def param_groups(self) -> list[list[nn.Parameter]]:
        return [
            list(self.model.parameters()) + list(self.head.parameters()),
            list(self.generator.parameters()),
        ]

    def step(self, module, optimizers, micro_batches, *, grad_clip, autocast):
        """Discriminator step, then generator step; each over all micro-batches."""
        num = len(micro_batches)
        out = {}
        for phase, optimizer, params in zip(
            ("discriminator", "generator"), optimizers, self.param_groups(), strict=True
        ):
            optimizer.zero_grad(set_to_none=True)
            total = torch.zeros((), device=micro_batches[0]["image"].device)
            for batch in micro_batches:
                with autocast():
                    loss, stats = module(batch, phase=phase)
                (loss / num).backward()
                total += loss.detach() / num
                for k, v in stats.items():
                    out[k] = out.get(k, 0) + v.detach() / num
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            optimizer.step()
            out[f"{phase}_loss"] = total
        # The generator's loss is the headline: it is what the discriminator's progress fights.
        return out["generator_loss"], out

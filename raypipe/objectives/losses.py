"""The loss functions of the pretraining objectives, as plain functions of tensors.

Kept apart from the objectives so each is checked against an independent reference
computation (tests/test_losses.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F

IGNORE = -100


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` (B, ...) from every rank in rank order, keeping gradients.

    The backward of the gather sums each rank's gradient back into its own slice, so a loss
    computed on the gathered batch on every rank, with DDP averaging gradients over ranks,
    trains exactly like one worker holding the whole global batch. Identity without a
    process group.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return torch.cat(dist_fn.all_gather(x.contiguous()), dim=0)


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over positions whose target is not IGNORE. (B, T, V), (B, T)."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE)


def skipgram_loss(
    centres: torch.Tensor, contexts: torch.Tensor, negatives: torch.Tensor
) -> torch.Tensor:
    """Skip-gram with negative sampling, the mean over N pairs of
    -log sigmoid(centre . context) - sum_k log sigmoid(-centre . negative_k).
    centres, contexts: (N, D); negatives: (N, K, D). Zero when there are no pairs."""
    if centres.shape[0] == 0:
        return centres.sum() * 0.0 + contexts.sum() * 0.0 + negatives.sum() * 0.0
    pos = (centres * contexts).sum(-1).float()
    neg = torch.einsum("nd,nkd->nk", centres, negatives).float()
    return -(F.logsigmoid(pos) + F.logsigmoid(-neg).sum(-1)).mean()


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent over 2N views: each view's positive is its pair, the other 2N - 2
    views are negatives; mean over all 2N anchors. z1, z2: (N, D), not yet normalised."""
    z = F.normalize(torch.cat([z1, z2]).float(), dim=-1)
    n = z1.shape[0]
    sim = z @ z.T / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, targets)


def clip_loss(
    image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE: row i of images matches row i of texts. `logit_scale` is log(1/T)."""
    img = F.normalize(image_emb.float(), dim=-1)
    txt = F.normalize(text_emb.float(), dim=-1)
    logits = logit_scale.exp() * img @ txt.T
    targets = torch.arange(img.shape[0], device=img.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def masked_patch_mse(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, *, norm_pix: bool
) -> torch.Tensor:
    """MAE's loss: per-patch MSE averaged over masked patches only.

    pred, target: (B, N, P); mask: (B, N), 1 where the patch was hidden from the encoder.
    `norm_pix`: the target is each patch normalised by its own mean and variance.
    """
    target = target.float()
    if norm_pix:
        mean = target.mean(-1, keepdim=True)
        var = target.var(-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
    per_patch = ((pred.float() - target) ** 2).mean(-1)
    return (per_patch * mask).sum() / mask.sum()


def gan_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """-[log D(x) + log(1 - D(G(z)))], batch mean, with D = sigmoid(logit) computed stably."""
    return (F.softplus(-real_logits.float()) + F.softplus(fake_logits.float())).mean()


def gan_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """The non-saturating generator loss -log D(G(z)), batch mean."""
    return F.softplus(-fake_logits.float()).mean()

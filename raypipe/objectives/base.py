"""The Objective contract shared by every pretraining objective, raypipe's own and plugins'
(README: "Your own objective or task"; a complete one: examples/plugin/myext/objectives.py)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from raypipe import registry

#: What an objective reads, which decides the Ray Data pipeline that feeds it:
#: "text_blocks" packed token blocks -> input_ids; "images" -> image;
#: "image_views" two augmented views -> view1, view2; "image_text" -> image, input_ids.
DATA_KINDS = ("text_blocks", "images", "image_views", "image_text")


class Objective(nn.Module):
    """Wraps the model being pretrained and turns a batch into a loss.

    Being a module, an objective carries its own parameters (a learnable temperature, a
    projection head, an MAE decoder, a GAN generator) and DDP wraps it whole: `ddp(batch)`
    runs `forward` on every rank. Only `self.model` is the backbone handed to fine-tuning.

    - `data_kind`: one of DATA_KINDS; `text_extra`: tokens per text row beyond seq_len
      (a causal LM's blocks hold seq_len + 1 tokens: inputs and shifted targets).
    - `model_overrides`: model hyperparameters it requires (a causal LM needs `causal=True`).
    - `forward(batch) -> (loss, metrics)`: a scalar loss to minimise and scalar tensors to log
      (kept as tensors so the loop syncs with the host only when it logs).
    - `unit`: what throughput counts ("tokens" or "images"), `items_in(batch)` how many.
    - `owns_step`: the objective runs its own optimisation step (`step`) over the optimizers
      made from `param_groups()` — for alternating updates such as a GAN's.
    - Options: the constructor's keyword arguments after `model` are `pretrain.options`;
      raise ValueError for a bad value (a one-line config error, found before Ray starts).
    - Metrics: `forward`'s dict keys are logged as `train/<key>` (and `val/<key>` on held-out
      data); the loss itself is `train/loss`.
    - `revision`: raise it when the same options come to train something else (a changed
      default, say): a pretrain stage cached under an older revision then runs again. 0
      leaves stage fingerprints as they were.

    What `self.model` offers: a text backbone (`transformer`) is called as `model(input_ids)`
    -> hidden states (B, T, dim); `model.lm_logits(hidden)` -> vocabulary logits (tied);
    `model.pooled({"input_ids": ids}, "mean" | "last")` -> (B, dim); `model.dim`;
    `model.config` (vocab_size, max_len, ...). Image backbones: `model.pooled({"image": x})`,
    `model.dim`. Special token ids: raypipe.vocab (ids below NUM_SPECIAL are special).

    Checked on the driver before Ray starts (raypipe/probe.py): `forward` runs once on the
    `meta` device with a batch shaped as `data_kind` delivers it and must return (loss, metrics).
    """

    data_kind: ClassVar[str] = "text_blocks"
    text_extra: ClassVar[int] = 0
    model_overrides: ClassVar[dict[str, Any]] = {}
    unit: ClassVar[str] = "tokens"
    owns_step: ClassVar[bool] = False
    revision: ClassVar[int] = 0

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(
        self, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def param_groups(self) -> list[list[nn.Parameter]]:
        """One list of parameters per optimizer (one optimizer unless the objective owns its step)."""
        return [list(self.parameters())]

    def items_in(self, batch: dict[str, torch.Tensor]) -> int:
        """Throughput units in one batch: tokens of `input_ids`, or images."""
        if self.unit == "images":
            return next(iter(batch.values())).shape[0]
        ids = batch["input_ids"]
        return ids.shape[0] * (ids.shape[1] - self.text_extra)

    def step(self, module: nn.Module, optimizers, micro_batches, *, grad_clip, autocast):
        """Owners of their step implement this; see objectives/gan.py."""
        raise NotImplementedError


def require(model: nn.Module, objective: str, *attrs: str, hint: str) -> None:
    """Fail at build time (on the driver, before Ray) when the model lacks what we need."""
    missing = [a for a in attrs if not hasattr(model, a)]
    if missing:
        raise ValueError(
            f"objective '{objective}' needs a model with {missing} ({type(model).__name__} "
            f"has none); {hint}"
        )


def build_objective(
    name: str, model: nn.Module, options: dict[str, Any] | None = None
) -> Objective:
    cls = registry.resolve("objective", name)
    return cls(model, **(options or {}))

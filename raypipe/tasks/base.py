"""The Task contract shared by every fine-tuning task, raypipe's own and plugins' (README:
"Your own objective or task"; a complete one: examples/plugin/myext/tasks.py)."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from raypipe import registry
from raypipe.vocab import BOS_ID

#: The batch column each input modality arrives in.
INPUT_COLUMNS = {"text": "input_ids", "image": "image"}


class Task(nn.Module):
    """A backbone plus a task head.

    - `option_names`: the `finetune` settings its constructor takes (num_classes, pool, ...);
      setting one a task does not take is a config error, never a silent no-op.
    - `data_kind`: "labeled" (one input column + `label`, as `label_dtype`) or "pairs"
      (source text -> target text).
    - `model_overrides`: backbone hyperparameters it requires (translation decodes causally).
    - `forward(batch) -> (loss, stats)`: the mean loss to minimise and per-batch *sums*
      (including "count"), so statistics over many batches and ranks add up exactly.
    - `summarize(stats) -> metrics`: turns summed stats into the reported metrics;
      `metrics` names them, the first being the default sweep metric (as `val/<name>`).
    - `minimize`: the metrics where lower is better (the sweep's default mode, and which sign
      of the summary's gap is a win); others are higher-is-better.
    - Options: `option_names` are the `finetune` settings the constructor takes as keyword
      arguments (num_classes, pool, dropout, input); any other keyword argument comes from
      `finetune.options`. `input` ("text" | "image") names the batch column read
      (`self.input_column`: input_ids or image).
    - `predictor()`: a module mapping the raw input tensor to predictions, for serving;
      `serving_spec()` its input and output (name, dtype, shape with -1 for free dims).
      `predict` is exported with `torch.export` for the registered model: tensor operations
      only (no `.item()`, `.tolist()`, NumPy, or Python branches on tensor values).
    - `prediction`: what `raypipe predict` makes of `predict`'s output: "classes" (logits ->
      label and probabilities), "value" (one number per row), "tokens" (next-token logits,
      decoded greedily into text) or "raw" (the output as it is, a list per row).

    Checked on the driver before Ray starts (raypipe/probe.py): `forward` runs once on the
    `meta` device and must return (loss, stats); `summarize` must exist and report the sweep
    metric.
    """

    option_names: ClassVar[tuple[str, ...]] = ()
    metrics: ClassVar[tuple[str, ...] | None] = None  # None: any name (not checked)
    #: the metrics where lower is better (the sweep's default mode for them is "min")
    minimize: ClassVar[tuple[str, ...]] = ("loss",)
    #: the classical baseline beside the neural arms ("linear"; see raypipe/baselines.py)
    baseline: ClassVar[str | None] = None
    data_kind: ClassVar[str] = "labeled"
    label_dtype: ClassVar[str] = "int64"
    model_overrides: ClassVar[dict[str, Any]] = {}
    needs_tokenizer: ClassVar[bool] = False
    prediction: ClassVar[str] = "raw"

    def __init__(self, backbone: nn.Module, *, input: str = "text"):
        super().__init__()
        if input not in INPUT_COLUMNS:
            raise ValueError(f"input must be one of {list(INPUT_COLUMNS)}, got {input!r}")
        if input not in getattr(backbone, "modalities", ("text",)):
            raise ValueError(
                f"model {type(backbone).__name__} reads {list(backbone.modalities)}, not {input}"
            )
        self.backbone = backbone
        self.input = input
        self.input_column = INPUT_COLUMNS[input]

    def forward(
        self, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    @staticmethod
    def summarize(stats: dict[str, torch.Tensor]) -> dict[str, float]:
        raise NotImplementedError

    def predict(self, inputs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def predictor(self) -> nn.Module:
        return _Predictor(self)

    @property
    def unit(self) -> str:
        return "images" if self.input == "image" else "tokens"

    def items_in(self, batch: dict[str, torch.Tensor]) -> int:
        x = batch[self.input_column]
        return x.shape[0] if self.input == "image" else x.numel()

    def example_input(self) -> np.ndarray:
        if self.input == "image":
            cfg = self.backbone.config
            return np.zeros((2, cfg.channels, cfg.image_size, cfg.image_size), dtype=np.uint8)
        return np.full((2, 8), BOS_ID, dtype=np.int64)

    def serving_spec(self) -> dict[str, tuple]:
        example = self.example_input()
        shape = (-1, *example.shape[1:]) if self.input == "image" else (-1, -1)
        with torch.no_grad():
            out = self.predict(torch.as_tensor(example))
        out_shape = (-1, *out.shape[1:])
        return {
            "input": (self.input_column, example.dtype, shape),
            "output": (self.output_name, np.dtype(np.float32), out_shape),
        }

    output_name: ClassVar[str] = "logits"


class _Predictor(nn.Module):
    """The raw input tensor -> the task's predictions (what the registered model serves)."""

    def __init__(self, task: Task):
        super().__init__()
        self.task = task

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.task.predict(inputs)


def build_task(
    name: str,
    backbone: nn.Module,
    options: dict[str, Any] | None = None,
    *,
    tokenizer_json: str | None = None,
) -> Task:
    cls = registry.resolve("task", name)
    extra = {"tokenizer_json": tokenizer_json} if cls.needs_tokenizer else {}
    return cls(backbone, **(options or {}), **extra)

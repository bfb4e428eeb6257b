"""Model builders: `build_model(spec)` turns a `model.json` spec into a module."""

from __future__ import annotations

from typing import Any

from torch import nn

from raypipe import registry


def build_model(spec: dict[str, Any]) -> nn.Module:
    """`spec` is {"type": name, "config": {...}} as written to a checkpoint's `model.json`.

    A model class names its hyperparameter dataclass as `config_class`.
    """
    model_cls = registry.resolve("model", spec["type"])
    return model_cls(model_cls.config_class(**spec["config"]))

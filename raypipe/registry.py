"""Name -> factory registries, resolved lazily so the CLI and job drivers import fast.

A YAML value is either a registered name (`causal_lm`) or a user's own `"package.module:Name"`.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any

MODELS = {
    "transformer": "raypipe.models.transformer:Transformer",
    "vit": "raypipe.models.vision:ViT",
    "cnn": "raypipe.models.vision:CNN",
    "clip": "raypipe.models.multimodal:DualEncoder",
    "captioner": "raypipe.models.multimodal:Captioner",
}
OBJECTIVES = {
    "causal_lm": "raypipe.objectives.lm:CausalLM",
    "masked_lm": "raypipe.objectives.lm:MaskedLM",
    "masked_image": "raypipe.objectives.masked_image:MaskedImage",
    "simclr": "raypipe.objectives.contrastive:SimCLR",
    "clip": "raypipe.objectives.contrastive:CLIP",
    "captioning": "raypipe.objectives.captioning:Captioning",
    "gan": "raypipe.objectives.gan:GAN",
}
TASKS = {
    "classification": "raypipe.tasks.classification:Classification",
    "regression": "raypipe.tasks.regression:Regression",
    "translation": "raypipe.tasks.translation:Translation",
}


_KINDS = {"model": MODELS, "objective": OBJECTIVES, "task": TASKS}


def is_known(kind: str, name: str) -> bool:
    """True for a registered name or a well-formed `module:attr` reference (not imported here)."""
    if name in _KINDS[kind]:
        return True
    module, sep, attr = name.partition(":")
    return bool(sep and module and attr.isidentifier())


def unknown_message(kind: str, name: str) -> str:
    table = _KINDS[kind]
    close = difflib.get_close_matches(name, table, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return (
        f"unknown {kind} '{name}'; {hint}choose one of {sorted(table)} "
        "or give your own as 'package.module:Name'"
    )


def task_metrics(name: str) -> list[str] | None:
    """What `finetune.sweep.metric` may name for task `name`, as the task declares it
    (`Task.metrics`, on validation, plus the training loss), default first; None when the
    task cannot be loaded (the plan names that error)."""
    try:
        cls = resolve("task", name)
    except KeyError:
        return None
    declared = getattr(cls, "metrics", None)
    return None if declared is None else [f"val/{m}" for m in declared] + ["train/loss"]


def task_baseline(name: str) -> str | None:
    """The classical baseline task `name` declares (`Task.baseline`), if any."""
    try:
        return getattr(resolve("task", name), "baseline", None)
    except KeyError:
        return None


def resolve(kind: str, name: str) -> Any:
    """Import and return the object registered (or referenced) as `name`."""
    if not is_known(kind, name):
        raise KeyError(unknown_message(kind, name))
    target = _KINDS[kind].get(name, name)
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
        return getattr(module, attr)
    except (ImportError, AttributeError) as e:
        raise KeyError(f"cannot load {kind} '{name}' ({target}): {e}") from e

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
    "bag": "raypipe.models.bag:BagOfEmbeddings",
}
OBJECTIVES = {
    "causal_lm": "raypipe.objectives.lm:CausalLM",
    "masked_lm": "raypipe.objectives.lm:MaskedLM",
    "masked_image": "raypipe.objectives.masked_image:MaskedImage",
    "simclr": "raypipe.objectives.contrastive:SimCLR",
    "clip": "raypipe.objectives.contrastive:CLIP",
    "captioning": "raypipe.objectives.captioning:Captioning",
    "gan": "raypipe.objectives.gan:GAN",
    "skipgram": "raypipe.objectives.skipgram:SkipGram",
}
TASKS = {
    "classification": "raypipe.tasks.classification:Classification",
    "regression": "raypipe.tasks.regression:Regression",
    "translation": "raypipe.tasks.translation:Translation",
}


_KINDS = {"model": MODELS, "objective": OBJECTIVES, "task": TASKS}
#: What each kind must be a subclass of (imported when a plugin is resolved).
_BASES = {
    "model": "torch.nn:Module",
    "objective": "raypipe.objectives.base:Objective",
    "task": "raypipe.tasks.base:Task",
}
#: The `module:Class` plugins the pipeline file itself names (see `trust`): the only ones a
#: file raypipe did not write (a checkpoint's model.json) may name.
_TRUSTED: set[str] = set()


def trust(*names: str | None) -> None:
    """Plugins named by the user's pipeline file: a checkpoint may name these too."""
    _TRUSTED.update(n for n in names if n and ":" in n)


def check_named_by_file(kind: str, name: Any, where: str) -> None:
    """A name read from a file (a checkpoint's model.json) may be a registered one, or a plugin
    the pipeline file names; anything else is refused before it is imported."""
    if isinstance(name, str) and (name in _KINDS[kind] or name in _TRUSTED):
        return
    raise KeyError(
        f"{where} names the {kind} {name!r}, which is neither raypipe's own nor a plugin your "
        "pipeline file names: not importing it (name the plugin in the pipeline file to trust it)"
    )


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


def task_minimizes(name: str, metric: str) -> bool | None:
    """Whether task `name` declares lower-is-better for `metric` (`Task.minimize`); None
    when the task cannot be loaded."""
    try:
        cls = resolve("task", name)
    except KeyError:
        return None
    return metric.split("/", 1)[-1] in getattr(cls, "minimize", ())


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
    found = _import(target, f"cannot load {kind} '{name}' ({target})")
    if name not in _KINDS[kind]:
        base = _import(_BASES[kind], f"cannot load the {kind} base class")
        if not (isinstance(found, type) and issubclass(found, base)):
            what = f"the {type(found).__name__} {target}" if not isinstance(found, type) else target
            raise KeyError(
                f"{kind} '{name}' is {what}, not a subclass of {base.__module__}."
                f"{base.__qualname__}; name your {kind} class as 'package.module:Class'"
            )
    return found


def _import(target: str, failure: str) -> Any:
    module_name, _, attr = target.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except ModuleNotFoundError as e:
        hint = (
            "; list the package folder under `plugins:` in the pipeline file"
            if e.name == module_name.split(".")[0]
            else ""
        )
        raise KeyError(f"{failure}: {e}{hint}") from e
    except SyntaxError as e:
        raise KeyError(f"{failure}: syntax error in {e.filename}, line {e.lineno}: {e.msg}") from e
    except Exception as e:  # noqa: BLE001 - a plugin's import may raise anything
        raise KeyError(f"{failure}: {type(e).__name__}: {e}") from e

"""A dry run of the objective and the task on the `meta` device, before Ray starts.

`make_plan` builds both on `meta` (no memory, no compute); here each also runs `forward` on a
batch shaped as its data kind delivers it, so a plugin whose `forward` returns the wrong type,
reads a column the batch does not hold, or a task without `summarize` or without the sweep
metric is one line naming the class and the fix, not a worker traceback after full epochs.

A model may use what the `meta` device cannot run (a value read back with `.item()`, say):
then that part of the dry run is skipped, never reported as the user's mistake.
"""

from __future__ import annotations

from typing import Any

import torch

from raypipe.errors import UserError

_B = 2  # rows in a probe batch


def _meta(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def _image(cfg: dict) -> torch.Tensor:
    return _meta((_B, cfg.get("channels", 3), cfg["image_size"], cfg["image_size"]), torch.uint8)


def objective_batch(kind: str, model_cfg: dict, seq_len: int, extra: int) -> dict:
    """What the pretraining pipeline of `kind` hands `forward` (see data/kinds.py)."""
    ids = _meta((_B, seq_len + extra), torch.long)
    if kind == "text_blocks":
        return {"input_ids": ids}
    if kind == "images":
        return {"image": _image(model_cfg)}
    if kind == "image_views":
        return {"view1": _image(model_cfg), "view2": _image(model_cfg)}
    return {"image": _image(model_cfg), "input_ids": ids}  # image_text


def _is_meta_limit(e: BaseException) -> bool:
    """An error from the meta device itself (not from the user's code)."""
    text = str(e).lower()
    return "meta" in text or isinstance(e, NotImplementedError) and "not implemented" in text


def _pair(out: Any) -> bool:
    return (
        isinstance(out, tuple)
        and len(out) == 2
        and isinstance(out[0], torch.Tensor)
        and out[0].dim() == 0
        and isinstance(out[1], dict)
        and all(isinstance(v, torch.Tensor) for v in out[1].values())
    )


def _run_forward(module, base, batch: dict, key: str, name: str) -> Any:
    """`module(batch)` on meta, or None where meta cannot run it; a UserError for a bug."""
    if type(module).forward is base.forward:
        raise UserError(f"{key}: {name} does not implement forward(batch) -> (loss, metrics)")
    try:
        with torch.no_grad():
            return module(batch)
    except NotImplementedError as e:
        if _is_meta_limit(e):
            return None
        raise UserError(f"{key}: {name}.forward raised NotImplementedError: {e}") from None
    except KeyError as e:
        raise UserError(
            f"{key}: {name}.forward reads the batch column {e}, which its data kind does not "
            f"deliver (the batch holds {sorted(batch)})"
        ) from None
    except Exception as e:  # noqa: BLE001 - a plugin may raise anything
        if _is_meta_limit(e):
            return None
        raise UserError(
            f"{key}: {name}.forward failed on a batch of {sorted(batch)}: {type(e).__name__}: {e}"
        ) from None


def check_objective(objective, model_cfg: dict, seq_len: int, key: str) -> None:
    from raypipe.objectives.base import Objective

    name = type(objective).__name__
    if objective.owns_step:
        return  # its step, not forward, is what the loop runs
    batch = objective_batch(objective.data_kind, model_cfg, seq_len, objective.text_extra)
    out = _run_forward(objective, Objective, batch, key, name)
    if out is not None and not _pair(out):
        raise UserError(
            f"{key}: {name}.forward returned {_describe(out)}; it must return (loss, metrics): "
            "a scalar loss tensor and a dict of scalar tensors"
        )


def _describe(out: Any) -> str:
    if isinstance(out, tuple):
        return f"a tuple of {[type(x).__name__ for x in out]}"
    if isinstance(out, torch.Tensor):
        return f"a tensor of shape {tuple(out.shape)}"
    return f"a {type(out).__name__}"


def task_batch(task, model_cfg: dict, seq_len: int) -> dict:
    """What the fine-tuning pipeline hands the task's `forward` (see data/kinds.py)."""
    if task.data_kind == "pairs":
        return {"input_ids": _meta((_B, seq_len), torch.long),
                "target_start": _meta((_B,), torch.long)}  # fmt: skip
    column = task.input_column
    x = _image(model_cfg) if task.input == "image" else _meta((_B, seq_len), torch.long)
    return {column: x, "label": _meta((_B,), getattr(torch, task.label_dtype))}


def check_task(task, model_cfg: dict, seq_len: int, metric: str | None, key: str) -> None:
    """forward -> (loss, summed stats); summarize(stats) -> metrics holding the sweep metric."""
    from raypipe.tasks.base import Task

    cls, name = type(task), type(task).__name__
    if cls.summarize is Task.summarize:
        raise UserError(
            f"{key}: task {name} does not implement summarize(stats) -> metrics (see "
            "raypipe/tasks/base.py)"
        )
    task.eval()
    out = _run_forward(task, Task, task_batch(task, model_cfg, seq_len), key, name)
    if out is None:
        return
    if not _pair(out):
        raise UserError(
            f"{key}: {name}.forward returned {_describe(out)}; it must return (loss, stats): "
            "a scalar loss tensor and a dict of summed scalar tensors"
        )
    stats = {k: torch.ones(v.shape, dtype=torch.float64, device="cpu") for k, v in out[1].items()}
    try:
        metrics = cls.summarize(stats)
    except Exception as e:  # noqa: BLE001
        raise UserError(
            f"{key}: {name}.summarize failed on the stats forward returns ({sorted(stats)}): "
            f"{type(e).__name__}: {e}"
        ) from None
    if not isinstance(metrics, dict):
        raise UserError(f"{key}: {name}.summarize returned a {type(metrics).__name__}, not a dict")
    if metric and metric.startswith("val/") and metric[4:] not in metrics:
        raise UserError(
            f"finetune.sweep.metric: '{metric}' is not reported by task {name} (it reports "
            f"{sorted('val/' + m for m in metrics)}); choose one of those"
        )

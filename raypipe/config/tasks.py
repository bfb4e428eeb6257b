"""Several fine-tuning tasks in one pipeline: each task seen as a pipeline of its own.

`finetune` is one section, or a mapping of named tasks (`schema.FinetuneTask`), each with its
own labeled data. Every part of raypipe that fine-tunes reads one `cfg.finetune` and one
`cfg.data.labeled`; a `TaskView` is the pipeline as one task sees it (that task's section and
data in those places, its registered model in `tracking`), so the same code serves both forms.
Messages about a view name the task's keys (`finetune.sst2.batch_size`), through `rekey`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from raypipe.config.schema import FinetuneConfig, PipelineConfig
from raypipe.errors import UserError


@dataclass(frozen=True)
class TaskView:
    """One fine-tuning task: its name, the pipeline as it sees it, its stage's name."""

    name: str  # the pipeline's name in the single-section form
    cfg: PipelineConfig
    stage: str  # "finetune", or "finetune-<task>" among several
    several: bool  # one of several named tasks

    def rekey(self, text: str) -> str:
        return rekey(text, self.name) if self.several else text


def has_tasks(cfg: PipelineConfig) -> bool:
    """Whether `finetune` is a mapping of named tasks."""
    return isinstance(cfg.finetune, dict)


def registered_name(cfg: PipelineConfig, task: str) -> str:
    """A named task's registered model by default: `<pipeline's registered name>-<task>`."""
    return f"{cfg.tracking.registered_model or cfg.name}-{task}"


def task_views(cfg: PipelineConfig) -> list[TaskView]:
    """The pipeline as each fine-tuning task sees it, in the order the file lists them ([]
    without a finetune section)."""
    if cfg.finetune is None:
        return []
    if not has_tasks(cfg):
        return [TaskView(cfg.name, cfg, "finetune", False)]
    views = []
    for name, task in cfg.finetune.items():
        tracking = cfg.tracking.model_copy(
            update={"registered_model": task.registered_model or registered_name(cfg, name)}
        )
        data = cfg.data.model_copy(update={"labeled": task.data})
        one = cfg.model_copy(update={"finetune": task, "data": data, "tracking": tracking})
        views.append(TaskView(name, one, f"finetune-{name}", True))
    return views


def without_tasks(cfg: PipelineConfig) -> PipelineConfig:
    """The pipeline with no fine-tuning: what pretraining sees."""
    return cfg.model_copy(update={"finetune": None})


def all_tasks(cfg: PipelineConfig) -> list[FinetuneConfig]:
    return [v.cfg.finetune for v in task_views(cfg)]


_FINETUNE_KEY = re.compile(r"(?<![\w.])finetune(?=[.:])")
_LABELED_KEY = re.compile(r"(?<![\w.])data\.labeled\b")


def rekey(text: str, task: str) -> str:
    """A message about one task's view, in the pipeline file's keys: `finetune.x` ->
    `finetune.<task>.x`, `data.labeled` -> `finetune.<task>.data`."""
    text = _FINETUNE_KEY.sub(f"finetune.{task}", text)
    return _LABELED_KEY.sub(f"finetune.{task}.data", text)


def rekeyed(view: TaskView, error: UserError) -> UserError:
    """`error` from a task's view, naming the pipeline file's keys."""
    if not view.several:
        return error
    return UserError(view.rekey(str(error)))

"""Rules that span several config keys, checked after the schema; the defaults that depend on
other keys (seq_len, the sweep metric and mode, the baseline, ...) are filled in here too."""

from __future__ import annotations

import difflib
from pathlib import Path

from pydantic import ValidationError

from raypipe import registry, storage
from raypipe.config.schema import (
    TUNABLE,
    Distribution,
    FinetuneConfig,
    FinetuneOptimizer,
    InitEvery,
    PipelineConfig,
)
from raypipe.config.tasks import has_tasks, task_views


def cross_checks(cfg: PipelineConfig) -> list[str]:
    """Rules that span several keys; filled-in defaults are resolved here too."""
    problems: list[str] = []
    m = cfg.model
    if not registry.is_known("model", m.type):
        problems.append(f"model.type: {registry.unknown_message('model', m.type)}")
    if m.type != "cnn" and m.dim % m.heads:
        problems.append(f"model.heads: must divide model.dim ({m.dim}), got {m.heads}")
    if cfg.pretrain is None and cfg.finetune is None:
        problems.append("pretrain, finetune: give at least one stage")
    if cfg.pretrain is not None:
        problems.extend(_pretrain_checks(cfg))
    if has_tasks(cfg):
        problems.extend(_tasks_checks(cfg))
    elif cfg.finetune is not None:
        problems.extend(_finetune_checks(cfg))
    problems.extend(_budget_checks(cfg))
    cfg.tracking.experiment = cfg.tracking.experiment or cfg.name
    cfg.tracking.registered_model = cfg.tracking.registered_model or cfg.name
    return problems


def _budget_checks(cfg: PipelineConfig) -> list[str]:
    b = cfg.budget
    if b.pretrain_worker_hours is not None and cfg.pretrain is None:
        return ["budget.pretrain_worker_hours: this pipeline does not pretrain; remove it"]
    if b.finetune_worker_hours is not None and cfg.finetune is None:
        return ["budget.finetune_worker_hours: this pipeline does not fine-tune; remove it"]
    both = cfg.pretrain is not None and cfg.finetune is not None
    split = b.pretrain_worker_hours is not None or b.finetune_worker_hours is not None
    if b.worker_hours is not None and both and not split:
        return ["budget.worker_hours: say how it splits between the stages: set "
                "budget.pretrain_worker_hours or budget.finetune_worker_hours too"]  # fmt: skip
    return []


def _probe_checks(cfg: PipelineConfig) -> list[str]:
    p = cfg.pretrain
    problems = []
    if p.probe.every % p.checkpoint_every:
        problems.append(
            f"pretrain.probe.every: {p.probe.every} is not a multiple of "
            f"pretrain.checkpoint_every ({p.checkpoint_every}); each probe reads that step's "
            "checkpoint"
        )
    if cfg.finetune is None:
        problems.append("pretrain.probe: estimates the fine-tuning tasks; add a finetune section")
    if p.probe.patience is None and p.probe.min_delta:
        problems.append("pretrain.probe.min_delta: has no effect without probe.patience; remove it")
    return problems


def _tasks_checks(cfg: PipelineConfig) -> list[str]:
    """Several named tasks: each task's own checks, in its keys; distinct registered names."""
    problems: list[str] = []
    if cfg.data.labeled is not None:
        problems.append(
            "data.labeled: with several finetune tasks, each task has its own labeled data; "
            f"move it to finetune.<task>.data (tasks: {list(cfg.finetune)})"
        )
    names: dict[str, str] = {}
    for view in task_views(cfg):
        problems.extend(view.rekey(p) for p in _finetune_checks(view.cfg))
        registered = view.cfg.tracking.registered_model
        view.cfg.finetune.registered_model = registered
        if registered in names:
            problems.append(
                f"finetune.{view.name}.registered_model: '{registered}' is also task "
                f"'{names[registered]}'s; give each task its own registered model"
            )
        names[registered] = view.name
    return problems


def _init_steps_checks(cfg: PipelineConfig) -> list[str]:
    """finetune.init_steps: each a pretraining checkpoint that will exist."""
    f, p = cfg.finetune, cfg.pretrain
    if f.init_steps is None:
        return []
    if f.init != "pretrain" or p is None:
        return ["finetune.init_steps: picks checkpoints of this pipeline's pretraining; it needs "
                "init: pretrain and a pretrain section"]  # fmt: skip
    if isinstance(f.init_steps, InitEvery):
        gap = f.init_steps.every * p.checkpoint_every
        f.init_steps = [*range(gap, p.max_steps, gap), "last"]
        if len(f.init_steps) == 1:
            return [f"finetune.init_steps: every {gap} steps gives no checkpoint before the last "
                    f"(pretrain.max_steps = {p.max_steps}); lower every, or list the steps"]  # fmt: skip
    problems = []
    for step in (s for s in f.init_steps if s != "last"):
        if step > p.max_steps:
            problems.append(
                f"finetune.init_steps: step {step} is beyond pretrain.max_steps ({p.max_steps}); "
                "no checkpoint will exist there"
            )
        elif step % p.checkpoint_every and step != p.max_steps:
            below = step - step % p.checkpoint_every
            near = [n for n in (below, below + p.checkpoint_every) if 0 < n <= p.max_steps]
            problems.append(
                f"finetune.init_steps: no checkpoint is written at step {step} (checkpoints "
                f"come every pretrain.checkpoint_every = {p.checkpoint_every} steps); use "
                + " or ".join(str(n) for n in near)
            )
        elif step == p.max_steps and "last" in f.init_steps and p.keep == "last":
            problems.append(
                f"finetune.init_steps: step {step} is the last checkpoint, listed as 'last' too; "
                "remove one"
            )
    return problems


def _pretrain_checks(cfg: PipelineConfig) -> list[str]:
    problems: list[str] = []
    m = cfg.model
    p = cfg.pretrain
    if cfg.data.unlabeled is None:
        problems.append("data.unlabeled: required by the pretrain stage")
    if not registry.is_known("objective", p.objective):
        problems.append(f"pretrain.objective: {registry.unknown_message('objective', p.objective)}")
    has_validation = (
        cfg.data.unlabeled_validation is not None or cfg.data.unlabeled_holdout is not None
    )
    if cfg.data.unlabeled_validation is not None and cfg.data.unlabeled_holdout is not None:
        problems.append(
            "data.unlabeled_holdout: give held-out data once, as data.unlabeled_validation "
            "or as a share of data.unlabeled; remove one"
        )
    if not has_validation and (p.eval_every is not None or p.keep == "best"):
        key = "pretrain.eval_every" if p.eval_every is not None else "pretrain.keep"
        problems.append(
            f"{key}: needs held-out unlabeled data (data.unlabeled_validation or "
            "data.unlabeled_holdout)"
        )
    if p.eval_every is not None and p.eval_every > p.max_steps:
        problems.append(
            f"pretrain.eval_every: {p.eval_every} is beyond pretrain.max_steps "
            f"({p.max_steps}); lower it"
        )
    if p.probe is not None:
        problems.extend(_probe_checks(cfg))
    if has_validation and p.eval_every is None:
        p.eval_every = min(p.checkpoint_every, p.max_steps)
    p.seq_len = p.seq_len or m.max_len
    # Causal LM blocks hold seq_len + 1 tokens; the model sees seq_len of them.
    if p.seq_len > m.max_len:
        problems.append(
            f"pretrain.seq_len: must be <= model.max_len ({m.max_len}), got {p.seq_len}"
        )
    return problems


def _finetune_checks(cfg: PipelineConfig) -> list[str]:
    problems: list[str] = []
    m = cfg.model
    f = cfg.finetune
    if cfg.data.labeled is None:
        problems.append("data.labeled: required by the finetune stage")
    if not registry.is_known("task", f.task):
        problems.append(f"finetune.task: {registry.unknown_message('task', f.task)}")
    if f.init == "pretrain" and cfg.pretrain is None:
        problems.append(
            "finetune.init: 'pretrain' needs a pretrain stage; add one, or set init to "
            "'scratch' or a checkpoint directory"
        )
    if f.init_directory is not None:
        # A checkpoint in an object store is checked when the plan reads its model.json.
        if not storage.is_remote(f.init) and not Path(f.init).is_dir():
            problems.append(
                f"finetune.init: checkpoint directory '{f.init}' does not exist; point it "
                "at a checkpoint raypipe wrote (<storage>/<name>/pretrain-*/train/step-*)"
            )
        if cfg.pretrain is not None:
            problems.append(
                "finetune.init: a checkpoint directory takes the place of this pipeline's "
                "pretrain stage; remove the pretrain section or set init to 'pretrain'"
            )
    if f.compare_scratch and f.init == "scratch":
        problems.append("finetune.compare_scratch: has no effect when init is 'scratch'; remove it")
    if f.compare_scratch is None:
        f.compare_scratch = f.init != "scratch"
    if f.init_directory is None:  # else the checkpoint's model decides (raypipe/plan.py)
        f.max_len = f.max_len or m.max_len
    if f.max_len is not None and f.init_directory is None and f.max_len > m.max_len:
        problems.append(
            f"finetune.max_len: must be <= model.max_len ({m.max_len}), got {f.max_len}"
        )
    problems.extend(_sweep_checks(f))
    problems.extend(_init_steps_checks(cfg))
    if f.resample_labels and (f.repeats == 1 or min(f.label_fractions) == 1):
        problems.append(
            "finetune.resample_labels: has no effect without finetune.repeats above 1 and a "
            "label fraction below 1; remove it"
        )
    known = registry.task_baseline(f.task)
    if f.baseline == "linear" and known != "linear":
        problems.append(
            f"finetune.baseline: task '{f.task}' has no classical baseline; remove it or "
            "set it to none"
        )
    f.baseline = f.baseline or known or "none"
    return problems


def _sweep_checks(f: FinetuneConfig) -> list[str]:
    """The sweep's space, search and metric; the metric and mode default from the task."""
    problems: list[str] = []
    for key in f.sweep.space:
        if key not in TUNABLE:
            close = difflib.get_close_matches(key, TUNABLE, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            problems.append(
                f"finetune.sweep.space.{key}: not a tunable setting; {hint}tunable: {list(TUNABLE)}"
            )
            continue
        problems.extend(_check_space_values(key, f.sweep.space[key]))
    s = f.sweep
    grids = [k for k, d in s.space.items() if d.kind == "grid"]
    if s.search == "optuna" and grids:
        problems.append(
            f"finetune.sweep.space: optuna cannot search grid dimensions {grids}; use choice"
        )
    if s.scheduler == "pbt" and not s.space:
        problems.append("finetune.sweep.space: pbt needs a search space to perturb")
    if s.scheduler == "pbt" and s.search == "optuna":
        problems.append(
            "finetune.sweep.search: pbt picks its own settings; use search: random with pbt"
        )
    metrics = registry.task_metrics(f.task)
    s.metric = s.metric or (metrics[0] if metrics else "val/loss")
    if s.mode is None:
        declared = registry.task_minimizes(f.task, s.metric)
        lower_is_better = declared or s.metric.endswith(("loss", "mse", "mae", "error"))
        s.mode = "min" if lower_is_better else "max"
    if metrics is not None and f.sweep.metric not in metrics:
        problems.append(
            f"finetune.sweep.metric: '{f.sweep.metric}' is not reported by task "
            f"'{f.task}'; choose one of {metrics}"
        )
    return problems


def _check_space_values(key: str, dist: Distribution) -> list[str]:
    """Each value a sweep may pick for `key` must be a valid value of that setting; values are
    coerced as the setting itself would be (YAML reads `1e-3`, without a dot, as a string)."""
    owner = FinetuneOptimizer if key in FinetuneOptimizer.model_fields else FinetuneConfig
    values = list(getattr(dist, dist.kind))
    coerced = []
    for value in values:
        try:
            coerced.append(getattr(owner.model_validate({key: value}), key))
        except ValidationError as e:
            why = e.errors()[0]["msg"]
            return [f"finetune.sweep.space.{key}: {value!r} is not a valid {key} ({why})"]
    if dist.kind in ("choice", "grid"):
        setattr(dist, dist.kind, coerced)
    return []

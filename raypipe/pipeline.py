"""Run a pipeline: preflight, then each stage through the stage cache, then publishing, then
the summary, under one MLflow run tree.

Every check that needs no cluster runs first (raypipe/preflight.py), before Ray starts; Ray
starts only when a stage has work to do (stages/connect.py). Each stage owns its whole stage
(stages/pretrain.py, stages/finetune.py): its fingerprint, its Ray wiring, its typed result.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import astuple

from raypipe import progress, timing, tracking
from raypipe.config import PipelineConfig, to_yaml
from raypipe.config.tasks import TaskView, has_tasks, task_views, without_tasks
from raypipe.errors import find_user_error
from raypipe.preflight import (
    Checked,
    RunContext,
    dataset_inputs,
    model_spec_for,
    preflight,
    tokenizer_json,
)
from raypipe.stages import cache, finetune, pretrain, probing, publish
from raypipe.stages.connect import RayConnection
from raypipe.stages.worker_budget import finetune_share_s, pipeline_spent, pretrain_share_s
from raypipe.summary import ARTIFACT as SUMMARY_ARTIFACT
from raypipe.summary import Summary, TaskResult
from raypipe.summary import to_json as summary_to_json


def _log_pipeline_inputs(cfg: PipelineConfig, ctx: RunContext, parent: tracking.RunRef) -> None:
    tracking.log_text(parent, to_yaml(cfg), "config/pipeline.yaml")
    tracking.RunLogger(parent).log_params(cfg.model_dump(mode="json"))
    if not has_tasks(cfg):
        tracking.log_datasets(parent, dataset_inputs(cfg, ctx))
        return
    inputs = dataset_inputs(cfg, ctx, only=("pretrain", "pretrain-validation"))
    for view in task_views(cfg):
        inputs += dataset_inputs(view.cfg, ctx.task(view.name), prefix=f"{cfg.name}-{view.name}",
                                 only=("train", "validation", "test"))  # fmt: skip
    tracking.log_datasets(parent, inputs)


def _milestones(cfg: PipelineConfig) -> tuple[int, ...]:
    """The pretraining steps some task fine-tunes from (finetune.init_steps), ascending."""
    steps = {s for v in task_views(cfg) for s in v.cfg.finetune.pretrain_steps if s is not None}
    return tuple(sorted(steps))


def _reached(steps: list[int | None], pre) -> list[int | None]:
    """The init_steps pretraining got to: the probe (probe.patience) may have stopped it first;
    the arms of the steps it never reached are left out, and said so."""
    if not pre.stopped_by_probe:
        return steps
    beyond = [s for s in steps if s is not None and s > pre.steps]
    if beyond:
        progress.console.line(f"[finetune] pretraining stopped at step {pre.steps} (the probe's "
                     f"patience): no arm for step(s) {beyond}")  # fmt: skip
    return [s for s in steps if s not in beyond]


def _run_task(view: TaskView, ctx: RunContext, pre, parent, pipeline_fp, ray_conn, budget_s):
    """One fine-tuning task from the pretraining `pre` (None: none in this pipeline), spending
    at most `budget_s` worker-seconds (None: no budget): its result and its stage's outcome."""
    cfg, f = view.cfg, view.cfg.finetune
    if pre is not None:
        tokenizer, spec, upstream = pre.tokenizer_json, pre.model_spec, pre.fingerprint
    else:
        tokenizer = tokenizer_json(cfg, ctx)
        spec, upstream = model_spec_for(cfg, ctx, tokenizer), None
    if f.init == "scratch":
        init_ckpts = ()
    elif f.init_directory is not None:
        init_ckpts = ((None, f.init_directory),)
    else:
        key = view.rekey("finetune.init_steps")
        init_ckpts = tuple((s, pre.start_from(s, key)) for s in _reached(f.pretrain_steps, pre))
    result, outcome = finetune.run_stage(
        view, ctx, parent, ray_conn,
        tokenizer_json=tokenizer, spec=spec, init_ckpts=init_ckpts,
        upstream=upstream or f.init, pipeline_fp=pipeline_fp, worker_budget_s=budget_s,
    )  # fmt: skip
    rows = {a.arm.label: a.to_dict() for a in result.arms}
    publish.log_label_efficiency(cfg, parent, rows, task=view.name if view.several else None)
    return TaskResult(f.sweep.metric, f.sweep.mode, rows, result.model.to_dict()), outcome


def _task_demand(view: TaskView) -> dict[str, float]:
    """The most one task's sweep holds at once: its concurrent trials' training workers."""
    f = view.cfg.finetune
    per_worker = {"CPU": f.scaling.cpus_per_worker, "GPU": 1.0 if f.scaling.use_gpu else 0.0,
                  **f.scaling.resources_per_worker}  # fmt: skip
    runs = f.scaling.num_workers * f.sweep.max_concurrent_trials
    return {k: v * runs for k, v in per_worker.items() if v}


def side_by_side(views: list[TaskView], capacity: dict[str, float]) -> int:
    """How many tasks' sweeps run at once: as many as the cluster holds with each task's
    sweep at its fullest (finetune.sweep.max_concurrent_trials trials), at least one."""
    widest = {}
    for view in views:
        for k, v in _task_demand(view).items():
            widest[k] = max(widest.get(k, 0.0), v)
    fits = [int(capacity.get(k, 0.0) // v) for k, v in widest.items()]
    return max(1, min([len(views), *fits]))


def _run_tasks(views: list[TaskView], ctx, pre, parent, pipeline_fp, ray_conn, budget_s) -> list:
    """Every task, [(result, outcome)] in their order: side by side where the cluster holds
    several tasks' sweeps at once (threads on this driver, each driving its own Tune sweeps),
    else one after another. A task that fails lets the others finish (their stages are
    kept), then its error is raised."""
    width = side_by_side(views, ray_conn.capacity()) if len(views) > 1 else 1
    run = [(v, ctx.task(v.name), pre, parent, pipeline_fp, ray_conn, budget_s) for v in views]
    if width == 1:
        return [_run_task(*args) for args in run]
    progress.console.line(f"[finetune] {len(views)} tasks, {width} at a time: the cluster holds "
                          f"{width} tasks' sweeps at once")  # fmt: skip
    with ThreadPoolExecutor(width, thread_name_prefix="raypipe-task") as pool:
        futures = [pool.submit(_run_task, *args) for args in run]
        wait(futures)
    return [f.result() for f in futures]


def _run_stages(cfg, ctx, parent, pipeline_fp, ray_conn, summary: Summary) -> None:
    """Pretraining (if any), then each fine-tuning task from it (if any), each cached, each
    within its worker-hour budget (if any)."""
    pre, views = None, task_views(cfg)
    if cfg.pretrain is not None:
        probes = [probing.ProbeTask(v.name, v.cfg, c.train, c.validation)
                  for v in views for c in [ctx.task(v.name)]]  # fmt: skip
        pre, outcome = pretrain.run_stage(
            without_tasks(cfg), ctx, parent, ray_conn, milestones=_milestones(cfg),
            probe_tasks=probes if cfg.pretrain.probe is not None else [],
            worker_budget_s=pretrain_share_s(cfg, len(views)),
        )  # fmt: skip
        summary.stages.append(outcome)
    pre_spent = (pre.worker_spent_s or 0.0) if pre is not None else 0.0
    budget_s = finetune_share_s(cfg, len(views), pre_spent) if views else None
    tasks = _run_tasks(views, ctx, pre, parent, pipeline_fp, ray_conn, budget_s)
    for view, (task, outcome) in zip(views, tasks, strict=True):
        if view.several:
            summary.tasks[view.name] = task
        else:
            summary.metric, summary.mode, summary.arms, summary.model = astuple(task)
        summary.stages.append(outcome)
    if has_tasks(cfg):
        publish.log_scoreboard(cfg, parent, summary)
    summary.budget = pipeline_spent(cfg, pre_spent, [task.arms for task, _ in tasks])


def run_pipeline(
    cfg: PipelineConfig,
    *,
    address: str | None = None,
    verbose: bool = False,
    checked: Checked | None = None,
) -> Summary:
    """The whole pipeline; `checked`: preflight's input checks, when the caller made them."""
    started = time.perf_counter()
    progress.in_driver()  # training run in this process prints straight to the console
    ctx = preflight(cfg, address=address, checked=checked)
    parent, pipeline_fp = cache.pipeline_run(cfg, ctx)
    summary = Summary(cfg.name, parent.run_id, ctx.tracking_uri, str(ctx.storage))
    ray_conn = RayConnection(cfg, address=address, verbose=verbose)
    timing.mark("checks")
    try:
        _log_pipeline_inputs(cfg, ctx, parent)
        _run_stages(cfg, ctx, parent, pipeline_fp, ray_conn, summary)
        publish.log_headline(parent, summary)
        publish.log_budget(parent, summary.budget)
        summary.seconds = time.perf_counter() - started
        tracking.RunLogger(parent).log_metrics({"pipeline/seconds": summary.seconds}, 0)
        tracking.log_text(parent, summary_to_json(summary), SUMMARY_ARTIFACT)
        tracking.end_run(parent)
    except BaseException as e:
        tracking.end_run(parent, "FAILED")
        if isinstance(e, Exception):
            # A user's mistake found inside a Ray task or worker arrives wrapped by Ray.
            user = find_user_error(e)
            if user is not None and user is not e:
                raise user from None
        raise
    finally:
        progress.in_driver(False)
        timing.MARKS.clear()  # a later run in this process starts its own count
        ray_conn.close()
    return summary

"""Run a pipeline: preflight, then each stage through the stage cache, then publishing, then
the summary, under one MLflow run tree.

Every check that needs no cluster runs first (raypipe/preflight.py), before Ray starts; Ray
starts only when a stage has work to do (stages/connect.py). Each stage owns its whole stage
(stages/pretrain.py, stages/finetune.py): its fingerprint, its Ray wiring, its typed result.
"""

from __future__ import annotations

import time

from raypipe import progress, timing, tracking
from raypipe.config import PipelineConfig, to_yaml
from raypipe.errors import find_user_error
from raypipe.preflight import (
    Checked,
    RunContext,
    dataset_inputs,
    model_spec_for,
    preflight,
    tokenizer_json,
)
from raypipe.stages import cache, finetune, pretrain, publish
from raypipe.stages.connect import RayConnection
from raypipe.summary import ARTIFACT as SUMMARY_ARTIFACT
from raypipe.summary import Summary
from raypipe.summary import to_json as summary_to_json


def _log_pipeline_inputs(cfg: PipelineConfig, ctx: RunContext, parent: tracking.RunRef) -> None:
    tracking.log_text(parent, to_yaml(cfg), "config/pipeline.yaml")
    tracking.RunLogger(parent).log_params(cfg.model_dump(mode="json"))
    tracking.log_datasets(parent, dataset_inputs(cfg, ctx))


def _run_stages(cfg, ctx, parent, pipeline_fp, ray_conn, summary: Summary) -> None:
    """Pretraining (if any), then fine-tuning from it (if any), each cached."""
    init_ckpt, upstream = None, None
    if cfg.pretrain is not None:
        pre, outcome = pretrain.run_stage(cfg, ctx, parent, ray_conn)
        summary.stages.append(outcome)
        tokenizer, spec = pre.tokenizer_json, pre.model_spec
        init_ckpt, upstream = pre.checkpoint, pre.fingerprint
    else:
        tokenizer = tokenizer_json(cfg, ctx)
        spec = model_spec_for(cfg, ctx, tokenizer)
    if cfg.finetune is None:
        return
    f = cfg.finetune
    if f.init == "scratch":
        init_ckpt = None
    elif f.init_directory is not None:
        init_ckpt = f.init_directory
    result, outcome = finetune.run_stage(
        cfg, ctx, parent, ray_conn,
        tokenizer_json=tokenizer, spec=spec, init_ckpt=init_ckpt,
        upstream=upstream or f.init, pipeline_fp=pipeline_fp,
    )  # fmt: skip
    rows = {a.arm.label: a.to_dict() for a in result.arms}
    summary.metric, summary.arms, summary.model = f.sweep.metric, rows, result.model.to_dict()
    summary.mode = f.sweep.mode
    publish.log_label_efficiency(cfg, parent, rows)
    summary.stages.append(outcome)


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

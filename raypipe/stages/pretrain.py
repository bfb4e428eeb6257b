"""The pretraining stage, whole: its fingerprint, Ray Data's stream into Ray Train (workers,
or the driver under Ray Train's local mode), and its outputs as a `PretrainResult`.

The dataset pipeline is defined once on the driver (data/pipelines.py); each worker runs the
plain-PyTorch loop of engine/pretrain_loop.py over a `TrainSession`.
"""

from __future__ import annotations

import os
import socket
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Any

import ray
import ray.train
import torch
from ray.data import ExecutionOptions, ExecutionResources
from ray.train import CheckpointConfig, DataConfig, FailureConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from raypipe import faults, storage, timing, tracking
from raypipe.config import (
    PipelineConfig,
    PreprocessConfig,
    PretrainConfig,
    ProbeConfig,
    Source,
)
from raypipe.data import files as datafiles
from raypipe.data.pipelines import (
    STREAM_AHEAD_BYTES,
    Holdout,
    Tally,
    build_dataset,
    data_footprint,
    mix_pass,
    mixed_dataset,
    passes_per_epoch,
)
from raypipe.engine.checkpoint import (
    TOKENIZER_FILE,
    has_file,
    latest_checkpoint,
    read_meta,
    read_spec,
    read_tokenizer,
)
from raypipe.engine.pretrain_loop import CHECKPOINT_PREFIX, PretrainJob, pretrain_loop
from raypipe.errors import UserError, find_user_error
from raypipe.preflight import RunContext, dataset_inputs, model_spec_for, tokenizer_json
from raypipe.progress import console, progress
from raypipe.stages import cache, probing, publish
from raypipe.stages.budget import WORKER_FILE, read_budget, spends_text, worker_hours
from raypipe.stages.checkpoint_models import CheckpointRecorder, record_checkpoints
from raypipe.stages.connect import RayConnection
from raypipe.stages.sessions import TrainSession, scaling_config
from raypipe.stages.worker_budget import StageClock
from raypipe.summary import StageOutcome
from raypipe.system_metrics import system_metrics
from raypipe.tracking import RunRef, Tag


@dataclass(frozen=True)
class PretrainResult:
    checkpoint: str  # what fine-tuning starts from: the last checkpoint, or (keep: best) the best
    steps: int
    final_loss: float
    fingerprint: str
    skipped_images: int | None = None  # None: not skipping (data.bad_images: fail)
    checkpoint_step: int | None = None  # the step of `checkpoint`
    best_val_loss: float | None = None  # the lowest validation loss (None: no validation data)
    #: step -> checkpoint kept for fine-tuning to start from (finetune.init_steps)
    milestones: dict[int, str] = field(default_factory=dict)
    #: the probe's figures at the last step it probed ("probe/<task>/accuracy" -> value)
    probe: dict[str, float] = field(default_factory=dict)
    #: stopped before max_steps by pretrain.probe.patience
    stopped_by_probe: bool = False
    #: stopped before max_steps by its worker-hour budget
    stopped_by_budget: bool = False
    #: with a worker-hour budget: its limit and what pretraining spent, in worker-seconds
    worker_limit_s: float | None = None
    worker_spent_s: float | None = None

    def to_marker(self) -> dict[str, Any]:
        out = {"checkpoint": self.checkpoint, "steps": self.steps, "final_loss": self.final_loss}
        optional = {"skipped_images": self.skipped_images, "checkpoint_step": self.checkpoint_step,
                    "best_val_loss": self.best_val_loss,
                    "milestones": {str(k): v for k, v in self.milestones.items()} or None,
                    "probe": self.probe or None,
                    "stopped_by_probe": self.stopped_by_probe or None,
                    "stopped_by_budget": self.stopped_by_budget or None,
                    "worker_limit_s": self.worker_limit_s,
                    "worker_spent_s": self.worker_spent_s}  # fmt: skip
        return out | {k: v for k, v in optional.items() if v is not None}

    @classmethod
    def from_marker(cls, marker: dict[str, Any], fingerprint: str) -> PretrainResult:
        return cls(
            marker["checkpoint"], marker["steps"], marker["final_loss"], fingerprint,
            marker.get("skipped_images"), marker.get("checkpoint_step"),
            marker.get("best_val_loss"),
            {int(k): v for k, v in (marker.get("milestones") or {}).items()},
            marker.get("probe") or {}, bool(marker.get("stopped_by_probe")),
            bool(marker.get("stopped_by_budget")), marker.get("worker_limit_s"),
            marker.get("worker_spent_s"),
        )  # fmt: skip

    @property
    def stopped_early(self) -> str | None:
        """Why pretraining stopped before max_steps, in the config's words (None: it did not)."""
        if self.stopped_by_probe:
            return "pretrain.probe.patience"
        return "its worker-hour budget" if self.stopped_by_budget else None

    def start_from(self, step: int | None, key: str) -> str:
        """The checkpoint of pretraining step `step` (None: the one fine-tuning starts from by
        default); `key` names the setting that asked for it."""
        if step is None:
            return self.checkpoint
        if step not in self.milestones and self.stopped_early and step > self.steps:
            raise UserError(
                f"{key}: pretraining stopped at step {self.steps} ({self.stopped_early}), "
                f"before step {step}; ask for steps up to {self.steps}, or "
                + ("remove the patience" if self.stopped_by_probe else "raise the budget")
            )
        if step not in self.milestones:
            kept = sorted(self.milestones) or "none"
            raise UserError(
                f"{key}: the completed pretraining stage kept no checkpoint at step {step} (it "
                f"keeps the steps asked for when it runs; it kept {kept}); ask for those, or "
                "remove its directory to pretrain again"
            )
        return self.milestones[step]

    @property
    def tokenizer_json(self) -> str | None:
        return (
            read_tokenizer(self.checkpoint) if has_file(self.checkpoint, TOKENIZER_FILE) else None
        )

    @property
    def model_spec(self) -> dict[str, Any]:
        spec = read_spec(self.checkpoint)
        return {"type": spec["type"], "config": spec["config"]}


def fingerprint(cfg: PipelineConfig, ctx: RunContext, worker_budget_s: float | None = None) -> str:
    return cache.fingerprint(
        "pretrain",
        cfg.model.model_dump(),
        cfg.tokenizer.model_dump(),
        cfg.pretrain.fingerprinted(),
        cfg.data.unlabeled.fingerprinted(),
        cfg.data.bad_images,
        cfg.seed,
        datafiles.manifest_digest(ctx.unlabeled),
        # Held-out data changes what is kept (keep: best) and, held out of the unlabeled rows,
        # what is trained on; absent, the parts stay as they were.
        *(
            [cfg.data.unlabeled_validation.model_dump(),
             datafiles.manifest_digest(ctx.unlabeled_validation)]
            if cfg.data.unlabeled_validation is not None else []
        ),
        *([{"holdout": cfg.data.unlabeled_holdout}] if cfg.data.unlabeled_holdout else []),
        # An objective whose options came to mean something else (see Objective.revision).
        *([{"revision": r}] if (r := getattr(ctx.plan.objective, "revision", 0)) else []),
        # A worker-hour budget may cut it (budget.pretrain_worker_hours, budget.worker_hours).
        *([{"worker_budget_s": worker_budget_s}] if worker_budget_s is not None else []),
    )  # fmt: skip


def run_stage(
    cfg: PipelineConfig,
    ctx: RunContext,
    parent: RunRef,
    ray_conn: RayConnection,
    *,
    milestones: tuple[int, ...] = (),
    probe_tasks: list[probing.ProbeTask] = (),
    worker_budget_s: float | None = None,
) -> tuple[PretrainResult, StageOutcome]:
    """Pretrain, or reuse the completed stage with the same fingerprint; `milestones`: the
    steps whose checkpoints fine-tuning starts from, kept for good (they change what is kept,
    not what is computed: not in the fingerprint); `worker_budget_s`: what it may spend."""
    fp = fingerprint(cfg, ctx, worker_budget_s)
    with cache.open_stage(cfg, ctx, parent, "pretrain", fp, before_work=ray_conn.ensure) as stage:
        if stage.marker is None:
            result = _train_stage(cfg, ctx, stage, local_ray=ray_conn.local,
                                  milestones=milestones, probe_tasks=list(probe_tasks),
                                  worker_budget_s=worker_budget_s)  # fmt: skip
            stage.complete(result.to_marker())
        else:
            result = PretrainResult.from_marker(stage.marker, fp)
        # A reused stage's run carries the same outcome as the run that computed it.
        skipped = (
            {} if result.skipped_images is None else {"data/skipped_images": result.skipped_images}
        )
        logger = tracking.RunLogger(stage.run)
        logger.log_metrics({"final/loss": result.final_loss, **skipped}, result.steps)
        logger.set_tags({Tag.CHECKPOINT: result.checkpoint})
        tracking.log_datasets(
            stage.run, dataset_inputs(cfg, ctx, only=("pretrain", "pretrain-validation"))
        )
        publish.plot_pretraining(cfg, stage)
        publish.plot_probe(cfg, stage)
        record_checkpoints(stage.run, storage.join(stage.dir, "train"), kind="pretrain")
    metrics = {"steps": result.steps, "final loss": round(result.final_loss, 4)}
    if result.stopped_by_probe:
        metrics["stopped"] = f"by the probe, of {cfg.pretrain.max_steps}"
    if result.stopped_by_budget:
        metrics["stopped"] = f"by its budget, of {cfg.pretrain.max_steps}"
    if result.worker_limit_s is not None:
        metrics["budget"] = spends_text(worker_limit_s=result.worker_limit_s,
                                        worker_spent_s=result.worker_spent_s)  # fmt: skip
    if result.probe:
        metrics["probe"] = ", ".join(
            f"{k.removeprefix('probe/')} {v:.4f}" for k, v in result.probe.items()
        )
    if result.best_val_loss is not None:
        metrics["best val/loss"] = round(result.best_val_loss, 4)
        metrics["kept step"] = result.checkpoint_step
    if result.skipped_images is not None:
        metrics["skipped images"] = result.skipped_images
    return result, stage.outcome(metrics)


def _train_stage(cfg: PipelineConfig, ctx: RunContext, stage: cache.Stage, *, local_ray: bool,
                 milestones: tuple[int, ...], probe_tasks: list[probing.ProbeTask],
                 worker_budget_s: float | None):  # fmt: skip
    p = cfg.pretrain
    tokenizer = tokenizer_json(cfg, ctx)
    spec = model_spec_for(cfg, ctx, tokenizer)
    probe = None
    if p.probe is not None and probe_tasks:
        found = probing.samples(probe_tasks, p.probe, tokenizer_json=tokenizer,
                                model_config=spec["config"])  # fmt: skip
        probe = (p.probe, found) if found else None
    tracking.RunLogger(stage.run).log_params(
        {"fingerprint": stage.fingerprint, "model": spec["config"], **p.model_dump()}
    )
    return train(
        cfg=p,
        model_spec=spec,
        files=ctx.unlabeled,
        groups=[files for _, files in ctx.sources.get("unlabeled", [])],
        validation=(ctx.unlabeled_validation, cfg.data.unlabeled_validation),
        holdout=cfg.data.unlabeled_holdout,
        source=cfg.data.unlabeled,
        data_kind=ctx.plan.pretrain_kind,
        text_extra=ctx.plan.objective.text_extra,
        tokenizer_json=tokenizer,
        stage_dir=stage.dir,
        run=stage.run,
        seed=cfg.seed,
        fingerprint=stage.fingerprint,
        preprocess=cfg.data.preprocess,
        skip_undecodable=cfg.data.bad_images == "skip",
        local_ray=local_ray,
        milestones=milestones,
        probe=probe,
        system_metrics_s=cfg.tracking.system_metrics_s,
        worker_budget_s=worker_budget_s,
    )


def _train_worker(config: dict[str, Any]):
    """Ray Train's entry point on every worker (or the driver, in local mode)."""
    job: PretrainJob = config["job"]
    recorder = CheckpointRecorder(config["run"]) if config["run"] is not None else None
    session = TrainSession(
        config["run"],
        checkpoints=job.checkpoint_dir,
        prefix=CHECKPOINT_PREFIX,
        keep_here=config["in_process"],
        num_to_keep=job.cfg.num_checkpoints_to_keep,
        recorder=recorder,
    )
    ctx = ray.train.get_context()
    node = f"{socket.gethostname()}-rank{session.rank}"  # one monitor per node: its first rank
    every = job.system_metrics_s if ctx.get_local_rank() == 0 else None
    try:
        with system_metrics(config["run"], every_s=every, node=node):
            outcome = pretrain_loop(job, session)
    finally:
        if recorder is not None:
            recorder.close()  # the checkpoints' records, queued for MLflow
    session.logger.close()  # waits for metrics queued while the tracking server was away
    return outcome


def in_process(cfg: PretrainConfig, *, local_ray: bool) -> bool:
    """Whether pretraining runs in this process (see `pretrain.scaling.in_process`)."""
    sc = cfg.scaling
    if sc.in_process != "auto":
        return sc.in_process
    return local_ray and sc.num_workers == 1 and not sc.use_gpu and cfg.strategy == "ddp"


def _fit_in_process(trainer: TorchTrainer, cfg: PretrainConfig):
    """`trainer.fit()` in this process with the worker's torch threads, and Ray Train's
    failure policy kept: after an error the loop starts again from the latest checkpoint in
    storage, up to `max_failures` times. A user's mistake is not retried."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))  # as Ray gives a worker
    try:
        for attempt in range(cfg.max_failures + 1):
            try:
                return trainer.fit()
            except Exception as e:
                if attempt == cfg.max_failures or find_user_error(e) is not None:
                    raise
                progress(
                    f"pretrain failed ({type(e).__name__}: {e}); starting again from the latest "
                    f"checkpoint ({attempt + 1} of {cfg.max_failures} restarts)"
                )
    finally:
        torch.set_num_threads(threads)


def _ingest(name: str, cfg: PretrainConfig, *, streamed: bool, cpu: float | None = None):
    """How Ray Data runs dataset `name` into training: in read order (a seeded run sees the
    same data in the same order), and a streamed training stream at most STREAM_AHEAD_BYTES
    per worker ahead of the trainer (backpressure: reading and tokenizing keep pace with the
    steps instead of racing the training step for the CPUs)."""
    ahead = STREAM_AHEAD_BYTES * cfg.scaling.num_workers if streamed and name == "train" else None
    limits = ExecutionResources.for_limits(cpu=cpu, object_store_memory=ahead)
    return ExecutionOptions(preserve_order=True, resource_limits=limits)


def _limit_to_driver(datasets: dict, cfg: PretrainConfig, *, streamed: bool) -> None:
    """Ray Train's local mode gives the loop the datasets themselves: set what DataConfig and
    the worker's placement would (`_ingest`; the CPU this process trains on is not Ray
    Data's, though Ray never reserved it: at least one CPU stays, never a deadlock). The
    context is each dataset's own (a copy made when it was read), not Ray's global."""
    cpus = max(ray.cluster_resources().get("CPU", 1.0) - cfg.scaling.cpus_per_worker, 1.0)
    for name, ds in datasets.items():
        ds.context.execution_options = _ingest(name, cfg, streamed=streamed, cpu=cpus)


def _trainer(job: PretrainJob, run, datasets, *, here: bool, stage_dir: str,
             streamed: bool) -> TorchTrainer:  # fmt: skip
    cfg = job.cfg
    return TorchTrainer(
        _train_worker,
        train_loop_config={"job": job, "run": run, "in_process": here},
        # num_workers=0: Ray Train's local mode, the loop runs in this process.
        scaling_config=ScalingConfig(num_workers=0) if here else scaling_config(cfg.scaling),
        run_config=ray.train.RunConfig(
            name="train",
            storage_path=stage_dir,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.num_checkpoints_to_keep),
            # A node reclaimed with notice (spot) restarts the run from the checkpoint written
            # on the notice; those restarts are not counted against max_failures.
            failure_config=FailureConfig(max_failures=cfg.max_failures, max_preemption_failures=-1),
        ),
        datasets=datasets,
        dataset_config=DataConfig(
            execution_options={n: _ingest(n, cfg, streamed=streamed) for n in datasets}
        ),
    )


def _datasets(files, *, source, validation, holdout, seed, tally, footprint, passes, mix, common):
    """{"train": the stream, "validation": held-out rows (a share of the same rows, or other
    files) when there are any}: each built by `build_dataset` with the `common` arguments;
    with `mix` (each path's files, their footprints), the stream mixes the paths by weight."""
    training = {"source": source, "bad_image_tally": tally, "passes": passes,
                "holdout": Holdout(holdout, seed, keep=False) if holdout else None}  # fmt: skip
    if mix is not None:
        groups, footprints = mix
        stream = mixed_dataset(groups, source.weights, footprints=footprints, **training, **common)
    else:
        stream = build_dataset(files, footprint=footprint, **training, **common)
    datasets = {"train": stream}
    if holdout:  # the held-out share of the same rows, one pass per evaluation
        datasets["validation"] = build_dataset(
            files, source=source, holdout=Holdout(holdout, seed, keep=True), **common
        )
    elif validation[0]:  # held-out files, one pass per evaluation
        datasets["validation"] = build_dataset(validation[0], source=validation[1], **common)
    return datasets


def train(
    *,
    cfg: PretrainConfig,
    model_spec: dict[str, Any],
    files: list[str],
    source: Source,
    data_kind: str,
    groups: list[list[str]] | None = None,
    validation: tuple[list[str], Source | None] = ([], None),
    holdout: float | None = None,
    text_extra: int,
    tokenizer_json: str | None,
    stage_dir: str,
    run: RunRef | None,
    seed: int,
    fingerprint: str,
    preprocess: PreprocessConfig | None = None,
    skip_undecodable: bool = False,
    local_ray: bool = False,
    milestones: tuple[int, ...] = (),
    probe: tuple[ProbeConfig, list] | None = None,
    system_metrics_s: float | None = None,
    worker_budget_s: float | None = None,
) -> PretrainResult:
    """Train on `files` (less a `holdout` share of their rows, scored on instead of the
    `validation` files), mixed by `source.weights` over `groups` (each listed path's files)
    when it has weights; `local_ray`: Ray is the embedded one this process started, so one CPU
    worker may train right here (`pretrain.scaling.in_process`)."""
    tally = Tally.remote() if skip_undecodable else None
    here = in_process(cfg, local_ray=local_ray)
    timing.mark("setup")
    footprint = data_footprint(files, kind=data_kind, source=source)  # read once: both agree
    block = cfg.seq_len + text_extra
    world = cfg.scaling.num_workers
    mix = None
    if groups is not None and getattr(source, "weights", None):
        mix = (groups, [data_footprint(g, kind=data_kind, source=source) for g in groups])
    one_pass = mix_pass(mix[1], source.weights, data_kind) if mix else None
    passes = passes_per_epoch(footprint, kind=data_kind, cfg=cfg, block_size=block, world=world,
                              one_pass=one_pass)  # fmt: skip
    datasets = _datasets(
        files, source=source, validation=validation, holdout=holdout, seed=seed, tally=tally,
        footprint=footprint, passes=passes, mix=mix,
        common={"kind": data_kind, "tokenizer_json": tokenizer_json, "seq_len": cfg.seq_len,
                "text_extra": text_extra, "model_config": model_spec["config"],
                "preprocess": preprocess},
    )  # fmt: skip
    timing.mark("dataset")
    train_dir = storage.join(stage_dir, "train")
    if here:
        _limit_to_driver(datasets, cfg, streamed=not footprint.small)
    job = PretrainJob(
        cfg=cfg, model_spec=model_spec, tokenizer_json=tokenizer_json, seed=seed,
        fingerprint=fingerprint, checkpoint_dir=train_dir, best_dir=storage.join(stage_dir, "best"),
        run_id=run.run_id if run is not None else None, passes=passes,
        # Driver milestones, when this process is `raypipe run` (see raypipe/timing.py).
        startup={"start": timing.process_start(), **timing.MARKS} if "imports" in timing.MARKS else {},
        faults=os.environ.get(faults.ENV, ""),
        milestones=tuple(milestones), milestone_dir=storage.join(stage_dir, "milestones"),
        probe_every=probe[0].every if probe else None, probe_dir=storage.join(stage_dir, "probe"),
        stop_file=(storage.join(stage_dir, "probe", probing.STOP_FILE)
                   if probe and probe[0].patience else None),
        system_metrics_s=system_metrics_s,
    )  # fmt: skip
    budget = read_budget(worker_budget_s, stage_dir, WORKER_FILE)
    if budget is not None and budget.left_s <= 0:  # spent before the driver restarted
        console.line(f"[pretrain] its worker-hour budget was spent before this run "
                     f"({worker_hours(budget.spent_s)} of {worker_hours(budget.limit_s)}): no "
                     "more steps; it ends at its latest checkpoint")  # fmt: skip
        return _result(job, None, stage_dir, milestones=milestones, probes={}, skipped=None,
                       budget=(budget, budget.spent_s))  # fmt: skip
    result, probes, spent = _fit_within(budget, job, run, datasets, here=here, probe=probe,
                                        stage_dir=stage_dir, streamed=not footprint.small)  # fmt: skip
    outcome = result.return_value
    if outcome is not None and outcome.error:
        raise UserError(outcome.error)
    return _result(job, outcome, stage_dir, milestones=milestones, probes=probes,
                   skipped=ray.get(tally.get.remote()) if tally is not None else None,
                   error=result.error, budget=(budget, spent) if budget else None)  # fmt: skip


def _fit_within(budget, job: PretrainJob, run, datasets, *, here: bool, probe, stage_dir: str,
                streamed: bool):  # fmt: skip
    """Train within the stage's worker-hour `budget` (None: none), its clock running: the
    training result, the probe's figures, and the worker-seconds spent (None: no budget)."""
    if budget is not None and budget.spent_s > 0:
        console.line(f"[pretrain] its worker-hour budget: {worker_hours(budget.left_s)} left of "
                     f"{worker_hours(budget.limit_s)} ({worker_hours(budget.spent_s)} spent "
                     "before this run)")  # fmt: skip
    workers = 1 if here else job.cfg.scaling.num_workers
    with StageClock(budget, stage_dir, workers=workers) if budget else nullcontext() as clock:
        job = replace(job, deadline=clock.deadline()) if clock else job
        trainer = _trainer(job, run, datasets, here=here, stage_dir=stage_dir, streamed=streamed)
        result, probes = _fit_and_probe(trainer, job, here=here, probe=probe, run=run)
    return result, probes, clock.spent_s() if clock else None


def _result(job: PretrainJob, outcome, stage_dir: str, *, milestones, probes, skipped,
            error=None, budget=None):  # fmt: skip
    """What pretraining left in storage, checked: its newest whole checkpoint (Ray Train's
    record can lag one behind), the one fine-tuning starts from, the kept milestones;
    `budget`: its worker-hour budget and what it spent, when it has one."""
    cfg = job.cfg
    found = latest_checkpoint(job.checkpoint_dir, prefix=CHECKPOINT_PREFIX)
    if found is None and budget is not None and outcome is None and error is None:
        raise UserError(
            f"budget: pretraining's worker-hours ({worker_hours(budget[0].limit_s)}) were "
            "spent before its first checkpoint; raise budget.pretrain_worker_hours or "
            "budget.worker_hours"
        )
    if found is None:
        raise RuntimeError(f"pretraining ended without a checkpoint ({error})")
    checkpoint = storage.qualify(found[0], like=stage_dir)
    meta = read_meta(checkpoint)
    stopped = job.stop_file is not None and storage.is_file(job.stop_file)
    cut = (budget is not None and meta["step"] < cfg.max_steps and not stopped
           and (outcome is None or outcome.stopped_by_budget))  # fmt: skip
    if meta["step"] != cfg.max_steps and not stopped and not cut:
        raise RuntimeError(f"pretraining stopped at step {meta['step']} of {cfg.max_steps}")
    kept = latest_checkpoint(job.best_dir, prefix=CHECKPOINT_PREFIX) if cfg.keep == "best" else None
    chosen = storage.qualify(kept[0], like=stage_dir) if kept else checkpoint
    return PretrainResult(
        checkpoint=chosen,
        steps=int(meta["step"]),
        final_loss=float(outcome.final_loss if outcome is not None else meta["loss"]),
        fingerprint=job.fingerprint,
        skipped_images=skipped,
        checkpoint_step=int(read_meta(chosen)["step"]),
        best_val_loss=meta.get("best_val_loss"),
        milestones=_milestones(
            job.milestone_dir, [s for s in milestones if s <= meta["step"]], like=stage_dir
        ),
        probe=next((v for v in reversed(probes.values()) if v), {}),
        stopped_by_probe=meta["step"] < cfg.max_steps and not cut,
        stopped_by_budget=cut,
        worker_limit_s=budget[0].limit_s if budget else None,
        worker_spent_s=budget[1] if budget else None,
    )


def _fit_and_probe(trainer: TorchTrainer, job: PretrainJob, *, here: bool, probe, run):
    """Train (here, or on Train's workers) with the probe beside it when there is one: the
    training result, and the probe's {step: figures}."""
    watcher = None
    if probe is not None:  # beside training, on checkpoints as they appear
        watcher = probing.Watcher(job.probe_dir, CHECKPOINT_PREFIX, probe[0], probe[1], run,
                                  job.seed, stop_file=job.stop_file).start()  # fmt: skip
    try:
        result = _fit_in_process(trainer, job.cfg) if here else trainer.fit()
    finally:
        probes = watcher.finish() if watcher is not None else {}
    return result, probes


def _milestones(directory: str, steps: tuple[int, ...], *, like: str) -> dict[int, str]:
    """{step: its kept checkpoint} for each of `steps`, all of which must be there."""
    out = {}
    for step in steps:
        path = storage.join(directory, f"{CHECKPOINT_PREFIX}{step:08d}")
        if read_meta(path)["step"] != step:
            raise RuntimeError(f"the checkpoint kept at {path} is not of step {step}")
        out[step] = storage.qualify(path, like=like)
    return out

"""The fine-tuning loop of one trial: plain PyTorch over a `Session` (see engine/session.py).

Build the backbone (weights only from the init checkpoint: a new head and a fresh optimizer),
put the task's head on it, resume or continue (PBT) where a checkpoint says, then epoch after
epoch: train, validate, log, and hand the session a checkpoint when the sweep metric improves
(every epoch under PBT). A node reclaim notice (spot preemption) writes a checkpoint inside the
epoch, which a restarted trial resumes from (engine/reclaim.py). The same loop runs in a Tune
trial's process, in TorchTrainer workers (DDP) and, without Ray, in the tests and benchmarks.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import torch

from raypipe import faults
from raypipe.config import FinetuneConfig
from raypipe.engine import reclaim
from raypipe.engine.checkpoint import (
    load_task,
    load_train_state,
    load_weights,
    read_meta,
    rng_state,
    save_checkpoint,
    save_into,
    set_rng_state,
)
from raypipe.engine.optim import build_optimizer, warmup_cosine
from raypipe.engine.reclaim import RECLAIM_PREFIX, EpochPoint, same_settings, wait_for_reclaim
from raypipe.engine.session import Session
from raypipe.engine.step import (
    Meter,
    NonFiniteLoss,
    SkippedSteps,
    all_reduce_sum,
    evaluate,
    inject_fault,
    train_step,
)
from raypipe.errors import UserError
from raypipe.models import build_model
from raypipe.progress import progress
from raypipe.tasks import build_task

#: A trial's checkpoints are `<trials>/<run name>/epoch-0003`.
CHECKPOINT_PREFIX = "epoch-"
#: Validation batch size (evaluation holds no gradients).
EVAL_BATCH_SIZE = 256


@dataclass(frozen=True)
class FinetuneJob:
    """One trial's training (or one PBT segment of it), decided by the trial."""

    cfg: FinetuneConfig
    hp: dict[str, Any]  # the trial's settings (see stages/trial.py: hyperparameters)
    task_options: dict[str, Any]
    model_spec: dict[str, Any]
    init_checkpoint: str | None  # pretrained weights to start from; None: from scratch
    tokenizer_json: str | None
    num_train_rows: int  # rows in one epoch (steps and the shuffle buffer follow from it)
    seed: int
    fingerprint: str
    arm: str  # the arm's label, written to meta.json
    trial_name: str  # the trial's name, e.g. scratch-00001 (faults are addressed by it)
    faults: str = ""  # RAYPIPE_FAULTS, read on the driver
    continue_from: str | None = None  # PBT: the checkpoint this segment continues
    stop_epoch: int | None = None  # PBT: the segment's last epoch; None: cfg.epochs
    save_every_epoch: bool = False  # PBT continues from the latest state, not the best
    #: where a reclaim notice's just-in-time checkpoint goes (the trial's storage directory);
    #: None: a notice is not acted on
    reclaim_dir: str | None = None


def is_better(value: float, best: float | None, mode: str) -> bool:
    return best is None or (value > best if mode == "max" else value < best)


def _nonfinite(job: FinetuneJob, epoch: int, detail: str) -> UserError:
    return UserError(
        f"finetune {job.trial_name}: the loss became non-finite in epoch {epoch} ({detail}); "
        "lower finetune.optimizer.lr (or the lr range in finetune.sweep.space)"
    )


def _build(job: FinetuneJob, device: torch.device):
    """(backbone, task) with the init checkpoint's weights, the backbone frozen if asked."""
    torch.manual_seed(job.seed)
    backbone = build_model(job.model_spec)
    if job.init_checkpoint:
        load_weights(job.init_checkpoint, backbone)  # weights only: new head, new optimizer
    task = build_task(
        job.cfg.task, backbone, job.task_options, tokenizer_json=job.tokenizer_json
    ).to(device)
    if job.hp["freeze_backbone"]:
        backbone.requires_grad_(False)
    return backbone, task


def _optimizer(job: FinetuneJob, task, world: int):
    hp, opt = job.hp, job.cfg.optimizer
    steps_per_epoch = max(1, job.num_train_rows // (hp["batch_size"] * world))
    total_steps = steps_per_epoch * job.cfg.epochs
    ratio = hp.get("backbone_lr_ratio", 1.0)
    optimizer = build_optimizer(
        task.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"], betas=opt.betas,
        lr_scales=[(task.backbone.parameters(), ratio)] if ratio != 1.0 else [],
    )  # fmt: skip
    scheduler = warmup_cosine(
        optimizer,
        warmup_steps=int(hp["warmup_ratio"] * total_steps),
        total_steps=total_steps,
        min_lr_ratio=opt.min_lr_ratio,
    )
    return optimizer, scheduler, total_steps


def _resume(directory: str, task, optimizer, scheduler) -> dict[str, Any]:
    """A restarted trial continues where it left off: weights, optimizer, schedule, RNG."""
    load_weights(directory, task)
    state = load_train_state(directory)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state


def _continue(job: FinetuneJob, task, optimizer, scheduler, total_steps: int) -> int:
    """PBT: continue from a trial's checkpoint (its own, or a better trial's it cloned) with
    this trial's possibly perturbed settings: weights and moments carry over, the learning-rate
    schedule restarts from the same step under the new peak rate. Returns its epoch."""
    hp = job.hp
    load_weights(job.continue_from, task)
    state = load_train_state(job.continue_from)
    optimizer.load_state_dict(state["optimizer"])
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] = hp["lr"] * group.get("lr_scale", 1.0)
        if group["weight_decay"]:
            group["weight_decay"] = hp["weight_decay"]
    scheduler.base_lrs = [g["lr"] for g in optimizer.param_groups]
    done = min(state.get("steps", 0), total_steps)
    scheduler.last_epoch = done - 1
    scheduler.step()
    set_rng_state(state["rng"])
    return state["epoch"]


def _train_epoch(job: FinetuneJob, session: Session, module, task, optimizer, scheduler,
                 point: EpochPoint):  # fmt: skip
    """One pass over this rank's training rows (the rest of one, resumed from a reclaim
    checkpoint: the batches it had done are read past, in the same seeded order):
    (summed stats, meter)."""
    epoch = point.epoch
    meter = Meter(unit=task.unit)
    totals = point.totals
    skipped = SkippedSteps(session.device)
    batches = iter(
        session.batches(
            "train",
            batch_size=job.hp["batch_size"],
            drop_last=True,
            shuffle_buffer=job.num_train_rows,
            shuffle_seed=job.seed * 1000 + epoch,
        )
    )
    for _ in itertools.islice(batches, point.done):
        pass
    while True:
        try:
            batch = meter.timed_next(batches)
        except StopIteration:
            break
        try:
            _, stats = train_step(
                module, optimizer, scheduler, [batch], grad_clip=job.cfg.optimizer.grad_clip,
                device=session.device, precision=job.cfg.precision,
            )  # fmt: skip
        except NonFiniteLoss as e:
            raise _nonfinite(job, epoch, str(e)) from None
        stats.pop("grad_norm", None)
        skipped.add(stats, meter.steps + 1)  # found on the device: read at the epoch's end
        for k, v in stats.items():
            totals[k] = totals.get(k, 0) + v
        meter.steps += 1
        meter.items += task.items_in(batch) * session.world
        point.done += 1
        if not point.noticed and (deadline := session.reclaim_notice()) is not None:
            _checkpoint_at_notice(job, session, task, optimizer, scheduler, point, deadline)
    if found := skipped.take(session.world):
        raise _nonfinite(job, epoch, f"{found // session.world} step(s) skipped")
    if not totals:
        raise UserError(
            f"finetune: the labeled training data gives no full batch of {job.hp['batch_size']} "
            "rows per worker; lower finetune.batch_size or add labeled data"
        )
    return all_reduce_sum(totals, session.device), meter


def _validate(session: Session, module) -> dict[str, torch.Tensor]:
    """The task's stats summed over the validation rows (each rank takes every world-th batch;
    the sums are exact after the reduction)."""
    rank, world, device = session.rank, session.world, session.device
    val = session.batches("validation", batch_size=EVAL_BATCH_SIZE)
    totals = evaluate(module, itertools.islice(val, rank, None, world), device=device)
    if not totals:
        # Fewer validation batches than ranks: this rank adds zeros of the right shapes, so
        # every rank joins the same collective.
        first = next(iter(session.batches("validation", batch_size=EVAL_BATCH_SIZE)))
        totals = {k: v * 0 for k, v in evaluate(module, [first], device=device).items()}
    return all_reduce_sum(totals, device)


def _saver(job: FinetuneJob, task, optimizer, scheduler, epoch: int, metrics: dict | None,
           *, point: EpochPoint | None = None):  # fmt: skip
    """save(directory) for the checkpoint of a finished epoch (its metrics), or, with
    `point`, for a reclaim checkpoint inside one: no metrics, no trial named (see reclaim.py)."""
    spec = {**job.model_spec, "task": {"name": job.cfg.task, "options": job.task_options}}
    meta = {
        "epoch": epoch,
        "task": job.cfg.task,
        "arm": job.arm,
        "hyperparameters": job.hp,
        "init_checkpoint": job.init_checkpoint,
        "fingerprint": job.fingerprint,
    }
    if point is None:
        meta.update(trial=job.trial_name, metrics=metrics)
    else:
        meta.update(reclaim_of=job.trial_name, done_in_epoch=point.done)

    def save(directory):
        return save_checkpoint(
            directory,
            module=task,
            spec=spec,
            tokenizer_json=job.tokenizer_json,
            meta=meta,
            train_state={
                "epoch": epoch,
                "steps": scheduler.last_epoch,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": rng_state(),
                **(point.state() if point is not None else {}),
            },
        )

    return save


def _checkpoint_at_notice(job: FinetuneJob, session: Session, task, optimizer, scheduler,
                          point: EpochPoint, deadline: float) -> None:  # fmt: skip
    """Spot preemption. On the notice that a node of this trial is about to be reclaimed, a
    just-in-time checkpoint at this step boundary, then no more steps until the deadline:
    the trial is restarted elsewhere (Ray Tune and Ray Train do not count a preemption as one
    of `max_failures`) and goes on from this step. A node still here after the deadline and
    its grace was not reclaimed after all: training goes on."""
    point.noticed = True
    if job.reclaim_dir is None:
        return
    where = f"epoch {point.epoch}, batch {point.done}"
    if session.rank == 0:
        save = _saver(job, task, optimizer, scheduler, point.epoch, None, point=point)
        name = f"{RECLAIM_PREFIX}{scheduler.last_epoch:08d}"
        point.written = save_into(job.reclaim_dir, name, save, num_to_keep=1)
        progress(f"finetune {job.trial_name}: node reclaim notice at {where}: checkpoint written"
                 + ("; waiting for the restart" if math.isfinite(deadline) else ""))  # fmt: skip
    wait_for_reclaim(deadline)


def _resume_at_notice(job: FinetuneJob, task, optimizer, scheduler, start_epoch: int,
                      best: float | None) -> EpochPoint:  # fmt: skip
    """Where the trial's training starts: after `start_epoch`, or inside a later epoch where
    a reclaim checkpoint of these settings says (its weights, optimizer, schedule, RNG)."""
    point = EpochPoint(epoch=start_epoch + 1, best=best)
    found = job.reclaim_dir and reclaim.find(
        job.reclaim_dir, hp=job.hp, fingerprint=job.fingerprint
    )
    if not found or found[1]["epoch"] <= start_epoch:
        return point
    path, state = found
    _resume(path, task, optimizer, scheduler)
    device = next(task.parameters()).device
    point = EpochPoint(
        epoch=state["epoch"], best=state["best"], done=state["done_in_epoch"],
        totals={k: v.to(device) for k, v in state["totals"].items()}, written=path,
    )  # fmt: skip
    progress(f"finetune {job.trial_name} resumed at epoch {point.epoch}, batch {point.done} "
             "(the checkpoint of a node reclaim notice)")  # fmt: skip
    return point


def score(checkpoint: str, batches, *, device: torch.device) -> dict[str, float]:
    """A fine-tuned checkpoint's metrics on `batches` (the test split): what the task reports,
    from stats summed over every batch."""
    task = load_task(checkpoint).to(device)
    return task.summarize(evaluate(task, batches, device=device))


def finetune_loop(job: FinetuneJob, session: Session) -> None:
    """Train one trial (or one PBT segment of it); every epoch is recorded with the session."""
    cfg, device = job.cfg, session.device
    backbone, task = _build(job, device)
    optimizer, scheduler, total_steps = _optimizer(job, task, session.world)
    metric, mode = cfg.sweep.metric, cfg.sweep.mode
    start_epoch, best = 0, None
    with session.resumed() as d:
        # A checkpoint of other settings under this trial's name (a resumed search that
        # suggested differently) is not this trial's: it starts over.
        if d is not None and same_settings(read_meta(d).get("hyperparameters"), job.hp):
            start_epoch = _resume(d, task, optimizer, scheduler)["epoch"]
            best = read_meta(d)["metrics"][metric]
        else:
            d = None
    if d is None and job.continue_from:
        start_epoch = _continue(job, task, optimizer, scheduler, total_steps)
    point = _resume_at_notice(job, task, optimizer, scheduler, start_epoch, best)
    start_epoch, best = point.epoch - 1, point.best
    two_towers = len(getattr(backbone, "modalities", ())) > 1
    # A two-tower backbone (CLIP, captioner) leaves the tower the task does not read unused.
    module = session.wrap(task, find_unused_parameters=two_towers)
    logger, injected = session.logger, faults.parse(job.faults)
    try:
        for epoch in range(start_epoch + 1, (job.stop_epoch or cfg.epochs) + 1):
            inject_fault(injected, task, place=job.trial_name, rank=session.rank, at=epoch)
            point = point if point.epoch == epoch else point.next(best)
            train, meter = _train_epoch(job, session, module, task, optimizer, scheduler, point)
            if session.rank == 0:  # before the record: no epoch is trained twice
                reclaim.discard(point)
            val = _validate(session, module)
            metrics = {
                "epoch": epoch,
                **{f"train/{k}": v for k, v in task.summarize(train).items()},
                **{f"val/{k}": v for k, v in task.summarize(val).items()},
                **{f"perf/{k}": v for k, v in meter.read_and_reset().items()},
            }
            logger.log_metrics(metrics, epoch)  # the sweep's status line shows it
            save = None
            improved = is_better(metrics[metric], best, mode)
            if improved or job.save_every_epoch:
                best = metrics[metric] if improved else best
                save = _saver(job, task, optimizer, scheduler, epoch, metrics)
            # The scheduler may stop the trial at this record: its metrics go first (a short
            # wait when the tracking server is away; they stay queued if it stays away).
            logger.flush(timeout=30)
            session.record(metrics, save=save, checkpoint_name=f"{CHECKPOINT_PREFIX}{epoch:04d}")
    except BaseException:  # also Tune stopping the trial at a record (SystemExit)
        logger.close(timeout=30)
        raise
    logger.close()  # waits for metrics queued while the tracking server was away

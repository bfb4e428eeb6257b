"""The pretraining loop: plain PyTorch over a `Session` (see engine/session.py).

One function per worker, read top to bottom: build the objective, wrap it (DDP or FSDP), build
the optimizers, resume from the session's checkpoint, then step until `max_steps`, logging every
`log_every` steps and checkpointing every `checkpoint_every`. The same loop runs in a Ray Train
worker, in the driver (Ray Train's local mode) and in the tests and benchmarks without Ray.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from raypipe import faults, storage, timing
from raypipe.config import PretrainConfig
from raypipe.engine.checkpoint import (
    load_train_state,
    load_weights,
    read_meta,
    rng_state,
    save_checkpoint,
    save_into,
    set_rng_state,
    split_objective_state,
)
from raypipe.engine.flops import mfu, peak_flops, transformer_flops_per_token
from raypipe.engine.optim import build_optimizer, warmup_cosine
from raypipe.engine.parallel import (
    full_optimizer_state,
    full_state_dict,
    load_optimizer_state,
    shard,
)
from raypipe.engine.precision import autocast_for
from raypipe.engine.reclaim import wait_for_reclaim
from raypipe.engine.session import Session
from raypipe.engine.step import (
    Meter,
    NonFiniteLoss,
    SkippedSteps,
    all_gather,
    all_reduce_sum,
    inject_fault,
    train_step,
)
from raypipe.errors import UserError
from raypipe.models import build_model
from raypipe.objectives import build_objective
from raypipe.progress import progress, status

#: A pretraining checkpoint is `<checkpoint_dir>/step-00000300`.
CHECKPOINT_PREFIX = "step-"


@dataclass(frozen=True)
class PretrainJob:
    """Everything one pretraining worker needs, decided on the driver."""

    cfg: PretrainConfig
    model_spec: dict[str, Any]
    tokenizer_json: str | None
    seed: int
    fingerprint: str
    checkpoint_dir: str  # where the checkpoints go (named in messages)
    best_dir: str | None = None  # with pretrain.keep: best, where the best checkpoint goes
    run_id: str | None = None  # the MLflow run that trains it (lineage in meta.json)
    passes: int = 1  # passes over the data in one epoch of the dataset
    startup: dict[str, float] = field(default_factory=dict)  # driver's cold-start marks
    faults: str = ""  # RAYPIPE_FAULTS, read on the driver
    #: steps whose checkpoints are kept for good in `milestone_dir` (fine-tuning starts from
    #: them: finetune.init_steps), besides the newest few that a resume needs
    milestones: tuple[int, ...] = ()
    milestone_dir: str | None = None
    #: pretrain.probe: every `probe_every` steps (and the last) a copy of the checkpoint goes
    #: to `probe_dir`, where the probe reads it (and deletes it once probed)
    probe_every: int | None = None
    probe_dir: str | None = None
    #: pretrain.probe.patience: the probe writes this file when pretraining should stop; the
    #: loop looks for it at each checkpoint
    stop_file: str | None = None
    #: tracking.system_metrics_s: MLflow's system metrics of each node, every this many seconds
    system_metrics_s: float | None = None
    #: budget.pretrain_worker_hours: the wall-clock moment (time.time()) the driver worked out
    #: the stage's worker-hours run out at; the loop checkpoints and stops there
    deadline: float | None = None


@dataclass(frozen=True)
class PretrainOutcome:
    steps: int
    final_loss: float = float("nan")
    skipped_steps: int = 0
    error: str | None = None  # a non-finite stop: the message for the user
    stopped_by_probe: bool = False  # before max_steps, because the probe stopped improving
    stopped_by_budget: bool = False  # before max_steps, because its worker-hours ran out


@dataclass
class DataPosition:
    """Where one worker is in its stream: the epoch, and the batches it consumed in it."""

    epoch: int = 0
    batches: int = 0


@dataclass
class _State:
    """What the loop changes as it goes (and a checkpoint restores)."""

    step: int = 0
    final_loss: float = float("nan")
    skipped: int = 0
    last_saved: int | None = None
    best_val: float | None = None  # the lowest validation loss so far
    items: int = 0  # tokens or images seen so far, over every rank (objective.unit)
    position: DataPosition = field(default_factory=DataPosition)
    resumed: str | None = None  # the checkpoint it resumed from
    note: str = ""  # how the resume differs (another number of workers)
    reclaim_at: int | None = None  # the step a node reclaim notice came at (spot preemption)


def _batches_forever(session: Session, cfg: PretrainConfig, seed: int, at: DataPosition):
    """Epoch after epoch over this worker's split, from `at` on; keeps `at` current.

    Ray Data's iterators cannot seek, so resuming mid-epoch re-reads the epoch and drops the
    batches consumed before the checkpoint: the split is deterministic (order preserved, rows
    dealt to the worker with the fewest), so the same rows come back in the same order.
    """
    while True:
        skip, count = at.batches, 0
        for batch in session.batches(
            "train",
            batch_size=cfg.batch_size,
            drop_last=True,
            prefetch=cfg.prefetch_batches,
            shuffle_buffer=cfg.shuffle_buffer or None,
            shuffle_seed=seed + at.epoch if cfg.shuffle_buffer else None,
        ):
            count += 1
            if count <= skip:
                continue
            at.batches = count
            yield batch
        if count == 0:
            raise UserError(
                f"pretrain: the unlabeled data yields no full batch of {cfg.batch_size} rows per "
                "worker; lower pretrain.batch_size (or pretrain.seq_len for text), or add data"
            )
        at.epoch, at.batches = at.epoch + 1, 0


def _build(job: PretrainJob, device: torch.device):
    """The objective around a new model, identical on every rank."""
    torch.manual_seed(job.seed)
    model = build_model(job.model_spec)
    return build_objective(job.cfg.objective, model, job.cfg.options).to(device)


def _optimizers(objective, cfg: PretrainConfig):
    opt = cfg.optimizer
    # Built after sharding, so each optimizer holds this rank's shards (and moments) only.
    optimizers = [
        build_optimizer(params, lr=opt.lr, weight_decay=opt.weight_decay, betas=opt.betas)
        for params in objective.param_groups()
    ]
    schedulers = [
        warmup_cosine(
            o,
            warmup_steps=opt.warmup_steps,
            total_steps=cfg.max_steps,
            min_lr_ratio=opt.min_lr_ratio,
        )  # fmt: skip
        for o in optimizers
    ]
    return optimizers, schedulers


def _restore(directory: str, objective, state: _State) -> dict[str, Any]:
    """Weights, the objective's own state and the loss of a checkpoint; its train state."""
    load_weights(directory, objective.model)
    meta = read_meta(directory)
    state.final_loss, state.skipped = (
        meta.get("loss", state.final_loss),
        meta.get("skipped_steps", 0),
    )
    state.best_val = meta.get("best_val_loss")
    state.items = meta.get("items_seen", 0)
    saved = load_train_state(directory)
    objective.load_state_dict({**objective.state_dict(), **saved["objective"]}, strict=True)
    return saved


def _resume_optimizers(saved, objective, optimizers, schedulers, state: _State, session) -> None:
    for o, o_state in zip(optimizers, saved["optimizers"], strict=True):
        load_optimizer_state(objective, o, o_state)
    for sch, sch_state in zip(schedulers, saved["schedulers"], strict=True):
        sch.load_state_dict(sch_state)
    state.step = state.last_saved = saved["step"]
    ranks = saved["ranks"]
    if len(ranks) != session.world:
        state.note = f"; {len(ranks)} workers then, {session.world} now"
    if len(ranks) == session.world:  # each rank continues its own stream and random draws
        set_rng_state(ranks[session.rank]["rng"])
        state.position = DataPosition(**ranks[session.rank]["data"])
    else:  # another split of the data: the epoch starts over
        set_rng_state(ranks[0]["rng"])
        state.position = DataPosition(epoch=ranks[0]["data"]["epoch"])


def _saver(job: PretrainJob, session: Session, objective, optimizers, schedulers, state: _State):
    """Take a snapshot now (collectives: every rank calls this); returns `save(directory)`."""
    cfg, world = job.cfg, session.world
    full = full_state_dict(objective)
    optimizer_states = [full_optimizer_state(objective, o) for o in optimizers]
    ranks = all_gather({"rng": rng_state(), "data": asdict(state.position)}, world)
    step, loss, skipped, best_val = state.step, state.final_loss, state.skipped, state.best_val
    items, unit = state.items, objective.unit
    per_token = (
        transformer_flops_per_token(objective.model, cfg.seq_len) if unit == "tokens" else None
    )

    def save(directory):
        weights, own = split_objective_state(full)
        return save_checkpoint(
            directory,
            weights=weights,
            spec=job.model_spec,
            tokenizer_json=job.tokenizer_json,
            meta={
                "step": step,
                "samples_seen": step * cfg.batch_size * cfg.grad_accum_steps * world,
                # Pretraining compute so far: the checkpoint curve's other x axes.
                "unit": unit,
                "items_seen": items,
                "train_flops": items * per_token if per_token else None,
                "objective": cfg.objective,
                "fingerprint": job.fingerprint,
                "loss": loss,
                "strategy": cfg.strategy,
                "skipped_steps": skipped,
                "num_workers": world,
                "best_val_loss": best_val,
                # Lineage: the MLflow run that trained it (fine-tune trials tag themselves).
                "mlflow_run_id": job.run_id,
            },
            train_state={
                "step": step,
                "optimizers": optimizer_states,
                "schedulers": [sch.state_dict() for sch in schedulers],
                "ranks": ranks,
                "objective": own,
            },
        )

    return save


def _nonfinite(job: PretrainJob, state: _State, at_step: int, detail: str) -> PretrainOutcome:
    kept = (
        f"the last good checkpoint (step {state.last_saved}) stays in "
        f"{job.checkpoint_dir.rstrip('/')}/{CHECKPOINT_PREFIX}{state.last_saved:08d}"
        if state.last_saved is not None
        else "no checkpoint was written before it"
    )
    return PretrainOutcome(
        steps=at_step - 1,
        error=f"pretrain: the loss became non-finite at step {at_step} ({detail}); {kept}; lower "
        "pretrain.optimizer.lr, set pretrain.optimizer.grad_clip, or set "
        "pretrain.on_nonfinite: skip",
    )


def _step(objective, module, optimizers, schedulers, micro, cfg: PretrainConfig, device):
    """One optimizer step: the objective's own (a GAN's alternating updates) or `train_step`."""
    opt = cfg.optimizer
    if not objective.owns_step:
        return train_step(
            module, optimizers[0], schedulers[0], micro, grad_clip=opt.grad_clip, device=device,
            precision=cfg.precision, on_nonfinite=cfg.on_nonfinite,
        )  # fmt: skip
    loss, stats = objective.step(
        module, optimizers, micro, grad_clip=opt.grad_clip,
        autocast=lambda: autocast_for(device, cfg.precision),
    )  # fmt: skip
    for sch in schedulers:
        sch.step()
    # It has stepped already: a non-finite loss can only stop the run, which happens when the
    # count is read (no per-step sync or collective).
    stats["skipped_steps"] = (~torch.isfinite(loss.detach())).float()
    return loss, stats


def validate(objective, session: Session, cfg: PretrainConfig, seed: int) -> float:
    """The objective's mean loss over this rank's validation rows, summed over ranks (a
    collective). Its random draws (masks, noise) come from a fixed seed, so every evaluation
    scores the same task, and the training's own random state is left as it was."""
    device = session.device
    devices = [device] if device.type == "cuda" else []
    total = torch.zeros((), device=device, dtype=torch.float64)
    count = torch.zeros((), device=device, dtype=torch.float64)
    was_training = objective.training
    objective.eval()
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        for batch in session.batches("validation", batch_size=cfg.batch_size):
            with autocast_for(device, cfg.precision):
                loss, _ = objective(batch)
            rows = next(iter(batch.values())).shape[0]
            total += loss.double() * rows
            count += rows
    objective.train(was_training)
    sums = all_reduce_sum({"total": total, "count": count}, device)
    if float(sums["count"]) == 0:
        raise UserError(
            "data.unlabeled_validation: gives no rows to score; point it at held-out data"
        )
    return float(sums["total"] / sums["count"])


def _evaluate(job, session, objective, optimizers, schedulers, state: _State, text: bool) -> None:
    """Score on the validation data; with keep: best, a new lowest loss keeps its checkpoint."""
    loss = validate(objective, session, job.cfg, job.seed)
    metrics = {"val/loss": loss, **({"val/perplexity": math.exp(min(loss, 50))} if text else {})}
    session.logger.log_metrics(metrics, state.step)
    if state.best_val is not None and loss >= state.best_val:
        return
    state.best_val = loss
    if job.cfg.keep == "best" and job.best_dir:
        save = _saver(job, session, objective, optimizers, schedulers, state)  # a collective
        if session.rank == 0:
            save_into(job.best_dir, f"{CHECKPOINT_PREFIX}{state.step:08d}", save, num_to_keep=1)


def _log_start(job: PretrainJob, session: Session, objective, state: _State) -> None:
    if state.resumed:
        session.logger.log_metrics({"train/resumed_from_step": state.step}, state.step)
        if session.rank == 0:
            p = state.position
            progress(
                f"pretrain resumed at step {state.step} from {state.resumed} (epoch {p.epoch}, "
                f"{p.batches} batches in){state.note}"
            )
    elif session.rank == 0:
        session.logger.log_params(
            {
                "num_parameters": sum(p.numel() for p in objective.parameters()),
                "torch_threads": torch.get_num_threads(),
                "data_passes_per_epoch": job.passes,
            }
        )


def _metrics(loss, stats, schedulers, meter: Meter, state: _State, session, mfu_of) -> dict:
    """The logged metrics (the loss is the mean over ranks: a collective, all ranks log)."""
    state.final_loss = all_reduce_sum({"loss": loss}, session.device)["loss"].item() / session.world
    metrics = {
        "train/loss": state.final_loss,
        "train/lr": schedulers[0].get_last_lr()[0],
        "train/skipped_steps": state.skipped,
        **{f"train/{k}": float(v) for k, v in stats.items()},
        **{f"perf/{k}": v for k, v in meter.read_and_reset().items()},
    }
    if mfu_of is not None:
        metrics["perf/mfu"] = mfu_of(metrics["perf/tokens_per_s"] / session.world)
    return metrics


def _mfu_of(objective, cfg: PretrainConfig, device):
    """tokens/s -> MFU on GPUs whose peak is known, for transformers (engine/flops.py)."""
    peak = peak_flops(device)
    if not (peak and objective.unit == "tokens"):
        return None
    per_token = transformer_flops_per_token(objective.model, cfg.seq_len)
    return lambda rate: mfu(rate, per_token, peak)


def pretrain_loop(job: PretrainJob, session: Session) -> PretrainOutcome:
    marks = {"workers": time.time()}  # this worker's cold-start milestones
    cfg, rank, world, device = job.cfg, session.rank, session.world, session.device
    objective = _build(job, device)
    # Identical init on every rank above; from here each rank draws its own masks and noise.
    torch.manual_seed(job.seed * 1000 + rank)
    state, saved = _State(), None
    with session.resumed() as found:
        if found is not None:
            saved, state.resumed = _restore(found, objective, state), found
    if cfg.compile:
        objective.compile()  # in place, before DDP/FSDP wrap it
    if cfg.strategy == "fsdp":
        module = shard(objective)  # in place: the objective now holds parameter shards
    else:
        module = session.wrap(objective, find_unused_parameters=objective.owns_step)
    optimizers, schedulers = _optimizers(objective, cfg)
    marks["model"] = time.time()
    if saved is not None:
        _resume_optimizers(saved, objective, optimizers, schedulers, state, session)
    _log_start(job, session, objective, state)
    skipped = SkippedSteps(device)
    batches = _batches_forever(session, cfg, job.seed + rank, state.position)
    meter, mfu_of = Meter(unit=objective.unit), _mfu_of(objective, cfg, device)
    text = objective.data_kind == "text_blocks"  # a language model: perplexity too
    injected = faults.parse(job.faults)
    while state.step < cfg.max_steps:
        inject_fault(injected, objective, place="pretrain", rank=rank, at=state.step + 1)
        micro = [meter.timed_next(batches) for _ in range(cfg.grad_accum_steps)]
        marks.setdefault("first_batch", time.time())
        try:
            loss, stats = _step(objective, module, optimizers, schedulers, micro, cfg, device)
        except NonFiniteLoss as e:
            # Every rank gets here at the same step (see train_step), so all return together.
            return _nonfinite(job, state, state.step + 1, str(e))
        state.step += 1
        step, last = state.step, state.step == cfg.max_steps
        if "first_step" not in marks:
            marks["first_step"] = time.time()
            if rank == 0 and not state.resumed and "start" in job.startup:
                # Not after a resume: the restarted workers' marks would mix two starts.
                _log_startup({**job.startup, **marks}, session.logger, step)
        skipped.add(stats, step)
        if step % cfg.log_every == 0 or step % cfg.checkpoint_every == 0 or last:
            # Summed over ranks (a GAN's loss is per rank), so every rank decides alike.
            found = skipped.take(world)
            if found and (cfg.on_nonfinite == "stop" or objective.owns_step):
                return _nonfinite(
                    job, state, skipped.first_step(world),
                    "found when the step count was next read; the updates of that step and "
                    + ("any since were applied" if objective.owns_step else "any since skipped"),
                )  # fmt: skip
            state.skipped += found // world  # train_step skips on every rank alike
        meter.steps += 1
        items = sum(objective.items_in(b) for b in micro) * world
        meter.items += items
        state.items += items
        if step % cfg.log_every == 0 or last:
            metrics = _metrics(loss, stats, schedulers, meter, state, session, mfu_of)
            session.logger.log_metrics(metrics, step)
            if rank == 0:
                _status(cfg, objective.unit, state, metrics)
        if cfg.eval_every and (step % cfg.eval_every == 0 or last):
            _evaluate(job, session, objective, optimizers, schedulers, state, text)
        if (step % cfg.checkpoint_every == 0 or last) and _checkpoint(
            job, session, objective, optimizers, schedulers, state, last=last
        ):
            break  # the probe stopped improving (pretrain.probe.patience)
        if not last and _reclaimed(job, session, objective, optimizers, schedulers, state):
            break  # ... at the checkpoint a reclaim notice wrote
        if not last and _out_of_budget(job, session, objective, optimizers, schedulers, state):
            return PretrainOutcome(steps=state.step, final_loss=state.final_loss,
                                   skipped_steps=state.skipped, stopped_by_budget=True)  # fmt: skip
    return PretrainOutcome(
        steps=state.step, final_loss=state.final_loss, skipped_steps=state.skipped,
        stopped_by_probe=state.step < cfg.max_steps,
    )  # fmt: skip


def _checkpoint(job, session, objective, optimizers, schedulers, state: _State, *, last: bool):
    """This step's checkpoint, and its kept copies; True if pretraining stops here, before
    max_steps, because the probe asked it to."""
    step, rank = state.step, session.rank
    stop = not last and _probe_says_stop(job, session.world)
    # This step's metrics reach MLflow before the checkpoint that a resume starts after (so a
    # driver killed in between loses none); no wait while it is away.
    session.logger.flush(timeout=10)
    save = _saver(job, session, objective, optimizers, schedulers, state)
    _keep_copies(job, step, save, last=last or stop, rank=rank)
    done = {"step": step, "loss": state.final_loss}
    session.record(done, save=save, checkpoint_name=f"{CHECKPOINT_PREFIX}{step:08d}")
    state.last_saved = step
    if stop and rank == 0:
        progress(f"pretrain: stopped at step {step} of {job.cfg.max_steps}: the probe stopped "
                 "improving (pretrain.probe.patience)")  # fmt: skip
    return stop


def _reclaimed(job, session, objective, optimizers, schedulers, state: _State) -> bool:
    """Spot preemption. On the notice that a node of this run is about to be reclaimed (Ray
    Train's), a just-in-time checkpoint at this step boundary (unless this step wrote one),
    then no more steps until the deadline: Ray Train takes the workers down there and
    restarts the run from that checkpoint (a preemption, not one of `pretrain.max_failures`),
    so no finished step is lost. Without a deadline training goes on from the checkpoint.
    True if the probe asked to stop at that checkpoint."""
    deadline = session.reclaim_notice()
    if deadline is None or state.reclaim_at is not None:
        return False
    state.reclaim_at = step = state.step
    stop = state.last_saved != step and _checkpoint(
        job, session, objective, optimizers, schedulers, state, last=False
    )
    if session.rank == 0:
        progress(f"pretrain: node reclaim notice at step {step}: checkpoint written"
                 + ("; waiting for the restart" if math.isfinite(deadline) else ""))  # fmt: skip
    if not stop:
        wait_for_reclaim(deadline)
    return stop


def _out_of_budget(job, session, objective, optimizers, schedulers, state: _State) -> bool:
    """budget.pretrain_worker_hours: past the driver's deadline, this step's checkpoint (as
    the last one: the probe scores it too) and no more steps. The ranks agree: one rank looks
    every step; several look together at each logging step (a collective)."""
    if job.deadline is None or (session.world > 1 and state.step % job.cfg.log_every):
        return False
    if not any(all_gather(time.time() >= job.deadline, session.world)):
        return False
    if state.last_saved != state.step:
        _checkpoint(job, session, objective, optimizers, schedulers, state, last=True)
    if session.rank == 0:
        progress(f"pretrain: stopped at step {state.step} of {job.cfg.max_steps}: its "
                 "worker-hour budget is spent")  # fmt: skip
    return True


def _probe_says_stop(job: PretrainJob, world: int) -> bool:
    """Whether the probe has asked pretraining to stop. Every rank looks and all follow any
    that saw it: a file appearing between two ranks' looks must not split them."""
    if job.stop_file is None:
        return False
    return any(all_gather(storage.is_file(job.stop_file), world))


def _keep_copies(job: PretrainJob, step: int, save, *, last: bool, rank: int) -> None:
    """Copies of this step's checkpoint that outlive the newest few a resume needs: for a
    fine-tuning arm (milestones) and for the probe. Written before the checkpoint a resume
    starts after, so a crash between them redoes them."""
    if rank != 0:
        return
    name = f"{CHECKPOINT_PREFIX}{step:08d}"
    if step in job.milestones and job.milestone_dir:
        save_into(job.milestone_dir, name, save, num_to_keep=None)
    if job.probe_dir and job.probe_every and (step % job.probe_every == 0 or last):
        save_into(job.probe_dir, name, save, num_to_keep=None)


def _status(cfg: PretrainConfig, unit: str, state: _State, metrics: dict) -> None:
    status(
        f"pretrain step {state.step}/{cfg.max_steps} loss {state.final_loss:.4f} "
        f"{metrics[f'perf/{unit}_per_s']:.0f} {unit}/s "
        f"data wait {100 * metrics['perf/data_wait_share']:.1f}%"
        + (f" skipped {state.skipped} step(s)" if state.skipped else "")
    )


def _log_startup(marks: dict[str, float], logger, step: int) -> None:
    """The cold start, `raypipe run` process start -> first step, as metrics and a line."""
    spans = timing.breakdown(marks, marks["start"])
    logger.log_metrics({f"startup/{k}_s": v for k, v in spans.items()}, step)
    progress(timing.describe(spans))

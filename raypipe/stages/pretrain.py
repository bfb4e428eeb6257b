"""Pretraining: Ray Data streams packed token blocks into TorchTrainer workers (DDP).

The only Ray Train caller for pretraining. The dataset pipeline is defined once on the driver;
each worker iterates its own streaming split and runs `_train_loop` top to bottom.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import ray
import ray.data
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.data import ExecutionOptions, ExecutionResources
from ray.train import CheckpointConfig, DataConfig, FailureConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from raypipe import faults, storage, timing
from raypipe.config import PreprocessConfig, PretrainConfig, Source
from raypipe.data import files as datafiles
from raypipe.data.text import pack_blocks
from raypipe.data.vision import decode_images, encode_image_text, simclr_views
from raypipe.engine.checkpoint import (
    load_weights,
    read_meta,
    rng_state,
    save_checkpoint,
    set_rng_state,
    split_objective_state,
)
from raypipe.engine.flops import mfu, peak_flops, transformer_flops_per_token
from raypipe.engine.loop import Meter, NonFiniteLoss, all_reduce_sum, train_step
from raypipe.engine.optim import build_optimizer, warmup_cosine
from raypipe.engine.parallel import (
    full_optimizer_state,
    full_state_dict,
    load_optimizer_state,
    shard,
)
from raypipe.engine.precision import autocast_for
from raypipe.errors import UserError
from raypipe.models import build_model
from raypipe.objectives import build_objective
from raypipe.objectives.base import DATA_KINDS
from raypipe.progress import progress, status
from raypipe.stages.common import (
    Tally,
    find_user_error,
    latest_checkpoint,
    preprocess_args,
    report,
    scaling_config,
    skip_bad_images,
)
from raypipe.tracking import RunRef, logger_for


@dataclass
class PretrainOutput:
    checkpoint: str
    steps: int
    final_loss: float
    skipped_images: int | None = None  # None: not skipping (data.bad_images: fail)


#: Bytes of text per token, a generous upper bound (BPE on English gives 2-5): so the count of
#: blocks estimated from the text's size is low, and `passes_per_epoch` errs towards more.
MAX_BYTES_PER_TOKEN = 8
#: At most this many passes over the data in one Ray Data epoch.
MAX_PASSES = 64
#: Data up to this size (raw column bytes, from the Parquet footers) is read once into Ray's
#: object store, in blocks of about BLOCK_BYTES; larger data streams from its shards.
CACHE_MAX_BYTES = 256 * 2**20
BLOCK_BYTES = 8 * 2**20


def data_columns(kind: str, source: Source) -> list[str]:
    """The columns of the shards that objectives of data kind `kind` read."""
    if kind == "text_blocks":
        return [source.text_column]
    if kind in ("images", "image_views"):
        return [source.image_column]
    if kind == "image_text":
        return [source.image_column, source.text_column]
    raise ValueError(f"unknown data kind {kind!r}; expected one of {DATA_KINDS}")


@dataclass(frozen=True)
class Footprint:
    """What a stage will read, from the Parquet footers: rows (after `max_rows`) and the
    uncompressed bytes of the columns read. Decides how the data is read (`small`)."""

    rows: int
    size: int

    @property
    def small(self) -> bool:
        """Read once on the driver into the object store; otherwise streamed from the shards."""
        return self.size <= CACHE_MAX_BYTES


def data_footprint(files: list[str], *, kind: str, source: Source) -> Footprint:
    rows, size = datafiles.footprint(files, data_columns(kind, source))
    if source.max_rows and rows > source.max_rows:
        size, rows = size * source.max_rows // rows, source.max_rows
    return Footprint(rows=rows, size=size)


def passes_per_epoch(
    footprint: Footprint, *, kind: str, cfg: PretrainConfig, block_size: int, world: int
) -> int:
    """Passes over the data that one Ray Data epoch makes: enough for the whole run.

    Each epoch of a streaming split starts a new execution (tasks, the first blocks through
    the transforms) behind a barrier, and the trainer waits for it: seconds every epoch, a real
    cost when the data is small and epochs are short. Repeating the data inside one epoch
    removes those waits. Estimated from the Parquet footers, before anything is read.
    """
    if not footprint.small:
        return 1  # streamed from the shards: an epoch's start is small beside a pass of them
    needed = cfg.max_steps * cfg.batch_size * cfg.grad_accum_steps * world
    if kind == "text_blocks":
        have = footprint.size / (MAX_BYTES_PER_TOKEN * block_size)
    else:
        have = footprint.rows
    return int(min(MAX_PASSES, max(1, math.ceil(needed / max(have, 1)))))


def build_dataset(
    files: list[str],
    *,
    kind: str,
    source: Source,
    tokenizer_json: str | None,
    seq_len: int,
    text_extra: int,
    model_config: dict[str, Any],
    preprocess: PreprocessConfig | None = None,
    bad_image_tally=None,
    footprint: Footprint | None = None,
    passes: int = 1,
) -> ray.data.Dataset:
    """Lazy: read shards -> decode / augment / tokenize on CPU tasks, streamed into the trainer.

    `kind` is the objective's `data_kind`; each kind is one transform over numpy batches.
    With `bad_image_tally` (a Tally), rows whose image does not decode are dropped and counted.
    One epoch of the result makes `passes` passes over small data (`Footprint.small`; the
    footprint is read from the footers unless given), in order; over larger data, streamed
    from the shards, one (see `passes_per_epoch`).
    """
    images = {
        "image_column": source.image_column,
        "image_size": model_config.get("image_size"),
        "channels": model_config.get("channels"),
    }
    columns = data_columns(kind, source)
    if kind == "text_blocks":
        fn, kwargs, batch_size = (
            pack_blocks,
            {
                "tokenizer_json": tokenizer_json,
                "text_column": source.text_column,
                "block_size": seq_len + text_extra,
            },
            1024,
        )
    elif kind == "images":
        fn, kwargs, batch_size = decode_images, images, 256
    elif kind == "image_views":
        fn, kwargs, batch_size = simclr_views, images, 256
    else:  # image_text (data_columns rejected any other kind)
        fn, batch_size = encode_image_text, 256
        kwargs = {
            **images,
            "text_column": source.text_column,
            "tokenizer_json": tokenizer_json,
            "text_len": seq_len + text_extra,
        }
    footprint = footprint or data_footprint(files, kind=kind, source=source)
    small = footprint.small
    if small:
        # Small data is read once, here, into Ray's object store, in order, in blocks of about
        # BLOCK_BYTES. Ray Data's reader took 2-3 s to start for what pyarrow reads in 0.1 s
        # (the quickstart's 20,000 rows).
        per_block = max(1, footprint.rows * BLOCK_BYTES // max(footprint.size, 1))
        tables = datafiles.read_blocks(
            files, columns, rows_per_block=per_block, max_rows=source.max_rows
        )
        refs = [ray.put(t) for t in tables]
        ds = ray.data.from_arrow_refs(refs)
    else:
        ds = ray.data.read_parquet(files, columns=columns)
        if source.max_rows:
            ds = ds.limit(source.max_rows)
    if bad_image_tally is not None and kind != "text_blocks":
        ds = skip_bad_images(
            ds,
            image_column=source.image_column,
            channels=images["channels"],
            batch_size=batch_size,
            preprocess=preprocess,
            tally=bad_image_tally,
        )
    if small and passes > 1:
        # One epoch makes `passes` passes: the same blocks listed `passes` times, in order. (A
        # union of the data with itself deals its inputs' blocks out in turn, even with the
        # order kept: each block came `passes` times in a row.) Bad images are skipped (and
        # counted) once, before the passes.
        if bad_image_tally is not None and kind != "text_blocks":
            ds.context.execution_options.preserve_order = True
            refs = ds.materialize().to_arrow_refs()
        ds = ray.data.from_arrow_refs(refs * passes)
    ds.context.raise_original_map_exception = True  # a UserError in a transform stays one
    return ds.map_batches(
        fn,
        batch_format="numpy",
        batch_size=batch_size,
        fn_kwargs=kwargs,
        **preprocess_args(preprocess),
    )


@dataclass
class DataPosition:
    """Where one worker is in its stream: the epoch, and the batches it consumed in it."""

    epoch: int = 0
    batches: int = 0


def _batches_forever(shard, cfg: PretrainConfig, device: torch.device, seed: int, at: DataPosition):
    """Epoch after epoch over this worker's split, from `at` on; keeps `at` current.

    Each `iter_torch_batches` is one Ray Data epoch (`passes_per_epoch` passes over the data).
    Ray Data's iterators cannot seek, so resuming mid-epoch re-reads the epoch and drops the
    batches consumed before the checkpoint: the split is deterministic (order preserved, rows
    dealt to the worker with the fewest), so the same rows come back in the same order.
    """
    while True:
        skip, count = at.batches, 0
        for batch in shard.iter_torch_batches(
            batch_size=cfg.batch_size,
            drop_last=True,
            device=device,
            prefetch_batches=cfg.prefetch_batches,
            pin_memory=device.type == "cuda",  # then the copy to the GPU does not block
            local_shuffle_buffer_size=cfg.shuffle_buffer or None,
            local_shuffle_seed=seed + at.epoch if cfg.shuffle_buffer else None,
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


def _per_rank(value: Any, world: int) -> list[Any]:
    """Every rank's `value`, in rank order (a collective)."""
    if world == 1:
        return [value]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, value)
    return out


def _log_startup(marks: dict[str, float], logger, step: int) -> None:
    """The cold start, `raypipe run` process start -> first step, as metrics and a line."""
    spans = timing.breakdown(marks, marks["start"])
    logger.log_metrics({f"startup/{k}_s": v for k, v in spans.items()}, step)
    progress(timing.describe(spans))


def _train_loop(loop: dict[str, Any]) -> dict[str, Any]:
    marks = {"workers": time.time()}  # this worker's cold-start milestones
    cfg: PretrainConfig = loop["pretrain"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    injected = faults.parse(loop["faults"])
    torch.manual_seed(loop["seed"])  # identical init on every rank

    objective = build_objective(cfg.objective, build_model(loop["model_spec"]), cfg.options).to(
        device
    )
    # Identical init on every rank above; from here each rank draws its own masks and noise.
    torch.manual_seed(loop["seed"] * 1000 + rank)
    opt = cfg.optimizer
    step, final_loss, state, skipped = 0, float("nan"), None, 0
    position = DataPosition()
    found = latest_checkpoint(loop["train_dir"], prefix="step-")
    if found:
        resumed_from, state = found
        load_weights(resumed_from, objective.model)
        meta = read_meta(resumed_from)
        final_loss, skipped = meta.get("loss", final_loss), meta.get("skipped_steps", 0)
        objective.load_state_dict({**objective.state_dict(), **state["objective"]}, strict=True)
    if cfg.compile:
        objective.compile()  # in place, before DDP/FSDP wrap it
    if cfg.strategy == "fsdp":
        module = shard(objective)  # in place: the objective now holds parameter shards
    else:
        ddp_kwargs = {"find_unused_parameters": True} if objective.owns_step else None
        module = ray.train.torch.prepare_model(objective, parallel_strategy_kwargs=ddp_kwargs)
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
        )
        for o in optimizers
    ]
    logger = logger_for(loop["run"], rank)
    marks["model"] = time.time()
    if state is not None:
        for o, o_state in zip(optimizers, state["optimizers"], strict=True):
            load_optimizer_state(objective, o, o_state)
        for sch, sch_state in zip(schedulers, state["schedulers"], strict=True):
            sch.load_state_dict(sch_state)
        step = state["step"]
        ranks = state["ranks"]
        if len(ranks) == world:  # each rank continues its own stream and random draws
            set_rng_state(ranks[rank]["rng"])
            position = DataPosition(**ranks[rank]["data"])
        else:  # another split of the data: the epoch starts over
            set_rng_state(ranks[0]["rng"])
            position = DataPosition(epoch=ranks[0]["data"]["epoch"])
        logger.log_metrics({"train/resumed_from_step": step}, step)
        if rank == 0:
            progress(
                f"pretrain resumed at step {step} from {resumed_from} (epoch {position.epoch}, "
                f"{position.batches} batches in)"
                + ("" if len(ranks) == world else f"; {len(ranks)} workers then, {world} now")
            )
    elif rank == 0:
        logger.log_params(
            {
                "num_parameters": sum(p.numel() for p in objective.parameters()),
                "torch_threads": torch.get_num_threads(),
                "data_passes_per_epoch": loop["passes"],
            }
        )

    def snapshot() -> tuple[dict, list, list]:
        """Weights and optimizer state, unsharded on rank 0, and every rank's RNG and data
        position (collectives: every rank calls this)."""
        return (
            full_state_dict(objective),
            [full_optimizer_state(objective, o) for o in optimizers],
            _per_rank({"rng": rng_state(), "data": asdict(position)}, world),
        )

    def save(directory, taken):
        full, optimizer_states, ranks = taken
        weights, own = split_objective_state(full)
        return save_checkpoint(
            directory,
            weights=weights,
            spec=loop["model_spec"],
            tokenizer_json=loop["tokenizer_json"],
            meta={
                "step": step,
                "samples_seen": step * cfg.batch_size * cfg.grad_accum_steps * world,
                "objective": cfg.objective,
                "fingerprint": loop["fingerprint"],
                "loss": final_loss,
                "strategy": cfg.strategy,
                "skipped_steps": skipped,
                "num_workers": world,
                # Lineage: the MLflow run that trained it (fine-tune trials tag themselves).
                "mlflow_run_id": loop["run"].run_id if loop["run"] is not None else None,
            },
            train_state={
                "step": step,
                "optimizers": optimizer_states,
                "schedulers": [sch.state_dict() for sch in schedulers],
                "ranks": ranks,
                "objective": own,
            },
        )

    def stop_nonfinite(at_step: int, detail: str) -> dict[str, Any]:
        kept = (
            f"the last good checkpoint (step {last_saved}) stays in "
            f"{storage.join(loop['train_dir'], f'step-{last_saved:08d}')}"
            if last_saved is not None
            else "no checkpoint was written before it"
        )
        logger.close()
        return {
            "error": f"pretrain: the loss became non-finite at step {at_step} ({detail}); "
            f"{kept}; lower pretrain.optimizer.lr, set pretrain.optimizer.grad_clip, or set "
            "pretrain.on_nonfinite: skip",
            "steps": at_step - 1,
        }

    # Steps whose update was skipped for a non-finite loss or gradient, not yet counted in
    # `skipped`, and the first of them (device tensors: read only when logging).
    pending = torch.zeros((), device=device)
    first_bad = torch.zeros((), device=device, dtype=torch.long)
    batches = _batches_forever(
        ray.train.get_dataset_shard("train"), cfg, device, loop["seed"] + rank, position
    )
    meter = Meter(unit=objective.unit)
    # MFU on GPUs whose peak is known, for transformers (see engine/flops.py).
    peak = peak_flops(device)
    per_token = (
        transformer_flops_per_token(objective.model, cfg.seq_len)
        if peak and objective.unit == "tokens"
        else None
    )
    last_saved = step if state is not None else None
    while step < cfg.max_steps:
        # Test-only faults (RAYPIPE_FAULTS): "crash" ends this process here, "raise" raises,
        # "nan" poisons a weight so this step's loss is NaN.
        if faults.check(injected, place="pretrain", rank=rank, at=step + 1) == "nan":
            with torch.no_grad():
                next(objective.parameters()).fill_(float("nan"))
        micro = [meter.timed_next(batches) for _ in range(cfg.grad_accum_steps)]
        marks.setdefault("first_batch", time.time())
        try:
            if objective.owns_step:  # e.g. a GAN's alternating updates
                loss, stats = objective.step(
                    module,
                    optimizers,
                    micro,
                    grad_clip=opt.grad_clip,
                    autocast=lambda: autocast_for(device, cfg.precision),
                )
                for sch in schedulers:
                    sch.step()
                # It has stepped already: a non-finite loss can only stop the run, which
                # happens when the count below is read (no per-step sync or collective).
                stats["skipped_steps"] = (~torch.isfinite(loss.detach())).float()
            else:
                loss, stats = train_step(
                    module,
                    optimizers[0],
                    schedulers[0],
                    micro,
                    grad_clip=opt.grad_clip,
                    device=device,
                    precision=cfg.precision,
                    on_nonfinite=cfg.on_nonfinite,
                )
        except NonFiniteLoss as e:
            # Every rank gets here at the same step (see train_step), so all return together.
            return stop_nonfinite(step + 1, str(e))
        step += 1
        if "first_step" not in marks:
            marks["first_step"] = time.time()
            if rank == 0 and state is None and "start" in loop["startup"]:
                # Not after a resume: the restarted workers' marks would mix two starts.
                _log_startup({**loop["startup"], **marks}, logger, step)
        skipped_now = stats.pop("skipped_steps", None)
        if skipped_now is not None:  # a device tensor, read when logging: no per-step sync
            first_bad = torch.where((pending == 0) & (skipped_now > 0), step, first_bad)
            pending = pending + skipped_now
        last = step == cfg.max_steps
        if step % cfg.log_every == 0 or step % cfg.checkpoint_every == 0 or last:
            # Summed over ranks (a GAN's loss is per rank), so every rank decides alike.
            found = int(all_reduce_sum({"n": pending}, device)["n"].item())
            if found and (cfg.on_nonfinite == "stop" or objective.owns_step):
                firsts = _per_rank(int(first_bad.item()), world)  # a collective, rarely run
                return stop_nonfinite(
                    min(f for f in firsts if f > 0),
                    "found when the step count was next read; the updates of that step and "
                    + ("any since were applied" if objective.owns_step else "any since skipped"),
                )
            count = found // world  # train_step skips on every rank alike (global norm)
            skipped += count
            pending.zero_()
        meter.steps += 1
        meter.items += sum(objective.items_in(b) for b in micro) * world

        if step % cfg.log_every == 0 or last:
            # The mean over ranks: every rank saw different data (a collective, so all ranks log).
            final_loss = all_reduce_sum({"loss": loss}, device)["loss"].item() / world
            metrics = {
                "train/loss": final_loss,
                "train/lr": schedulers[0].get_last_lr()[0],
                "train/skipped_steps": skipped,
                **{f"train/{k}": float(v) for k, v in stats.items()},
                **{f"perf/{k}": v for k, v in meter.read_and_reset().items()},
            }
            if per_token:
                rate = metrics["perf/tokens_per_s"] / world
                metrics["perf/mfu"] = mfu(rate, per_token, peak)
            logger.log_metrics(metrics, step)
            if rank == 0:
                unit = objective.unit
                status(
                    f"pretrain step {step}/{cfg.max_steps} loss {final_loss:.4f} "
                    f"{metrics[f'perf/{unit}_per_s']:.0f} {unit}/s "
                    f"data wait {100 * metrics['perf/data_wait_share']:.1f}%"
                    + (f" skipped {skipped} step(s)" if skipped else "")
                )
        if step % cfg.checkpoint_every == 0 or last:
            taken = snapshot()  # every rank takes part; rank 0 writes
            report(
                {"step": step, "loss": final_loss},
                rank=rank,
                save=lambda directory, taken=taken: save(directory, taken),
                checkpoint_name=f"step-{step:08d}",
                into=loop["train_dir"] if loop["in_process"] else None,
                num_to_keep=cfg.num_checkpoints_to_keep,
            )
            last_saved = step
    logger.close()  # waits for metrics queued while the tracking server was away
    return {"steps": step, "final_loss": final_loss, "skipped_steps": skipped}


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


def run_pretrain(
    *,
    cfg: PretrainConfig,
    model_spec: dict[str, Any],
    files: list[str],
    source: Source,
    data_kind: str,
    text_extra: int,
    tokenizer_json: str | None,
    stage_dir: str,
    run: RunRef,
    seed: int,
    fingerprint: str,
    preprocess: PreprocessConfig | None = None,
    skip_undecodable: bool = False,
    local_ray: bool = False,
) -> PretrainOutput:
    """Train on `files`; `local_ray`: Ray is the embedded one this process started, so one
    CPU worker may train right here (`pretrain.scaling.in_process`)."""
    tally = Tally.remote() if skip_undecodable else None
    here = in_process(cfg, local_ray=local_ray)
    timing.mark("setup")
    footprint = data_footprint(files, kind=data_kind, source=source)  # read once: both agree
    passes = passes_per_epoch(
        footprint,
        kind=data_kind,
        cfg=cfg,
        block_size=cfg.seq_len + text_extra,
        world=cfg.scaling.num_workers,
    )
    dataset = build_dataset(
        files,
        kind=data_kind,
        source=source,
        tokenizer_json=tokenizer_json,
        seq_len=cfg.seq_len,
        text_extra=text_extra,
        model_config=model_spec["config"],
        preprocess=preprocess,
        bad_image_tally=tally,
        footprint=footprint,
        passes=passes,
    )
    timing.mark("dataset")
    train_dir = storage.join(stage_dir, "train")
    if here:
        # Ray Train's local mode gives the loop the dataset itself: set what DataConfig and
        # the worker's placement would (stream order; the CPU this process trains on is not
        # Ray Data's, though Ray never reserved it: at least one CPU stays, never a deadlock).
        # The context is this dataset's own (a copy made when it was read), not Ray's global.
        cpus = ray.cluster_resources().get("CPU", 1.0) - cfg.scaling.cpus_per_worker
        dataset.context.execution_options = ExecutionOptions(
            preserve_order=True, resource_limits=ExecutionResources.for_limits(cpu=max(cpus, 1.0))
        )
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={
            "in_process": here,
            "train_dir": train_dir,
            "faults": os.environ.get(faults.ENV, ""),
            "pretrain": cfg,
            "model_spec": model_spec,
            "tokenizer_json": tokenizer_json,
            "run": run,
            "seed": seed,
            "fingerprint": fingerprint,
            "passes": passes,
            # Driver milestones, when this process is `raypipe run` (see raypipe/timing.py).
            "startup": {"start": timing.process_start(), **timing.MARKS}
            if "imports" in timing.MARKS
            else {},
        },
        # num_workers=0: Ray Train's local mode, the loop runs in this process.
        scaling_config=ScalingConfig(num_workers=0) if here else scaling_config(cfg.scaling),
        run_config=ray.train.RunConfig(
            name="train",
            storage_path=stage_dir,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.num_checkpoints_to_keep),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
        ),
        datasets={"train": dataset},
        # Blocks arrive in read order, so a seeded run sees the same data in the same order.
        dataset_config=DataConfig(execution_options=ExecutionOptions(preserve_order=True)),
    )
    result = _fit_in_process(trainer, cfg) if here else trainer.fit()
    out = result.return_value or {}
    if out.get("error"):
        raise UserError(out["error"])
    # The newest whole checkpoint in storage (Ray Train's record can lag one behind).
    found = latest_checkpoint(train_dir, prefix="step-")
    if found is None:
        raise RuntimeError(f"pretraining ended without a checkpoint ({result.error})")
    checkpoint = storage.qualify(found[0], like=stage_dir)
    meta = read_meta(checkpoint)
    if meta["step"] != cfg.max_steps:
        raise RuntimeError(f"pretraining stopped at step {meta['step']} of {cfg.max_steps}")
    return PretrainOutput(
        checkpoint=checkpoint,
        steps=int(meta["step"]),
        final_loss=float(out.get("final_loss", meta["loss"])),
        skipped_images=ray.get(tally.get.remote()) if tally is not None else None,
    )

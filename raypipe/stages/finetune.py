"""The fine-tune sweep: Ray Tune trials on the labeled shards. A one-worker trial trains in its
own Tune process; a trial with several workers runs a TorchTrainer (DDP).

The only Ray Tune caller. Every arm (pretrained, scratch) is its own Tune experiment with the
same seeded search, so both arms try the same settings and the early-stopping scheduler only
ever compares trials of one arm with each other.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import random
from dataclasses import dataclass, field
from typing import Any

import ray
import ray.data
import ray.train
import ray.train.torch
import torch
from ray import tune
from ray.train import CheckpointConfig, DataConfig
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining
from ray.tune.search.basic_variant import BasicVariantGenerator

from raypipe import faults, registry, storage, tracking
from raypipe.config import (
    TUNABLE,
    Distribution,
    FinetuneConfig,
    LabeledSource,
    PreprocessConfig,
    SweepConfig,
)
from raypipe.data.text import encode_labeled, encode_translation
from raypipe.data.vision import encode_labeled_images
from raypipe.engine.checkpoint import (
    META_FILE,
    load_train_state,
    load_weights,
    read_meta,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from raypipe.engine.loop import Meter, NonFiniteLoss, all_reduce_sum, evaluate, train_step
from raypipe.engine.optim import build_optimizer, warmup_cosine
from raypipe.errors import UserError
from raypipe.models import build_model
from raypipe.plan import task_options
from raypipe.progress import console
from raypipe.stages.common import (
    find_user_error,
    latest_checkpoint,
    preprocess_args,
    report,
    save_into,
    scaling_config,
    skip_bad_images,
)
from raypipe.tasks import build_task

#: A trial's checkpoints are `<trials>/<run name>/epoch-0003`.
CHECKPOINT_PREFIX = "epoch-"
#: Beside them when the trial ran all its epochs: its last result.
DONE_FILE = "done.json"


@dataclass
class ArmResult:
    arm: str
    best_metric: float | None
    best_checkpoint: str | None
    best_trial: str | None
    best_params: dict[str, Any] = field(default_factory=dict)
    num_trials: int = 0
    num_stopped_early: int = 0
    num_failed: int = 0


def labeled_dataset(
    files: list[str],
    *,
    source: LabeledSource,
    kind: str,
    input: str,
    label_dtype: str,
    tokenizer_json: str | None,
    max_len: int,
    model_config: dict[str, Any],
    preprocess: PreprocessConfig | None = None,
    bad_image_tally=None,
) -> ray.data.Dataset:
    """Encoded once and materialized: every trial and epoch re-reads the same blocks.
    With `bad_image_tally` (a Tally), rows whose image does not decode are dropped and counted.

    kind "labeled": one input column (text or image) + label; "pairs": source -> target text.
    """
    if kind == "pairs":
        columns = [source.text_column, source.target_column]
        fn, kwargs = (
            encode_translation,
            {
                "tokenizer_json": tokenizer_json,
                "text_column": source.text_column,
                "target_column": source.target_column,
                "max_len": max_len,
            },
        )
    elif input == "image":
        columns = [source.image_column, source.label_column]
        fn, kwargs = (
            encode_labeled_images,
            {
                "image_column": source.image_column,
                "label_column": source.label_column,
                "label_dtype": label_dtype,
                "image_size": model_config["image_size"],
                "channels": model_config["channels"],
            },
        )
    else:
        columns = [source.text_column, source.label_column]
        fn, kwargs = (
            encode_labeled,
            {
                "tokenizer_json": tokenizer_json,
                "text_column": source.text_column,
                "label_column": source.label_column,
                "label_dtype": label_dtype,
                "max_len": max_len,
            },
        )
    ds = ray.data.read_parquet(files, columns=columns)
    if source.max_rows:
        ds = ds.limit(source.max_rows)
    if bad_image_tally is not None and kind != "pairs" and input == "image":
        ds = skip_bad_images(
            ds,
            image_column=source.image_column,
            channels=model_config["channels"],
            batch_size=256,
            preprocess=preprocess,
            tally=bad_image_tally,
        )
    ds = ds.map_batches(
        fn, batch_format="numpy", batch_size=256, fn_kwargs=kwargs, **preprocess_args(preprocess)
    )
    ds.context.execution_options.preserve_order = True  # the same rows in the same order
    ds.context.raise_original_map_exception = True  # a UserError in a transform stays one
    return ds.materialize()


def _is_better(value: float, best: float | None, mode: str) -> bool:
    return best is None or (value > best if mode == "max" else value < best)


def _trial_name(arm: str, trial_id: str) -> str:
    """Deterministic: Tune's trial ids end in the trial's index (`..._00003`)."""
    return f"{arm}-{trial_id.rsplit('_', 1)[-1]}"


def num_trials(sweep: SweepConfig) -> int:
    """Trials in one arm: num_samples times every grid point."""
    points = math.prod(len(d.grid) for d in sweep.space.values() if d.kind == "grid")
    return sweep.num_samples * points


class _SweepStatus(tune.Callback):
    """The sweep's one status line on the driver's console: trials finished of all, the best
    so far, and the latest epoch's result with its throughput."""

    def __init__(self, arm: str, cfg: FinetuneConfig):
        self.arm, self.total, self.epochs = arm, num_trials(cfg.sweep), cfg.epochs
        self.metric, self.mode = cfg.sweep.metric, cfg.sweep.mode
        self.best: float | None = None
        self.finished: set[str] = set()
        self.latest = ""

    def _show(self, trials) -> None:
        self.finished |= {t.trial_id for t in trials if t.status in ("TERMINATED", "ERROR")}
        running = sum(t.status == "RUNNING" and t.trial_id not in self.finished for t in trials)
        best = "-" if self.best is None else f"{self.best:.4f}"
        console.status(
            f"finetune {self.arm}: {len(self.finished)}/{self.total} trials done, {running} "
            f"running, best {self.metric} {best}" + (f" | {self.latest}" if self.latest else "")
        )

    def on_trial_result(self, iteration, trials, trial, result, **info):
        value = result.get(self.metric)
        if value is None:
            return
        if _is_better(value, self.best, self.mode):
            self.best = float(value)
        rate = [f"{v:,.0f} {k[5:-6]}/s" for k, v in result.items()
                if k.startswith("perf/") and k.endswith("_per_s")]  # fmt: skip
        self.latest = (
            f"{_trial_name(self.arm, trial.trial_id)} epoch {result.get('epoch')}/{self.epochs} "
            f"{self.metric} {value:.4f}" + (f", {rate[0]}" if rate else "")
        )
        self._show(trials)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.finished.add(trial.trial_id)
        self._show(trials)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.finished.add(trial.trial_id)
        self._show(trials)


def _search_space(space: dict[str, Distribution]) -> dict[str, Any]:
    out = {}
    for key, dist_ in space.items():
        kind, value = dist_.kind, getattr(dist_, dist_.kind)
        out[key] = {
            "uniform": lambda v: tune.uniform(*v),
            "loguniform": lambda v: tune.loguniform(*v),
            "randint": lambda v: tune.randint(v[0], v[1] + 1),  # inclusive high, like YAML reads
            "choice": tune.choice,
            "grid": tune.grid_search,
        }[kind](value)
    return out


def _mutations(space: dict[str, Distribution]) -> dict[str, Any]:
    """PBT's explore step resamples from the same distributions (lists for discrete ones)."""
    out = {}
    for key, dist_ in space.items():
        value = getattr(dist_, dist_.kind)
        if dist_.kind in ("choice", "grid"):
            out[key] = list(value)
        elif dist_.kind == "randint":
            out[key] = list(range(value[0], value[1] + 1))
        else:
            out[key] = _search_space({key: dist_})[key]
    return out


def _hyperparameters(cfg: FinetuneConfig, sampled: dict[str, Any]) -> dict[str, Any]:
    base = {
        "lr": cfg.optimizer.lr,
        "weight_decay": cfg.optimizer.weight_decay,
        "warmup_ratio": cfg.optimizer.warmup_ratio,
        "batch_size": cfg.batch_size,
        "freeze_backbone": cfg.freeze_backbone,
        "dropout": cfg.dropout,
    }
    assert set(base) == set(TUNABLE)
    return {**base, **{k: sampled[k] for k in TUNABLE if k in sampled}}


def _nonfinite(trial: str, epoch: int, detail: str) -> UserError:
    return UserError(
        f"finetune {trial}: the loss became non-finite in epoch {epoch} ({detail}); lower "
        "finetune.optimizer.lr (or the lr range in finetune.sweep.space)"
    )


class _WorkerSession:
    """A fine-tuning loop inside a TorchTrainer worker (several workers: DDP)."""

    def __init__(self):
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    @contextlib.contextmanager
    def resumed(self):
        """The checkpoint a restarted worker group continues from, as a directory, or None."""
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as d:
            yield d

    def dataset(self, name: str):
        return ray.train.get_dataset_shard(name)

    def prepare(self, module: torch.nn.Module, *, multi_tower: bool) -> torch.nn.Module:
        # A two-tower backbone (CLIP, captioner) leaves the tower the task does not read unused.
        kwargs = {"find_unused_parameters": True} if multi_tower else None
        return ray.train.torch.prepare_model(module, parallel_strategy_kwargs=kwargs)

    def report(self, metrics: dict[str, Any], *, save, checkpoint_name: str) -> None:
        report(metrics, rank=self.rank, save=save, checkpoint_name=checkpoint_name)


class _InlineSession:
    """A one-worker fine-tuning loop run in the Tune trial's own process, with no TorchTrainer:
    no controller and worker processes to start and no dataset split to coordinate for each
    trial. Checkpoints go to the same place with the same names as a TorchTrainer's; a trial
    that Tune restarts (a crash, a restarted driver) continues from its newest one."""

    rank, world = 0, 1

    def __init__(self, *, run_dir: str, datasets: dict, use_gpu: bool, num_to_keep: int | None,
                 to_tune: bool):  # fmt: skip
        self.run_dir, self.datasets = run_dir, datasets
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.num_to_keep, self.to_tune = num_to_keep, to_tune
        self.last_metrics: dict[str, Any] | None = None

    @contextlib.contextmanager
    def resumed(self):
        found = latest_checkpoint(self.run_dir, prefix=CHECKPOINT_PREFIX)
        yield found[0] if found else None

    def dataset(self, name: str):
        return self.datasets[name]

    def prepare(self, module: torch.nn.Module, *, multi_tower: bool) -> torch.nn.Module:
        return module

    def report(self, metrics: dict[str, Any], *, save, checkpoint_name: str) -> None:
        if save is not None:
            save_into(self.run_dir, checkpoint_name, save, num_to_keep=self.num_to_keep)
        self.last_metrics = metrics
        if self.to_tune:
            tune.report(metrics)


def _finetune_loop(loop: dict[str, Any], session=None) -> None:
    """One trial's training (or one PBT segment of it), in a TorchTrainer worker or, with
    `session=_InlineSession(…)`, in the trial's process."""
    session = session or _WorkerSession()
    cfg: FinetuneConfig = loop["finetune"]
    hp = loop["hp"]
    rank, world, device = session.rank, session.world, session.device
    torch.manual_seed(loop["seed"])

    backbone = build_model(loop["model_spec"])
    if loop["init_checkpoint"]:
        load_weights(loop["init_checkpoint"], backbone)  # weights only: new head, new optimizer
    task_cls = registry.resolve("task", cfg.task)
    options = task_options(cfg, task_cls, loop["finetune_input"], hp["dropout"])
    task = build_task(cfg.task, backbone, options, tokenizer_json=loop["tokenizer_json"]).to(device)
    if hp["freeze_backbone"]:
        backbone.requires_grad_(False)

    steps_per_epoch = max(1, loop["num_train_rows"] // (hp["batch_size"] * world))
    total_steps = steps_per_epoch * cfg.epochs
    optimizer = build_optimizer(
        task.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"], betas=cfg.optimizer.betas
    )
    scheduler = warmup_cosine(
        optimizer,
        warmup_steps=int(hp["warmup_ratio"] * total_steps),
        total_steps=total_steps,
        min_lr_ratio=cfg.optimizer.min_lr_ratio,
    )
    metric, mode = cfg.sweep.metric, cfg.sweep.mode
    start_epoch, best, resumed = 0, None, False
    with session.resumed() as d:
        if d is not None:  # a restarted trial continues where it left off
            resumed = True
            load_weights(d, task)
            state = load_train_state(d)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            set_rng_state(state["rng"])
            start_epoch = state["epoch"]
            best = read_meta(d)["metrics"][metric]
    if not resumed and loop.get("continue_from"):
        # PBT: continue from a trial's checkpoint (its own, or a better trial's it cloned) with
        # this trial's possibly perturbed settings: weights and moments carry over, the
        # learning-rate schedule restarts from the same step under the new peak rate.
        d = loop["continue_from"]
        load_weights(d, task)
        state = load_train_state(d)
        optimizer.load_state_dict(state["optimizer"])
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] = hp["lr"]
            if group["weight_decay"]:
                group["weight_decay"] = hp["weight_decay"]
        scheduler.base_lrs = [hp["lr"] for _ in optimizer.param_groups]
        done = min(state.get("steps", 0), total_steps)
        scheduler.last_epoch = done - 1
        scheduler.step()
        set_rng_state(state["rng"])
        start_epoch = state["epoch"]
    module = session.prepare(task, multi_tower=len(getattr(backbone, "modalities", ())) > 1)
    logger = tracking.logger_for(loop["run"], rank)
    train_shard = session.dataset("train")
    val_data = session.dataset("validation")
    spec = {**loop["model_spec"], "task": {"name": cfg.task, "options": options}}
    stop_epoch = loop.get("stop_epoch") or cfg.epochs

    injected = faults.parse(loop["faults"])
    try:
        for epoch in range(start_epoch + 1, stop_epoch + 1):
            # Test-only faults (RAYPIPE_FAULTS): "crash" ends this process, "nan" poisons a weight.
            if faults.check(injected, place=loop["trial_name"], rank=rank, at=epoch) == "nan":
                with torch.no_grad():
                    next(task.parameters()).fill_(float("nan"))
            meter = Meter(unit=task.unit)
            train_totals: dict[str, torch.Tensor] = {}
            skipped = torch.zeros((), device=device)
            batches = iter(
                train_shard.iter_torch_batches(
                    batch_size=hp["batch_size"],
                    drop_last=True,
                    device=device,
                    local_shuffle_buffer_size=loop["num_train_rows"],
                    local_shuffle_seed=loop["seed"] * 1000 + epoch,
                )
            )
            while True:
                try:
                    batch = meter.timed_next(batches)
                except StopIteration:
                    break
                try:
                    _, stats = train_step(
                        module,
                        optimizer,
                        scheduler,
                        [batch],
                        grad_clip=cfg.optimizer.grad_clip,
                        device=device,
                        precision=cfg.precision,
                    )
                except NonFiniteLoss as e:
                    raise _nonfinite(loop["trial_name"], epoch, str(e)) from None
                stats.pop("grad_norm", None)
                # Found on the device (see train_step): checked at the epoch's end, no per-step sync.
                skipped = skipped + stats.pop("skipped_steps", 0)
                for k, v in stats.items():
                    train_totals[k] = train_totals.get(k, 0) + v
                meter.steps += 1
                meter.items += task.items_in(batch) * world
            if bool(skipped > 0):
                raise _nonfinite(loop["trial_name"], epoch, f"{int(skipped)} step(s) skipped")
            if not train_totals:
                raise UserError(
                    f"finetune: the labeled training data gives no full batch of {hp['batch_size']} "
                    "rows per worker; lower finetune.batch_size or add labeled data"
                )
            # Each rank evaluates every world-th batch; the summed stats are exact after reduction.
            val_batches = itertools.islice(
                val_data.iter_torch_batches(batch_size=256, device=device), rank, None, world
            )
            val_totals = evaluate(module, val_batches, device=device)
            if not val_totals:
                # Fewer validation batches than ranks: this rank adds zeros of the right shapes, so
                # every rank joins the same collective.
                first = next(iter(val_data.iter_torch_batches(batch_size=256, device=device)))
                val_totals = {k: v * 0 for k, v in evaluate(module, [first], device=device).items()}
            val_totals = all_reduce_sum(val_totals, device)
            train_totals = all_reduce_sum(train_totals, device)
            metrics = {
                "epoch": epoch,
                **{f"train/{k}": v for k, v in task.summarize(train_totals).items()},
                **{f"val/{k}": v for k, v in task.summarize(val_totals).items()},
                **{f"perf/{k}": v for k, v in meter.read_and_reset().items()},
            }
            logger.log_metrics(metrics, epoch)  # the sweep's status line shows it (_SweepStatus)
            value = metrics[metric]
            save = None
            # PBT continues from the latest state, so it saves every epoch; otherwise the best only.
            if _is_better(value, best, mode) or loop.get("save_every_epoch"):
                best = value if _is_better(value, best, mode) else best

                def save(directory, epoch=epoch, metrics=metrics):
                    return save_checkpoint(
                        directory,
                        module=task,
                        spec=spec,
                        tokenizer_json=loop["tokenizer_json"],
                        meta={
                            "epoch": epoch,
                            "task": cfg.task,
                            "arm": loop["arm"],
                            "hyperparameters": hp,
                            "metrics": metrics,
                            "init_checkpoint": loop["init_checkpoint"],
                            "fingerprint": loop["fingerprint"],
                        },
                        train_state={
                            "epoch": epoch,
                            "steps": scheduler.last_epoch,
                            "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(),
                            "rng": rng_state(),
                        },
                    )

            # The scheduler may stop the trial at this report: its metrics go first (a short wait
            # when the tracking server is away; they stay queued if it stays away).
            logger.flush(timeout=30)
            session.report(metrics, save=save, checkpoint_name=f"{CHECKPOINT_PREFIX}{epoch:04d}")
    except BaseException:  # also Tune stopping the trial at a report (SystemExit)
        logger.close(timeout=30)
        raise
    logger.close()  # waits for metrics queued while the tracking server was away


def _trial_run(static: dict[str, Any], trial_id: str, name: str, hp: dict) -> tracking.RunRef:
    """The trial's MLflow run: reopened when PBT restarts the trial, else created."""
    parent = static["parent"]
    found = tracking.find_run(
        tracking_uri=parent.tracking_uri,
        experiment_id=parent.experiment_id,
        kind="trial",
        tags={"raypipe.trial_id": trial_id},
        parent=parent,
    )
    if found is not None:
        tracking.RunLogger(found[0]).set_tags({"raypipe.settings_now": hp})
        return found[0]
    run = tracking.start_run(
        tracking_uri=parent.tracking_uri,
        experiment_id=parent.experiment_id,
        name=name,
        kind="trial",
        parent=parent,
        tags={
            "raypipe.arm": static["arm"],
            "raypipe.trial_id": trial_id,
            "raypipe.init_checkpoint": static["init_checkpoint"] or "none",
            **static["lineage"],  # the pretraining run and step it started from
        },
    )
    tracking.RunLogger(run).log_params(hp)
    return run


def inline_trials(cfg: FinetuneConfig) -> bool:
    """One worker per trial: the trial's own process trains (see _InlineSession)."""
    return cfg.scaling.num_workers == 1


def trial_resources(cfg: FinetuneConfig) -> dict[str, float]:
    """What one Tune trial holds: one worker's resources when it trains itself; otherwise
    nothing but a little memory, as the trial only waits on its TorchTrainer (a CPU reserved
    for it would starve the training workers on small machines)."""
    if not inline_trials(cfg):
        return {"CPU": 0, "memory": 64 * 2**20}
    return {k: float(v) for k, v in scaling_config(cfg.scaling).resources_per_worker.items()}


def _fit(static, loop_config, name: str, datasets, *, to_tune: bool, num_to_keep) -> str | None:
    """Train one trial (or one PBT segment of it) as run `name` under the trials directory;
    returns its newest checkpoint's path. With `to_tune`, each epoch is reported to Tune as
    it happens (the scheduler may stop the trial there)."""
    cfg: FinetuneConfig = static["finetune"]
    run_dir = storage.join(static["trials_dir"], name)
    if inline_trials(cfg):
        done = storage.join(run_dir, DONE_FILE)
        if to_tune and storage.exists(done):
            # Finished before a driver restart that Tune's saved state did not see: its last
            # result again, nothing recomputed.
            tune.report(json.loads(storage.read_text(done)))
        else:
            torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
            session = _InlineSession(
                run_dir=run_dir,
                datasets=datasets,
                use_gpu=cfg.scaling.use_gpu,
                num_to_keep=num_to_keep,
                to_tune=to_tune,
            )
            _finetune_loop(loop_config, session)
            if to_tune and session.last_metrics is not None:
                storage.write_text(done, json.dumps(session.last_metrics))
        found = latest_checkpoint(run_dir, prefix=CHECKPOINT_PREFIX)
        return found[0] if found else None
    trainer = TorchTrainer(
        _finetune_loop,
        train_loop_config=loop_config,
        scaling_config=scaling_config(cfg.scaling),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=static["trials_dir"],
            callbacks=[TuneReportCallback()] if to_tune else [],
            checkpoint_config=CheckpointConfig(num_to_keep=num_to_keep),
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        return None
    return storage.qualify(result.checkpoint.path, like=static["trials_dir"])


def _trial(params: dict[str, Any], *, static: dict[str, Any], train_ds, val_ds) -> None:
    """A Tune trial: open its MLflow run, then train (in this process, or with a TorchTrainer
    when a trial has several workers; see _fit).

    ASHA/FIFO: one run, each epoch reported to Tune as it happens. PBT: one run per
    perturbation interval, each continuing from the trial's checkpoint (Tune hands a trial a
    better trial's checkpoint when it exploits), reported to Tune with that checkpoint so PBT
    can clone it.
    """
    cfg: FinetuneConfig = static["finetune"]
    trial_id = tune.get_context().get_trial_id()
    hp = _hyperparameters(cfg, params)
    name = _trial_name(static["arm"], trial_id)
    run = _trial_run(static, trial_id, name, hp)
    datasets = {"train": train_ds, "validation": val_ds}
    loop_config = {**static, "hp": hp, "run": run, "trial_name": name}
    if cfg.sweep.scheduler != "pbt":
        _fit(static, loop_config, name, datasets, to_tune=True, num_to_keep=1)
        tracking.end_run(run, "FINISHED")
        return
    interval = cfg.sweep.perturbation_interval
    tune_ckpt = tune.get_checkpoint()
    epoch = 0
    continue_from = None
    if tune_ckpt is not None:
        continue_from = tune_ckpt.to_directory()  # a local copy of the cloned trial's state
        epoch = read_meta(continue_from)["epoch"]
    segment = 0
    while epoch < cfg.epochs:
        stop = min(epoch + interval, cfg.epochs)
        segment += 1
        continue_from = _fit(
            static,
            {**loop_config, "continue_from": continue_from, "stop_epoch": stop,
             "save_every_epoch": True},
            f"{name}-{epoch:03d}-{stop:03d}-{segment}",
            datasets,
            to_tune=False,
            num_to_keep=None,
        )  # fmt: skip
        metrics = read_meta(continue_from)["metrics"]
        epoch = stop
        fs, path = storage.resolve(continue_from)
        with ray.tune.Checkpoint(path, filesystem=fs).as_directory() as local:
            # Tune persists it from a local directory.
            tune.report(
                {**metrics, "checkpoint_path": continue_from},
                checkpoint=ray.tune.Checkpoint.from_directory(local),
            )
    tracking.end_run(run, "FINISHED")


def _close_trial_runs(parent: tracking.RunRef, arm: str, grid, epochs: int) -> int:
    """Close the arm's trial runs; returns how many the scheduler stopped early.

    A trial the scheduler stops is killed before it can end its own MLflow run.
    """
    by_trial = {r.metrics.get("trial_id"): r for r in grid if r.metrics}
    stopped = 0
    for run in tracking.child_runs(parent):
        if run.data.tags.get("raypipe.arm") != arm:
            continue
        result = by_trial.get(run.data.tags.get("raypipe.trial_id"))
        errored = result is None or result.error is not None
        early = not errored and result.metrics.get("epoch", 0) < epochs
        stopped += early
        ref = tracking.RunRef(parent.tracking_uri, parent.experiment_id, run.info.run_id)
        tracking.RunLogger(ref).set_tags({"raypipe.stopped_early": str(early).lower()})
        if run.info.status == "RUNNING":
            tracking.end_run(ref, "FAILED" if errored else "FINISHED")
    return stopped


def run_arm(
    *,
    arm: str,
    cfg: FinetuneConfig,
    init_checkpoint: str | None,
    model_spec: dict[str, Any],
    finetune_input: str,
    tokenizer_json: str | None,
    train_ds: ray.data.Dataset,
    val_ds: ray.data.Dataset,
    num_train_rows: int,
    stage_dir: str,
    parent: tracking.RunRef,
    seed: int,
    fingerprint: str,
    lineage: dict[str, Any] | None = None,
) -> ArmResult:
    sweep = cfg.sweep
    static = {
        "finetune": cfg,
        "arm": arm,
        "init_checkpoint": init_checkpoint,
        "model_spec": model_spec,
        "finetune_input": finetune_input,
        "tokenizer_json": tokenizer_json,
        "num_train_rows": num_train_rows,
        "trials_dir": storage.join(stage_dir, "trials"),
        "parent": parent,
        "seed": seed,
        "fingerprint": fingerprint,
        "lineage": lineage or {},
        "faults": os.environ.get(faults.ENV, ""),
    }
    space = _search_space(sweep.space)
    if sweep.scheduler == "asha":
        scheduler = ASHAScheduler(
            time_attr="epoch",
            max_t=cfg.epochs,
            grace_period=min(sweep.grace_period, cfg.epochs),
            reduction_factor=sweep.reduction_factor,
        )
    elif sweep.scheduler == "pbt":
        # PBT draws its explore/exploit choices from Python's global `random` (no seed argument).
        random.seed(seed)
        scheduler = PopulationBasedTraining(
            time_attr="epoch",
            perturbation_interval=sweep.perturbation_interval,
            hyperparam_mutations=_mutations(sweep.space),
        )
    else:
        scheduler = FIFOScheduler()
    if sweep.search == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        # TPE seeded alike in every arm: the arms start from the same suggestions.
        search_alg = ConcurrencyLimiter(
            OptunaSearch(seed=seed), max_concurrent=sweep.max_concurrent_trials
        )
    else:
        # The same seed in every arm: the arms sample the same settings.
        search_alg = BasicVariantGenerator(
            random_state=seed, max_concurrent=sweep.max_concurrent_trials
        )
    trainable = tune.with_resources(
        tune.with_parameters(_trial, static=static, train_ds=train_ds, val_ds=val_ds),
        trial_resources(cfg),
    )
    if not storage.is_remote(stage_dir):
        # Save the sweep's state (which trials finished) every second rather than every 10+ s,
        # so a restarted driver reruns as little as possible; a local write costs nothing.
        os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    sweep_dir = storage.join(stage_dir, f"sweep-{arm}")
    if tune.Tuner.can_restore(sweep_dir):
        # A driver that died mid-sweep: finished trials stay finished, unfinished ones resume
        # from their checkpoints, failed ones stay failed.
        console.line(f"[finetune] resuming the {arm} sweep from {sweep_dir}")
        tuner = tune.Tuner.restore(
            sweep_dir, trainable=trainable, resume_unfinished=True, param_space=space
        )
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                metric=sweep.metric,
                mode=sweep.mode,
                num_samples=sweep.num_samples,
                scheduler=scheduler,
                search_alg=search_alg,
                reuse_actors=inline_trials(cfg),
            ),
            run_config=tune.RunConfig(
                name=f"sweep-{arm}",
                storage_path=stage_dir,
                verbose=0,
                failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
                callbacks=[_SweepStatus(arm, cfg)],
            ),
        )
    grid = tuner.fit()
    stopped = _close_trial_runs(parent, arm, grid, cfg.epochs)
    errors = [r.error for r in grid if r.error is not None]
    if len(errors) == len(grid):
        # Every trial failed: surface the cause instead of an empty sweep.
        cause = next((u for u in map(find_user_error, errors) if u is not None), None)
        if cause is not None:
            raise cause
        first = str(errors[0]).strip().splitlines()
        raise RuntimeError(
            f"all {len(grid)} {arm} trials failed; first error: {first[-1] if first else errors[0]!r}"
        )
    failed = len(errors)

    best = ArmResult(
        arm=arm,
        best_metric=None,
        best_checkpoint=None,
        best_trial=None,
        num_trials=len(grid),
        num_stopped_early=stopped,
        num_failed=failed,
    )
    # The best checkpoint of the trials that did not fail, read from storage: each checkpoint's
    # meta.json holds its metrics. Tune's own record of a resumed sweep lacks the checkpoints
    # of the sessions before it.
    good = {_trial_name(arm, r.metrics["trial_id"]) for r in grid if r.error is None and r.metrics}
    for meta_file in storage.list_files(static["trials_dir"], META_FILE):
        checkpoint = meta_file.rsplit("/", 1)[0]
        run_name = checkpoint.rsplit("/", 2)[-2]  # arm-index, or arm-index-from-to-segment (PBT)
        trial = "-".join(run_name.split("-")[:2])
        if trial not in good:
            continue
        meta = json.loads(storage.read_text(meta_file))
        value = meta["metrics"].get(sweep.metric)
        if value is not None and _is_better(value, best.best_metric, sweep.mode):
            best.best_metric = float(value)
            best.best_checkpoint = checkpoint
            best.best_trial = trial
            best.best_params = {k: meta["hyperparameters"][k] for k in sweep.space}
    return best

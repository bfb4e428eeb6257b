"""The fine-tune sweep: Ray Tune trials, each a TorchTrainer run on the labeled shards.

The only Ray Tune caller. Every arm (pretrained, scratch) is its own Tune experiment with the
same seeded search, so both arms try the same settings and the early-stopping scheduler only
ever compares trials of one arm with each other.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
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
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from raypipe import tracking
from raypipe.config import TUNABLE, Distribution, FinetuneConfig
from raypipe.data.text import encode_labeled
from raypipe.engine.checkpoint import (
    load_train_state,
    load_weights,
    read_meta,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from raypipe.engine.loop import Meter, all_reduce_sum, evaluate, train_step
from raypipe.engine.optim import build_optimizer, warmup_cosine
from raypipe.errors import UserError
from raypipe.models import build_model
from raypipe.progress import progress
from raypipe.stages.common import find_user_error, report, scaling_config
from raypipe.tasks import build_task


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
    text_column: str,
    label_column: str,
    tokenizer_json: str,
    max_len: int,
) -> ray.data.Dataset:
    """Tokenized once and materialized: every trial and epoch re-reads the same blocks."""
    ds = ray.data.read_parquet(files, columns=[text_column, label_column]).map_batches(
        encode_labeled,
        batch_format="numpy",
        batch_size=1024,
        fn_kwargs={
            "tokenizer_json": tokenizer_json,
            "text_column": text_column,
            "label_column": label_column,
            "max_len": max_len,
        },
    )
    ds.context.execution_options.preserve_order = True  # the same rows in the same order
    return ds.materialize()


def _is_better(value: float, best: float | None, mode: str) -> bool:
    return best is None or (value > best if mode == "max" else value < best)


def _trial_name(arm: str, trial_id: str) -> str:
    """Deterministic: Tune's trial ids end in the trial's index (`..._00003`)."""
    return f"{arm}-{trial_id.rsplit('_', 1)[-1]}"


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


def _finetune_loop(loop: dict[str, Any]) -> None:
    cfg: FinetuneConfig = loop["finetune"]
    hp = loop["hp"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(loop["seed"])

    backbone = build_model(loop["model_spec"])
    if loop["init_checkpoint"]:
        load_weights(loop["init_checkpoint"], backbone)  # weights only: new head, new optimizer
    task_options = {"num_classes": cfg.num_classes, "pool": cfg.pool, "dropout": hp["dropout"]}
    task = build_task(cfg.task, backbone, task_options).to(device)
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
    start_epoch, best = 0, None
    resumed = ray.train.get_checkpoint()
    if resumed:  # a restarted worker group continues the same trial
        with resumed.as_directory() as d:
            load_weights(d, task)
            state = load_train_state(d)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            set_rng_state(state["rng"])
            start_epoch = state["epoch"]
            best = read_meta(d)["metrics"][metric]
    module = ray.train.torch.prepare_model(task)
    logger = tracking.logger_for(loop["run"], rank)
    train_shard = ray.train.get_dataset_shard("train")
    val_data = ray.train.get_dataset_shard("validation")
    spec = {**loop["model_spec"], "task": {"name": cfg.task, "options": task_options}}

    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        meter = Meter()
        train_totals: dict[str, torch.Tensor] = {}
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
            _, stats = train_step(
                module,
                optimizer,
                scheduler,
                [batch],
                grad_clip=cfg.optimizer.grad_clip,
                device=device,
                precision=cfg.precision,
            )
            stats.pop("grad_norm", None)
            for k, v in stats.items():
                train_totals[k] = train_totals.get(k, 0) + v
            meter.steps += 1
            meter.tokens += task.tokens_in(batch) * world
        if not train_totals:
            raise UserError(
                f"finetune: the labeled training data gives no full batch of {hp['batch_size']} "
                "rows per worker; lower finetune.batch_size or add labeled data"
            )
        # Each rank evaluates every world-th batch; the summed stats are exact after reduction.
        val_batches = itertools.islice(
            val_data.iter_torch_batches(batch_size=256, device=device), rank, None, world
        )
        val_totals = all_reduce_sum(evaluate(module, val_batches, device=device), device)
        train_totals = all_reduce_sum(train_totals, device)
        metrics = {
            "epoch": epoch,
            **{f"train/{k}": v for k, v in task.summarize(train_totals).items()},
            **{f"val/{k}": v for k, v in task.summarize(val_totals).items()},
            **{f"perf/{k}": v for k, v in meter.read_and_reset().items()},
        }
        logger.log_metrics(metrics, epoch)
        if rank == 0:
            progress(
                f"finetune {loop['trial_name']} epoch {epoch}/{cfg.epochs} "
                f"val/loss {metrics['val/loss']:.4f} {metric} {metrics[metric]:.4f}"
            )
        value = metrics[metric]
        save = None
        if _is_better(value, best, mode):
            best = value

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
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "rng": rng_state(),
                    },
                )

        report(metrics, rank=rank, save=save, checkpoint_name=f"epoch-{epoch:04d}")


def _trial(params: dict[str, Any], *, static: dict[str, Any], train_ds, val_ds) -> None:
    """A Tune trial: open its MLflow run, then drive one TorchTrainer run."""
    cfg: FinetuneConfig = static["finetune"]
    trial_id = tune.get_context().get_trial_id()
    arm = static["arm"]
    hp = _hyperparameters(cfg, params)
    name = _trial_name(arm, trial_id)
    run = tracking.start_run(
        tracking_uri=static["parent"].tracking_uri,
        experiment_id=static["parent"].experiment_id,
        name=name,
        kind="trial",
        parent=static["parent"],
        tags={
            "raypipe.arm": arm,
            "raypipe.trial_id": trial_id,
            "raypipe.init_checkpoint": static["init_checkpoint"] or "none",
        },
    )
    tracking.RunLogger(run).log_params(hp)
    trainer = TorchTrainer(
        _finetune_loop,
        train_loop_config={**static, "hp": hp, "run": run, "trial_name": name},
        scaling_config=scaling_config(cfg.scaling),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=static["trials_dir"],
            callbacks=[TuneReportCallback()],
            checkpoint_config=CheckpointConfig(num_to_keep=1),
        ),
        datasets={"train": train_ds, "validation": val_ds},
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )
    result = trainer.fit()
    tracking.end_run(run, "FINISHED" if result.error is None else "FAILED")


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
    tokenizer_json: str,
    train_ds: ray.data.Dataset,
    val_ds: ray.data.Dataset,
    num_train_rows: int,
    stage_dir: str,
    parent: tracking.RunRef,
    seed: int,
    fingerprint: str,
) -> ArmResult:
    sweep = cfg.sweep
    static = {
        "finetune": cfg,
        "arm": arm,
        "init_checkpoint": init_checkpoint,
        "model_spec": model_spec,
        "tokenizer_json": tokenizer_json,
        "num_train_rows": num_train_rows,
        "trials_dir": str(Path(stage_dir) / "trials"),
        "parent": parent,
        "seed": seed,
        "fingerprint": fingerprint,
    }
    if sweep.scheduler == "asha":
        scheduler = ASHAScheduler(
            time_attr="epoch",
            max_t=cfg.epochs,
            grace_period=min(sweep.grace_period, cfg.epochs),
            reduction_factor=sweep.reduction_factor,
        )
    else:
        scheduler = FIFOScheduler()
    trainable = tune.with_resources(
        tune.with_parameters(_trial, static=static, train_ds=train_ds, val_ds=val_ds),
        # The trial function only waits on its TorchTrainer: reserving a CPU for it would
        # starve the training workers on small machines.
        {"CPU": 0, "memory": 64 * 2**20},
    )
    tuner = tune.Tuner(
        trainable,
        param_space=_search_space(sweep.space),
        tune_config=tune.TuneConfig(
            metric=sweep.metric,
            mode=sweep.mode,
            num_samples=sweep.num_samples,
            scheduler=scheduler,
            # The same seed in every arm: the arms sample the same settings.
            search_alg=BasicVariantGenerator(
                random_state=seed, max_concurrent=sweep.max_concurrent_trials
            ),
        ),
        run_config=tune.RunConfig(name=f"sweep-{arm}", storage_path=stage_dir, verbose=0),
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
    for result in grid:
        if result.metrics_dataframe is None or sweep.metric not in result.metrics_dataframe:
            continue
        df = result.metrics_dataframe.dropna(subset=["checkpoint_path"])
        if df.empty:
            continue
        row = df.loc[
            df[sweep.metric].idxmax() if sweep.mode == "max" else df[sweep.metric].idxmin()
        ]
        value = float(row[sweep.metric])
        if (
            _is_better(value, best.best_metric, sweep.mode)
            and Path(row["checkpoint_path"]).is_dir()
        ):
            best.best_metric = value
            best.best_checkpoint = str(row["checkpoint_path"])
            best.best_trial = _trial_name(arm, result.metrics["trial_id"])
            searched = _hyperparameters(cfg, result.config)
            best.best_params = {k: searched[k] for k in sweep.space}
    return best

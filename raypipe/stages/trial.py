"""One fine-tuning trial: its MLflow run, its settings, and its training, in the Tune trial's
own process (one worker, `TrialSession`) or through a TorchTrainer (several workers, DDP).

ASHA/FIFO: one run, each epoch reported to Tune as it happens. PBT: one run per perturbation
interval, each continuing from the trial's checkpoint (Tune hands a trial a better trial's
checkpoint when it exploits), reported to Tune with that checkpoint so PBT can clone it.
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass, field, replace
from typing import Any

import ray
import ray.train
import torch
from ray import tune
from ray.train import CheckpointConfig, DataConfig
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from raypipe import registry, storage, tracking
from raypipe.config import TUNABLE, FinetuneConfig
from raypipe.engine.checkpoint import latest_checkpoint, read_meta
from raypipe.engine.finetune_loop import CHECKPOINT_PREFIX, FinetuneJob, finetune_loop
from raypipe.plan import task_options
from raypipe.stages.arms import Arm
from raypipe.stages.sessions import TrainSession, TrialSession, scaling_config
from raypipe.system_metrics import system_metrics
from raypipe.tracking import RunRef, Tag

#: Beside a trial's checkpoints once Tune has finished with it (ran every epoch, stopped by the
#: scheduler, or failed): its settings and its last result or its error, written by the trial
#: and by the driver (sweep.py's `TrialRecord`). A resumed sweep replays it instead of training.
DONE_FILE = "done.json"
#: The sampled setting that makes a trial a repeat of an arm's best settings with this seed.
REPEAT_SEED = "repeat_seed"


@dataclass(frozen=True)
class ArmSweep:
    """What every trial of one arm's sweep shares, decided on the driver."""

    cfg: FinetuneConfig
    arm: Arm
    init_checkpoint: str | None
    model_spec: dict[str, Any]
    finetune_input: str | None
    tokenizer_json: str | None
    num_train_rows: int
    trials_dir: str
    parent: RunRef  # the fine-tune stage's run: trial runs go under it
    seed: int
    fingerprint: str
    lineage: dict[str, Any] = field(default_factory=dict)  # the pretraining it started from
    faults: str = ""
    system_metrics_s: float | None = None  # tracking.system_metrics_s, on each trial's run
    #: the arm's share of budget.finetune_worker_hours, in worker-seconds (None: no budget)
    worker_budget_s: float | None = None


def trial_name(arm: Arm, trial_id: str) -> str:
    """Deterministic: Tune's trial ids end in the trial's index (`..._00003`)."""
    return f"{arm.label}-{trial_id.rsplit('_', 1)[-1]}"


def repeat_name(arm: Arm, seed: int) -> str:
    """A repeat's run name: the arm and the seed it trained with."""
    return f"{arm.label}-seed{seed}"


def hyperparameters(cfg: FinetuneConfig, sampled: dict[str, Any]) -> dict[str, Any]:
    base = {
        "lr": cfg.optimizer.lr,
        "weight_decay": cfg.optimizer.weight_decay,
        "warmup_ratio": cfg.optimizer.warmup_ratio,
        "batch_size": cfg.batch_size,
        "freeze_backbone": cfg.freeze_backbone,
        "dropout": cfg.dropout,
        "backbone_lr_ratio": cfg.optimizer.backbone_lr_ratio,
    }
    assert set(base) == set(TUNABLE)
    return {**base, **{k: sampled[k] for k in TUNABLE if k in sampled}}


def inline_trials(cfg: FinetuneConfig) -> bool:
    """One worker per trial: the trial's own process trains (see TrialSession)."""
    return cfg.scaling.num_workers == 1


def trial_resources(cfg: FinetuneConfig) -> dict[str, float]:
    """What one Tune trial holds: one worker's resources when it trains itself; otherwise
    nothing but a little memory, as the trial only waits on its TorchTrainer (a CPU reserved
    for it would starve the training workers on small machines)."""
    if not inline_trials(cfg):
        return {"CPU": 0, "memory": 64 * 2**20}
    return {k: float(v) for k, v in scaling_config(cfg.scaling).resources_per_worker.items()}


def _trial_run(sweep: ArmSweep, trial_id: str, name: str, hp: dict, seed: int | None) -> RunRef:
    """The trial's MLflow run (kind `repeat` for a repeat): found again when PBT restarts the
    trial, else created."""
    run, status = tracking.find_or_start_run(
        tracking_uri=sweep.parent.tracking_uri,
        experiment_id=sweep.parent.experiment_id,
        name=name,
        kind="trial" if seed is None else "repeat",
        parent=sweep.parent,
        tags={Tag.TRIAL: name},  # Tune's trial ids are new in a resumed sweep; names are not
        new_tags={
            Tag.TRIAL_ID: trial_id,
            Tag.ARM: sweep.arm.label,
            Tag.INIT_CHECKPOINT: sweep.init_checkpoint or "none",
            **({} if seed is None else {Tag.SEED: seed}),
            **sweep.lineage,
        },
        reopen=False,
    )
    if status is None:
        tracking.RunLogger(run).log_params(hp)
    else:
        tracking.RunLogger(run).set_tags({Tag.SETTINGS_NOW: hp, Tag.TRIAL_ID: trial_id})
    return run


def _job(sweep: ArmSweep, hp: dict, name: str, seed: int) -> FinetuneJob:
    task_cls = registry.resolve("task", sweep.cfg.task)
    return FinetuneJob(
        cfg=sweep.cfg, hp=hp,
        task_options=task_options(sweep.cfg, task_cls, sweep.finetune_input, hp["dropout"]),
        model_spec=sweep.model_spec, init_checkpoint=sweep.init_checkpoint,
        tokenizer_json=sweep.tokenizer_json, num_train_rows=sweep.num_train_rows,
        seed=seed, fingerprint=sweep.fingerprint, arm=sweep.arm.label, trial_name=name,
        faults=sweep.faults, reclaim_dir=storage.join(sweep.trials_dir, name),
    )  # fmt: skip


def _finetune_worker(config: dict[str, Any]) -> None:
    """A TorchTrainer worker's entry point (trials with several workers)."""
    session = TrainSession(config["run"])
    local_first = ray.train.get_context().get_local_rank() == 0  # one monitor per node
    with system_metrics(config["run"], every_s=config["system_metrics_s"] if local_first else None,
                        node=f"{socket.gethostname()}-rank{session.rank}"):  # fmt: skip
        finetune_loop(config["job"], session)


def _fit_inline(sweep, job, run, run_dir, datasets, *, to_tune: bool, num_to_keep) -> None:
    cfg = sweep.cfg
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    session = TrialSession(
        run, run_dir=run_dir, prefix=CHECKPOINT_PREFIX, datasets=datasets,
        use_gpu=cfg.scaling.use_gpu, num_to_keep=num_to_keep, to_tune=to_tune,
    )  # fmt: skip
    with system_metrics(run, every_s=sweep.system_metrics_s, node=f"{socket.gethostname()}-rank0"):
        finetune_loop(job, session)
    if to_tune and session.last_metrics is not None:
        write_done(run_dir, job.hp, result=session.last_metrics)


def _fit(sweep, job, run, name: str, datasets, *, to_tune: bool, num_to_keep) -> str | None:
    """Train one trial (or one PBT segment of it) as run `name` under the trials directory;
    returns its newest checkpoint's path. With `to_tune`, each epoch is reported to Tune as
    it happens (the scheduler may stop the trial there)."""
    if inline_trials(sweep.cfg):
        run_dir = storage.join(sweep.trials_dir, name)
        _fit_inline(sweep, job, run, run_dir, datasets, to_tune=to_tune, num_to_keep=num_to_keep)
        found = latest_checkpoint(run_dir, prefix=CHECKPOINT_PREFIX)
        return found[0] if found else None
    trainer = TorchTrainer(
        _finetune_worker,
        train_loop_config={"job": job, "run": run, "system_metrics_s": sweep.system_metrics_s},
        scaling_config=scaling_config(sweep.cfg.scaling),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=sweep.trials_dir,
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
    return storage.qualify(result.checkpoint.path, like=sweep.trials_dir)


def write_done(run_dir: str, hp: dict, *, result: dict | None = None, error: str | None = None):
    record = {"hyperparameters": hp, **({"error": error} if error else {"result": result})}
    storage.write_text(storage.join(run_dir, DONE_FILE), json.dumps(record, default=str))


def _replay(run_dir: str, hp: dict) -> bool:
    """A trial Tune had finished with before the driver restarted (same settings): its
    last result reported again, or its error raised again; nothing recomputed."""
    done = storage.join(run_dir, DONE_FILE)
    if not storage.exists(done):
        return False
    record = json.loads(storage.read_text(done))
    if record.get("hyperparameters") != json.loads(json.dumps(hp, default=str)):
        return False  # another setting under the same name (a search that went elsewhere)
    if "error" in record:
        raise RuntimeError(f"failed before the driver restarted: {record['error']}")
    tune.report(record["result"])
    return True


def run_trial(params: dict[str, Any], *, sweep: ArmSweep, train_ds, val_ds) -> None:
    """A Tune trial (the function trainable): open its MLflow run, then train (or replay
    what the trial did before a driver restart)."""
    cfg = sweep.cfg
    trial_id = tune.get_context().get_trial_id()
    hp = hyperparameters(cfg, params)
    seed = params.get(REPEAT_SEED)
    name = trial_name(sweep.arm, trial_id) if seed is None else repeat_name(sweep.arm, seed)
    run = _trial_run(sweep, trial_id, name, hp, seed)
    if _replay(storage.join(sweep.trials_dir, name), hp):
        return
    datasets = {"train": train_ds, "validation": val_ds}
    job = _job(sweep, hp, name, sweep.seed if seed is None else seed)
    if cfg.sweep.scheduler != "pbt" or seed is not None:
        _fit(sweep, job, run, name, datasets, to_tune=True, num_to_keep=1)
        tracking.end_run(run, "FINISHED")
        return
    _run_pbt_segments(sweep, job, run, name, datasets)
    tracking.end_run(run, "FINISHED")


def _run_pbt_segments(sweep: ArmSweep, job: FinetuneJob, run, name: str, datasets) -> None:
    cfg, interval = sweep.cfg, sweep.cfg.sweep.perturbation_interval
    tune_ckpt = tune.get_checkpoint()
    epoch, continue_from, segment = 0, None, 0
    if tune_ckpt is not None:
        continue_from = tune_ckpt.to_directory()  # a local copy of the cloned trial's state
        epoch = read_meta(continue_from)["epoch"]
    while epoch < cfg.epochs:
        stop = min(epoch + interval, cfg.epochs)
        segment += 1
        segment_job = replace(
            job, continue_from=continue_from, stop_epoch=stop, save_every_epoch=True
        )
        continue_from = _fit(
            sweep, segment_job, run, f"{name}-{epoch:03d}-{stop:03d}-{segment}", datasets,
            to_tune=False, num_to_keep=None,
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

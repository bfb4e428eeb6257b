"""One arm's fine-tuning sweep: a Ray Tune experiment over the arm's trials (stages/trial.py),
its scheduler and search, its status line, and the best checkpoint it found.

Every arm (pretrained, scratch; per label fraction) is its own Tune experiment with the same
seeded search, so both arms try the same settings and the early-stopping scheduler only ever
compares trials of one arm with each other.
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass, field, replace
from typing import Any

from ray import tune
from ray.tune.result import AUTO_RESULT_KEYS
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining
from ray.tune.search.basic_variant import BasicVariantGenerator

from raypipe import storage, tracking
from raypipe.config import Distribution, FinetuneConfig, SweepConfig
from raypipe.engine.checkpoint import META_FILE
from raypipe.engine.finetune_loop import is_better
from raypipe.errors import find_user_error
from raypipe.progress import console
from raypipe.stages.arms import Arm, ArmResult, Repeat
from raypipe.stages.budget import (
    WORKER_FILE,
    Budget,
    BudgetClock,
    SpentStopper,
    budget_line,
    read_budget,
    spends_text,
)
from raypipe.stages.counts import num_trials
from raypipe.stages.trial import (
    DONE_FILE,
    REPEAT_SEED,
    ArmSweep,
    hyperparameters,
    inline_trials,
    repeat_name,
    run_trial,
    trial_name,
    trial_resources,
    write_done,
)
from raypipe.tracking import Tag

#: What Tune adds to every result: left out of a trial's record.
_TUNE_KEYS = {*AUTO_RESULT_KEYS, "trial_id", "done", "experiment_tag", "should_checkpoint"}


class _SweepStatus(tune.Callback):
    """The sweep's one status line on the driver's console: trials finished of all, the best
    so far, and the latest epoch's result with its throughput."""

    def __init__(self, arm: Arm, cfg: FinetuneConfig, *, total: int, what: str = "sweep"):
        self.arm, self.total, self.epochs = arm, total, cfg.epochs
        self.title = arm.label if what == "sweep" else f"{arm.label} {what}"
        self.metric, self.mode = cfg.sweep.metric, cfg.sweep.mode
        self.best: float | None = None
        self.finished: set[str] = set()
        self.latest = ""

    def _show(self, trials) -> None:
        self.finished |= {t.trial_id for t in trials if t.status in ("TERMINATED", "ERROR")}
        running = sum(t.status == "RUNNING" and t.trial_id not in self.finished for t in trials)
        best = "-" if self.best is None else f"{self.best:.4f}"
        console.status(
            f"finetune {self.title}: {len(self.finished)}/{self.total} trials done, {running} "
            f"running, best {self.metric} {best}" + (f" | {self.latest}" if self.latest else "")
        )

    def on_trial_result(self, iteration, trials, trial, result, **info):
        value = result.get(self.metric)
        if value is None:
            return
        if is_better(value, self.best, self.mode):
            self.best = float(value)
        rate = [f"{v:,.0f} {k[5:-6]}/s" for k, v in result.items()
                if k.startswith("perf/") and k.endswith("_per_s")]  # fmt: skip
        seed = (trial.config or {}).get(REPEAT_SEED)
        name = trial_name(self.arm, trial.trial_id) if seed is None else repeat_name(self.arm, seed)
        self.latest = (
            f"{name} epoch {result.get('epoch')}/{self.epochs} "
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


def _close_trial_runs(parent: tracking.RunRef, arm: Arm, grid, epochs: int, *, kind: str) -> int:
    """Close the arm's trial runs; returns how many the scheduler stopped early.

    A trial the scheduler stops is killed before it can end its own MLflow run.
    """
    by_trial = {r.metrics.get("trial_id"): r for r in grid if r.metrics}
    stopped = 0
    for run in tracking.child_runs(parent):
        if run.data.tags.get(Tag.ARM) != arm.label or run.data.tags.get(Tag.KIND) != kind:
            continue
        result = by_trial.get(run.data.tags.get(Tag.TRIAL_ID))
        errored = result is None or result.error is not None
        early = not errored and result.metrics.get("epoch", 0) < epochs
        stopped += early
        ref = tracking.RunRef(parent.tracking_uri, parent.experiment_id, run.info.run_id)
        tracking.RunLogger(ref).set_tags({Tag.STOPPED_EARLY: str(early).lower()})
        if run.info.status == "RUNNING":
            tracking.end_run(ref, "FAILED" if errored else "FINISHED")
    return stopped


def _scheduler(cfg: FinetuneConfig, seed: int):
    sweep = cfg.sweep
    if sweep.scheduler == "asha":
        return ASHAScheduler(
            time_attr="epoch",
            max_t=cfg.epochs,
            grace_period=min(sweep.grace_period, cfg.epochs),
            reduction_factor=sweep.reduction_factor,
        )
    if sweep.scheduler == "pbt":
        # PBT draws its explore/exploit choices from Python's global `random` (no seed argument).
        random.seed(seed)
        return PopulationBasedTraining(
            time_attr="epoch",
            perturbation_interval=sweep.perturbation_interval,
            hyperparam_mutations=_mutations(sweep.space),
        )
    return FIFOScheduler()


def _search(sweep: SweepConfig, seed: int):
    if sweep.search == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        # TPE seeded alike in every arm: the arms start from the same suggestions.
        return ConcurrencyLimiter(
            OptunaSearch(seed=seed), max_concurrent=sweep.max_concurrent_trials
        )
    # The same seed in every arm: the arms sample the same settings.
    return BasicVariantGenerator(random_state=seed, max_concurrent=sweep.max_concurrent_trials)


@dataclass(frozen=True)
class _Experiment:
    """One Tune experiment of an arm: its sweep, or the repeats of its best settings."""

    name: str  # the experiment's directory under the stage: sweep-<arm> or repeats-<arm>
    what: str  # for the console: "sweep" or "repeats"
    num_samples: int
    scheduler: Any
    search: Any
    total: int  # trials in all
    budget: Budget | None = None  # the sweep's time budget (repeats have none)
    workers: Budget | None = None  # its share of budget.finetune_worker_hours, worker-seconds


class TrialRecord(tune.Callback):
    """The driver's record of every trial Tune has finished with, in the trial's own folder
    (`done.json`, plain JSON): ran every epoch, stopped by the scheduler, or failed. A sweep
    resumed after the driver died is a fresh Tuner whose trials (the same seeded settings under
    the same names) replay this record, or continue from their checkpoints. Tune's own saved
    state (`tuner.pkl`, trial pickles) is never read: storage does not get to run code here."""

    def __init__(self, spec: ArmSweep):
        self.spec = spec

    def _write(self, trial, **what) -> None:
        seed = (trial.config or {}).get(REPEAT_SEED)
        arm = self.spec.arm
        name = trial_name(arm, trial.trial_id) if seed is None else repeat_name(arm, seed)
        hp = hyperparameters(self.spec.cfg, trial.config or {})
        try:
            write_done(storage.join(self.spec.trials_dir, name), hp, **what)
        except Exception as e:  # the record only saves work on a resume: never end a sweep
            console.line(f"[finetune] could not record trial {name} ({e}); a resume redoes it")

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = {k: v for k, v in (trial.last_result or {}).items() if k not in _TUNE_KEYS}
        if result:
            self._write(trial, result=result)

    def on_trial_error(self, iteration, trials, trial, **info):
        text = str(trial.get_error() or "").strip()  # Tune's text trace (error.txt), not its pickle
        self._write(trial, error=text.splitlines()[-1][:500] if text else "the trial failed")


def _clocks(spec: ArmSweep, stage_dir: str, exp: _Experiment) -> list[BudgetClock]:
    here = storage.join(stage_dir, exp.name)
    out = [BudgetClock(exp.budget, here)] if exp.budget else []
    if exp.workers:
        workers = spec.cfg.scaling.num_workers
        out.append(BudgetClock(exp.workers, here, file=WORKER_FILE, workers=workers))
    return out


def _tuner(spec: ArmSweep, stage_dir: str, trainable, space, exp: _Experiment) -> tune.Tuner:
    cfg = spec.cfg
    clocks = _clocks(spec, stage_dir, exp)
    if storage.exists(storage.join(stage_dir, exp.name, "tuner.pkl")):
        console.line(f"[finetune] resuming the {spec.arm.label} {exp.what} (from raypipe's record)")
    return tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=cfg.sweep.metric,
            mode=cfg.sweep.mode,
            num_samples=exp.num_samples,
            scheduler=exp.scheduler,
            search_alg=exp.search,
            reuse_actors=inline_trials(cfg),
            time_budget_s=exp.budget.left_s if exp.budget else None,
        ),
        run_config=tune.RunConfig(
            name=exp.name,
            storage_path=stage_dir,
            verbose=0,
            failure_config=tune.FailureConfig(max_failures=cfg.sweep.max_failures),
            stop=SpentStopper(clocks[-1]) if exp.workers else None,
            callbacks=[
                _SweepStatus(spec.arm, cfg, total=exp.total, what=exp.what),
                TrialRecord(spec),
                *clocks,
            ],  # fmt: skip
        ),
    )


def _trainable(spec: ArmSweep, train_ds, val_ds):
    return tune.with_resources(
        tune.with_parameters(run_trial, sweep=spec, train_ds=train_ds, val_ds=val_ds),
        trial_resources(spec.cfg),
    )


def _fit(spec: ArmSweep, stage_dir: str, trainable, space, exp: _Experiment):
    if not storage.is_remote(stage_dir):
        # Save the sweep's state (which trials finished) every second rather than every 10+ s,
        # so a restarted driver reruns as little as possible; a local write costs nothing.
        os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    return _tuner(spec, stage_dir, trainable, space, exp).fit()


def _raise_if_all_failed(grid, arm: Arm) -> int:
    """The number of failed trials; when every trial failed, the cause instead."""
    errors = [r.error for r in grid if r.error is not None]
    if grid and len(errors) == len(grid):
        # Every trial failed: surface the cause instead of an empty sweep.
        cause = next((u for u in map(find_user_error, errors) if u is not None), None)
        if cause is not None:
            raise cause
        first = str(errors[0]).strip().splitlines()
        raise RuntimeError(
            f"all {len(grid)} {arm.label} trials failed; first error: "
            f"{first[-1] if first else errors[0]!r}"
        )
    return len(errors)


@dataclass(frozen=True)
class _Best:
    metric: float | None = None
    checkpoint: str | None = None
    trial: str | None = None
    epoch: int | None = None
    params: dict[str, Any] = field(default_factory=dict)


def _best_checkpoint(spec: ArmSweep, good: set[str]) -> _Best:
    """The best checkpoint of the trials in `good`, read from storage: each checkpoint's
    meta.json holds its metrics, trial and epoch. Tune's own record of a resumed sweep lacks
    the checkpoints of the sessions before it."""
    sweep = spec.cfg.sweep
    best = _Best()
    for meta_file in storage.list_files(spec.trials_dir, META_FILE):
        meta = json.loads(storage.read_text(meta_file))
        if meta.get("trial") not in good:
            continue
        value = meta["metrics"].get(sweep.metric)
        if value is not None and is_better(value, best.metric, sweep.mode):
            best = _Best(
                metric=float(value),
                checkpoint=meta_file.rsplit("/", 1)[0],
                trial=meta["trial"],
                epoch=meta.get("epoch"),
                params={k: meta["hyperparameters"][k] for k in sweep.space},
            )
    return best


def run_sweep(spec: ArmSweep, *, stage_dir: str, train_ds, val_ds) -> ArmResult:
    """Every trial of one arm (as many as its time budget allows); its best checkpoint by the
    sweep metric."""
    cfg = spec.cfg
    name = f"sweep-{spec.arm.label}"
    exp = _Experiment(
        name=name, what="sweep", num_samples=cfg.sweep.num_samples,
        scheduler=_scheduler(cfg, spec.seed), search=_search(cfg.sweep, spec.seed),
        total=num_trials(cfg.sweep),
        budget=read_budget(cfg.sweep.time_budget_s, storage.join(stage_dir, name)),
        workers=read_budget(spec.worker_budget_s, storage.join(stage_dir, name), WORKER_FILE),
    )  # fmt: skip
    budgets = [b for b in (exp.budget, exp.workers) if b is not None]
    if any(b.left_s <= 0 for b in budgets):
        return _budget_spent(spec, exp, stage_dir)
    if exp.budget is not None and exp.budget.spent_s > 0:
        b = exp.budget
        console.line(f"[finetune] the {spec.arm.label} sweep's time budget: {b.left_s:.0f} s left "
                     f"of {b.limit_s:.0f} s ({b.spent_s:.0f} s spent before this run)")  # fmt: skip
    space = _search_space(cfg.sweep.space)
    grid = _fit(spec, stage_dir, _trainable(spec, train_ds, val_ds), space, exp)
    stopped = _close_trial_runs(spec.parent, spec.arm, grid, cfg.epochs, kind="trial")
    failed = _raise_if_all_failed(grid, spec.arm)
    good = {
        trial_name(spec.arm, r.metrics["trial_id"]) for r in grid if r.error is None and r.metrics
    }
    cut = _cut(spec, exp, stage_dir)
    if cut is not None:
        good, cut = cut
    best = _best_checkpoint(spec, good)
    return ArmResult(
        arm=spec.arm,
        best_metric=best.metric,
        best_checkpoint=best.checkpoint,
        best_trial=best.trial,
        best_epoch=best.epoch,
        best_params=best.params,
        num_trials=max(len(grid), exp.total) if cut else len(grid),
        # A trial the budget cut is not one the scheduler stopped.
        num_stopped_early=max(stopped - (cut["started"] if cut else 0), 0),
        num_failed=failed,
        num_train_rows=None,
        budget={k: v for k, v in cut.items() if k != "started"} if cut else None,
    )


def _spends(exp: _Experiment, stage_dir: str) -> dict[str, float]:
    """Each budget's limit and what is spent of it now, by its clock in storage."""
    here, out = storage.join(stage_dir, exp.name), {}
    if exp.budget is not None:
        out |= {"limit_s": exp.budget.limit_s, "spent_s": read_budget(1, here).spent_s}
    if exp.workers is not None:
        out |= {"worker_limit_s": exp.workers.limit_s,
                "worker_spent_s": read_budget(1, here, WORKER_FILE).spent_s}  # fmt: skip
    return out


def _cut(spec: ArmSweep, exp: _Experiment, stage_dir: str) -> tuple[set[str], dict] | None:
    """With a budget: the arm's trials that did not fail (by raypipe's records, so that trials
    finished before a restart count even if this driver's Tune never reached them again), and
    what the budget cut (the trials never finished with: stopped mid-way or never started),
    said on the console. None without a budget."""
    if exp.budget is None and exp.workers is None:
        return None
    ran, ended, failed = _records(spec)
    record = {**_spends(exp, stage_dir), "cut": exp.total - len(ended), "total": exp.total}
    if record["cut"]:
        console.line(f"[finetune] budget spent: {budget_line(spec.arm.label, **record)}; "
                     "the best finished epoch stands")  # fmt: skip
    return ran - failed, {**record, "started": len(ran - ended)}


def _records(spec: ArmSweep) -> tuple[set[str], set[str], set[str]]:
    """The arm's sweep trials with a checkpoint, those Tune finished with (done.json), and
    those that failed."""
    pattern = re.compile(re.escape(spec.arm.label) + r"-\d+")
    ran, ended, failed = set(), set(), set()
    for meta_file in storage.list_files(spec.trials_dir, META_FILE):
        trial = json.loads(storage.read_text(meta_file)).get("trial", "")
        if pattern.fullmatch(trial):
            ran.add(trial)
    for done_file in storage.list_files(spec.trials_dir, DONE_FILE):
        trial = done_file.rstrip("/").rsplit("/", 2)[-2]
        if pattern.fullmatch(trial):
            ended.add(trial)
            if "error" in json.loads(storage.read_text(done_file)):
                failed.add(trial)
    return ran, ended, failed


def _budget_spent(spec: ArmSweep, exp: _Experiment, stage_dir: str) -> ArmResult:
    """A sweep whose budget earlier drivers spent: not started again; the best epoch of its
    trials that did not fail stands."""
    ran, ended, failed = _records(spec)
    best = _best_checkpoint(spec, ran - failed)
    spends = _spends(exp, stage_dir)
    console.line(f"[finetune] the {spec.arm.label} sweep's budget was spent before this run "
                 f"({spends_text(**spends)}): not "
                 "started again; its best finished epoch stands")  # fmt: skip
    return ArmResult(
        arm=spec.arm, best_metric=best.metric, best_checkpoint=best.checkpoint,
        best_trial=best.trial, best_epoch=best.epoch, best_params=best.params,
        num_trials=exp.total, num_failed=len(failed),
        budget={**spends, "total": exp.total, "cut": exp.total - len(ended)},
    )  # fmt: skip


def run_repeats(
    spec: ArmSweep, best: ArmResult, *, seeds: list[int], stage_dir: str, train_ds, val_ds
) -> tuple[Repeat, ...]:
    """The arm's best settings trained again on `train_ds`, one full run (every epoch, no
    early stop) per seed; each keeps its best epoch. A seed whose run failed has no checkpoint
    (and no metric)."""
    cfg = spec.cfg
    name = f"repeats-{spec.arm.label}"
    spec = replace(spec, trials_dir=storage.join(stage_dir, name))
    exp = _Experiment(
        name=name, what="repeats", num_samples=1,
        scheduler=FIFOScheduler(),
        search=BasicVariantGenerator(random_state=spec.seed,
                                     max_concurrent=cfg.sweep.max_concurrent_trials),
        total=len(seeds),
    )  # fmt: skip
    space = {**best.best_params, REPEAT_SEED: tune.grid_search(seeds)}
    grid = _fit(spec, stage_dir, _trainable(spec, train_ds, val_ds), space, exp)
    _close_trial_runs(spec.parent, spec.arm, grid, cfg.epochs, kind="repeat")
    out = []
    for seed in seeds:
        name = repeat_name(spec.arm, seed)
        found = _best_checkpoint(spec, {name})
        out.append(Repeat(seed, name, found.metric, found.epoch, found.checkpoint))
    return tuple(out)

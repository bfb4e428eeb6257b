"""The fine-tuning stage, whole: its fingerprint, the labeled data (encoded once; seeded label
subsets shared by every arm; small subsets repeated within an epoch), one sweep per arm and
label fraction (stages/sweep.py), and publishing the best model (stages/publish.py), with its
outputs as a `FinetuneResult`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from typing import Any

import ray
import torch

from raypipe import faults, storage, tracking
from raypipe.config import FinetuneConfig, PipelineConfig, run_only_exclusions
from raypipe.config.tasks import TaskView
from raypipe.data import files as datafiles
from raypipe.data.pipelines import Tally, labeled_dataset
from raypipe.data.text import length_profile
from raypipe.engine.checkpoint import read_meta
from raypipe.engine.finetune_loop import EVAL_BATCH_SIZE, score
from raypipe.preflight import RunContext, dataset_inputs
from raypipe.progress import console
from raypipe.stages import cache, publish
from raypipe.stages.arms import PRETRAINED, SCRATCH, Arm, ArmResult, Repeat
from raypipe.stages.baseline import evaluations, run_baseline
from raypipe.stages.budget import budget_line, worker_hours
from raypipe.stages.checkpoint_models import record_checkpoints
from raypipe.stages.connect import RayConnection
from raypipe.stages.counts import num_trials, repeat_seeds, sweep_is_a_repeat
from raypipe.stages.sweep import run_repeats, run_sweep
from raypipe.stages.trial import ArmSweep
from raypipe.summary import StageOutcome
from raypipe.tracking import RunRef, Tag


@dataclass(frozen=True)
class FinetuneResult:
    arms: tuple[ArmResult, ...]
    model: publish.RegisteredModel

    def to_marker(self) -> dict[str, Any]:
        return {
            "arms": {a.arm.label: a.to_dict() for a in self.arms},
            "model": self.model.to_dict(),
        }

    @classmethod
    def from_marker(cls, marker: dict[str, Any]) -> FinetuneResult:
        arms = tuple(ArmResult.from_dict(a) for a in marker["arms"].values())
        return cls(arms, publish.RegisteredModel(**marker["model"]))


def with_task_overrides(spec: dict[str, Any], task_cls) -> dict[str, Any]:
    """The task may require a form of the backbone (translation decodes causally)."""
    overrides = {k: v for k, v in task_cls.model_overrides.items() if k in spec["config"]}
    return {"type": spec["type"], "config": {**spec["config"], **overrides}}


def fingerprint(cfg: PipelineConfig, ctx: RunContext, spec: dict, upstream: str | None,
                worker_budget_s: float | None = None) -> str:  # fmt: skip
    return cache.fingerprint(
        "finetune",
        _fingerprinted(cfg.finetune),
        cfg.data.labeled.fingerprinted(),
        cfg.data.bad_images,
        cfg.seed,
        spec,
        upstream,
        datafiles.manifest_digest(ctx.train + ctx.validation + ctx.test),
        cfg.tracking.registered_model,
        # A worker-hour budget may cut the sweeps; absent, the parts stay as they were.
        *([{"worker_budget_s": worker_budget_s}] if worker_budget_s is not None else []),
    )


def _fingerprinted(f: FinetuneConfig) -> dict[str, Any]:
    """What of `finetune` a stage fingerprint covers: no time budget key when there is none,
    so stages fingerprinted before budgets existed are still reused."""
    out = f.model_dump(exclude=run_only_exclusions(FinetuneConfig))
    if out["sweep"].get("time_budget_s") is None:
        out["sweep"].pop("time_budget_s", None)
    return out


def lineage(init_ckpt: str | None) -> dict[str, Any]:
    """Tags that tie fine-tuning to the pretraining it started from: the checkpoint, its step
    and the MLflow run that trained it (when the checkpoint names one)."""
    if not init_ckpt:
        return {}
    meta = read_meta(init_ckpt)
    tags = {Tag.INIT_CHECKPOINT: init_ckpt}
    if meta.get("step") is not None:
        tags[Tag.PRETRAIN_STEP] = meta["step"]
    if meta.get("mlflow_run_id"):
        tags[Tag.PRETRAIN_RUN_ID] = meta["mlflow_run_id"]
    return tags


def pretraining_seen(init_ckpt: str | None) -> dict[str, float] | None:
    """What pretraining had seen at `init_ckpt` (meta.json): samples, and tokens or images,
    and its training FLOPs where known (transformers); None from scratch or an older
    checkpoint that does not say."""
    if not init_ckpt:
        return None
    meta = read_meta(init_ckpt)
    if meta.get("samples_seen") is None:
        return None
    seen = {"samples": meta["samples_seen"]}
    if meta.get("unit") and meta.get("items_seen") is not None:
        seen[meta["unit"]] = meta["items_seen"]
    if meta.get("train_flops"):
        seen["flops"] = meta["train_flops"]
    return seen


@dataclass(frozen=True)
class _Start:
    """Where every arm of the stage starts: the model, its tokenizer, the pretrained weights
    (pretraining step, or None for the stage's own checkpoint -> checkpoint; empty: every arm
    from scratch), and the stage's fingerprint."""

    spec: dict[str, Any]
    tokenizer_json: str | None
    init_ckpts: tuple[tuple[int | None, str], ...]
    fingerprint: str
    worker_budget_s: float | None = None  # the stage's, shared equally by its sweeps


def run_stage(
    view: TaskView,
    ctx: RunContext,
    parent: RunRef,
    ray_conn: RayConnection,
    *,
    tokenizer_json: str | None,
    spec: dict[str, Any],
    init_ckpts: tuple[tuple[int | None, str], ...],
    upstream: str | None,
    pipeline_fp: str,
    worker_budget_s: float | None = None,
) -> tuple[FinetuneResult, StageOutcome]:
    """Sweep every arm and label fraction of one task and register its best model, or reuse
    the completed stage with the same fingerprint; `worker_budget_s`: what its sweeps may
    spend in all (budget.finetune_worker_hours, or the task's share of what the pipeline's
    budget left)."""
    cfg, name = view.cfg, view.stage
    spec = with_task_overrides(spec, ctx.plan.task)
    fp = fingerprint(cfg, ctx, spec, upstream, worker_budget_s)
    prefix = f"{cfg.name}-{view.name}" if view.several else None
    with cache.open_stage(cfg, ctx, parent, name, fp, before_work=ray_conn.ensure) as stage:
        if stage.marker is None:
            inputs = _Start(spec, tokenizer_json, init_ckpts, fp, worker_budget_s)
            result = _sweep_and_register(cfg, ctx, stage, inputs, parent, pipeline_fp)
            stage.complete(result.to_marker())
        else:
            result = FinetuneResult.from_marker(stage.marker)
        best = {
            f"best/{a.arm.label}/{cfg.finetune.sweep.metric}": a.best_metric
            for a in result.arms
            if a.best_metric is not None
        }
        tracking.RunLogger(stage.run).log_metrics(best, 0)
        tracking.RunLogger(stage.run).set_tags({Tag.BEST_CHECKPOINT: result.model.checkpoint})
        tracking.log_datasets(
            stage.run,
            dataset_inputs(cfg, ctx, only=("train", "validation", "test"), prefix=prefix),
        )
        publish.plot_finetuning(cfg, stage, list(result.arms))
        record_checkpoints(stage.run, stage.dir, kind="trial")
        lengths = _text_lengths(cfg, ctx, tokenizer_json, stage.run)
    outcome = stage.outcome(
        {
            "trials": sum(a.num_trials for a in result.arms),
            "stopped early": sum(a.num_stopped_early for a in result.arms),
            "failed": sum(a.num_failed for a in result.arms),
            **_budgets(result.arms),
            **lengths,
        }
    )
    return result, outcome


def _budgets(arms) -> dict[str, str]:
    """{"budget": each arm's spent of its budgets and what they cut}, when there is one."""
    lines = [budget_line(a.arm.label, **a.budget) for a in arms if a.budget]
    return {"budget": "; ".join(lines)} if lines else {}


#: Training rows tokenized to say how many texts `finetune.max_len` cuts.
LENGTH_SAMPLE_ROWS = 2_000


def _text_lengths(cfg: PipelineConfig, ctx: RunContext, tokenizer_json, run) -> dict[str, str]:
    """{"texts cut": ...} for a text classification/regression task: the share of (a sample
    of) the training rows longer than finetune.max_len, logged as data/ metrics too."""
    kind = ctx.plan.finetune_data
    if tokenizer_json is None or not kind.needs_tokenizer or not kind.labeled:
        return {}
    f, column = cfg.finetune, cfg.data.labeled.train.text_column
    texts = datafiles.read_column_sample(ctx.train, column, LENGTH_SAMPLE_ROWS)
    profile = length_profile(texts, tokenizer_json, f.max_len)
    tracking.RunLogger(run).log_metrics(
        {f"data/{k}": profile[k] for k in ("truncated_share", "tokens_kept_share")}, 0
    )
    text = (
        f"{profile['truncated_share']:.1%} of {profile['rows']} training rows longer than "
        f"max_len {f.max_len}, {profile['tokens_kept_share']:.1%} of tokens kept ({f.truncation})"
    )
    return {"texts cut": text}


class _Encoder:
    """The labeled splits through the task's encoding, materialized (data/pipelines.py)."""

    def __init__(self, cfg: PipelineConfig, ctx: RunContext, inputs: _Start, tally):
        self.cfg, self.ctx, self.inputs, self.tally = cfg, ctx, inputs, tally

    def __call__(self, files: list[str], src, *, max_rows: bool = True):
        task_cls = self.ctx.plan.task
        return labeled_dataset(
            files,
            source=src if max_rows else src.model_copy(update={"max_rows": None}),
            kind=task_cls.data_kind,
            input=self.ctx.plan.finetune_input,
            label_dtype=task_cls.label_dtype,
            tokenizer_json=self.inputs.tokenizer_json,
            max_len=self.cfg.finetune.max_len,
            model_config=self.inputs.spec["config"],
            preprocess=self.cfg.data.preprocess,
            bad_image_tally=self.tally,
            truncation=self.cfg.finetune.truncation,
        )


@dataclass(frozen=True)
class _Rows:
    """One label fraction's training rows: where its sweeps live, its files (and how many of
    their rows are read), the encoded dataset, its row count and the repeats in an epoch."""

    where: str
    files: list[str]
    max_rows: int | None
    dataset: Any
    num_rows: int
    repeat: int


def _label_rows(cfg: PipelineConfig, ctx: RunContext, stage, encode, full_train, fraction,
                seed=None):  # fmt: skip
    """One label fraction's rows (`_Rows`), drawn with `seed` (default: the pipeline's): the
    same seeded rows for every arm, kept with the stage; an epoch of a small subset repeats it."""
    f, lab, task_cls = cfg.finetune, cfg.data.labeled, ctx.plan.task
    where, train_ds = stage.dir, full_train
    files, max_rows = ctx.train, lab.train.max_rows
    if fraction < 1:
        # Class labels are stratified; regression targets and translation pairs are not.
        classes = ctx.plan.finetune_data.labeled and task_cls.label_dtype == "int64"
        drawn = cfg.seed if seed is None else seed
        where = storage.join(
            stage.dir, f"labels-{fraction:g}" + ("" if seed is None else f"-seed{seed}")
        )
        subset = datafiles.label_subset(
            ctx.train, fraction=fraction, seed=drawn, out=where,
            stratify_by=lab.train.label_column if classes else None, max_rows=lab.train.max_rows,
        )  # fmt: skip
        train_ds = encode(subset, lab.train, max_rows=False)
        files, max_rows = subset, None
    num_train, repeat = train_ds.count(), 1
    if f.min_epoch_rows and 0 < num_train < f.min_epoch_rows:
        repeat = math.ceil(f.min_epoch_rows / num_train)
        train_ds = train_ds.union(*[train_ds] * (repeat - 1)).materialize()
    return _Rows(where, files, max_rows, train_ds, num_train, repeat)


def _on_test(result: ArmResult, test_ds, stage_run: RunRef) -> ArmResult:
    """The arm's best checkpoint scored once on the test split (on this process's CPU), logged
    on its trial's run and the stage's; the result unchanged when there is no test split."""
    if test_ds is None or result.best_checkpoint is None:
        return result
    batches = test_ds.iter_torch_batches(batch_size=EVAL_BATCH_SIZE)
    found = score(result.best_checkpoint, batches, device=torch.device("cpu"))
    scored = replace(result, test_metrics={f"test/{k}": v for k, v in found.items()})
    publish.log_test_metrics(stage_run, scored)
    return scored


def _repeat_on_test(repeat: Repeat, test_ds, stage_run: RunRef) -> Repeat:
    """A repeat's best checkpoint scored once on the test split, logged on its run."""
    if test_ds is None or repeat.checkpoint is None:
        return repeat
    batches = test_ds.iter_torch_batches(batch_size=EVAL_BATCH_SIZE)
    found = score(repeat.checkpoint, batches, device=torch.device("cpu"))
    scored = replace(repeat, test_metrics={f"test/{k}": v for k, v in found.items()})
    publish.log_run_metrics(stage_run, repeat.trial, scored.test_metrics, repeat.epoch or 0)
    return scored


@dataclass(frozen=True)
class _Data:
    """The stage's encoded splits (the training rows per fraction come from `_label_rows`)."""

    encode: _Encoder
    full_train: Any
    validation: Any
    test: Any  # None without a test split


def _data(cfg: PipelineConfig, ctx: RunContext, stage, inputs: _Start) -> _Data:
    lab = cfg.data.labeled
    skip = cfg.data.bad_images == "skip" and ctx.plan.finetune_data.reads_images
    tally = Tally.remote() if skip else None
    encode = _Encoder(cfg, ctx, inputs, tally)
    full_train, val_ds = encode(ctx.train, lab.train), encode(ctx.validation, lab.validation)
    test_ds = encode(ctx.test, lab.test) if lab.test is not None else None
    if tally is not None:  # materialized: the tally is final here
        skipped = ray.get(tally.get.remote())
        tracking.RunLogger(stage.run).log_metrics({"data/skipped_images": skipped}, 0)
        console.line(f"[finetune] skipped {skipped} undecodable image(s)")
    return _Data(encode, full_train, val_ds, test_ds)


def _run_repeats(spec: ArmSweep, result: ArmResult, data: _Data, rows: _Rows, seeded, stage):
    """The arm's best settings again with each repeat seed: on the fraction's rows, or (with
    resample_labels) on each seed's own rows (`seeded`: seed -> _Rows); each scored on test.
    A sweep of one setting is its own first repeat (see `sweep_is_a_repeat`)."""
    seeds = repeat_seeds(spec.seed, spec.cfg)
    repeats = []
    if sweep_is_a_repeat(spec.cfg):
        seeds = seeds[1:]
        repeats.append(Repeat(spec.seed, result.best_trial, result.best_metric, result.best_epoch,
                              result.best_checkpoint, result.test_metrics))  # fmt: skip
        publish.tag_run(stage.run, result.best_trial, {Tag.SEED: spec.seed})
    groups = [(rows, seeds)] if seeded is None else [(seeded[s], [s]) for s in seeds]
    for where, group in groups:
        each = replace(spec, num_train_rows=where.num_rows * where.repeat)
        done = run_repeats(each, result, seeds=group, stage_dir=where.where,
                           train_ds=where.dataset, val_ds=data.validation)  # fmt: skip
        repeats += [_repeat_on_test(r, data.test, stage.run) for r in done]
    return tuple(repeats)


def _run_arm(cfg, ctx, stage, inputs: _Start, data: _Data, rows: _Rows, arm: Arm, ckpt,
             seeded=None, worker_budget_s=None):  # fmt: skip
    """One arm on one fraction's rows: its sweep (spending at most `worker_budget_s`
    worker-seconds), its best checkpoint on test, its repeats."""
    f, tags = cfg.finetune, lineage(ckpt)
    console.line(
        f"[finetune] sweeping the {arm.label} arm: {num_trials(f.sweep)} trial(s) "
        f"on {rows.num_rows} labeled rows ({arm.label_fraction:.0%})"
        + (f", repeated {rows.repeat}x in each epoch" if rows.repeat > 1 else "")
    )
    spec = ArmSweep(
        cfg=f, arm=arm, init_checkpoint=ckpt, model_spec=inputs.spec,
        finetune_input=ctx.plan.finetune_input, tokenizer_json=inputs.tokenizer_json,
        num_train_rows=rows.num_rows * rows.repeat, trials_dir=storage.join(rows.where, "trials"),
        parent=stage.run, seed=cfg.seed, fingerprint=inputs.fingerprint,
        lineage={**(tags if ckpt else {}), Tag.LABEL_FRACTION: arm.label_fraction},
        faults=os.environ.get(faults.ENV, ""), system_metrics_s=cfg.tracking.system_metrics_s,
        worker_budget_s=worker_budget_s,
    )  # fmt: skip
    datasets = {"train_ds": rows.dataset, "val_ds": data.validation}
    result = run_sweep(spec, stage_dir=rows.where, **datasets)
    step = tags.get(Tag.PRETRAIN_STEP)
    result = replace(result, num_train_rows=rows.num_rows,
                     pretrain_step=int(step) if step is not None else None,
                     pretrain_seen=pretraining_seen(ckpt))  # fmt: skip
    result = _on_test(result, data.test, stage.run)
    if f.repeats > 1 and result.best_checkpoint is not None:
        again = (f"{f.repeats - 1} more seed(s) (its one sweep trial is the first of "
                 f"{f.repeats})" if sweep_is_a_repeat(f) else f"{f.repeats} seeds")  # fmt: skip
        console.line(f"[finetune] repeating the {arm.label} arm's best settings with {again}"
                     + (", each on its own rows" if seeded else ""))  # fmt: skip
        result = replace(result, repeats=_run_repeats(spec, result, data, rows, seeded, stage))
    return result


def _arm_share(worker_budget_s: float | None, sweeps: int) -> float | None:
    """Each sweep's equal share of the stage's worker-hour budget, said on the console: the
    arms compare on the same spend."""
    if worker_budget_s is None:
        return None
    console.line(f"[finetune] worker-hour budget {worker_hours(worker_budget_s)}: "
                 f"{worker_hours(worker_budget_s / sweeps)} for each of {sweeps} sweep(s)")  # fmt: skip
    return worker_budget_s / sweeps


def _sweep_and_register(cfg, ctx, stage, inputs: _Start, parent, pipeline_fp) -> FinetuneResult:
    f = cfg.finetune
    tracking.RunLogger(stage.run).log_params(
        {"fingerprint": inputs.fingerprint, **f.model_dump(exclude={"sweep"}),
         "sweep": f.sweep.model_dump()}
    )  # fmt: skip
    data = _data(cfg, ctx, stage, inputs)
    pretrained = [(PRETRAINED, step, ckpt) for step, ckpt in inputs.init_ckpts]
    bases = pretrained + ([(SCRATCH, None, None)] if f.compare_scratch or not pretrained else [])
    evals = evaluations(cfg, ctx, inputs.spec) if f.baseline == "linear" else None
    arms = []
    share = _arm_share(inputs.worker_budget_s, len(f.label_fractions) * len(bases))
    for fraction in sorted(f.label_fractions, reverse=True):
        rows = _label_rows(cfg, ctx, stage, data.encode, data.full_train, fraction)
        seeded = None  # with resample_labels: each repeat seed's own rows, shared by the arms
        if f.resample_labels and f.repeats > 1 and fraction < 1:
            seeded = {
                s: _label_rows(cfg, ctx, stage, data.encode, data.full_train, fraction, seed=s)
                for s in repeat_seeds(cfg.seed, f)
                if s != cfg.seed  # the sweep's own rows: its trial is that seed's repeat
            }
        for base, step, ckpt in bases:
            arm = Arm(base, fraction, step)
            arms.append(_run_arm(cfg, ctx, stage, inputs, data, rows, arm, ckpt, seeded, share))
        if evals is not None:
            arms.append(run_baseline(cfg, stage.run, evals, rows.files, fraction=fraction,
                                     max_rows=rows.max_rows, spec=inputs.spec))  # fmt: skip
    model = publish.register_best(
        cfg, stage.run, arms, inputs.tokenizer_json,
        tags={
            Tag.PIPELINE_FINGERPRINT: pipeline_fp,
            Tag.PIPELINE_RUN_ID: parent.run_id,
            Tag.VALIDATION_DIGEST: datafiles.manifest_digest(ctx.validation),
        },
        lineage={ckpt: lineage(ckpt) for _, ckpt in inputs.init_ckpts},
    )  # fmt: skip
    return FinetuneResult(tuple(arms), model)

"""`raypipe validate --plan`: what a run will do, counted from the config and the data's
footers, and how long its training will take, from a warm-up measured on this machine.

Counted: tokens (or images) per pretraining step and in all; fine-tuning's arms, label
fractions, trials, epochs, rows and repeats, as training and validation row-passes.
Measured: a few optimizer steps of the real model, objective and task on this machine's CPU
with the threads one worker gets (`cpus_per_worker`), after one untimed step. The estimate
is compute only: Ray's start, data encoding, checkpoints, the test split and the baseline come
on top (a few seconds to a minute on a laptop; see BENCHMARKS.md).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from raypipe.config import PipelineConfig
from raypipe.data import files as datafiles
from raypipe.plan import Plan, model_spec, task_options
from raypipe.stages.counts import num_trials, sweep_is_a_repeat
from raypipe.vocab import NUM_SPECIAL

_TIMED_STEPS = 3


@dataclass(frozen=True)
class Pretraining:
    steps: int
    per_step: int  # tokens or images, over all workers and micro-batches
    unit: str
    seconds_per_step: float | None  # measured; None: not measured


@dataclass(frozen=True)
class Finetuning:
    arms: int
    fractions: list[float]
    trials: int  # per arm and fraction
    epochs: int
    train_rows: int
    validation_rows: int
    repeats: int  # extra runs per arm and fraction after the sweep
    concurrent: int
    runs: int  # trials and repeats over every arm and fraction: each starts its workers
    train_passes: int  # rows trained on, over every trial and repeat
    validation_passes: int
    rows_per_second: float | None  # training rows a second, one trial, measured


def _threads(cpus: float) -> int:
    return max(1, int(cpus))


def _timed(step, cpus: float) -> float:
    """Seconds per call of `step`, the median of a few after one untimed (warm-up) call."""
    before = torch.get_num_threads()
    torch.set_num_threads(_threads(cpus))
    try:
        step()
        times = []
        for _ in range(_TIMED_STEPS):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(before)
    return sorted(times)[len(times) // 2]


def _batch(kind: str, cfg: dict, rows: int, length: int, vocab: int, gen) -> dict:
    def image():
        size, channels = cfg["image_size"], cfg.get("channels", 3)
        return torch.randint(0, 256, (rows, channels, size, size), dtype=torch.uint8, generator=gen)

    def ids(width):
        return torch.randint(NUM_SPECIAL, vocab, (rows, width), generator=gen)

    if kind == "text_blocks":
        return {"input_ids": ids(length)}
    if kind == "images":
        return {"image": image()}
    if kind == "image_views":
        return {"view1": image(), "view2": image()}
    return {"image": image(), "input_ids": ids(length)}


def _train_step(module, batch: dict):
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)

    def step():
        loss, _ = module(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _vocab(cfg: PipelineConfig) -> int:
    return 256 + NUM_SPECIAL if cfg.tokenizer.type == "byte" else cfg.tokenizer.vocab_size


def pretraining(cfg: PipelineConfig, plan: Plan, *, measure: bool) -> Pretraining:
    p, objective_cls = cfg.pretrain, plan.objective
    spec = model_spec(cfg, objective_cls, vocab_size=_vocab(cfg))
    length = p.seq_len + objective_cls.text_extra
    items = 1 if objective_cls.unit == "images" else p.seq_len
    per_step = p.batch_size * p.grad_accum_steps * p.scaling.num_workers * items
    seconds = None
    if measure and not objective_cls.owns_step:
        from raypipe.models import build_model

        torch.manual_seed(0)
        objective = objective_cls(build_model(spec), **p.options)
        gen = torch.Generator().manual_seed(0)
        batch = _batch(objective_cls.data_kind, spec["config"], p.batch_size, length,
                       _vocab(cfg), gen)  # fmt: skip
        seconds = _timed(_train_step(objective, batch), p.scaling.cpus_per_worker)
        seconds *= p.grad_accum_steps
    return Pretraining(p.max_steps, per_step, objective_cls.unit, seconds)


def _rows(files: list[str], max_rows: int | None) -> int:
    rows = datafiles.footprint(files, [])[0]  # from the footers
    return min(rows, max_rows or rows)


def finetuning(cfg: PipelineConfig, plan: Plan, sources, *, measure: bool) -> Finetuning:
    f, lab = cfg.finetune, cfg.data.labeled
    train = _rows(datafiles.all_files(sources["train"]), lab.train.max_rows)
    val = _rows(datafiles.all_files(sources["validation"]), lab.validation.max_rows)
    arms = 1 + bool(f.compare_scratch and (cfg.pretrain is not None or f.init_directory))
    trials, repeats = num_trials(f.sweep), f.repeats - 1 if sweep_is_a_repeat(f) else f.repeats
    repeats = repeats if f.repeats > 1 else 0
    train_passes = val_passes = 0
    for fraction in f.label_fractions:
        rows = max(1, round(train * fraction))
        rows = max(rows, f.min_epoch_rows or 0)
        runs = arms * (trials + repeats)
        train_passes += runs * f.epochs * rows
        val_passes += runs * f.epochs * val
    cpus = max(1.0, f.scaling.cpus_per_worker * f.scaling.num_workers)
    concurrent = max(1, min(f.sweep.max_concurrent_trials, int((os.cpu_count() or 1) // cpus)))
    speed = _finetune_speed(cfg, plan) if measure else None
    runs = arms * (trials + repeats) * len(f.label_fractions)
    return Finetuning(arms, list(f.label_fractions), trials, f.epochs, train, val, repeats,
                      concurrent, runs, train_passes, val_passes, speed)  # fmt: skip


def _finetune_speed(cfg: PipelineConfig, plan: Plan) -> float | None:
    """Training rows a second of one trial (one worker's micro-batches), measured."""
    from raypipe.models import build_model
    from raypipe.plan import _placeholder_tokenizer
    from raypipe.tasks import build_task

    f = cfg.finetune
    if plan.task.data_kind != "labeled":
        return None
    torch.manual_seed(0)
    spec = model_spec(cfg, plan.objective, vocab_size=_vocab(cfg))
    options = task_options(f, plan.task, plan.finetune_input, f.dropout)
    task = build_task(f.task, build_model(spec), options, tokenizer_json=_placeholder_tokenizer())
    gen = torch.Generator().manual_seed(0)
    kind = "images" if plan.finetune_input == "image" else "text_blocks"
    batch = _batch(kind, spec["config"], f.batch_size, f.max_len, _vocab(cfg), gen)
    batch = {task.input_column: next(iter(batch.values()))}
    if plan.task.label_dtype == "int64":
        batch["label"] = torch.randint(0, f.num_classes or 2, (f.batch_size,), generator=gen)
    else:
        batch["label"] = torch.randn(f.batch_size, generator=gen)
    task.train()
    return f.batch_size / _timed(_train_step(task, batch), f.scaling.cpus_per_worker)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def format_plan(pre: Pretraining | None, fine: Finetuning | None) -> str:
    lines, total = ["plan:"], 0.0
    if pre is not None:
        lines.append(f"  pretrain   {pre.steps:,} steps x {pre.per_step:,} {pre.unit} a step = "
                     f"{pre.steps * pre.per_step:,} {pre.unit}")  # fmt: skip
        if pre.seconds_per_step is not None:
            total += pre.steps * pre.seconds_per_step
            lines.append(f"             measured here: {pre.seconds_per_step:.3f} s a step -> "
                         f"about {_duration(pre.steps * pre.seconds_per_step)} of training")  # fmt: skip
    if fine is not None:
        fractions = ", ".join(f"{x:g}" for x in fine.fractions)
        lines.append(
            f"  finetune   {fine.arms} arm(s) x fraction(s) [{fractions}] x ({fine.trials} "
            f"trial(s) + {fine.repeats} repeat(s)) x {fine.epochs} epoch(s); "
            f"{fine.train_rows:,} training rows, {fine.validation_rows:,} validation rows"
        )
        lines.append(f"             = {fine.train_passes:,} training and "
                     f"{fine.validation_passes:,} validation row-passes in {fine.runs} "
                     f"training run(s), up to {fine.concurrent} at once on this machine")  # fmt: skip
        if fine.rows_per_second:
            # A validation pass is a forward only: about a third of a training step.
            work = fine.train_passes + fine.validation_passes / 3
            seconds = work / fine.rows_per_second / fine.concurrent
            total += seconds
            lines.append(f"             measured here: {fine.rows_per_second:,.0f} training rows/s "
                         f"a trial -> about {_duration(seconds)}")  # fmt: skip
    if total:
        lines.append(f"  estimate   about {_duration(total)} of training on this machine's CPU, "
                     "plus start-up (Ray, and each run's workers), data encoding and scoring "
                     "(compute only, from a warm-up; less when the scheduler stops trials "
                     "early)")  # fmt: skip
    return "\n".join(lines)


def plan_run(cfg: PipelineConfig, plan: Plan, sources, *, measure: bool = True) -> str:
    pre = pretraining(cfg, plan, measure=measure) if cfg.pretrain is not None else None
    fine = None
    if cfg.finetune is not None and "train" in sources and "validation" in sources:
        fine = finetuning(cfg, plan, sources, measure=measure)
    return format_plan(pre, fine)

"""Publishing a pipeline's results: the best fine-tuned model registered (with its lineage) and
the champion alias, the label-efficiency table and plot, the loss and fine-tune curves."""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from raypipe import tracking
from raypipe.config import PipelineConfig
from raypipe.data.files import label_names, resolve_parquet_files
from raypipe.engine.checkpoint import TOKENIZER_FILE, load_task, read_meta
from raypipe.errors import UserError
from raypipe.model_card import CARD_FILE, card_for
from raypipe.progress import console
from raypipe.stages.arms import ArmResult
from raypipe.stages.budget import spends_text
from raypipe.stages.cache import Stage
from raypipe.summary import (
    TaskResult,
    by_fraction,
    checkpoint_curve,
    label_efficiency,
    on_test,
    scoreboard,
    test_key,
)
from raypipe.tracking import Tag


@dataclass(frozen=True)
class RegisteredModel:
    name: str
    version: str
    uri: str
    arm: str  # the arm's label
    trial: str
    checkpoint: str
    champion: str  # the version the champion alias points at now

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _candidates(arms: list[ArmResult]) -> list[ArmResult]:
    """The arms with a checkpoint to register; none is an error naming its cause."""
    candidates = [a for a in arms if a.best_checkpoint]
    if not candidates and any(a.budget and a.budget["cut"] for a in arms):
        raise UserError(
            "budget: the sweeps' budget ran out before any trial finished an epoch; raise "
            "budget.finetune_worker_hours (or budget.worker_hours, finetune.sweep.time_budget_s)"
        )
    if not candidates:
        raise RuntimeError("no fine-tune trial produced a checkpoint; see the trial errors above")
    return candidates


def register_best(
    cfg: PipelineConfig,
    run: tracking.RunRef,
    arms: list[ArmResult],
    tokenizer_json: str | None,
    *,
    tags: dict,
    lineage: dict,
) -> RegisteredModel:
    """Log the best trial's model (pt2, no pickled code) into the finetune run, register it with
    `tags` and its lineage (`lineage`: init checkpoint -> the tags of the pretraining it came
    from, when it is a pretrained arm's), and move the champion alias to it if it beats the
    champion on the same validation data."""
    f = cfg.finetune
    sign = 1 if f.sweep.mode == "max" else -1
    candidates = _candidates(arms)
    best = max(candidates, key=lambda a: sign * a.representative()[0])
    _, repeat = best.representative()
    checkpoint = repeat.checkpoint if repeat else best.best_checkpoint
    trial = repeat.trial if repeat else best.best_trial
    epoch = repeat.epoch if repeat else best.best_epoch
    test_metrics = (repeat.test_metrics if repeat else best.test_metrics) or {}
    task = load_task(checkpoint).eval()
    meta = read_meta(checkpoint)
    with tempfile.TemporaryDirectory(prefix="raypipe-") as tmp, torch.no_grad():
        card = card_for(task, task_name=f.task, source=cfg.data.labeled.train,
                        max_len=f.max_len, truncation=f.truncation,
                        labels=_class_names(cfg) if task.prediction == "classes" else None)  # fmt: skip
        (Path(tmp) / CARD_FILE).write_text(card.to_json())
        extra_files = [str(Path(tmp) / CARD_FILE)]
        if tokenizer_json is not None:
            tok_file = Path(tmp) / TOKENIZER_FILE
            tok_file.write_text(tokenizer_json)
            extra_files.append(str(tok_file))
        uri, version = tracking.log_registered_model(
            run,
            model=task.predictor(),
            input_example=task.example_input(),
            spec=task.serving_spec(),
            registered_name=cfg.tracking.registered_model,
            extra_files=extra_files,
            description=_version_description(cfg, best, arms, repeat, test_metrics),
            tags={
                Tag.ARM: best.arm.label,
                Tag.TRIAL: trial,
                Tag.metric(f.sweep.metric): (repeat.metric if repeat else best.best_metric),
                Tag.CHECKPOINT: checkpoint,
                Tag.INIT_CHECKPOINT: meta.get("init_checkpoint") or "none",
                Tag.LABEL_FRACTION: best.arm.label_fraction,
                **{Tag.metric(k): v for k, v in test_metrics.items()},
                **({Tag.BEST_EPOCH: epoch} if epoch is not None else {}),
                **({Tag.SEED: repeat.seed} if repeat else {}),
                **tags,
                **lineage.get(meta.get("init_checkpoint") or "", {}),
            },
        )
    champion, why = tracking.promote_champion(
        run.tracking_uri,
        cfg.tracking.registered_model,
        version,
        metric=f.sweep.metric,
        value=repeat.metric if repeat else best.best_metric,
        mode=f.sweep.mode,
        data_digest=tags[Tag.VALIDATION_DIGEST],
    )
    console.line(f"[finetune] alias '{tracking.CHAMPION}' -> version {champion} ({why})")
    return RegisteredModel(
        name=cfg.tracking.registered_model,
        version=version,
        uri=uri,
        arm=best.arm.label,
        trial=trial,
        checkpoint=checkpoint,
        champion=champion,
    )


def _version_description(cfg: PipelineConfig, best: ArmResult, arms: list[ArmResult], repeat,
                         test_metrics: dict) -> str:  # fmt: skip
    """The registered version in a sentence or three: task, arm, data, metric, and the gap to
    the scratch arm on the same rows."""
    f, lab = cfg.finetune, cfg.data.labeled
    metric = f.sweep.metric
    value = repeat.metric if repeat else best.best_metric
    rows = f"{best.num_train_rows} labeled rows" if best.num_train_rows else "its labeled rows"
    text = (f"{f.task} fine-tuned by raypipe pipeline '{cfg.name}': arm {best.arm.label} "
            f"({best.arm.label_fraction:g} of the labels, {rows} of {lab.train.path}). "
            f"{metric} {value:.4f} on validation ({lab.validation.path})")  # fmt: skip
    test = test_key(metric)
    if test in test_metrics:
        text += f", {test} {test_metrics[test]:.4f} on test"
    scratch = next((a for a in arms if a.arm.base == "scratch"
                    and a.arm.label_fraction == best.arm.label_fraction), None)  # fmt: skip
    theirs = scratch.representative()[0] if scratch is not None else None
    if best.arm.base == "pretrained" and theirs is not None:
        ours = best.representative()[0]
        text += (f"; the arms' validation means: this arm {ours:.4f}, from scratch on the same "
                 f"rows {theirs:.4f} (gap {ours - theirs:+.4f})")  # fmt: skip
    if best.budget and best.budget["cut"]:
        b = {k: v for k, v in best.budget.items() if k not in ("cut", "total")}
        text += (f". Its sweep's budget ({spends_text(**b)}) cut {best.budget['cut']} of "
                 f"{best.budget['total']} trials: the best epoch of those that ran")  # fmt: skip
    return text + "."


def _child_run(stage_run: tracking.RunRef, run_name: str) -> tracking.RunLogger | None:
    """A logger for the stage's child run `run_name` (a trial or a repeat), if it is there."""
    runs = {r.info.run_name: r.info.run_id for r in tracking.child_runs(stage_run)}
    if run_name not in runs:
        return None
    return tracking.RunLogger(
        tracking.RunRef(stage_run.tracking_uri, stage_run.experiment_id, runs[run_name])
    )


def log_run_metrics(stage_run: tracking.RunRef, run_name: str, metrics: dict, step: int) -> None:
    """Metrics on the stage's child run `run_name`, if it is there."""
    if (logger := _child_run(stage_run, run_name)) is not None:
        logger.log_metrics(metrics, step)


def tag_run(stage_run: tracking.RunRef, run_name: str, tags: dict) -> None:
    """Tags on the stage's child run `run_name`, if it is there."""
    if (logger := _child_run(stage_run, run_name)) is not None:
        logger.set_tags(tags)


def log_test_metrics(stage_run: tracking.RunRef, result: ArmResult) -> None:
    """An arm's test metrics: on its best trial's run (at the best epoch) and on the stage's
    (`best/<arm>/test/...`)."""
    log_run_metrics(stage_run, result.best_trial, result.test_metrics, result.best_epoch or 0)
    best = {f"best/{result.arm.label}/{k}": v for k, v in result.test_metrics.items()}
    tracking.RunLogger(stage_run).log_metrics(best, 0)


def log_label_efficiency(
    cfg: PipelineConfig, parent: tracking.RunRef, rows: dict, *, task: str | None = None
) -> None:
    """On the pipeline run: label_efficiency.json (the summary's table) and its plot, the best
    metric against the fraction of labeled rows, one curve per arm; with several pretraining
    checkpoints, checkpoint_curve.json and its plot too. A named task's files end `-<task>`."""
    metric = cfg.finetune.sweep.metric
    suffix, title = (f"-{task}", f"{cfg.name} {task}") if task else ("", cfg.name)
    _log_checkpoint_curve(parent, rows, metric, suffix=suffix, title=title)
    table = label_efficiency(rows, metric)
    if not table:
        return
    tracking.log_text(parent, json.dumps(table, indent=2), f"label_efficiency{suffix}.json")
    if on_test(rows):
        metric = test_key(metric)
    series = {
        arm: [
            (row["fraction"], row[arm], row[f"{arm}_sd"]) if f"{arm}_sd" in row
            else (row["fraction"], row[arm])
            for row in table if row.get(arm) is not None
        ]
        for arm in ("pretrained", "scratch", "baseline")
        if any(row.get(arm) is not None for row in table)
    }  # fmt: skip
    tracking.log_plot(
        parent,
        f"label_efficiency{suffix}.png",
        series,
        title=f"{title}: {metric} against labeled rows used"
        + (" (mean ± sd over seeds)" if any("pretrained_sd" in r for r in table) else ""),
        xlabel="fraction of the labeled training rows (log scale)",
        ylabel=metric,
        log_x=True,
    )


def _log_checkpoint_curve(parent, rows: dict, metric: str, *, suffix: str, title: str) -> None:
    """checkpoint_curve.json and .png: the downstream metric against the pretraining step
    fine-tuning started from, a line per label fraction and scratch's level beside it."""
    curve = checkpoint_curve(rows, metric)
    if not curve:
        return
    tracking.log_text(parent, json.dumps(curve, indent=2), f"checkpoint_curve{suffix}.json")
    steps = sorted({p["step"] for p in curve if p["step"]})
    series: dict[str, list] = {}
    for p in curve:
        if p["step"]:
            series.setdefault(f"pretrained, {p['fraction']:g} of labels", []).append(
                (p["step"], p["value"], p["sd"])
            )
        else:  # scratch: one level, drawn across the steps
            series[f"scratch, {p['fraction']:g} of labels"] = [(s, p["value"]) for s in steps]
    shown = test_key(metric) if on_test(rows) else metric
    tracking.log_plot(
        parent,
        f"checkpoint_curve{suffix}.png",
        series,
        title=f"{title}: {shown} by the pretraining checkpoint fine-tuned",
        xlabel=_steps_label(curve),
        ylabel=shown,
    )


def _steps_label(curve: list[dict]) -> str:
    """`pretraining steps (8.19k tokens each)`: the compute behind a step, where known."""
    for p in curve:
        for unit in ("tokens", "images"):
            if p["step"] and p.get(f"{unit}_seen"):
                return f"pretraining steps ({p[f'{unit}_seen'] / p['step']:,.0f} {unit} each)"
    return "pretraining steps"


def log_scoreboard(cfg: PipelineConfig, parent: tracking.RunRef, summary) -> None:
    """Several tasks: scoreboard.json (summary.scoreboard) and scoreboard.png (each task's
    gain from pretraining against the fraction of labels, and the mean over the tasks of each
    metric), plus `gain/mean_<metric>_<fraction>` metrics on the pipeline run, for the runs
    table."""
    board = scoreboard(summary)
    if not board["rows"]:
        return
    tracking.log_text(parent, json.dumps(board, indent=2), "scoreboard.json")
    series: dict[str, list] = {}
    for row in board["rows"]:
        if row.get("gain") is not None:
            series.setdefault(row["task"], []).append((row["fraction"], row["gain"]))
    for m in board["mean_gain"]:
        if m["tasks"] > 1:
            series.setdefault(f"mean over {m['metric']} tasks", []).append(
                (m["fraction"], m["gain"])
            )
    tracking.RunLogger(parent).log_metrics(
        {f"gain/mean_{m['metric'].rsplit('/', 1)[-1]}_{m['fraction']:g}": m["gain"]
         for m in board["mean_gain"]}, 0,
    )  # fmt: skip
    tracking.log_plot(
        parent,
        "scoreboard.png",
        series,
        title=f"{cfg.name}: what pretraining buys, per task (+: pretraining wins)",
        xlabel="fraction of the labeled training rows (log scale)",
        ylabel="pretrained - scratch (signed)",
        log_x=len({m["fraction"] for m in board["mean_gain"]}) > 1,
    )


def plot_pretraining(cfg: PipelineConfig, stage: Stage) -> None:
    """plots/pretrain_loss.png on the stage's run: the training loss at each logged step."""
    loss = tracking.metric_history(stage.computed_by, "train/loss")
    held_out = tracking.metric_history(stage.computed_by, "val/loss")
    if loss:
        tracking.log_plot(
            stage.run,
            "pretrain_loss.png",
            {"train/loss": loss, **({"val/loss (held out)": held_out} if held_out else {})},
            title=f"{cfg.name}: pretraining loss ({cfg.pretrain.objective})",
            xlabel="step",
            ylabel="loss",
        )


def plot_probe(cfg: PipelineConfig, stage: Stage) -> None:
    """plots/pretrain_probe.png on the stage's run: each task's probe figure at each probed
    step (pretrain.probe), beside the loss plot."""
    run = tracking.get_run(stage.computed_by.tracking_uri, stage.computed_by.run_id)
    keys = sorted(
        k for k in (run.data.metrics if run is not None else {}) if k.startswith("probe/")
    )
    series = {k: tracking.metric_history(stage.computed_by, k) for k in keys}
    if any(series.values()):
        tracking.log_plot(
            stage.run,
            "pretrain_probe.png",
            series,
            title=f"{cfg.name}: the probe of each task during pretraining",
            xlabel="step",
            ylabel="probe figure (accuracy, or mse)",
        )


def plot_finetuning(cfg: PipelineConfig, stage: Stage, arms: list[ArmResult]) -> None:
    """plots/finetune_curves.png on the stage's run: the sweep metric epoch by epoch for the
    best trial of each arm (pretrained against scratch)."""
    metric = cfg.finetune.sweep.metric
    trials = {r.info.run_name: r.info.run_id for r in tracking.child_runs(stage.computed_by)}
    series = {}
    for result in arms:
        if result.best_checkpoint is not None and result.best_trial in trials:
            ref = tracking.RunRef(
                stage.run.tracking_uri, stage.run.experiment_id, trials[result.best_trial]
            )
            label = f"{result.arm.label} ({result.best_trial})"
            series[label] = tracking.metric_history(ref, metric)
    if series:
        tracking.log_plot(
            stage.run,
            "finetune_curves.png",
            series,
            title=f"{cfg.name}: best trial per arm, {metric} on the validation split",
            xlabel="epoch",
            ylabel=metric,
        )


def _class_names(cfg: PipelineConfig) -> list[str] | None:
    """The class names of the training rows, when `prepare` numbered them by name."""
    files = resolve_parquet_files(cfg.data.labeled.train.path, key="data.labeled.train.path")
    return label_names(files)


def log_budget(parent: tracking.RunRef, budget: dict | None) -> None:
    """The pipeline's worker-hours on its run: spent (in all, pretraining, fine-tuning) and
    the budget, so that runs compare by what they cost."""
    if budget is None:
        return
    metrics = {f"budget/{k.removesuffix('_s')}_worker_hours": v / 3600
               for k, v in budget.items() if v is not None}  # fmt: skip
    tracking.RunLogger(parent).log_metrics(metrics, 0)


def log_headline(parent: tracking.RunRef, summary) -> None:
    """The answer on the pipeline run itself, so that pipelines compare in MLflow's runs table
    and charts: per task and label fraction, `headline/[<task>/]<metric>/<arm>_<fraction>`
    (pretrained, scratch, baseline, and gap = pretrained - scratch) on the reported split, and
    a description (the run's note) with the same figures as a table."""
    tasks = summary.tasks or ({"": TaskResult(summary.metric, summary.mode, summary.arms,
                                               summary.model)} if summary.arms else {})  # fmt: skip
    metrics, lines = {}, []
    for name, task in tasks.items():
        if not task.metric or not task.arms:
            continue
        shown = test_key(task.metric) if on_test(task.arms) else task.metric
        prefix = f"headline/{name + '/' if name else ''}{shown}"
        for row in by_fraction(task.arms, task.metric):
            figures = {k: row.get(k) for k in ("pretrained", "scratch", "baseline")}
            if figures["pretrained"] is not None and figures["scratch"] is not None:
                figures["gap"] = figures["pretrained"] - figures["scratch"]
            for arm, value in figures.items():
                if value is not None:
                    metrics[f"{prefix}/{arm}_{row['fraction']:g}"] = value
            cells = [f"{v:+.4f}" if k == "gap" else f"{v:.4f}" if v is not None else "-"
                     for k, v in figures.items()]  # fmt: skip
            lines.append(f"| {name or summary.name} | {shown} | {row['fraction']:g} | "
                         + " | ".join(cells) + " |")  # fmt: skip
    if not metrics:
        return
    tracking.RunLogger(parent).log_metrics(metrics, 0)
    head = ["| task | metric | labels | pretrained | scratch | baseline | gap |",
            "|---|---|---|---|---|---|---|"]  # fmt: skip
    note = (
        f"raypipe pipeline '{summary.name}': what pretraining bought (gap = pretrained - "
        "scratch, on the test split when there is one).\n\n" + "\n".join(head + lines)
    )
    tracking.RunLogger(parent).set_tags({"mlflow.note.content": note})

"""The fine-tuning stage's classical baseline (raypipe/baselines.py) on each label fraction:
the same training rows as the neural arms, the same validation and test splits, as an arm of
its own (`baseline`) with its own MLflow run under the stage."""

from __future__ import annotations

from dataclasses import dataclass

from raypipe import baselines, tracking
from raypipe.config import PipelineConfig
from raypipe.preflight import RunContext
from raypipe.progress import console
from raypipe.stages.arms import BASELINE, Arm, ArmResult
from raypipe.tracking import RunRef, Tag


def _image_args(cfg: PipelineConfig, spec: dict) -> dict:
    config = spec["config"]
    return {"image_size": config.get("image_size"), "channels": config.get("channels"),
            "skip_bad": cfg.data.bad_images == "skip"}  # fmt: skip


@dataclass(frozen=True)
class Evaluations:
    """The validation split, and the test split when there is one, read once for every fraction."""

    kind: str  # "text" | "image"
    splits: dict[str, baselines.Rows]  # "val" and "test"
    regression: bool = False  # labels are numbers (a regression task)


def evaluations(cfg: PipelineConfig, ctx: RunContext, spec: dict) -> Evaluations:
    lab, kind = cfg.data.labeled, ctx.plan.finetune_input
    regression = ctx.plan.task.label_dtype != "int64"
    image = {**_image_args(cfg, spec), "regression": regression}
    splits = {"val": baselines.read_rows(ctx.validation, lab.validation, kind=kind, **image,
                                         max_rows=lab.validation.max_rows)}  # fmt: skip
    if lab.test is not None:
        splits["test"] = baselines.read_rows(
            ctx.test, lab.test, kind=kind, **image, max_rows=lab.test.max_rows
        )
    return Evaluations(kind, splits, regression)


def run_baseline(cfg, stage_run: RunRef, evals: Evaluations, train_files: list[str], *,
                 fraction: float, max_rows: int | None, spec: dict) -> ArmResult:  # fmt: skip
    """Fit and score the baseline on one fraction's rows; logged as run `baseline[_<fraction>]`."""
    f, lab = cfg.finetune, cfg.data.labeled
    arm = Arm(BASELINE, fraction)
    image = {**_image_args(cfg, spec), "regression": evals.regression}
    train = baselines.read_rows(train_files, lab.train, kind=evals.kind, **image, max_rows=max_rows)
    found = baselines.fit_and_score(
        train, evals.splits, kind=evals.kind, num_classes=f.num_classes, seed=cfg.seed,
        regression=evals.regression,
    )  # fmt: skip
    names = baselines.REGRESSION_DESCRIPTIONS if evals.regression else baselines.DESCRIPTIONS
    what = names[evals.kind]
    run, _ = tracking.find_or_start_run(
        tracking_uri=stage_run.tracking_uri, experiment_id=stage_run.experiment_id,
        name=arm.label, kind="baseline", parent=stage_run,
        tags={Tag.ARM: arm.label}, new_tags={Tag.LABEL_FRACTION: fraction},
    )  # fmt: skip
    tracking.RunLogger(run).log_params({"model": what, "num_train_rows": len(train.labels)})
    tracking.RunLogger(run).log_metrics(found, 0)
    tracking.end_run(run)
    metric = f.sweep.metric
    test = {k: v for k, v in found.items() if k.startswith("test/")}
    chance = "mean_mse" if evals.regression else "majority_accuracy"
    majority = found.get(f"test/{chance}" if test else f"val/{chance}")
    console.line(
        f"[finetune] baseline ({what}) on {len(train.labels)} rows: {metric} "
        f"{found.get(metric, float('nan')):.4f}"
        + (
            f", test {found.get('test/' + metric.split('/', 1)[-1], float('nan')):.4f}"
            if test
            else ""
        )
        + (
            "; always the training mean: mse "
            if evals.regression
            else "; always the most common class: "
        )
        + f"{majority:.4f}"
    )
    return ArmResult(
        arm=arm, best_metric=found.get(metric), best_checkpoint=None, best_trial=arm.label,
        best_params={"model": what}, num_train_rows=len(train.labels),
        test_metrics=test or None, majority=majority,
    )  # fmt: skip

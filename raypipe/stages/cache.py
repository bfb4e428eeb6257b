"""The stage cache: fingerprints, the `stage.json` marker, reuse and resume, and the runs that
hold them (pipeline and stage; trials in stages/trial.py) through one find-or-start.

A stage's fingerprint is the sha256 of what it computes from: its resolved config (less the
settings marked RUN_ONLY in config.py, which change how it runs, not what it computes), its
input data and its upstream fingerprint. A completed stage writes `stage.json` last and is
reused on re-run; a stage with a directory but no marker resumes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from raypipe import storage, tracking
from raypipe.config import PipelineConfig, to_yaml
from raypipe.data import files as datafiles
from raypipe.preflight import RunContext
from raypipe.progress import console
from raypipe.summary import StageOutcome
from raypipe.tracking import Tag

STAGE_MARKER = "stage.json"


def fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class Stage:
    """One stage's directory, its MLflow run, and the marker of a previous completed run."""

    name: str
    dir: str  # local path or URI
    fingerprint: str
    run: tracking.RunRef
    marker: dict[str, Any] | None
    started: float = field(default_factory=time.perf_counter)

    def complete(self, outputs: dict[str, Any]) -> None:
        """Write the marker last: only a stage that finished has one."""
        payload = {"fingerprint": self.fingerprint, "mlflow_run_id": self.run.run_id, **outputs}
        storage.write_text(
            storage.join(self.dir, STAGE_MARKER), json.dumps(payload, indent=2, default=str)
        )

    @property
    def computed_by(self) -> tracking.RunRef:
        """The run that logged the stage's metrics: this one, or the run a reused stage's
        outputs came from."""
        if self.marker is None:
            return self.run
        return tracking.RunRef(
            self.run.tracking_uri, self.run.experiment_id, self.marker["mlflow_run_id"]
        )

    def outcome(self, metrics: dict[str, Any]) -> StageOutcome:
        """The stage's line in the summary."""
        status = "reused" if self.marker is not None else "done"
        return StageOutcome(self.name, status, time.perf_counter() - self.started, metrics)


@contextlib.contextmanager
def open_stage(
    cfg: PipelineConfig,
    ctx: RunContext,
    parent: tracking.RunRef,
    name: str,
    fp: str,
    *,
    before_work: Callable[[], None],
) -> Iterator[Stage]:
    """Open a stage: reuse it when its marker exists, else prepare its directory and call
    `before_work` (which starts Ray). The stage's MLflow run ends FINISHED, or FAILED if the
    body raises."""
    stage_dir = storage.join(ctx.storage, cfg.name, f"{name}-{fp[:12]}")
    marker_path = storage.join(stage_dir, STAGE_MARKER)
    marker = json.loads(storage.read_text(marker_path)) if storage.is_file(marker_path) else None
    if marker is not None:
        console.line(f"[{name}] reusing the completed stage {tracking.redact(stage_dir)}")
    # A resumed pipeline run already has this stage's run: continue it, never add a second.
    run, status = tracking.find_or_start_run(
        tracking_uri=ctx.tracking_uri,
        experiment_id=ctx.experiment_id,
        name=name,
        kind="stage",
        parent=parent,
        tags={Tag.STAGE: name, Tag.FINGERPRINT: fp},
        new_tags={
            Tag.REUSED: str(marker is not None).lower(),
            **({Tag.REUSED_FROM: marker["mlflow_run_id"]} if marker is not None else {}),
        },
    )
    if marker is None:
        storage.makedirs(stage_dir)
        storage.write_text(storage.join(stage_dir, "config.yaml"), to_yaml(cfg))
        if status is not None:
            console.line(f"[{name}] resuming the interrupted stage {tracking.redact(stage_dir)}")
        before_work()
    try:
        yield Stage(name, stage_dir, fp, run, marker)
    except BaseException:
        console.end_status()
        tracking.end_run(run, "FAILED")
        raise
    console.end_status()
    tracking.end_run(run)


def pipeline_run(cfg: PipelineConfig, ctx: RunContext) -> tuple[tracking.RunRef, str]:
    """The pipeline's MLflow run and fingerprint: the interrupted run of this same pipeline
    (same config, same data) continues, so a rerun after a crash keeps one run tree;
    otherwise a new run."""
    fp = fingerprint(
        "pipeline",
        cfg.model_dump(mode="json"),
        datafiles.manifest_digest(ctx.every_file),
    )
    run, status = tracking.find_or_start_run(
        tracking_uri=ctx.tracking_uri,
        experiment_id=ctx.experiment_id,
        name=cfg.name,
        kind="pipeline",
        tags={Tag.FINGERPRINT: fp},
        reuse_finished=False,
    )
    if status is not None:
        console.line(f"[pipeline] continuing the interrupted run {run.run_id}")
    return run, fp

"""MLflow: the run tree (pipeline -> stage -> trial), metrics from workers, the model registry.

Runs are created through `MlflowClient` with explicit ids, never through MLflow's global
"active run", so the driver, Train workers and Tune trials can all write to one tree.
Workers get a `RunRef` (picklable) and call `logger_for(ref, rank)`: rank 0 logs, others no-op.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raypipe.errors import UserError

PARENT_TAG = "mlflow.parentRunId"
#: Tag set on every run raypipe creates: pipeline, stage or trial.
KIND_TAG = "raypipe.kind"


def resolve_tracking_uri(configured: str | None, storage: str) -> str:
    """An explicit `tracking.uri` wins, then MLFLOW_TRACKING_URI, then a local sqlite store
    inside `storage`. Relative sqlite paths are made absolute: workers run in other dirs."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or ""
    if not uri:
        uri = f"sqlite:///{Path(storage).resolve() / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"
    return uri


def ui_command(uri: str) -> str:
    if uri.startswith(("http://", "https://", "databricks")):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri}"


@dataclass(frozen=True)
class RunRef:
    """Enough to write to one MLflow run from any process."""

    tracking_uri: str
    experiment_id: str
    run_id: str


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _flat(params: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in params.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, f"{key}."))
        else:
            out[key] = str(v)[:6000]
    return out


class RunLogger:
    """Writes metrics, params and tags to one run; safe to create in any worker."""

    def __init__(self, ref: RunRef):
        self.ref = ref
        self._client = _client(ref.tracking_uri)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self._client.log_batch(self.ref.run_id, metrics=batch, synchronous=True)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in _flat(params).items()]
        for i in range(0, len(items), 100):  # MLflow's per-batch limit
            self._client.log_batch(self.ref.run_id, params=items[i : i + 100])

    def set_tags(self, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self._client.set_tag(self.ref.run_id, k, str(v))


class NullLogger:
    """What every rank but 0 holds: the same calls, doing nothing."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def set_tags(self, tags: dict[str, Any]) -> None:
        pass


def logger_for(ref: RunRef | None, rank: int) -> RunLogger | NullLogger:
    return RunLogger(ref) if ref is not None and rank == 0 else NullLogger()


def start_run(
    *,
    tracking_uri: str,
    experiment_id: str,
    name: str,
    kind: str,
    parent: RunRef | None = None,
    tags: dict[str, Any] | None = None,
) -> RunRef:
    all_tags = {KIND_TAG: kind, **(tags or {})}
    if parent is not None:
        all_tags[PARENT_TAG] = parent.run_id
    run = _client(tracking_uri).create_run(
        experiment_id, run_name=name, tags={k: str(v) for k, v in all_tags.items()}
    )
    return RunRef(tracking_uri, experiment_id, run.info.run_id)


def find_run(
    *,
    tracking_uri: str,
    experiment_id: str,
    kind: str,
    tags: dict[str, Any],
    parent: RunRef | None = None,
) -> tuple[RunRef, str] | None:
    """The newest run of `kind` carrying all `tags` (under `parent`): (ref, its status)."""
    wanted = {KIND_TAG: kind, **tags}
    if parent is not None:
        wanted[PARENT_TAG] = parent.run_id
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in wanted.items())
    runs = _client(tracking_uri).search_runs(
        [experiment_id], filter_string=query, order_by=["attributes.start_time DESC"], max_results=1
    )
    if not runs:
        return None
    return RunRef(tracking_uri, experiment_id, runs[0].info.run_id), runs[0].info.status


def reopen_run(ref: RunRef) -> None:
    """Mark an interrupted run as running again: a resumed pipeline continues its own tree."""
    _client(ref.tracking_uri).update_run(ref.run_id, status="RUNNING")


def end_run(ref: RunRef, status: str = "FINISHED") -> None:
    _client(ref.tracking_uri).set_terminated(ref.run_id, status=status)


def child_runs(ref: RunRef) -> list:
    """Direct children of a run."""
    return _client(ref.tracking_uri).search_runs(
        [ref.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{ref.run_id}'"
    )


def log_text(ref: RunRef, text: str, artifact_file: str) -> None:
    _client(ref.tracking_uri).log_text(ref.run_id, text, artifact_file)


def open_experiment(tracking_uri: str, name: str, *, artifact_root: str | None) -> str:
    """Get or create the experiment; fail fast, naming the URI, when the store is unreachable."""
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    try:
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        location = f"{Path(artifact_root).resolve() / name}" if artifact_root else None
        return client.create_experiment(name, artifact_location=location)
    except MlflowException as e:
        raise UserError(
            f"MLflow tracking store '{tracking_uri}' is not usable ({str(e).splitlines()[0]}); "
            "check tracking.uri or MLFLOW_TRACKING_URI"
        ) from None


def log_registered_model(
    ref: RunRef,
    *,
    model,
    input_example,
    spec: dict[str, tuple],
    registered_name: str,
    extra_files: list[str],
    tags: dict[str, Any],
) -> tuple[str, str]:
    """Log `model` (a torch module) in MLflow's pt2 format, which loads without unpickling
    code, and register it. Returns (model URI, registered version)."""
    import mlflow
    import numpy as np
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    (in_name, in_dtype, in_shape), (out_name, out_dtype, out_shape) = spec["input"], spec["output"]
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(in_dtype), tuple(in_shape), in_name)]),
        outputs=Schema([TensorSpec(np.dtype(out_dtype), tuple(out_shape), out_name)]),
    )
    # log_model works on MLflow's global tracking URI (and exports it to the environment):
    # set it for this call only, so the caller's process is left as it was.
    previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(ref.tracking_uri)
    try:
        with mlflow.start_run(run_id=ref.run_id):
            info = mlflow.pytorch.log_model(
                model,
                name="model",
                serialization_format="pt2",
                input_example=input_example,
                signature=signature,
                registered_model_name=registered_name,
                extra_files=extra_files,
                # Listing requirements skips MLflow's inference, which re-loads the model in a
                # subprocess and costs seconds.
                pip_requirements=[
                    f"torch=={torch.__version__.split('+')[0]}",
                    f"mlflow=={mlflow.__version__}",
                ],
                tags={k: str(v) for k, v in tags.items()},
                # The serving-input check goes through pyfunc, which the pt2 tensor flavor lacks.
                validate_serving_input=False,
            )
    finally:
        mlflow.set_tracking_uri(previous)
    version = str(info.registered_model_version)
    client = _client(ref.tracking_uri)
    for k, v in tags.items():
        client.set_model_version_tag(registered_name, version, k, str(v))
    return info.model_uri, version

"""MLflow: the run tree (pipeline -> stage -> trial), metrics from workers, the model registry.

Runs are created through `MlflowClient` with explicit ids, never through MLflow's global
"active run", so the driver, Train workers and Tune trials can all write to one tree.
Workers get a `RunRef` (picklable) and call `logger_for(ref, rank)`: rank 0 logs, others no-op.
Owns raypipe's tag vocabulary (`Tag`) and the one find-or-reopen-or-start of a run.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from raypipe.errors import UserError
from raypipe.progress import progress, stderr_without
from raypipe.redaction import redact
from raypipe.registered import global_store

PARENT_TAG = "mlflow.parentRunId"


class Tag:
    """raypipe's tag vocabulary on runs and registered versions: the only place these
    names are spelled."""

    KIND = "raypipe.kind"  # on every run raypipe creates: pipeline, stage or trial
    FINGERPRINT = "raypipe.fingerprint"  # a pipeline's or a stage's fingerprint
    STAGE = "raypipe.stage"
    REUSED = "raypipe.reused"  # a stage's outputs came from an earlier run
    REUSED_FROM = "raypipe.reused_from_run"
    CHECKPOINT = "raypipe.checkpoint"  # a stage's or a registered version's checkpoint
    BEST_CHECKPOINT = "raypipe.best_checkpoint"  # the fine-tune stage's best
    ARM = "raypipe.arm"  # "pretrained" | "scratch" (with its label fraction on trials)
    TRIAL_ID = "raypipe.trial_id"
    TRIAL = "raypipe.trial"
    BEST_EPOCH = "raypipe.best_epoch"  # the epoch of a registered version's checkpoint
    SEED = "raypipe.seed"  # a repeat's seed (finetune.repeats)
    SETTINGS_NOW = "raypipe.settings_now"  # a PBT trial's settings after a perturbation
    STOPPED_EARLY = "raypipe.stopped_early"
    LABEL_FRACTION = "raypipe.label_fraction"
    INIT_CHECKPOINT = "raypipe.init_checkpoint"  # lineage: the pretraining it started from
    PRETRAIN_STEP = "raypipe.pretrain_step"
    PRETRAIN_RUN_ID = "raypipe.pretrain_run_id"
    PIPELINE_FINGERPRINT = "raypipe.pipeline_fingerprint"
    PIPELINE_RUN_ID = "raypipe.pipeline_run_id"
    #: On a registered version: the digest of the validation data its metric was measured on.
    VALIDATION_DIGEST = "raypipe.validation_digest"

    @staticmethod
    def metric(name: str) -> str:
        """A registered version's value of the sweep metric `name`."""
        return f"raypipe.{name}"


def resolve_tracking_uri(configured: str | None, storage: str) -> str:
    """An explicit `tracking.uri` wins, then MLFLOW_TRACKING_URI, then a local sqlite store
    inside `storage`. Relative sqlite paths are made absolute: workers run in other dirs."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or ""
    if not uri:
        uri = f"sqlite:///{Path(storage).resolve() / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"
    return uri


#: The URI schemes MLflow tracks to (a bare path is a local file store).
TRACKING_SCHEMES = ("http", "https", "sqlite", "file", "postgresql", "mysql", "mssql", "databricks")


def check_uri(uri: str, *, key: str, must_exist: bool = False) -> None:
    """A tracking URI MLflow can use, checked by its form; with `must_exist`, a local store
    must already be there (reading a run's results never creates an empty database)."""
    parts = urlsplit(uri)
    scheme = parts.scheme.split("+")[0].lower()
    fix = "use http(s)://HOST:PORT, sqlite:///PATH/mlflow.db or file:///PATH"
    if scheme and scheme not in TRACKING_SCHEMES:
        raise UserError(f"{key}: '{redact(uri)}' has the scheme '{scheme}', which MLflow does "
                        f"not track to; {fix}")  # fmt: skip
    if scheme in ("http", "https") and not parts.hostname:
        raise UserError(f"{key}: '{redact(uri)}' names no host; {fix}")
    if scheme == "sqlite" and not uri.startswith("sqlite:///"):
        raise UserError(f"{key}: '{redact(uri)}' is not sqlite:///PATH (three slashes)")
    local = uri.removeprefix("sqlite:///") if scheme == "sqlite" else None
    if must_exist and local is not None and not Path(local).is_file():
        raise UserError(f"{key}: there is no MLflow store at '{local}' (a mistyped path?); give "
                        "the one the run's summary printed")  # fmt: skip


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail in seconds on an HTTP tracking server nothing answers at (MLflow's client would
    retry for minutes). Any HTTP answer, even an error status, means it is there."""
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    netloc += f":{parts.port}" if parts.port else ""
    url = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/") + "/health", "", ""))
    try:
        urllib.request.urlopen(url, timeout=timeout).close()
    except urllib.error.HTTPError:
        return
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise UserError(
            f"MLflow tracking server '{redact(uri)}' is unreachable ({reason}); start it, or "
            "fix tracking.uri or MLFLOW_TRACKING_URI"
        ) from None


def ui_command(uri: str) -> str:
    """How to see the runs: a server's own address, or the command that serves a local store."""
    if uri.startswith(("http://", "https://", "databricks")):
        return uri
    return f"mlflow ui --backend-store-uri {uri}"


def quiet_run_links() -> None:
    """No "View run … / View experiment …" lines from MLflow on each run a server ends (ten
    pairs per quickstart): the summary names the run and the UI once. A user's own setting of
    MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT wins."""
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


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
            out[key] = redact(str(v))[:6000]
    return out


class MetricsLogger(Protocol):
    """What a training loop logs through (see `logger_for`): metrics and params, flushed and
    closed by the loop."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_params(self, params: dict[str, Any]) -> None: ...

    def flush(self, timeout: float) -> bool: ...

    def close(self, timeout: float = 300.0) -> None: ...


def _log_params(client, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in _flat(params).items()]
    for i in range(0, len(items), 100):  # MLflow's per-batch limit
        client.log_batch(run_id, params=items[i : i + 100])


class RunLogger:
    """Writes metrics, params and tags to one run at once; the driver's logger."""

    def __init__(self, ref: RunRef):
        self.ref = ref
        self._client = _client(ref.tracking_uri)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self._client.log_batch(self.ref.run_id, metrics=batch, synchronous=True)

    def log_params(self, params: dict[str, Any]) -> None:
        _log_params(self._client, self.ref.run_id, params)

    def set_tags(self, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self._client.set_tag(self.ref.run_id, k, redact(str(v)))


class BufferedLogger:
    """A training loop's metrics and params, sent by a background thread: a slow or unreachable
    tracking server never stalls training, and neither does the MLflow import and client set-up
    (done in that thread, while the first steps run). A batch that cannot be sent stays queued
    and is retried (MLflow's client also retries each request with backoff) until `close`."""

    retry_s = 5.0

    def __init__(self, ref: RunRef):
        self.ref = ref
        self._client = None  # made by the sender thread
        self._pending: list[tuple[str, float, int, int]] = []  # (key, value, ms, step)
        self._params: list[dict[str, Any]] = []
        self._cv = threading.Condition()
        self._closed = False
        self._failing = False
        self._thread = threading.Thread(target=self._send, daemon=True, name="raypipe-metrics")
        self._thread.start()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        with self._cv:
            self._pending.extend((k, float(v), now, step) for k, v in metrics.items())
            self._cv.notify()

    def log_params(self, params: dict[str, Any]) -> None:
        with self._cv:
            self._params.append(params)
            self._cv.notify()

    def _send_some(self, params: list[dict[str, Any]], batch: list[tuple]) -> None:
        from mlflow.entities import Metric

        if self._client is None:
            self._client = _client(self.ref.tracking_uri)
        for p in params:
            _log_params(self._client, self.ref.run_id, p)
        if batch:
            metrics = [Metric(*m) for m in batch]
            self._client.log_batch(self.ref.run_id, metrics=metrics, synchronous=True)

    def _send(self) -> None:
        while True:
            with self._cv:
                while not (self._pending or self._params) and not self._closed:
                    self._cv.wait()
                if not (self._pending or self._params):
                    return
                params, batch = list(self._params), self._pending[:1000]  # MLflow's limit
            try:
                self._send_some(params, batch)
            except Exception as e:  # noqa: BLE001 - any failure: keep the batch, try again
                if not self._failing:
                    self._failing = True
                    progress(
                        f"tracking: cannot reach MLflow at {redact(self.ref.tracking_uri)} "
                        f"({str(e).splitlines()[0][:200]}); training goes on, metrics are kept "
                        "and sent when it is back"
                    )
                with self._cv:
                    self._cv.wait(self.retry_s)
                continue
            with self._cv:
                del self._params[: len(params)]
                del self._pending[: len(batch)]
                self._cv.notify_all()
            if self._failing:
                self._failing = False
                progress("tracking: MLflow is reachable again; buffered metrics sent")

    def flush(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the queue to empty; True if it did. No wait while
        the tracking server is unreachable (what is queued stays queued)."""
        if self._failing:
            return False
        deadline = time.monotonic() + timeout
        with self._cv:
            while (self._pending or self._params) and (left := deadline - time.monotonic()) > 0:
                self._cv.wait(min(left, 1.0))
            return not (self._pending or self._params)

    def close(self, timeout: float = 300.0) -> None:
        """Send what is queued, waiting up to `timeout` seconds for an unreachable server."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout)
        if self._pending:
            progress(
                f"tracking: {len(self._pending)} metric values could not be sent to "
                f"{redact(self.ref.tracking_uri)} within {timeout:.0f} s"
            )


class NullLogger:
    """What every rank but 0 holds: the same calls, doing nothing."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def flush(self, timeout: float) -> bool:
        return True

    def close(self, timeout: float = 0.0) -> None:
        pass


def logger_for(ref: RunRef | None, rank: int) -> BufferedLogger | NullLogger:
    """What a training worker logs through: rank 0 sends (in the background), others no-op."""
    return BufferedLogger(ref) if ref is not None and rank == 0 else NullLogger()


def start_run(
    *,
    tracking_uri: str,
    experiment_id: str,
    name: str,
    kind: str,
    parent: RunRef | None = None,
    tags: dict[str, Any] | None = None,
) -> RunRef:
    all_tags = {Tag.KIND: kind, **(tags or {})}
    if parent is not None:
        all_tags[PARENT_TAG] = parent.run_id
    run = _client(tracking_uri).create_run(
        experiment_id, run_name=name, tags={k: redact(str(v)) for k, v in all_tags.items()}
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
    wanted = {Tag.KIND: kind, **tags}
    if parent is not None:
        wanted[PARENT_TAG] = parent.run_id
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in wanted.items())
    runs = _client(tracking_uri).search_runs(
        [experiment_id], filter_string=query, order_by=["attributes.start_time DESC"], max_results=1
    )
    if not runs:
        return None
    return RunRef(tracking_uri, experiment_id, runs[0].info.run_id), runs[0].info.status


def find_or_start_run(
    *,
    tracking_uri: str,
    experiment_id: str,
    name: str,
    kind: str,
    tags: dict[str, Any],
    parent: RunRef | None = None,
    new_tags: dict[str, Any] | None = None,
    reuse_finished: bool = True,
    reopen: bool = True,
) -> tuple[RunRef, str | None]:
    """The run of `kind` carrying `tags` (under `parent`), so a restarted driver continues its
    own run tree: (the run found, its status), marked running again if it had ended (`reopen`),
    or a new run with `tags` and `new_tags`: (it, None). A finished run is not taken up again
    unless `reuse_finished`."""
    where = {"tracking_uri": tracking_uri, "experiment_id": experiment_id}
    found = find_run(**where, kind=kind, tags=tags, parent=parent)
    if found is not None and (reuse_finished or found[1] != "FINISHED"):
        if reopen and found[1] != "FINISHED":
            reopen_run(found[0])
        return found
    run = start_run(**where, name=name, kind=kind, parent=parent, tags={**tags, **(new_tags or {})})
    return run, None


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


def metric_history(ref: RunRef, key: str) -> list[tuple[float, float]]:
    """A run's values of one metric as (step, value), in step order; none when the run is not
    in this store (a reused stage computed under another tracking server)."""
    from mlflow.exceptions import MlflowException

    try:
        history = _client(ref.tracking_uri).get_metric_history(ref.run_id, key)
    except MlflowException:
        return []
    return sorted((m.step, m.value) for m in history)


def log_plot(ref: RunRef, name: str, series: dict, **labels) -> None:
    """Draw `series` (see plots.curves) and log the PNG as `plots/<name>` on the run."""
    from raypipe import plots

    with tempfile.TemporaryDirectory(prefix="raypipe-") as tmp:
        path = plots.curves(Path(tmp) / name, series, **labels)
        _client(ref.tracking_uri).log_artifact(ref.run_id, str(path), "plots")


def get_run(tracking_uri: str, run_id: str):
    """The MLflow run `run_id`, or None when the store has no such run."""
    from mlflow.exceptions import MlflowException

    check_reachable(tracking_uri)
    try:
        return _client(tracking_uri).get_run(run_id)
    except MlflowException:
        return None


def read_artifact_text(tracking_uri: str, run_id: str, artifact: str) -> str | None:
    """A run's text artifact, or None when the run has none by that name."""
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory(prefix="raypipe-") as tmp:
        try:
            local = _client(tracking_uri).download_artifacts(run_id, artifact, tmp)
        except (MlflowException, OSError):
            return None
        return Path(local).read_text()


def log_text(ref: RunRef, text: str, artifact_file: str) -> None:
    _client(ref.tracking_uri).log_text(ref.run_id, redact(text), artifact_file)


def open_experiment(tracking_uri: str, name: str, *, artifact_root: str | None) -> str:
    """Get or create the experiment; fail fast, naming the URI, when the store is unreachable."""
    from mlflow.exceptions import MlflowException

    check_reachable(tracking_uri)
    client = _client(tracking_uri)
    try:
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        location = f"{Path(artifact_root).resolve() / name}" if artifact_root else None
        return client.create_experiment(name, artifact_location=location)
    except MlflowException as e:
        raise UserError(
            f"MLflow tracking store '{redact(tracking_uri)}' is not usable ({str(e).splitlines()[0]}); "
            "check tracking.uri or MLFLOW_TRACKING_URI"
        ) from None


def log_datasets(ref: RunRef, datasets: list[tuple[str, str, str, str]]) -> None:
    """Record data as the run's inputs (MLflow datasets): (name, location, digest, context),
    context being e.g. "train". Logging the same dataset again changes nothing."""
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    inputs = []
    for name, location, digest, context in datasets:
        with warnings.catch_warnings():  # "can be interpreted in multiple ways": all local
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(redact(location))
        dataset = MetaDataset(source, name=name, digest=digest[:36])
        inputs.append(
            DatasetInput(dataset._to_mlflow_entity(), [InputTag(MLFLOW_DATASET_CONTEXT, context)])
        )
    _client(ref.tracking_uri).log_inputs(ref.run_id, datasets=inputs)


CHAMPION = "champion"


def promote_champion(
    tracking_uri: str,
    name: str,
    version: str,
    *,
    metric: str,
    value: float,
    mode: str,
    data_digest: str,
) -> tuple[str, str]:
    """Point the `champion` alias at `version` if there is no champion yet, or if `version`
    beats it on the same validation data (the digest tags match). Returns (the champion's
    version now, why): the alias never moves to a model measured on other data."""
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    version = str(version)  # MLflow hands back versions as ints or strings
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        current = None
    if current is not None and str(current.version) == version:
        return version, "already the champion"
    if current is not None:
        theirs = current.tags.get(Tag.metric(metric))
        if current.tags.get(Tag.VALIDATION_DIGEST) != data_digest or theirs is None:
            return str(current.version), "measured on other validation data: the alias stays"
        better = value > float(theirs) if mode == "max" else value < float(theirs)
        if not better:
            return str(current.version), (
                f"{metric} {float(theirs):.4g} is not beaten: the alias stays"
            )
    client.set_registered_model_alias(name, CHAMPION, version)
    return version, "new champion"


def log_registered_model(
    ref: RunRef,
    *,
    model,
    input_example,
    spec: dict[str, tuple],
    registered_name: str,
    extra_files: list[str],
    tags: dict[str, Any],
    description: str | None = None,
) -> tuple[str, str]:
    """Log `model` (a torch module) in MLflow's pt2 format, which loads without unpickling
    code, and register it, with `description` on the version. Returns (model URI, registered
    version)."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    (_, in_dtype, in_shape), (_, out_dtype, out_shape) = spec["input"], spec["output"]
    # Unnamed tensors: MLflow's scoring server hands a named one to the PyTorch flavor as a
    # dict, which it refuses (every /invocations a 400); an unnamed one arrives as the array
    # `{"inputs": [[...], ...]}` holds (README, "Use the model").
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(in_dtype), tuple(in_shape))]),
        outputs=Schema([TensorSpec(np.dtype(out_dtype), tuple(out_shape))]),
    )
    # log_model works on MLflow's global tracking URI (and exports it to the environment):
    # set it for this call only, so the caller's process is left as it was.
    with global_store(ref.tracking_uri):
        info = _log_model(ref, model, input_example, signature, registered_name, extra_files, tags)
    version = str(info.registered_model_version)
    client = _client(ref.tracking_uri)
    for k, v in tags.items():
        client.set_model_version_tag(registered_name, version, k, redact(str(v)))
    if description:
        client.update_model_version(registered_name, version, description=redact(description))
    return info.model_uri, version


def _log_model(ref, model, input_example, signature, registered_name, extra_files, tags):
    import mlflow
    import torch

    # MLflow prints what it registered: the summary says it already.
    quiet = stderr_without("Successfully registered model", "Created version")
    with mlflow.start_run(run_id=ref.run_id), quiet:
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
            tags={k: redact(str(v)) for k, v in tags.items()},
            # MLflow scores its own serving example through the model: a registered model
            # the scoring server could not answer fails here.
            validate_serving_input=True,
        )
    return info

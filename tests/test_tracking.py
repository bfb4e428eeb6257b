"""Tracking outages against a real `mlflow server`: fail fast at start, buffer mid-run."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient
from servers import free_port, mlflow_server

from raypipe import tracking
from raypipe.errors import UserError


def test_unreachable_server_at_start_names_the_uri():
    uri = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(UserError, match=f"MLflow tracking server '{uri}' is unreachable"):
        tracking.open_experiment(uri, "x", artifact_root=None)


def test_credentials_in_a_uri_are_never_shown(monkeypatch):
    uri = "https://alice:s3cret-token@mlflow.example.com:5000/path"
    assert tracking.redact(uri) == "https://***@mlflow.example.com:5000/path"
    assert tracking.redact("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok-123456")
    assert tracking.redact("Bearer tok-123456 s3://AKIA:key@b/x") == "Bearer *** s3://***@b/x"
    with pytest.raises(UserError) as err:
        tracking.check_reachable("http://alice:s3cret-token@127.0.0.1:1")
    assert "s3cret-token" not in str(err.value) and "http://***@127.0.0.1:1" in str(err.value)


def test_params_tags_and_texts_are_scrubbed_in_the_store(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI-secret")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = tracking.open_experiment(uri, "scrub", artifact_root=str(tmp_path / "art"))
    leaky = "s3://AKIAEXAMPLE:wJalrXUtnFEMI-secret@bucket/runs"
    run = tracking.start_run(
        tracking_uri=uri, experiment_id=experiment, name="r", kind="stage", tags={"where": leaky}
    )
    tracking.RunLogger(run).log_params({"storage": leaky, "nested": {"key": leaky}})
    tracking.RunLogger(run).set_tags({"checkpoint": leaky})
    tracking.log_text(run, f"storage: {leaky}\n", "config/pipeline.yaml")
    stored = MlflowClient(uri).get_run(run.run_id).data
    text = (tmp_path / "art" / "scrub").rglob("pipeline.yaml")
    values = [*stored.params.values(), *stored.tags.values(), *(p.read_text() for p in text)]
    assert sum("s3://***@bucket/runs" in v for v in values) == 5
    assert not [v for v in values if "wJalrXUtnFEMI" in v or "AKIAEXAMPLE" in v]


def test_metrics_logged_while_the_server_is_down_arrive_when_it_is_back(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail each request at once
    port = free_port()
    with mlflow_server(tmp_path, port) as server:
        experiment = tracking.open_experiment(server.url, "outage", artifact_root=None)
        run = tracking.start_run(
            tracking_uri=server.url, experiment_id=experiment, name="r", kind="stage"
        )
        logger = tracking.BufferedLogger(run)
        logger.retry_s = 0.5
        logger.log_metrics({"loss": 1.0}, 1)
        assert logger.flush(timeout=60)
    # The server is gone: logging neither raises nor waits, and nothing is dropped.
    logger.log_metrics({"loss": 0.5}, 2)
    logger.log_metrics({"loss": 0.25}, 3)
    assert not logger.flush(timeout=2)
    with mlflow_server(tmp_path, port) as server:  # back, same store
        logger.close(timeout=60)
        history = MlflowClient(server.url).get_metric_history(run.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 0.5), (3, 0.25)]


def test_champion_moves_only_for_a_better_model_on_the_same_data(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("m")

    def register(accuracy: float, data: str) -> tuple[str, tuple[str, str]]:
        version = client.create_model_version(
            "m",
            source=str(tmp_path),
            tags={"raypipe.val/accuracy": str(accuracy), tracking.Tag.VALIDATION_DIGEST: data},
        ).version
        version = str(version)
        moved = tracking.promote_champion(
            uri, "m", version, metric="val/accuracy", value=accuracy, mode="max", data_digest=data
        )
        return version, moved

    v1, moved = register(0.80, "a")
    assert moved == (v1, "new champion")  # no champion yet
    _, moved = register(0.70, "a")
    assert moved == (v1, "val/accuracy 0.8 is not beaten: the alias stays")
    _, moved = register(0.95, "b")  # better, but on other validation data
    assert moved == (v1, "measured on other validation data: the alias stays")
    v4, moved = register(0.90, "a")
    assert moved == (v4, "new champion")
    assert str(client.get_model_version_by_alias("m", tracking.CHAMPION).version) == v4
    assert register(0.90, "a")[1] == (v4, "val/accuracy 0.9 is not beaten: the alias stays")
    # A loss-like metric: lower wins.
    assert tracking.promote_champion(
        uri, "m", v1, metric="val/accuracy", value=0.85, mode="min", data_digest="a"
    ) == (v1, "new champion")


def test_datasets_are_logged_as_run_inputs_once(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = tracking.open_experiment(uri, "e", artifact_root=None)
    run = tracking.start_run(tracking_uri=uri, experiment_id=exp, name="r", kind="pipeline")
    data = [("e-train", str(tmp_path / "train"), "d" * 64, "train")]
    tracking.log_datasets(run, data)
    tracking.log_datasets(run, data)  # a resumed run logs them again
    (logged,) = MlflowClient(uri).get_run(run.run_id).inputs.dataset_inputs
    assert (logged.dataset.name, logged.dataset.digest) == ("e-train", "d" * 36)
    assert str(tmp_path / "train") in logged.dataset.source
    assert [(t.key, t.value) for t in logged.tags] == [("mlflow.data.context", "train")]


def test_credentials_are_masked_by_their_structure(monkeypatch):
    from raypipe.redaction import redact

    shown = {
        "https://acct.blob.core.windows.net/c/x?sv=2022&sig=AbC%2Bsecret123&se=2027": "sig=***&se=2027",
        "http://mlflow:5000/?token=tok_123456789": "?token=***",
        "s3://AKIAXXXXXXXX:pass@word@bucket/runs": "s3://***@bucket/runs",
        "gs://bucket/plain/path?generation=12": "?generation=12",  # nothing secret: kept
    }
    for text, kept in shown.items():
        assert kept in redact(text), (text, redact(text))
    assert "pass" not in redact("s3://AKIAXXXXXXXX:pass@word@bucket/runs")
    secrets = {
        "AWS_ACCESS_KEY_ID": "AKIAIOSFODNN7EXAMPLE",
        "DATABRICKS_TOKEN": "dapi0123456789abcdef",
        "HF_TOKEN": "hf_abcdefghijklmnop",
        "AZURE_STORAGE_CONNECTION_STRING": "DefaultEndpointsProtocol=https;AccountKey=abc123==",
        "AZURE_STORAGE_SAS_TOKEN": "sv=2022-11-02&ss=b&sig=zzzzzzzz",
        "AZURE_CLIENT_SECRET": "client~secret~value",
    }
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false-ish-value")  # a name, not a secret
    line = " ".join(secrets.values()) + " false-ish-value"
    assert redact(line) == " ".join(["***"] * len(secrets)) + " false-ish-value"


def test_error_lines_and_validate_never_show_a_secret(tmp_path, monkeypatch, capsys):
    from raypipe import cli

    monkeypatch.setenv("HF_TOKEN", "hf_verysecretvalue")
    (tmp_path / "p.yaml").write_text(
        "name: x\nstorage: s3://AKIAKEY:hf_verysecretvalue@bucket/runs\n"
        "data: {labeled: {train: {path: /nowhere}, validation: {path: /nowhere}}}\n"
        "finetune: {num_classes: 2}\n"
    )
    assert cli.main(["validate", str(tmp_path / "p.yaml")]) == cli.EXIT_USER_ERROR
    out = capsys.readouterr()
    assert "hf_verysecretvalue" not in out.out + out.err and "AKIAKEY" not in out.out + out.err
    assert out.err.startswith("raypipe: error:") and len(out.err.strip().splitlines()) == 1
    assert "storage: credentials inside an object-store URI are not supported" in out.err


def test_a_bug_s_traceback_is_shown_with_its_credentials_masked(monkeypatch, capsys):
    from raypipe import cli, config

    def broken(*args, **kwargs):
        raise RuntimeError("could not open s3://AKIAKEY:wJalr-secret@bucket/runs")

    monkeypatch.setattr(config, "load_config", broken)
    assert cli.main(["validate", "p.yaml"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: could not open s3://***@bucket/runs" in err
    assert "wJalr-secret" not in err and "AKIAKEY" not in err

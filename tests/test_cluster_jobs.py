"""The cluster path for real, on loopback: `ray job submit` to a running Ray head whose
autoscaler (Ray's fake multi-node provider) launches worker nodes for the pipeline and removes
them when idle; data, checkpoints and stage outputs in S3 (a moto server); every run, metric,
artifact and the registered model in an MLflow tracking server.

The head offers no CPUs, so nothing of the pipeline can run until worker nodes come up.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import yaml
from servers import (
    alive_worker_nodes,
    autoscaling_cluster,
    mlflow_server,
    patched_env,
    s3_server,
    wait_for,
)

pytestmark = pytest.mark.slow
BUCKET = "raypipe-test"


@pytest.fixture(scope="module")
def stack(tmp_path_factory, quickstart_data):
    root = tmp_path_factory.mktemp("cluster")
    with (
        s3_server(root, BUCKET) as s3_env,
        mlflow_server(root, auth=True) as mlflow,  # basic auth, as cluster.yaml runs it
        autoscaling_cluster(root) as cluster,
        patched_env(mlflow.env),  # this test's own MLflow client logs in too
    ):
        fs = pafs.S3FileSystem(
            access_key=s3_env["AWS_ACCESS_KEY_ID"],
            secret_key=s3_env["AWS_SECRET_ACCESS_KEY"],
            endpoint_override=s3_env["AWS_ENDPOINT_URL"],
            region=s3_env["AWS_DEFAULT_REGION"],
        )
        for split, local in quickstart_data.items():
            pafs.copy_files(local, f"{BUCKET}/data/{split}", destination_filesystem=fs)
        workdir = root / "job"
        workdir.mkdir()
        yield {"cluster": cluster, "mlflow": mlflow, "s3_env": s3_env, "fs": fs, "dir": workdir}


def _pipeline(stack, name: str) -> dict:
    data = f"s3://{BUCKET}/data"
    return {
        "name": name,
        "storage": f"s3://{BUCKET}/runs",
        "tracking": {"uri": stack["mlflow"].url, "experiment": "cluster"},
        "data": {
            "unlabeled": {"path": f"{data}/unlabeled"},
            "labeled": {
                "train": {"path": f"{data}/train"},
                "validation": {"path": f"{data}/validation"},
            },
        },
        "tokenizer": {"vocab_size": 300},
        "model": {"dim": 32, "layers": 1, "heads": 2, "max_len": 32},
        "pretrain": {"max_steps": 20, "batch_size": 16, "log_every": 10, "checkpoint_every": 10},
        "finetune": {
            "epochs": 1,
            "batch_size": 16,
            "compare_scratch": False,
            "sweep": {"num_samples": 1, "space": {"lr": {"loguniform": [3e-4, 3e-3]}}},
        },
    }


def _submit(stack, name: str, *overrides: str, working_dir: bool = True, timeout: float = 600,
            pipeline: dict | None = None):  # fmt: skip
    """Submit `raypipe run` as a Ray job; wait; return (status, logs, max worker nodes seen).

    `working_dir=False` runs the driver in the test's own directory instead of a Ray-managed
    copy: on the fake cluster every node shares this machine's disk, and a worker node that
    starts mid-job re-extracts the job's working_dir, deleting the driver's current directory
    under it (on a real cluster each node has its own disk).
    """
    from ray.job_submission import JobSubmissionClient

    cluster = stack["cluster"]
    pipeline = pipeline or _pipeline(stack, name)
    (stack["dir"] / "pipeline.yaml").write_text(yaml.safe_dump(pipeline))
    command = f"{sys.executable} -m raypipe run pipeline.yaml " + " ".join(
        f"--set {o}" for o in overrides
    )
    # Ray Data keeps its last request to the autoscaler for 180 s after a dataset finishes
    # (idle nodes stay that long); shortened so the scale-down test need not wait minutes.
    env = {**stack["s3_env"], **stack["mlflow"].env,
           "RAY_DATA_AUTOSCALING_REQUEST_EXPIRE_TIME_S": "10"}  # fmt: skip
    runtime_env = {"env_vars": env}
    if working_dir:
        runtime_env["working_dir"] = str(stack["dir"])
    else:
        command = f"cd {stack['dir']} && {command}"
    with patched_env(cluster.env):
        client = JobSubmissionClient(cluster.dashboard_url)
        # The head's job agent can come up after the dashboard answers (slowly on a busy box).
        job = wait_for(lambda: _try_submit(client, command, runtime_env), "the job agent", 120, 2)
        deadline, most = time.time() + timeout, 0
        while not (status := client.get_job_status(job)).is_terminal():
            assert time.time() < deadline, (
                f"job still {status} after {timeout}s: {client.get_job_logs(job)[-4000:]}"
            )
            most = max(most, alive_worker_nodes(cluster))
            time.sleep(2)
        stack["peak_nodes"] = max(stack.get("peak_nodes", 0), most)
        return status.value, client.get_job_logs(job), most


def _try_submit(client, command: str, runtime_env: dict) -> str | None:
    try:
        return client.submit_job(entrypoint=command, runtime_env=runtime_env)
    except RuntimeError as e:
        if "No available agent" in str(e):
            return None
        raise


def _children(client, exp: str, run_id: str) -> list:
    return client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{run_id}'")


def test_job_runs_the_pipeline_on_autoscaled_nodes(stack):
    assert alive_worker_nodes(stack["cluster"]) == 0  # nothing runs on the 0-CPU head
    status, logs, most = _submit(stack, "jobrun", working_dir=False)
    assert status == "SUCCEEDED", logs[-4000:]
    assert most >= 1, "no worker node was launched for the pipeline"
    # The driver joined the cluster it was submitted to; it did not start a Ray of its own.
    assert "[ray] connected to the Ray cluster at" in logs
    assert "started a local Ray" not in logs
    assert "pretrain step 20/20" in logs and "raypipe: pipeline 'jobrun' finished" in logs
    # Quiet: MLflow's link lines for each run ended are off; the summary names the UI once.
    assert "View run" not in logs and "View experiment" not in logs
    assert f"open the UI: {stack['mlflow'].url}" in logs

    # Every run, metric and artifact is in the tracking server, and the model is registered.
    from mlflow.tracking import MlflowClient

    url = stack["mlflow"].url
    client = MlflowClient(tracking_uri=url, registry_uri=url)
    exp = client.get_experiment_by_name("cluster").experiment_id
    (pipeline,) = client.search_runs([exp], filter_string="tags.`raypipe.kind` = 'pipeline'")
    assert pipeline.info.status == "FINISHED"
    stages = {r.info.run_name: r for r in _children(client, exp, pipeline.info.run_id)}
    assert set(stages) == {"pretrain", "finetune"}
    losses = client.get_metric_history(stages["pretrain"].info.run_id, "train/loss")
    assert [m.step for m in losses] == [10, 20]  # logged from the Train worker
    children = _children(client, exp, stages["finetune"].info.run_id)
    trials = [t for t in children if t.data.tags["raypipe.kind"] == "trial"]
    assert [t.data.tags["raypipe.arm"] for t in trials] == ["pretrained"]
    # The classical baseline read the same rows from S3.
    assert [r.info.run_name for r in children if r.data.tags["raypipe.kind"] == "baseline"] == [
        "baseline"
    ]
    assert all(client.get_metric_history(t.info.run_id, "val/accuracy") for t in trials)
    assert client.list_artifacts(pipeline.info.run_id, "config")
    assert client.get_model_version("jobrun", "1").tags["raypipe.arm"] in ("pretrained", "scratch")
    import mlflow

    model_dir = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=client.get_model_version_download_uri("jobrun", "1"),
            dst_path=str(stack["dir"] / "m"),
            tracking_uri=url,
        )
    )
    assert (model_dir / "MLmodel").is_file()  # the model's files were served by the server

    # Without the password the tracking server answers nothing but its health check.
    import urllib.error
    import urllib.request

    search = f"{url}/api/2.0/mlflow/experiments/get-by-name?experiment_name=cluster"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(search, timeout=10)
    assert refused.value.code == 401

    # The storage keys and MLflow's password were in the job's environment; none reached a
    # param, tag or artifact.
    password = stack["mlflow"].env["MLFLOW_TRACKING_PASSWORD"]
    assert not [
        r
        for r in client.search_runs([exp])
        if any(password in v for v in [*r.data.params.values(), *r.data.tags.values()])
    ]
    secret = stack["s3_env"]["AWS_SECRET_ACCESS_KEY"]
    config = Path(
        client.download_artifacts(
            pipeline.info.run_id, "config/pipeline.yaml", str(stack["dir"] / "m")
        )
    ).read_text()
    assert "s3://" in config and secret not in config
    for run in client.search_runs([exp]):
        written = [*run.data.params.values(), *run.data.tags.values()]
        assert written and not [v for v in written if secret in v], run.info.run_name

    # Stage outputs and checkpoints are in S3; fine-tuning started from the checkpoint there.
    fs = stack["fs"]
    keys = [
        i.path for i in fs.get_file_info(pafs.FileSelector(f"{BUCKET}/runs/jobrun", recursive=True))
    ]
    markers = [k for k in keys if k.endswith("/stage.json")]
    assert len(markers) == 2
    assert any(k.endswith("/train/step-00000020/model.safetensors") for k in keys)
    with fs.open_input_stream(next(m for m in markers if "/finetune-" in m)) as f:
        finetune = json.loads(f.read())
    best = finetune["arms"]["pretrained"]["best_checkpoint"]
    assert best.startswith(f"s3://{BUCKET}/runs/jobrun/finetune-")
    with fs.open_input_stream(best.removeprefix("s3://") + "/meta.json") as f:
        init = json.loads(f.read())["init_checkpoint"]
    assert init.startswith(f"s3://{BUCKET}/runs/jobrun/pretrain-")

    # The same job again reuses both stages from the markers in S3.
    status, logs, _ = _submit(stack, "jobrun")
    assert status == "SUCCEEDED", logs[-4000:]
    assert "pretrain  reused" in logs and "finetune  reused" in logs


def test_job_with_a_bad_data_path_fails_with_one_line(stack):
    missing = f"s3://{BUCKET}/data/nowhere"
    status, logs, _ = _submit(stack, "badjob", f"data.unlabeled.path={missing}", timeout=300)
    assert status == "FAILED"
    assert f"raypipe: error: data.unlabeled.path: data path '{missing}' does not exist" in logs
    assert "Traceback" not in logs


def test_job_ships_the_plugin_its_pipeline_names(stack):
    """The example plugin (objective and task), in a folder the driver's directory does not
    hold at its top (Ray would put that directory on its workers' path): the pretraining and
    fine-tuning workers on the autoscaled nodes import it because raypipe shipped it."""
    import shutil

    example = Path(__file__).resolve().parents[1] / "examples" / "plugin" / "myext"
    shutil.copytree(example, stack["dir"] / "code" / "myext", dirs_exist_ok=True)
    pipeline = _pipeline(stack, "plugjob")
    pipeline["plugins"] = ["code/myext"]
    pipeline["pretrain"].update(objective="myext.objectives:ReplacedTokenDetection", max_steps=10)
    pipeline["finetune"].update(task="myext.tasks:SmoothedClassification", num_classes=2)
    status, logs, _ = _submit(stack, "plugjob", working_dir=False, pipeline=pipeline)
    assert status == "SUCCEEDED", logs[-4000:]
    assert "pretrain step 10/10" in logs and "best val/error_rate" in logs, logs[-4000:]

    from mlflow.tracking import MlflowClient

    url = stack["mlflow"].url
    client = MlflowClient(tracking_uri=url)
    exp = client.get_experiment_by_name("cluster").experiment_id
    (run,) = client.search_runs(
        [exp], filter_string="tags.`raypipe.kind` = 'pipeline' and attributes.run_name = 'plugjob'"
    )
    stages = {r.info.run_name: r for r in _children(client, exp, run.info.run_id)}
    assert client.get_metric_history(stages["pretrain"].info.run_id, "train/detect_acc")
    trials = _children(client, exp, stages["finetune"].info.run_id)
    assert any("val/error_rate" in t.data.metrics for t in trials)


def test_idle_worker_nodes_are_removed(stack):
    # idle_timeout_minutes is 0.25 in the test cluster: a node goes 15 s after its last task,
    # unless a resource request still holds it: Ray Train keeps its worker group's request for
    # up to 180 s after a run (not configurable in Ray 2.60), so the last node can take minutes:
    # the test waits for the first idle node to go, not the last.
    peak = stack.get("peak_nodes", 0)
    assert peak >= 1
    wait_for(
        lambda: alive_worker_nodes(stack["cluster"]) < peak,
        f"scale-down below the {peak} worker node(s) the jobs used",
        300,
        3,
    )

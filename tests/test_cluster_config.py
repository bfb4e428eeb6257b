"""cluster.yaml passes Ray's own cluster-config schema validation (offline, no cloud calls), and
k8s/rayjob.yaml has what KubeRay requires of a RayJob."""

from __future__ import annotations

import copy
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from raypipe.config import load_config

ROOT = Path(__file__).parent.parent


def _validate(cfg: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    return prepared


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_is_valid(cluster):
    prepared = _validate(cluster)
    types = prepared["available_node_types"]
    assert set(types) == {"head", "cpu_worker", "gpu_worker"}
    assert types["head"]["resources"] == {"CPU": 0}  # nothing trains or preprocesses there
    assert types["gpu_worker"]["min_workers"] == 0 and types["cpu_worker"]["min_workers"] == 0
    assert types["gpu_worker"]["resources"]["GPU"] == 1
    assert types["gpu_worker"]["max_workers"] > 0 and types["cpu_worker"]["max_workers"] > 0
    assert prepared["idle_timeout_minutes"] > 0
    assert any("pip install" in c and "raypipe" in c for c in prepared["setup_commands"])


def test_cluster_yaml_exposes_nothing_and_keeps_token_auth(cluster):
    head = " ".join(cluster["head_start_ray_commands"])
    workers = " ".join(cluster["worker_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head  # the dashboard / Jobs API: over SSH only
    assert "0.0.0.0" not in head + workers
    mlflow = next(c for c in cluster["head_start_ray_commands"] if "mlflow server" in c)
    host = shlex.split(mlflow)[shlex.split(mlflow).index("--host") + 1]
    assert "hostname -I" in host  # the head's private address
    # Token auth on every node, with the same token shipped to each.
    for command in (head, workers):
        assert "RAY_AUTH_MODE=token ray start" in command
        assert "RAY_AUTH_MODE=disabled" not in command
    assert "/home/ubuntu/.ray/auth_token" in cluster["file_mounts"]


def test_schema_validation_catches_mistakes(cluster):
    broken = copy.deepcopy(cluster)
    broken["idle_timout_minutes"] = 5  # misspelt key
    with pytest.raises(jsonschema.ValidationError):
        _validate(broken)


def test_kuberay_rayjob_manifest():
    job = yaml.safe_load((ROOT / "k8s" / "rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["metadata"]["name"]
    spec = job["spec"]
    assert spec["entrypoint"].startswith("raypipe run pipelines/")
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    assert cluster["authOptions"] == {"mode": "token"}
    assert tuple(map(int, cluster["rayVersion"].split("."))) >= (2, 52, 0)  # token auth
    assert cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head["template"]["spec"]["containers"][0]["image"]
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    for g in groups.values():
        assert isinstance(g["rayStartParams"], dict)
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        container = g["template"]["spec"]["containers"][0]
        assert container["image"] and container["resources"]["limits"]
    gpu = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu["nvidia.com/gpu"] == "1"


def test_kuberay_entrypoint_is_a_valid_pipeline_command():
    """The manifest's `raypipe run` command parses: the file exists and every --set applies."""
    job = yaml.safe_load((ROOT / "k8s" / "rayjob.yaml").read_text())
    args = shlex.split(job["spec"]["entrypoint"])
    assert args[:2] == ["raypipe", "run"]
    overrides = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    cfg = load_config(ROOT / args[2], overrides)
    assert cfg.storage.startswith("s3://") and cfg.tracking.uri.startswith("http://")
    assert cfg.data.generate is None and cfg.data.unlabeled.path.startswith("s3://")

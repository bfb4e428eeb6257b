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
    assert set(types) == {"head", "cpu_worker", "gpu_worker", "gpu_spot_worker"}
    spot = types["gpu_spot_worker"]
    assert spot["node_config"]["InstanceMarketOptions"] == {"MarketType": "spot"}
    assert spot["resources"] == types["gpu_worker"]["resources"] and spot["min_workers"] == 0
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
        assert 'MLFLOW_TRACKING_PASSWORD="$(cat ~/.raypipe/mlflow_password)"' in command
    assert "/home/ubuntu/.ray/auth_token" in cluster["file_mounts"]
    # MLflow behind its basic-auth app, the admin password from a file every node gets.
    assert "--app-name basic-auth" in mlflow and "MLFLOW_AUTH_CONFIG_PATH=" in mlflow
    assert "/home/ubuntu/.raypipe/mlflow_password" in cluster["file_mounts"]
    ini = " ".join(cluster["head_setup_commands"])
    assert "default_permission = NO_PERMISSIONS" in ini and "admin_password" not in ini
    assert 'MLFLOW_AUTH_ADMIN_PASSWORD="$(cat ~/.raypipe/mlflow_password)"' in mlflow
    assert any("raypipe[cluster]" in c for c in cluster["setup_commands"])


def test_cluster_nodes_get_scoped_roles_and_a_closed_security_group(cluster):
    import json

    nodes = cluster["available_node_types"]
    roles = {name: t["node_config"]["IamInstanceProfile"]["Name"] for name, t in nodes.items()}
    assert roles == {"head": "raypipe-head", "cpu_worker": "raypipe-worker",
                     "gpu_worker": "raypipe-worker", "gpu_spot_worker": "raypipe-worker"}  # fmt: skip
    groups = {tuple(t["node_config"]["SecurityGroupIds"]) for t in nodes.values()}
    assert len(groups) == 1  # one group of its own: the launcher's (SSH from anywhere) unused
    policy = json.loads((ROOT / "aws" / "head-policy.json").read_text())
    actions = [a for st in policy["Statement"] for a in np_list(st["Action"])]
    assert not [a for a in actions if a.endswith(":*") or a == "*"]  # nothing wholesale
    s3 = [
        st for st in policy["Statement"] if any(a.startswith("s3:") for a in np_list(st["Action"]))
    ]
    assert all(r.startswith("arn:aws:s3:::your-bucket") for st in s3 for r in st["Resource"])
    setup = (ROOT / "aws" / "setup.sh").read_text()
    assert '--port 22 --cidr "$ADMIN_CIDR"' in setup and "0.0.0.0/*) echo" in setup


def np_list(value) -> list:
    return value if isinstance(value, list) else [value]


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
    assert set(groups) == {"cpu", "gpu", "gpu-spot"}
    spot = groups["gpu-spot"]["template"]["spec"]
    assert spot["nodeSelector"] == {"cloud.google.com/gke-spot": "true"} and spot["tolerations"]
    for g in groups.values():
        assert isinstance(g["rayStartParams"], dict)
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        container = g["template"]["spec"]["containers"][0]
        assert container["image"] and container["resources"]["limits"]
    gpu = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu["nvidia.com/gpu"] == "1"


def test_kuberay_ray_pods_admit_only_each_other_and_the_submitter():
    job = yaml.safe_load((ROOT / "k8s" / "rayjob.yaml").read_text())
    policy = yaml.safe_load((ROOT / "k8s" / "networkpolicy.yaml").read_text())
    assert policy["kind"] == "NetworkPolicy" and policy["spec"]["policyTypes"] == ["Ingress"]
    ray_pods = {"ray.io/is-ray-node": "yes"}
    assert policy["spec"]["podSelector"]["matchLabels"] == ray_pods
    rules = policy["spec"]["ingress"]
    assert all("from" in r and r["from"] for r in rules)  # no rule admits everyone
    peers = [(r["from"][0]["podSelector"]["matchLabels"], r.get("ports")) for r in rules]
    assert (ray_pods, None) in peers
    submitter = {"job-name": job["metadata"]["name"]}
    assert (submitter, [{"protocol": "TCP", "port": 8265}]) in peers
    assert len(peers) == 2


def test_kuberay_entrypoint_is_a_valid_pipeline_command():
    """The manifest's `raypipe run` command parses: the file exists and every --set applies."""
    job = yaml.safe_load((ROOT / "k8s" / "rayjob.yaml").read_text())
    args = shlex.split(job["spec"]["entrypoint"])
    assert args[:2] == ["raypipe", "run"]
    overrides = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    cfg = load_config(ROOT / args[2], overrides)
    assert cfg.storage.startswith("s3://") and cfg.tracking.uri.startswith("http://")
    assert cfg.data.generate is None and cfg.data.unlabeled.path.startswith("s3://")

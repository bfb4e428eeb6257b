"""cluster.yaml passes Ray's own cluster-config schema validation (offline, no cloud calls)."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml

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
    assert types["gpu_worker"]["min_workers"] == 0 and types["cpu_worker"]["min_workers"] == 0
    assert prepared["idle_timeout_minutes"] > 0
    head_cmds = " ".join(prepared["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_cmds and "mlflow server" in head_cmds
    assert any("pip install" in c for c in prepared["setup_commands"])


def test_schema_validation_catches_mistakes(cluster):
    broken = copy.deepcopy(cluster)
    broken["idle_timout_minutes"] = 5  # misspelt key
    with pytest.raises(jsonschema.ValidationError):
        _validate(broken)

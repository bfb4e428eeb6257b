"""Shared fixtures: small generated data, and one local Ray instance for the whole session."""

from __future__ import annotations

import os
import sys

import pytest

from raypipe.data.synthetic import generate_quickstart

# Token authentication, Ray's default for a local cluster, for every Ray client in this process
# (the session's own Ray and the clusters the cluster tests start). Set before Ray reads it.
os.environ.setdefault("RAY_AUTH_MODE", "token")


@pytest.fixture(autouse=True)
def _restore_mlflow_uris():
    """A test that points MLflow's global tracking or registry URI somewhere (a server that is
    gone when it ends) must not leave later tests talking to it."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}
    yield
    if "mlflow" in sys.modules:
        import mlflow

        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
    for key in [k for k in os.environ if k.startswith("MLFLOW_")]:
        del os.environ[key]
    os.environ.update(saved)


@pytest.fixture(scope="session")
def quickstart_data(tmp_path_factory) -> dict[str, str]:
    """The quickstart's synthetic data at reduced size: {split: directory}."""
    root = tmp_path_factory.mktemp("data")
    dirs = {split: str(root / split) for split in ("unlabeled", "train", "validation")}
    generate_quickstart(
        unlabeled_dir=dirs["unlabeled"],
        train_dir=dirs["train"],
        validation_dir=dirs["validation"],
        num_unlabeled=2000,
        num_train=96,
        num_validation=64,
    )
    return dirs


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for every test that needs it (starting Ray costs seconds)."""
    import ray

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    ray.init(address="local", num_cpus=2, include_dashboard=True, logging_level="ERROR")
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def media_data(tmp_path_factory) -> dict[str, str]:
    """Small generated image, caption, translation and regression shards: {name: directory}."""
    from raypipe.data.synthetic import generate_regression, generate_shapes, generate_translation

    root = tmp_path_factory.mktemp("media")
    dirs = {
        name: str(root / name)
        for name in (
            "shapes_train",
            "shapes_val",
            "pairs_train",
            "pairs_val",
            "reg_train",
            "reg_val",
        )
    }
    generate_shapes(dirs["shapes_train"], num_rows=128, seed=1)
    generate_shapes(dirs["shapes_val"], num_rows=32, seed=2)
    generate_translation(dirs["pairs_train"], num_rows=96, seed=1)
    generate_translation(dirs["pairs_val"], num_rows=16, seed=2)
    generate_regression(dirs["reg_train"], num_rows=64, seed=1)
    generate_regression(dirs["reg_val"], num_rows=32, seed=2)
    return dirs

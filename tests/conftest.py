"""Shared fixtures: small generated data, and one local Ray instance for the whole session."""

from __future__ import annotations

import os

import pytest

from raypipe.data.synthetic import generate_quickstart


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
    ray.init(num_cpus=2, include_dashboard=True, logging_level="ERROR")
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()

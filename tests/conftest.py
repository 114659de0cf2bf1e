from __future__ import annotations

import logging
from pathlib import Path

import pytest

SHARED_ML100K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "movielens-100k"


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (2 CPUs, like the CI machine)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def tracking_uri(tmp_path) -> str:
    """A fresh embedded MLflow store (SQLite) in the test's temp dir."""
    return f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"

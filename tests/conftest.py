"""Shared fixtures: tiny timm models, one Prefect test server and one MLflow store per session."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

# Offline by construction: no test may reach the Hugging Face Hub (the network tests opt back in).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "dwk")
# dwk logs at INFO (dwk/__init__.py); outside a flow run those lines are no flow-run logs: no warning each.
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory) -> str:
    """One SQLite tracking store per session (each new database runs migrations for seconds)."""
    db = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    uri = f"sqlite:///{db}"
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    yield uri
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old


@pytest.fixture(scope="session")
def prefect_server():
    """A real Prefect API server on a temporary SQLite database, shared by the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture
def sync_dask():
    import dask

    with dask.config.set(scheduler="synchronous"):
        yield


def tiny_config(tmp_path: Path, **overrides):
    """A run config on tiny timm architectures that trains in seconds."""
    from dwk.config import RunConfig

    base = dict(
        name="test",
        store=tmp_path / "store.zarr",
        out=tmp_path / "runs",
        checkpoints=[
            dict(id="planted-test_convnext", arch="test_convnext", planted=dict(seed=0, noise_share=0.1)),
            dict(id="null-test_convnext", arch="test_convnext", pretrained=False, seed=0),
        ],
        chunk_kernels=128,
        normalize=dict(chunk_kernels=128),
        autoencoder=dict(epochs=15, batch_size=128),
        cluster=dict(n_init_clusters=24, n_null=2000),
        dask=dict(n_workers=1),
        retry_backoff_s=0.1,  # internal errors are retried (dwk.retry): quickly, in tests
    )
    base.update(overrides)
    return RunConfig.model_validate(base)


@pytest.fixture
def rng():
    return np.random.default_rng(0)

"""Training of one shape's autoencoder as its own flow, so it can be deployed to a GPU work pool."""
from __future__ import annotations

from prefect import flow

from dwk.config import RunConfig
from tasks import train_task


@flow(name="dwk-train", flow_run_name="train {shape} ({run_id})")
def train_flow(config: RunConfig, run_id: str, shape: str, mlflow_run_id: str | None = None) -> str:
    return train_task(config, run_id, shape, mlflow_run_id)

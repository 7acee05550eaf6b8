"""Autoencoder training: the GPU task (CPU when no GPU is present)."""
from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from dwk import pipeline
from dwk.config import RunConfig


@task(name="train-autoencoder", task_run_name="train {shape}", cache_policy=NO_CACHE, tags=["gpu"])
def train_task(config: RunConfig, run_id: str, shape: str, mlflow_run_id: str | None) -> str:
    return pipeline.train_shape(config, run_id, shape, mlflow_run_id)

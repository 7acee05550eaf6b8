"""Training of one shape's autoencoder as its own flow, so it can be deployed to a GPU work pool.

Retried twice, 30 s apart, when it raises (CUDA out of memory while another job held the GPU, an I/O
error on the shared filesystem, MLflow briefly away; a crashed or killed process is not retried): a
model saved and recorded in the store is not trained again. On a CUDA
device it holds one slot of the global concurrency limit ``dwk-gpu`` (``dwk cluster init``), when the
Prefect server has it: at most that many trainings on GPUs at once, cluster-wide.
"""
from __future__ import annotations

from prefect import flow

from flows import cluster as cluster_setup
from dwk.config import RunConfig
from tasks import train_task

RETRIES = 2
RETRY_DELAY_S = 30


def on_gpu(config: RunConfig) -> bool:
    """Will the autoencoder train on a CUDA device here (``autoencoder.device`` auto or cuda, a GPU visible)?"""
    if config.autoencoder.device == "cpu":
        return False
    import torch

    return torch.cuda.is_available()


@flow(name="dwk-train", flow_run_name="train {shape} ({run_id})", retries=RETRIES, retry_delay_seconds=RETRY_DELAY_S)
def train_flow(config: RunConfig, run_id: str, shape: str, mlflow_run_id: str | None = None) -> str:
    if not on_gpu(config):
        return train_task(config, run_id, shape, mlflow_run_id)
    with cluster_setup.slot(cluster_setup.GPU, f"training {shape} of run {run_id}"):
        return train_task(config, run_id, shape, mlflow_run_id)

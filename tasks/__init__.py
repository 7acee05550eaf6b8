"""Prefect tasks: each is a few lines around one ``dwk`` function.

Tasks take and return references (config, run id, shape, paths), never arrays: the Zarr store is
the channel for heavy data. Prefect's own result caching is off (``NO_CACHE``): whether a
checkpoint needs extracting is decided by the store's completion marker and content hash, which
also holds across flow runs, machines and Prefect servers.
"""
from tasks.analyze import cluster_task, finalize_task, normalize_task, prepare_run_task, publish_task, start_tracking_task
from tasks.classifier import (
    analyze_experiment_task,
    finish_experiment_task,
    start_experiment_task,
    train_scheme_task,
)
from tasks.extract import extract_checkpoint_task
from tasks.train import train_task

__all__ = [
    "analyze_experiment_task",
    "cluster_task",
    "extract_checkpoint_task",
    "finalize_task",
    "finish_experiment_task",
    "normalize_task",
    "prepare_run_task",
    "publish_task",
    "start_experiment_task",
    "start_tracking_task",
    "train_scheme_task",
    "train_task",
]

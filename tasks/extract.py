"""Extraction of one checkpoint into the store."""
from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from dwk import pipeline, retry
from dwk.config import CheckpointSpec


def _retry_unless_bad_input(task, task_run, state) -> bool:
    """Prefect's retry condition: ``dwk.retry.should_retry`` (transient faults and internal errors
    yes; a bad checkpoint, which fails the same way every time, no)."""
    return retry.should_retry(state.result(raise_on_failure=False))


@task(
    name="extract-checkpoint",
    task_run_name="extract {spec.id}",
    cache_policy=NO_CACHE,
    retries=1,  # the flow sets config.retries and its backoff (flows/extract.py)
    retry_delay_seconds=retry.delays(1, 2.0),
    retry_jitter_factor=retry.JITTER,
    retry_condition_fn=_retry_unless_bad_input,
)
def extract_checkpoint_task(spec: CheckpointSpec, store: Path, data_dir: Path, chunk_kernels: int,
                            regular_max_per_layer: int | None = None) -> dict:
    return pipeline.extract_checkpoint(spec, store, data_dir, chunk_kernels, regular_max_per_layer)

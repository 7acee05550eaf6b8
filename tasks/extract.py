"""Extraction of one checkpoint into the store."""
from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from dwk import pipeline
from dwk.config import CheckpointSpec
from dwk.errors import CheckpointError, NoDepthwiseError

BAD_INPUT = (CheckpointError, NoDepthwiseError)  # fails the same way every time: never retried


def _retry_unless_bad_input(task, task_run, state) -> bool:
    """Retry anything but bad input (I/O, network, and dwk's own internal errors); a bad checkpoint
    fails the same way every time."""
    exc = state.result(raise_on_failure=False)
    return not isinstance(exc, BAD_INPUT)


@task(
    name="extract-checkpoint",
    task_run_name="extract {spec.id}",
    cache_policy=NO_CACHE,
    retries=1,
    retry_delay_seconds=5,
    retry_condition_fn=_retry_unless_bad_input,
)
def extract_checkpoint_task(spec: CheckpointSpec, store: Path, data_dir: Path, chunk_kernels: int,
                            regular_max_per_layer: int | None = None) -> dict:
    return pipeline.extract_checkpoint(spec, store, data_dir, chunk_kernels, regular_max_per_layer)

"""Fan extraction out over checkpoints; failures are recorded, the others go on."""
from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from dwk import pipeline, progress, retry, sources
from flows import cluster as cluster_setup
from dwk.config import RunConfig
from dwk.errors import CheckpointsFailedError
from tasks import extract_checkpoint_task


@flow(name="dwk-extract", task_runner=ThreadPoolTaskRunner(max_workers=4))
def extract_flow(config: RunConfig | None = None, config_path: str | None = None) -> dict:
    """Extract every checkpoint of the run config (``config``, or the YAML file ``config_path``, one of
    the two) into its store.

    Returns ``{"extracted": [...], "failed": [{id, source, error}]}``. Concurrency is bounded by the
    task runner: ``bounded(config)`` gives this flow ``config.max_workers`` threads (a deployment run
    has the decorator's 4); Hub downloads are bounded per process (``DWK_HUB_MAX_PARALLEL``) and,
    cluster-wide, by the global concurrency limit ``dwk-hub-downloads`` (``dwk cluster init``).
    """
    config = cluster_setup.resolve_run_config(config, config_path)
    log = get_run_logger()
    task = extract_checkpoint_task.with_options(retries=config.retries,
                                                retry_delay_seconds=retry.delays(config.retries, config.retry_backoff_s))
    futures = task.map(config.checkpoints, config.store, pipeline.data_dir(config), config.chunk_kernels,
                       pipeline.regular_max_per_layer(config))
    extracted, failed = [], []
    for spec, fut in progress.track(zip(config.checkpoints, futures), "extracting checkpoints",
                                    total=len(config.checkpoints)):
        result = fut.result(raise_on_failure=False)
        if isinstance(result, BaseException):
            reason = getattr(result, "reason", None) or f"{type(result).__name__}: {result}"
            log.error("checkpoint %s failed: %s", spec.id, reason)
            failed.append(dict(id=spec.id, source=sources.kind_of(spec), error=reason))
        else:
            extracted.append(result)
        log.info("extraction %d/%d done", len(extracted) + len(failed), len(config.checkpoints))
    if not extracted:
        raise CheckpointsFailedError(failed)
    return dict(extracted=extracted, failed=failed)


def bounded(config: RunConfig):
    """``extract_flow`` with ``config.max_workers`` extraction threads."""
    return extract_flow.with_options(task_runner=ThreadPoolTaskRunner(max_workers=config.max_workers))

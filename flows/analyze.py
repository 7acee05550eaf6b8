"""Analyse a store: normalise (Dask), train (GPU when present), cluster, classify, report."""
from __future__ import annotations

import logging

from prefect import flow, get_run_logger
from prefect.deployments import run_deployment

from dwk import analysis, pipeline
from flows import cluster as cluster_setup
from dwk.config import RunConfig
from dwk.errors import ConfigError
from flows.train import train_flow
from tasks import cluster_task, finalize_task, normalize_task, prepare_run_task, publish_task

logger = logging.getLogger("dwk.flows.analyze")  # a dwk logger: in flow-run logs (PREFECT_LOGGING_EXTRA_LOGGERS)


def _train(config: RunConfig, run_id: str, shape: str, mlflow_run_id: str | None) -> str:
    """Train in this process, or on the GPU pool through ``config.train_deployment``.

    A deployed training run waits at most ``config.train_timeout_s`` (24 h by default) in all: one that has
    not started by then (Scheduled, Late, Pending: no worker took it) is cancelled, so that it never
    starts later, and this raises saying which pool needs a worker.
    """
    have = pipeline.trained_model(config, run_id, shape)  # a resumed run
    if have or not config.train_deployment:
        return have or train_flow(config, run_id, shape, mlflow_run_id)
    fr = run_deployment(config.train_deployment, timeout=config.train_timeout_s,
                        parameters=dict(config=config.model_dump(mode="json"), run_id=run_id, shape=shape,
                                        mlflow_run_id=mlflow_run_id))
    state = _current_state(fr)
    if state is not None and state.is_completed():
        return str(analysis.model_path(pipeline.run_dir(config, run_id) / "models", shape))
    where = f"training {shape} on deployment {config.train_deployment!r}"
    if state is not None and state.type.value in ("SCHEDULED", "PENDING"):
        pool = _pool_of(config.train_deployment)
        cancelled = _cancel(fr.id, f"not started after train_timeout_s={config.train_timeout_s:g}s: cancelled by the "
                                   f"analyze flow of run {run_id}")
        why = ("it waited for a slot of the deployment's concurrency limit (another training held it)"
               if state.name == "AwaitingConcurrencySlot" else "no worker took it")
        raise RuntimeError(
            f"{where} did not start within train_timeout_s={config.train_timeout_s:g}s (state {state.name}: {why}); "
            f"flow run {fr.id} is {cancelled}, it will not start later. Start a worker on work pool {pool!r} "
            f"(`prefect worker start --pool {pool} --type process`), or raise train_timeout_s, or set "
            "train_deployment: null to train in the flow's own process; then `dwk run --resume` this run")
    name = state.name if state is not None else "unknown"
    hint = (f" (still running after train_timeout_s={config.train_timeout_s:g}s)"
            if state is not None and not state.is_final() else "")
    raise RuntimeError(f"{where} is {name}{hint}: see flow run {fr.id} in the Prefect UI")


def _current_state(fr):
    """The flow run's state as the server has it now (``run_deployment`` returns the last one it polled)."""
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            return client.read_flow_run(fr.id).state
    except Exception:  # noqa: BLE001 - the state we have is good enough to report
        return fr.state


def _pool_of(deployment: str) -> str:
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            return client.read_deployment_by_name(deployment).work_pool_name or "?"
    except Exception:  # noqa: BLE001 - only for the message
        return "the deployment's pool (`prefect deployment inspect " + deployment + "`)"


def _cancel(flow_run_id, message: str) -> str:
    """Cancel a flow run that has not started (Scheduled: at once; Pending: its worker stops it). Returns its state."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling

    # Not forced: the server's rules turn Cancelling into Cancelled for a run that has no infrastructure yet.
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run_id, Cancelling(message=message))
        state = client.read_flow_run(flow_run_id).state
    logger.warning("training flow run %s: %s (now %s)", flow_run_id, message, state.name if state else "?")
    return state.name if state is not None else "Cancelling"


@flow(name="dwk-analyze")
def analyze_flow(config: RunConfig | None = None, run_id: str | None = None, extracted: list[dict] | None = None,
                 failed: list[dict] | None = None, mlflow_run_id: str | None = None, resume: bool = False,
                 config_path: str | None = None) -> dict:
    """Analyse ``extracted`` (the records ``dwk-extract`` returns) as run ``run_id``; ``resume``: go on
    with that unfinished run, skipping the stages it finished (``dwk.pipeline.STAGES``). The run config
    is ``config`` or the YAML file ``config_path`` (relative to the working directory), one of the two."""
    config = cluster_setup.resolve_run_config(config, config_path)
    if not run_id or extracted is None:
        raise ConfigError("dwk-analyze needs run_id and extracted (the records dwk-extract returns) besides the "
                          "config; `dwk analyze` builds them from the store, dwk-pipeline runs both stages")
    log = get_run_logger()
    shapes = prepare_run_task(config, run_id, extracted, mlflow_run_id, failed or [], resume)
    log.info("run %s: %d checkpoints, shapes %s", run_id, len(extracted), shapes)
    normalize_task(config, run_id)
    models = {}
    for i, shape in enumerate(shapes):
        models[shape] = _train(config, run_id, shape, mlflow_run_id)
        log.info("trained %d/%d shape groups", i + 1, len(shapes))
    for shape in shapes:
        # In the flow's own thread, one group after the other (k-means uses every core already): a
        # SIGTERM reaches the main thread and stops clustering within seconds; a worker thread would
        # keep the process alive until its group was done.
        cluster_task(config, run_id, shape, models[shape])  # writes the group's result record to the store
    summary = finalize_task(config, run_id, mlflow_run_id)
    publish_task(summary)
    return summary

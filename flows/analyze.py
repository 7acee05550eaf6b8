"""Analyse a store: normalise (Dask), train (GPU when present), cluster, classify, report."""
from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.deployments import run_deployment

from dwk import analysis, pipeline
from dwk.config import RunConfig
from flows.train import train_flow
from tasks import cluster_task, finalize_task, normalize_task, prepare_run_task, publish_task


def _train(config: RunConfig, run_id: str, shape: str, mlflow_run_id: str | None) -> str:
    """Train in this process, or on the GPU pool through ``config.train_deployment``."""
    have = pipeline.trained_model(config, run_id, shape)  # a resumed run
    if have or not config.train_deployment:
        return have or train_flow(config, run_id, shape, mlflow_run_id)
    fr = run_deployment(config.train_deployment, timeout=config.train_timeout_s,
                        parameters=dict(config=config.model_dump(mode="json"), run_id=run_id, shape=shape,
                                        mlflow_run_id=mlflow_run_id))
    if not fr.state or not fr.state.is_completed():
        state = fr.state.name if fr.state else "unknown"
        hint = (" (still waiting after train_timeout_s: is a worker running on the deployment's pool? "
                "`prefect worker start --pool dwk-gpu`)" if fr.state and not fr.state.is_final() else "")
        raise RuntimeError(f"training {shape} on deployment {config.train_deployment!r} is {state}{hint}: "
                           f"see flow run {fr.id} in the Prefect UI")
    return str(analysis.model_path(pipeline.run_dir(config, run_id) / "models", shape))


@flow(name="dwk-analyze")
def analyze_flow(config: RunConfig, run_id: str, extracted: list[dict], failed: list[dict] | None = None,
                 mlflow_run_id: str | None = None, resume: bool = False) -> dict:
    """Analyse ``extracted`` as run ``run_id``; ``resume``: go on with that unfinished run, skipping
    the stages it finished (``dwk.pipeline.STAGES``)."""
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

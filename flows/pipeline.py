"""The whole pipeline: extraction and analysis as subflows, tracked as one MLflow run."""
from __future__ import annotations

from prefect import flow

from dwk import pipeline, tracking
from flows import cluster as cluster_setup
from dwk.config import RunConfig
from flows.analyze import analyze_flow
from flows.extract import bounded
from tasks import start_tracking_task


@flow(name="dwk-pipeline")
def pipeline_flow(config: RunConfig | None = None, track: bool = True, resume: str | None = None,
                  config_path: str | None = None) -> dict:
    """Extract, then analyse as one run. The run config is ``config`` or the YAML file ``config_path``
    (read with ``dwk.config.load_config``; a relative path is taken from the working directory, on a
    worker its checkout DWK_HOME), exactly one of the two. ``resume``: the id of an unfinished run in
    ``config.store``, which goes on with the config it started with and skips what it finished
    (``dwk.pipeline.run``)."""
    config = cluster_setup.resolve_run_config(config, config_path)
    if track:
        tracking.preflight()  # in seconds, before any work
    if resume:
        config = pipeline.resume_config(config.store, resume)
    result = bounded(config)(config)
    run_id = resume or pipeline.new_run_id(config)
    mlflow_run_id = start_tracking_task(config, run_id, bool(resume)) if track else None
    with tracking.closed_on_error(mlflow_run_id):  # FAILED on an error, KILLED on Ctrl-C / SIGTERM
        return analyze_flow(config, run_id, result["extracted"], result["failed"], mlflow_run_id, bool(resume))

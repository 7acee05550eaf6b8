"""The whole pipeline: extraction and analysis as subflows, tracked as one MLflow run."""
from __future__ import annotations

from prefect import flow

from dwk import pipeline, tracking
from dwk.config import RunConfig
from flows.analyze import analyze_flow
from flows.extract import bounded
from tasks import start_tracking_task


@flow(name="dwk-pipeline")
def pipeline_flow(config: RunConfig, track: bool = True) -> dict:
    result = bounded(config)(config)
    run_id = pipeline.new_run_id(config)
    mlflow_run_id = start_tracking_task(config, run_id) if track else None
    try:
        return analyze_flow(config, run_id, result["extracted"], result["failed"], mlflow_run_id)
    except BaseException:
        if mlflow_run_id:
            tracking.end_run(mlflow_run_id, "FAILED")
        raise

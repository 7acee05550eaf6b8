"""Run set-up, normalisation, clustering, reporting and publishing."""
from __future__ import annotations

from prefect import task
from prefect.artifacts import create_link_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from dwk import pipeline, tracking
from dwk.config import RunConfig


def _not_tracking_error(task, task_run, state) -> bool:
    """A ``TrackingError`` (unreachable server, unwritable folder) is not retried: it was checked."""
    from dwk.errors import TrackingError

    return not isinstance(state.result(raise_on_failure=False), TrackingError)


@task(name="start-tracking", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=3,
      retry_condition_fn=_not_tracking_error)
def start_tracking_task(config: RunConfig, run_id: str, resume: bool = False) -> str:
    """Open the MLflow run (resuming: reopen the run's own), tagged with the Prefect flow run it
    belongs to (and host, pid)."""
    from prefect.runtime import flow_run

    tags = {}
    if fr := flow_run.get_id():
        from prefect.settings import PREFECT_UI_URL

        tags[tracking.TAG_FLOW_RUN] = str(fr)
        if ui := PREFECT_UI_URL.value():
            tags["prefect.flow_run_url"] = f"{ui.rstrip('/')}/runs/flow-run/{fr}"
    return pipeline.open_tracking(config, run_id, run_id if resume else None, tags)


@task(name="prepare-run", cache_policy=NO_CACHE)
def prepare_run_task(config: RunConfig, run_id: str, extracted: list[dict], mlflow_run_id: str | None,
                     failed: list[dict], resume: bool = False) -> list[str]:
    return pipeline.prepare_run(config, run_id, extracted, mlflow_run_id, failed, resume=resume)


@task(name="normalize", cache_policy=NO_CACHE)
def normalize_task(config: RunConfig, run_id: str) -> dict:
    return pipeline.normalize_stage(config, run_id)


@task(name="cluster", task_run_name="cluster {shape}", cache_policy=NO_CACHE)
def cluster_task(config: RunConfig, run_id: str, shape: str, model_path: str) -> dict:
    return pipeline.cluster_shape(config, run_id, shape, model_path)


@task(name="report", cache_policy=NO_CACHE)
def finalize_task(config: RunConfig, run_id: str, mlflow_run_id: str | None) -> dict:
    return pipeline.finalize(config, run_id, mlflow_run_id)


@task(name="publish", cache_policy=NO_CACHE)
def publish_task(summary: dict) -> None:
    """The per-checkpoint table and the MLflow link as Prefect artifacts (shown on the flow run's page)."""
    link = tracking.run_link(summary["mlflow_run_id"]) if summary.get("mlflow_run_id") else None
    rows = [{k: v for k, v in r.items() if k != "top_clusters"} | {"top_clusters": ", ".join(r.get("top_clusters", []))}
            for r in summary["checkpoints"] + summary["failed"]]
    create_table_artifact(
        table=rows, key="dwk-checkpoints",
        description=f"Classified share per checkpoint, run `{summary['run_id']}`. MLflow run: {link or 'not tracked'}. "
        f"Results: `{summary['out']}`",
    )
    if link:
        create_link_artifact(link=link, link_text=f"MLflow run {summary['run_id']}", key="dwk-mlflow-run")

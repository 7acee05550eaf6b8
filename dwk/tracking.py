"""MLflow tracking (the only module that imports MLflow).

Everything is logged by explicit ``run_id`` through ``MlflowClient``, never through the
thread-local "active run", so stages in other threads, processes or machines (a GPU worker) log
into the same run. ``MLFLOW_TRACKING_URI`` picks the store; unset, a SQLite database in the
current folder is used, with artifacts beside it in ``mlartifacts/``.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

logger = logging.getLogger(__name__)

MAX_PARAM_LEN = 6000  # MLflow's limit on a param value (8000 chars in 3.x); longer values are cut


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def client() -> MlflowClient:
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri)


def ui_hint() -> str:
    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        return uri
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1"


def start_run(experiment: str, run_name: str, params: dict[str, Any], tags: dict[str, str] | None = None) -> str:
    """Create the experiment if needed and open a run; returns its id."""
    c = client()
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        location = None
        if tracking_uri().startswith("sqlite:///"):  # artifacts beside the database, not in ./mlruns
            location = (Path(tracking_uri()[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()
        exp_id = c.create_experiment(experiment, artifact_location=location)
    else:
        exp_id = exp.experiment_id
    run = c.create_run(exp_id, run_name=run_name, tags=tags or {})
    run_id = run.info.run_id
    items = [mlflow.entities.Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in sorted(params.items())]
    for i in range(0, len(items), 100):  # log_batch takes at most 100 params at a time
        c.log_batch(run_id, params=items[i:i + 100])
    return run_id


def end_run(run_id: str, status: str = "FINISHED") -> None:
    client().set_terminated(run_id, status=status)


def log_metrics(run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    import time

    ts = int(time.time() * 1000)
    items = [Metric(k, float(v), ts, step) for k, v in sorted(metrics.items()) if v is not None]
    c = client()
    for i in range(0, len(items), 500):
        c.log_batch(run_id, metrics=items[i:i + 500])


def epoch_logger(run_id: str, key: str, every: int = 50) -> tuple[Callable[[int, float], None], Callable[[], None]]:
    """A training callback that logs ``key`` per epoch in batches; returns (callback, flush)."""
    import time

    buf: list[Metric] = []
    c = client()

    def flush() -> None:
        if buf:
            c.log_batch(run_id, metrics=list(buf))
            buf.clear()

    def on_epoch(epoch: int, loss: float) -> None:
        buf.append(Metric(key, float(loss), int(time.time() * 1000), epoch))
        if len(buf) >= every:
            flush()

    return on_epoch, flush


def log_table(run_id: str, rows: list[dict], artifact_file: str) -> None:
    """A list of dict rows as an MLflow table (shown in the run's Artifacts and Evaluation views)."""
    if not rows:
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))  # union of the rows' keys, in order
    cols = {k: [json.dumps(r.get(k)) if isinstance(r.get(k), (dict, list)) else r.get(k) for r in rows] for k in keys}
    client().log_table(run_id, data=cols, artifact_file=artifact_file)


def log_dict(run_id: str, data: dict, artifact_file: str) -> None:
    client().log_dict(run_id, data, artifact_file)


def log_figure(run_id: str, figure, artifact_file: str) -> None:
    client().log_figure(run_id, figure, artifact_file)


def log_artifact(run_id: str, path: Path, artifact_path: str | None = None) -> None:
    client().log_artifact(run_id, str(path), artifact_path)


def finish_run(run_id: str, models: dict[str, Any], status: str = "FINISHED") -> None:
    """Log trained torch modules as MLflow models linked to the run, then close the run.

    ``mlflow.pytorch.log_model`` only logs into the active run, and leaving that context ends the
    run, so models are logged last, together with the run's end.
    """
    import mlflow.pytorch

    client()
    with mlflow.start_run(run_id=run_id):
        for name, model in models.items():
            # MLflow 3 saves torch models as exported graphs ('pt2', no pickle), traced on the example.
            # pip_requirements given: skip MLflow's slow requirement inference.
            example = np.zeros((2, model.n_taps), np.float32)
            mlflow.pytorch.log_model(model, name=name, input_example=example, pip_requirements=["torch"])
    end_run(run_id, status)


def run_link(run_id: str) -> str:
    """A link to the run in the MLflow UI (the tracking server's, or the local UI's default address)."""
    run = client().get_run(run_id)
    # The tracking URI a worker uses (http://mlflow:5000 in compose) may not open in a browser:
    # DWK_MLFLOW_UI_URL gives the address users browse to.
    base = os.environ.get("DWK_MLFLOW_UI_URL") or (
        tracking_uri() if tracking_uri().startswith(("http://", "https://")) else "http://127.0.0.1:5000")
    return f"{base.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run_id}"

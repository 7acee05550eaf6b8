"""MLflow tracking (the only module that imports MLflow).

Everything is logged by explicit ``run_id`` through ``MlflowClient``, never through the
thread-local "active run", so stages in other threads, processes or machines (a GPU worker) log
into the same run. ``MLFLOW_TRACKING_URI`` picks the store; unset, a SQLite database in the
current folder is used, with artifacts beside it in ``mlartifacts/``.

Reliability: ``preflight`` checks the tracking store in seconds before any work; runs are tagged
with host, pid (and its start time) so that ``start_run`` marks FAILED the runs of the experiment
that a dead process on this host left RUNNING; ``closed_on_error`` ends a run FAILED (an exception)
or KILLED (Ctrl-C, SIGTERM) whatever stops the code inside it.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from dwk.errors import TrackingError

logger = logging.getLogger(__name__)

MAX_PARAM_LEN = 6000  # MLflow's limit on a param value (8000 chars in 3.x); longer values are cut
PREFLIGHT_TIMEOUT_S = float(os.environ.get("DWK_MLFLOW_PREFLIGHT_TIMEOUT_S", "5"))
TAG_HOST, TAG_PID, TAG_PID_START, TAG_FLOW_RUN, TAG_END_REASON, TAG_RESUMED = (
    "dwk.host", "dwk.pid", "dwk.pid_start", "prefect.flow_run_id", "dwk.end_reason", "dwk.resumed")

_open_runs: set[str] = set()  # runs this process started and has not ended
_open_lock = threading.Lock()


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


def _redact(uri: str) -> str:
    """The URI without a password, for messages."""
    parts = urllib.parse.urlsplit(uri)
    if parts.password:
        netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    return uri


def preflight(uri: str | None = None, timeout: float = PREFLIGHT_TIMEOUT_S) -> None:
    """Check in seconds that the tracking store can be used; raise ``TrackingError`` saying why not.

    http(s): a GET of the server's ``/health`` with ``timeout`` (MLflow's own client retries for
    minutes); a database server (postgresql, mysql, ...): a TCP connection to its port; SQLite and
    file stores: the folder exists and is writable. Other schemes (databricks, ...) are not checked.
    """
    uri = uri or tracking_uri()
    shown = _redact(uri)
    hint = "set MLFLOW_TRACKING_URI to a reachable server or a writable sqlite:///PATH, or run with --no-track"
    parts = urllib.parse.urlsplit(uri)
    scheme = parts.scheme.split("+")[0].lower()
    if scheme in ("http", "https"):
        url = urllib.parse.urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/health", query="", fragment=""))
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="GET"), timeout=timeout) as resp:
                status = resp.status
        except urllib.error.HTTPError as e:
            status = e.code
        except (urllib.error.URLError, OSError) as e:  # refused, unknown host, timed out
            reason = getattr(e, "reason", e)
            raise TrackingError(f"MLflow tracking server {shown} is unreachable ({reason}; checked "
                                f"{_redact(url)} with a {timeout:g}s timeout): {hint}") from e
        if status >= 500 or status == 404:
            raise TrackingError(f"MLflow tracking server {shown} answered HTTP {status} at /health: is it an "
                                f"MLflow server, and healthy? {hint}")
        return
    if scheme in ("postgresql", "mysql", "mssql"):
        host, port = parts.hostname, parts.port or {"postgresql": 5432, "mysql": 3306, "mssql": 1433}[scheme]
        try:
            socket.create_connection((host, port), timeout=timeout).close()
        except OSError as e:
            raise TrackingError(f"MLflow tracking database {shown} is unreachable ({e}; {host}:{port}, "
                                f"{timeout:g}s timeout): {hint}") from e
        return
    if scheme == "sqlite" or scheme in ("", "file"):
        if scheme == "sqlite":
            path = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else ""
            if not path or path == ":memory:":
                return
            target = Path(path)
            folder = target.parent
        else:
            target = Path(parts.path if scheme == "file" else uri)
            folder = target if target.is_dir() or not target.suffix else target.parent
        if not folder.is_dir():
            raise TrackingError(f"MLflow tracking store {shown}: folder {folder} does not exist: {hint}")
        if not os.access(folder, os.W_OK | os.X_OK) or (target.is_file() and not os.access(target, os.W_OK)):
            raise TrackingError(f"MLflow tracking store {shown}: {target if target.is_file() else folder} is "
                                f"not writable: {hint}")


def _proc_start(pid: int) -> str | None:
    """The start time of process ``pid`` (clock ticks since boot, Linux), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the command name may hold spaces


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    now = _proc_start(pid)
    return start is None or now is None or now == start


def process_tags() -> dict[str, str]:
    """Host, pid and the pid's start time: who holds a run open."""
    tags = {TAG_HOST: socket.gethostname(), TAG_PID: str(os.getpid())}
    start = _proc_start(os.getpid())
    if start:
        tags[TAG_PID_START] = start
    return tags


def reap_stale_runs(experiment_id: str, c: MlflowClient | None = None) -> list[str]:
    """Mark FAILED the RUNNING runs of an experiment whose process (on this host) no longer exists.

    Runs of other hosts are left alone: their processes cannot be checked from here. Returns the ids.
    """
    c = c or client()
    host = socket.gethostname()
    flt = f"attributes.status = 'RUNNING' and tags.`{TAG_HOST}` = '{host.replace(chr(39), '')}'"
    reaped = []
    for run in c.search_runs([experiment_id], filter_string=flt, max_results=1000):
        tags = run.data.tags
        try:
            pid = int(tags.get(TAG_PID, ""))
        except ValueError:
            continue
        if _alive(pid, tags.get(TAG_PID_START)):
            continue
        c.set_tag(run.info.run_id, TAG_END_REASON,
                  f"process {pid} on {host} ended without closing the run (killed?); marked FAILED by "
                  f"process {os.getpid()} at the next start")
        c.set_terminated(run.info.run_id, status="FAILED")
        logger.warning("MLflow run %s (%s) was left RUNNING by process %d, which is gone: marked FAILED",
                       run.info.run_id, run.info.run_name, pid)
        reaped.append(run.info.run_id)
    return reaped


def start_run(experiment: str, run_name: str, params: dict[str, Any], tags: dict[str, str] | None = None) -> str:
    """Create the experiment if needed and open a run; returns its id.

    The run is tagged with this host and pid; runs of the experiment left RUNNING by dead processes
    of this host are marked FAILED first (``reap_stale_runs``).
    """
    c = client()
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        location = None
        if tracking_uri().startswith("sqlite:///"):  # artifacts beside the database, not in ./mlruns
            location = (Path(tracking_uri()[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()
        exp_id = c.create_experiment(experiment, artifact_location=location)
    else:
        exp_id = exp.experiment_id
        reap_stale_runs(exp_id, c)
    run = c.create_run(exp_id, run_name=run_name, tags=process_tags() | (tags or {}))
    run_id = run.info.run_id
    with _open_lock:
        _open_runs.add(run_id)
    items = [mlflow.entities.Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in sorted(params.items())]
    for i in range(0, len(items), 100):  # log_batch takes at most 100 params at a time
        c.log_batch(run_id, params=items[i:i + 100])
    return run_id


TAG_PARENT, TAG_GROUP = "mlflow.parentRunId", "dwk.group"


def provenance_tags() -> dict[str, str]:
    """dwk's version and, from a git checkout, its commit (``mlflow.source.git.commit``). (Under Prefect,
    ``tasks/analyze.py`` adds the flow run and its link: the library does not import Prefect.)"""
    import subprocess
    from importlib.metadata import PackageNotFoundError, version

    tags: dict[str, str] = {}
    try:
        tags["dwk.version"] = version("dwk")
    except PackageNotFoundError:
        pass
    repo = Path(__file__).resolve().parent.parent
    if (repo / ".git").exists():
        try:
            commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                                    timeout=5).stdout.strip()
            dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            commit, dirty = "", ""
        if commit:
            tags["mlflow.source.git.commit"] = commit
            tags["dwk.git_dirty"] = str(bool(dirty)).lower()
    return tags


def start_child(parent_id: str, group: str, tags: dict[str, str] | None = None) -> str:
    """A child run of ``parent_id`` for one analysis group (``<run name>/<group>``): every child logs the
    same metric names (``classified_share``, ``tau_null``, ``n_clusters``, ``loss``, ...), so MLflow's
    Compare view and charts line the groups up."""
    c = client()
    parent = c.get_run(parent_id)
    run = c.create_run(parent.info.experiment_id, run_name=f"{parent.info.run_name}/{group}",
                       tags=process_tags() | {TAG_PARENT: parent_id, TAG_GROUP: group} | (tags or {}))
    with _open_lock:
        _open_runs.add(run.info.run_id)
    return run.info.run_id


def end_children(parent_id: str, status: str, reason: str | None = None) -> list[str]:
    """End the parent's child runs that are still RUNNING (a failed or stopped run ends them too)."""
    c = client()
    parent = c.get_run(parent_id)
    flt = f"tags.`{TAG_PARENT}` = '{parent_id}' and attributes.status = 'RUNNING'"
    ended = []
    for run in c.search_runs([parent.info.experiment_id], filter_string=flt, max_results=10000):
        if end_quietly(run.info.run_id, status, reason or f"parent run {status}"):
            ended.append(run.info.run_id)
    return ended


def log_checkpoint_inputs(run_id: str, checkpoints: list[dict]) -> None:
    """Each checkpoint as a dataset input of the run: its id as name, its content fingerprint as
    digest, where it came from as source, its role (subject, control, method-check) as context."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    inputs = []
    for ck in checkpoints:
        where = ck.get("location")
        try:
            source = resolve_dataset_source(where) if where else None
        except mlflow.exceptions.MlflowException:
            source = None
        source = source or CodeDatasetSource(tags={"dwk.source": ck.get("source"), "id": ck["id"], "where": where})
        ds = MetaDataset(source, name=ck["id"], digest=str(ck.get("fingerprint") or "")[:36] or None)
        inputs.append(DatasetInput(ds._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", ck.get("role") or "")]))
    for i in range(0, len(inputs), 100):
        client().log_inputs(run_id, datasets=inputs[i:i + 100])


@contextlib.contextmanager
def system_metrics(run_id: str | None, interval_s: float | None = None) -> Iterator[None]:
    """CPU, memory and (with nvidia-ml-py installed and a GPU) GPU use logged to ``run_id`` while the
    body runs (MLflow's system metrics monitor; ``system/...`` metrics), one sample every
    ``DWK_SYSTEM_METRICS_INTERVAL_S`` seconds (10)."""
    if not run_id:
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    interval_s = interval_s or float(os.environ.get("DWK_SYSTEM_METRICS_INTERVAL_S", "10"))

    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, tracking_uri=tracking_uri())
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


def log_model(run_id: str, model, name: str) -> None:
    """Log a trained torch module as an MLflow model of ``run_id`` and leave the run open.

    ``mlflow.pytorch.log_model`` logs into the active run only, and leaving that context ends the
    run; the run is set RUNNING again afterwards.
    """
    import mlflow.pytorch

    client()
    with mlflow.start_run(run_id=run_id):
        # MLflow 3 saves torch models as exported graphs ('pt2', no pickle), traced on the example.
        # pip_requirements given: skip MLflow's slow requirement inference.
        example = np.zeros((2, model.n_taps), np.float32)
        mlflow.pytorch.log_model(model, name=name, input_example=example, pip_requirements=["torch"])
    client().update_run(run_id, status="RUNNING")


def reopen_run(run_id: str, tags: dict[str, str] | None = None) -> bool:
    """Set an ended (or left RUNNING) run RUNNING again for a resumed dwk run; False when it is gone.

    It is tagged with this process (``dwk.host``, ``dwk.pid``) and ``dwk.resumed`` (how often);
    its metrics, params and artifacts stay, so the resumed run adds to them.
    """
    c = client()
    try:
        run = c.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        logger.warning("MLflow run %s of the resumed run is not in %s: a new MLflow run is started", run_id,
                       _redact(tracking_uri()))
        return False
    if run.info.lifecycle_stage == "deleted":
        logger.warning("MLflow run %s of the resumed run was deleted: a new MLflow run is started", run_id)
        return False
    resumed = int(run.data.tags.get(TAG_RESUMED, "0")) + 1
    for k, v in (process_tags() | (tags or {}) | {TAG_RESUMED: str(resumed)}).items():
        c.set_tag(run_id, k, v)
    if TAG_END_REASON in run.data.tags:  # why it ended before; no longer true
        c.delete_tag(run_id, TAG_END_REASON)
    c.update_run(run_id, status="RUNNING")
    with _open_lock:
        _open_runs.add(run_id)
    logger.info("MLflow run %s reopened (resumed %d time(s))", run_id, resumed)
    return True


def end_run(run_id: str, status: str = "FINISHED", reason: str | None = None) -> None:
    c = client()
    if reason:
        c.set_tag(run_id, TAG_END_REASON, reason[:MAX_PARAM_LEN])
    c.set_terminated(run_id, status=status)
    with _open_lock:
        _open_runs.discard(run_id)


def _is_interrupt(exc: BaseException) -> bool:
    """Ctrl-C, dwk's SIGTERM handler (``Interrupted``) or Prefect's ``TerminationSignal``."""
    return isinstance(exc, (KeyboardInterrupt, SystemExit)) or any(
        t.__name__ == "TerminationSignal" for t in type(exc).__mro__)


def end_quietly(run_id: str, status: str, reason: str) -> bool:
    """End a run, logging (not raising) a failure to do so: an error path must keep its own error."""
    try:
        end_run(run_id, status, reason)
    except Exception:  # noqa: BLE001 - the original error matters more; the next start reaps the run
        logger.warning("could not mark MLflow run %s %s", run_id, status, exc_info=True)
        return False
    return True


def end_open_runs(status: str = "KILLED", reason: str = "stopped") -> list[str]:
    """End every run this process opened and has not ended (the CLI's last resort on a signal)."""
    with _open_lock:
        runs = sorted(_open_runs)
    return [r for r in runs if end_quietly(r, status, reason)]


@contextlib.contextmanager
def closed_on_error(run_id: str | None) -> Iterator[None]:
    """End ``run_id`` KILLED (Ctrl-C, SIGTERM) or FAILED (any other exception) if the body raises.

    No code path leaves a run RUNNING: the body ends it FINISHED itself when it succeeds.
    """
    if not run_id:
        yield
        return
    try:
        yield
    except BaseException as e:
        status = "KILLED" if _is_interrupt(e) else "FAILED"
        try:
            end_children(run_id, status, f"parent run {status}: {type(e).__name__}")
        except Exception:  # noqa: BLE001 - the original error matters more; the next start reaps them
            logger.warning("could not end the child runs of MLflow run %s", run_id, exc_info=True)
        end_quietly(run_id, status, f"{type(e).__name__}: {e}")
        logger.info("MLflow run %s ended %s (%s)", run_id, status, type(e).__name__)
        raise


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


def finish_run(run_id: str, status: str = "FINISHED") -> None:
    """End a parent run and its children still open."""
    end_children(run_id, status)
    end_run(run_id, status)


def run_link(run_id: str) -> str:
    """A link to the run in the MLflow UI (the tracking server's, or the local UI's default address)."""
    run = client().get_run(run_id)
    # The tracking URI a worker uses (http://mlflow:5000 in compose) may not open in a browser:
    # DWK_MLFLOW_UI_URL gives the address users browse to.
    base = os.environ.get("DWK_MLFLOW_UI_URL") or (
        tracking_uri() if tracking_uri().startswith(("http://", "https://")) else "http://127.0.0.1:5000")
    return f"{base.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run_id}"

"""Issue 10's drills outside the store: exit codes, user errors, run ids, MLflow preflight and stale
runs, SIGTERM, concurrent ``dwk`` processes. The store's drills are in test_store_integrity.py."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dwk import pipeline
from dwk.cli import main
from dwk.errors import CheckpointError, CheckpointsFailedError, ConfigError, NoDepthwiseError, TrackingError

from conftest import tiny_config

DWK = [sys.executable, "-m", "dwk.cli"]
PLANTED = dict(id="planted-test_convnext", arch="test_convnext", planted=dict(seed=0, noise_share=0.1))
BROKEN = dict(id="broken", arch="test_convnext", file="/nonexistent/weights.pth")


def write_config(tmp_path: Path, **overrides) -> Path:
    cfg = tiny_config(tmp_path, **overrides)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json", exclude_none=True)))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- exit codes and errors
def test_run_exits_1_on_a_failed_checkpoint_and_0_with_allow_partial(tmp_path, capsys):
    cfg = write_config(tmp_path, checkpoints=[PLANTED, BROKEN], autoencoder=dict(epochs=2, batch_size=128),
                       cluster=dict(n_init_clusters=24, n_null=500))
    args = ["run", "--no-prefect", "--no-track", "--config", str(cfg)]
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "1 of 2 checkpoint(s) failed: broken; the other 1 were analysed" in out
    assert "--allow-partial" in out
    assert main(args + ["--allow-partial"]) == 0  # extraction skipped: the stored checkpoint is reused
    assert "exit status 0 (--allow-partial)" in capsys.readouterr().out


def test_extract_exit_codes_with_prefect(tmp_path, capsys, prefect_server):
    cfg = write_config(tmp_path, checkpoints=[PLANTED, BROKEN])
    assert main(["extract", "--config", str(cfg)]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "1 of 2 checkpoint(s) failed: broken; the other 1 were extracted" in out
    assert main(["extract", "--config", str(cfg), "--allow-partial"]) == 0
    # Nothing extracted: exit 1 too (the checkpoints failed, not the command line), without a traceback.
    only_broken = write_config(tmp_path, checkpoints=[BROKEN])
    assert main(["extract", "--config", str(only_broken), "--allow-partial"]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]  # (Prefect logs the flow's failure above it)
    assert last.startswith("dwk: error: no checkpoint could be extracted (1 failed): broken: weights file")


def test_config_error_is_readable_and_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("checkpoints: [{id: a, pretrained: false}, {id: b, arch: x, file: y, onnx: z}]\n"
                   "autoencoder: {epochs: 0, bogus: 2}\n")
    assert main(["run", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"config {bad} is not valid (4 problems)" in err
    assert "  checkpoints[0]: checkpoint 'a': 'pretrained: false' needs 'arch'" in err
    assert "  autoencoder.epochs: Input should be greater than or equal to 1" in err
    assert "  autoencoder.bogus: unknown key" in err
    assert "pydantic.dev" not in err and "Traceback" not in err and "Value error," not in err
    # -v: the same message, with the traceback.
    assert main(["-v", "run", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "ConfigError" in err
    # A missing config file is a user error too.
    assert main(["extract", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_only_dwk_errors_are_user_errors(tmp_path, monkeypatch):
    """A ValueError from inside dwk (or numpy, zarr...) is a bug: it keeps its traceback."""
    import dwk.cli

    def boom(args):
        raise ValueError("internal check failed")

    monkeypatch.setattr(dwk.cli, "cmd_show", boom)
    with pytest.raises(ValueError, match="internal check failed"):
        main(["show", str(tmp_path)])
    assert issubclass(ConfigError, ValueError)  # callers catching ValueError still catch config errors


def test_internal_value_errors_in_extraction_are_not_bad_input(tmp_path, monkeypatch):
    from prefect.states import Failed

    from tasks.extract import _retry_unless_bad_input

    spec = tiny_config(tmp_path).checkpoints[1]

    def internal(*a, **k):
        raise ValueError("layer 'x': expected (out, kh, kw) kernels")

    monkeypatch.setattr(pipeline, "extract_model", internal)
    with pytest.raises(ValueError, match="expected") as info:
        pipeline.extract_checkpoint(spec, tmp_path / "s.zarr", tmp_path, 128)
    assert not isinstance(info.value, CheckpointError)

    def no_dw(*a, **k):
        raise NoDepthwiseError("no depthwise kernels in the model")

    monkeypatch.setattr(pipeline, "extract_model", no_dw)
    with pytest.raises(CheckpointError, match="null-test_convnext.*no depthwise"):
        pipeline.extract_checkpoint(spec, tmp_path / "s.zarr", tmp_path, 128)
    # Prefect retries everything but bad input.
    retry = lambda exc: _retry_unless_bad_input(None, None, Failed(data=exc))  # noqa: E731
    assert retry(ValueError("internal")) and retry(OSError("disk"))
    assert not retry(CheckpointError("c", "bad file")) and not retry(NoDepthwiseError("none"))


def test_no_prefect_run_records_an_internal_error_and_raises_when_nothing_extracted(tmp_path, monkeypatch):
    def internal(*a, **k):
        raise ValueError("internal")

    monkeypatch.setattr(pipeline, "extract_model", internal)
    cfg = tiny_config(tmp_path, checkpoints=[dict(id="null", arch="test_convnext", pretrained=False)])
    with pytest.raises(CheckpointsFailedError, match="null: ValueError: internal") as info:
        pipeline.run(cfg, track=False)
    assert info.value.exit_code == 1


# ----------------------------------------------------------------------------- run ids
def test_run_ids_of_one_second_differ(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path)
    monkeypatch.setattr(pipeline.time, "strftime", lambda fmt: "20260101-120000")  # the same second
    ids = {pipeline.new_run_id(cfg) for _ in range(50)}
    assert len(ids) == 50
    prefix = f"test-20260101-120000-{cfg.fingerprint()[:6]}-"
    assert all(i.startswith(prefix) and len(i) == len(prefix) + 4 for i in ids)


# ----------------------------------------------------------------------------- MLflow
def test_unreachable_tracking_server_fails_in_seconds(tmp_path, monkeypatch, capsys):
    from dwk import tracking

    uri = f"http://127.0.0.1:{free_port()}"
    t0 = time.perf_counter()
    with pytest.raises(TrackingError, match=f"{uri} is unreachable"):
        tracking.preflight(uri)
    assert time.perf_counter() - t0 < 10
    # A server that accepts and never answers: the preflight's timeout, not MLflow's minutes of retries.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        hung = f"http://127.0.0.1:{silent.getsockname()[1]}"
        t0 = time.perf_counter()
        with pytest.raises(TrackingError, match=f"{hung} is unreachable.*timed out"):
            tracking.preflight(hung, timeout=1)
        assert time.perf_counter() - t0 < 10
    # Through the CLI: exit 2 before any work (no store is created).
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    cfg = write_config(tmp_path)
    t0 = time.perf_counter()
    assert main(["run", "--no-prefect", "--config", str(cfg)]) == 2
    assert time.perf_counter() - t0 < 10
    assert f"MLflow tracking server {uri} is unreachable" in capsys.readouterr().err
    assert not (tmp_path / "store.zarr").exists()
    # SQLite: the folder must exist and be writable.
    with pytest.raises(TrackingError, match="does not exist"):
        tracking.preflight(f"sqlite:///{tmp_path}/nowhere/mlflow.db")
    tracking.preflight(f"sqlite:///{tmp_path}/mlflow.db")


def test_a_running_run_of_a_dead_process_is_marked_failed_at_the_next_start(mlflow_uri):
    from dwk import tracking

    dead = subprocess.Popen(["true"])
    dead.wait()
    exp = f"stale-{os.getpid()}"
    alive = tracking.start_run(exp, "still-running", {}, {})  # this process: alive
    stale = tracking.start_run(exp, "left-running", {}, {tracking.TAG_PID: str(dead.pid)})
    c = tracking.client()
    assert c.get_run(stale).info.status == "RUNNING"
    tags = c.get_run(alive).data.tags
    assert tags[tracking.TAG_HOST] == socket.gethostname() and tags[tracking.TAG_PID] == str(os.getpid())
    new = tracking.start_run(exp, "next", {}, {})
    run = c.get_run(stale)
    assert run.info.status == "FAILED"
    assert f"process {dead.pid}" in run.data.tags[tracking.TAG_END_REASON]
    assert c.get_run(alive).info.status == "RUNNING"
    for r in (alive, new):
        tracking.end_run(r)


def test_closed_on_error_ends_runs_failed_or_killed(mlflow_uri):
    from dwk import tracking
    from dwk.errors import Interrupted

    c = tracking.client()
    for exc, status in ((RuntimeError("boom"), "FAILED"), (KeyboardInterrupt(), "KILLED"),
                        (Interrupted(signal.SIGTERM), "KILLED")):
        run_id = tracking.start_run(f"guard-{os.getpid()}", "r", {}, {})
        with pytest.raises(type(exc)), tracking.closed_on_error(run_id):
            raise exc
        run = c.get_run(run_id)
        assert run.info.status == status and type(exc).__name__ in run.data.tags[tracking.TAG_END_REASON]
        assert run_id not in tracking._open_runs


# ----------------------------------------------------------------------------- signals
def sigterm_when(args: list[str], env: dict, cwd: Path, ready, *, wait_s: float = 400, settle_s: float = 0,
                 exit_timeout_s: float = 60) -> tuple[int, float, str]:
    """Run ``dwk ARGS``; once ``ready()`` is true, send SIGTERM; return (exit status, seconds from the
    signal to the exit, the process's output)."""
    log_path = cwd / "log.txt"
    log = log_path.open("w")
    proc = subprocess.Popen(DWK + args, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=cwd)
    try:
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and proc.poll() is None and not ready():
            time.sleep(0.5)
        assert proc.poll() is None and ready(), log_path.read_text()[-3000:]
        time.sleep(settle_s)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=exit_timeout_s)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    return rc, took, log_path.read_text()


def parent_runs_once_training(experiment: str) -> list:
    """The parent MLflow runs of ``experiment`` once a child logs a training loss (else [])."""
    from dwk import tracking

    c = tracking.client()
    exp = c.get_experiment_by_name(experiment)
    runs = c.search_runs([exp.experiment_id]) if exp else []
    if any("loss" in r.data.metrics for r in runs):
        return [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    return []


def test_sigterm_during_analysis_stops_dwk_run_within_seconds(tmp_path, mlflow_uri):
    from dwk import tracking

    experiment = f"sigterm-{os.getpid()}"
    # Training long enough to be interrupted in the middle of the analysis.
    cfg = write_config(tmp_path, checkpoints=[PLANTED], experiment=experiment,
                       autoencoder=dict(epochs=100000, max_steps=None, batch_size=128))
    env = dict(os.environ, MLFLOW_TRACKING_URI=mlflow_uri, HF_HUB_OFFLINE="1")
    runs = []
    rc, took, text = sigterm_when(["run", "--no-prefect", "--config", str(cfg)], env, tmp_path,
                                  lambda: bool(runs.extend(parent_runs_once_training(experiment)) or runs),
                                  wait_s=240, exit_timeout_s=30)
    print(f"SIGTERM to exit: {took:.1f}s")
    assert rc == 143, text[-3000:]
    assert took < 10, f"took {took:.1f}s"
    assert "stopped by SIGTERM" in text and "Traceback" not in text
    run = tracking.client().get_run(runs[0].info.run_id)
    assert run.info.status == "KILLED"
    assert "Interrupted" in run.data.tags[tracking.TAG_END_REASON]
    # The store stays usable: the checkpoint is complete and verifies.
    assert main(["verify", "--store", str(tmp_path / "store.zarr")]) == 0


# ----------------------------------------------------------------------------- concurrent use
@pytest.mark.slow
def test_three_concurrent_extracts_with_the_ephemeral_prefect_server(tmp_path):
    """Measured here (2 cores): all three exit 0 in about 110-130 s (a single one: about 35 s)."""
    cfg = write_config(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), HF_HUB_OFFLINE="1")
    procs = [subprocess.Popen(DWK + ["extract", "--config", str(cfg)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=540)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], "\n=====\n".join(o[-2000:] for o in outs)
    assert not any("database is locked" in o for o in outs)
    # Each process had its own temporary database: Prefect's default one, then dwk's slots.
    assert sorted(p.name for p in (tmp_path / "prefect-home" / "dwk-ephemeral").glob("prefect-*.db")) == [
        "prefect-1.db", "prefect-2.db"]
    assert main(["verify", "--store", str(tmp_path / "store.zarr")]) == 0


@pytest.mark.slow
def test_sigterm_under_prefect_stops_within_seconds_and_the_run_resumes(tmp_path, mlflow_uri):
    """`dwk run` with Prefect's temporary server: SIGTERM in training ends it with 143 within seconds
    (Prefect's own handler or dwk's), its MLflow run KILLED; `dwk run --resume` then finishes it."""
    from dwk import tracking
    from dwk.store import KernelStore

    experiment = f"sigterm-prefect-{os.getpid()}"
    cfg = write_config(tmp_path, checkpoints=[PLANTED], experiment=experiment,
                       autoencoder=dict(epochs=400, batch_size=128))
    env = dict(os.environ, MLFLOW_TRACKING_URI=mlflow_uri, HF_HUB_OFFLINE="1", PREFECT_HOME=str(tmp_path / "prefect"))
    env.pop("PREFECT_API_URL", None)
    runs = []
    rc, took, text = sigterm_when(["run", "--config", str(cfg)], env, tmp_path,
                                  lambda: bool(runs.extend(parent_runs_once_training(experiment)) or runs))
    print(f"SIGTERM to exit under Prefect: {took:.1f}s")
    assert rc == 143, text[-3000:]
    assert took < 15, f"took {took:.1f}s"
    c = tracking.client()
    mlflow_id = runs[0].info.run_id
    assert c.get_run(mlflow_id).info.status == "KILLED"
    store = KernelStore(tmp_path / "store.zarr", create=False)
    (run_id,) = store.run_ids()
    assert main(["verify", "--store", str(tmp_path / "store.zarr")]) == 0
    assert subprocess.run(DWK + ["run", "--config", str(cfg), "--resume", run_id], env=env, cwd=tmp_path,
                          capture_output=True, timeout=600).returncode == 0
    assert c.get_run(mlflow_id).info.status == "FINISHED" and store.run_meta(run_id)["finished"]


@pytest.mark.slow
@pytest.mark.parametrize("prefect", [False, True], ids=["no-prefect", "prefect"])
def test_sigterm_during_clustering_stops_within_seconds(tmp_path, mlflow_uri, prefect):
    """Finding 10 of issue 10: SIGTERM in clustering (where `dwk run` on 1M kernels once ignored it)."""
    from dwk.store import KernelStore

    big = dict(id="pop", planted=dict(shape=[7, 7], n=150_000, noise_share=0.2, seed=3))
    cfg = write_config(tmp_path, checkpoints=[big], experiment=f"sigterm-cluster-{os.getpid()}",
                       autoencoder=dict(epochs=1, batch_size=1024), cluster=dict(n_init_clusters=48))
    env = dict(os.environ, MLFLOW_TRACKING_URI=mlflow_uri, HF_HUB_OFFLINE="1", PREFECT_HOME=str(tmp_path / "prefect"))
    env.pop("PREFECT_API_URL", None)

    def trained() -> bool:
        try:
            store = KernelStore(tmp_path / "store.zarr", create=False)
            return any(store.stage_record(r, "7x7", "train") for r in store.run_ids())
        except Exception:  # noqa: BLE001 - not written yet
            return False

    rc, took, text = sigterm_when(["run", "--config", str(cfg)] + ([] if prefect else ["--no-prefect"]), env,
                                  tmp_path, trained, wait_s=500, settle_s=5)  # well into the clustering
    print(f"SIGTERM in clustering to exit ({'prefect' if prefect else 'no prefect'}): {took:.1f}s")
    assert rc == 143, text[-3000:]
    assert took < 15, f"took {took:.1f}s"
    store = KernelStore(tmp_path / "store.zarr", create=False)
    (run_id,) = store.run_ids()
    assert store.stage_record(run_id, "7x7", "cluster") is None and store.stage_record(run_id, "7x7", "train")

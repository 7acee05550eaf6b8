"""dwk on a Prefect server (issue 12, item 1): `dwk cluster init`, the global concurrency slots that code
takes (GPU training, Hub downloads), the Late-run cancellation of a deployed training, and the documented
deployments registered from deployments/prefect.yaml and run by real workers on a hand-started stack.

Against the session's real Prefect server (``prefect_server`` in conftest.py).
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from flows import cluster as cluster_setup
from dwk.cli import main

ROOT = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).parent / "prefect")


@pytest.fixture(autouse=True)
def _fresh_log_once():
    cluster_setup._said.clear()
    yield
    cluster_setup._said.clear()


def _client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def _active_slots(name: str) -> int:
    with _client() as client:
        return client.read_global_concurrency_limit_by_name(name).active_slots


def _limit(name: str, limit: int = 2) -> str:
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    with _client() as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit))
    return name


# ----------------------------------------------------------------------------- dwk cluster init
def test_cluster_init_creates_limits_and_pools_and_is_idempotent(prefect_server, capsys):
    assert main(["cluster", "init", "--gpus", "1", "--downloads", "2"]) == 0
    first = capsys.readouterr().out
    with _client() as client:
        assert client.read_global_concurrency_limit_by_name("dwk-gpu").limit == 1
        assert client.read_global_concurrency_limit_by_name("dwk-hub-downloads").limit == 2
        pools = {name: client.read_work_pool(name) for name in ("dwk-cpu", "dwk-gpu")}
    assert all(p.type == "process" and p.base_job_template for p in pools.values())
    lines = first.strip().splitlines()
    assert len(lines) == 4, first
    assert all(ln.split()[0] in ("created", "unchanged", "exists") for ln in lines), first

    # Again: nothing changes, nothing fails; every line says so.
    assert main(["cluster", "init", "--gpus", "1", "--downloads", "2"]) == 0
    again = capsys.readouterr().out
    assert [ln.split()[0] for ln in again.strip().splitlines()] == ["unchanged", "unchanged", "exists", "exists"], again
    assert "global concurrency limit dwk-gpu: 1 slot (" in again and "work pool dwk-cpu: type process" in again

    # A new number of GPUs updates the limit in place.
    assert main(["cluster", "init", "--gpus", "3"]) == 0
    updated = capsys.readouterr().out
    assert "updated   global concurrency limit dwk-gpu: 1 slot -> 3 slots" in updated, updated
    assert "unchanged global concurrency limit dwk-hub-downloads: 2 slots" in updated, updated
    with _client() as client:
        assert client.read_global_concurrency_limit_by_name("dwk-gpu").limit == 3
    assert main(["cluster", "init", "--gpus", "1"]) == 0  # as the other tests expect it
    capsys.readouterr()


def test_cluster_init_reactivates_a_disabled_limit(prefect_server, capsys):
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

    assert main(["cluster", "init"]) == 0
    with _client() as client:
        client.update_global_concurrency_limit("dwk-hub-downloads", GlobalConcurrencyLimitUpdate(active=False))
    assert main(["cluster", "init"]) == 0
    assert "updated   global concurrency limit dwk-hub-downloads: 2 slots, inactive -> 2 slots" in capsys.readouterr().out
    with _client() as client:
        assert client.read_global_concurrency_limit_by_name("dwk-hub-downloads").active


def test_cluster_init_without_a_server_says_what_to_set(monkeypatch, capsys):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert main(["cluster", "init"]) == 2
    err = capsys.readouterr().err
    assert "no Prefect server configured" in err and "PREFECT_API_URL" in err and "Traceback" not in err


def test_cluster_init_refuses_a_zero_limit(prefect_server, capsys):
    assert main(["cluster", "init", "--gpus", "0"]) == 2
    assert "must be at least 1" in capsys.readouterr().err


# ----------------------------------------------------------------------------- slots
def test_slot_does_nothing_without_a_server(monkeypatch, caplog):
    from prefect.concurrency import sync
    from prefect.settings import PREFECT_API_URL, temporary_settings

    def refuse(*a, **k):
        raise AssertionError("no slot may be taken without a Prefect server")

    monkeypatch.setattr(sync, "concurrency", refuse)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with temporary_settings(restore_defaults={PREFECT_API_URL}), caplog.at_level(logging.DEBUG, logger="dwk"):
        assert cluster_setup.server_url() is None
        with cluster_setup.slot("dwk-gpu", "a training") as held:
            assert held is False
    assert not [r for r in caplog.records if r.name.startswith("dwk.cluster")]


def test_slot_with_a_missing_limit_is_a_noop_said_once_at_info(prefect_server, caplog):
    name = f"dwk-test-missing-{uuid.uuid4().hex[:6]}"
    with caplog.at_level(logging.DEBUG):
        for _ in range(3):
            with cluster_setup.slot(name, "a download") as held:
                assert held is False
    said = [r for r in caplog.records if name in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.INFO and said[0].name == "dwk.cluster", said
    assert "dwk cluster init" in said[0].getMessage()
    # Prefect's own "do not exist - skipping acquisition" warning is never reached.
    assert not [r for r in caplog.records if "skipping acquisition" in r.getMessage()], caplog.records


def test_slot_occupies_the_limit_while_held(prefect_server):
    name = _limit(f"dwk-test-held-{uuid.uuid4().hex[:6]}", limit=2)
    assert _active_slots(name) == 0
    with cluster_setup.slot(name, "a test") as held:
        assert held is True
        assert _active_slots(name) == 1
    assert _active_slots(name) == 0
    with pytest.raises(RuntimeError, match="boom"), cluster_setup.slot(name, "a test"):
        raise RuntimeError("boom")  # the body's errors pass through, and the slot is given back
    assert _active_slots(name) == 0


def test_slot_waits_for_a_free_slot(prefect_server):
    import threading

    name = _limit(f"dwk-test-wait-{uuid.uuid4().hex[:6]}", limit=1)
    order = []

    def second() -> None:
        with cluster_setup.slot(name, "second"):
            order.append("second")

    with cluster_setup.slot(name, "first"):
        t = threading.Thread(target=second)
        t.start()
        time.sleep(2.0)
        order.append("first done")
    t.join(60)
    assert order == ["first done", "second"]
    assert _active_slots(name) == 0


def test_hub_download_holds_a_dwk_hub_downloads_slot(prefect_server, monkeypatch, tmp_path):
    from dwk.sources import hub

    assert main(["cluster", "init"]) == 0
    seen = []

    def download(**kwargs):
        seen.append((kwargs["local_files_only"], _active_slots("dwk-hub-downloads")))
        f = tmp_path / kwargs["filename"]
        f.write_bytes(b"x")
        return str(f)

    monkeypatch.setattr(hub, "_hf_hub_download", download)
    hub._fetch("timm/x", "model.safetensors", None, "x.tag", offline=False, cache_dir=None)
    hub._fetch("timm/x", "model.safetensors", None, "x.tag", offline=True, cache_dir=None)  # the cache only
    assert seen == [(False, 1), (True, 0)]
    assert _active_slots("dwk-hub-downloads") == 0


def test_training_on_a_gpu_holds_a_dwk_gpu_slot(prefect_server, monkeypatch, tmp_path):
    import flows.train as train_mod
    from conftest import tiny_config
    from dwk import pipeline

    assert main(["cluster", "init", "--gpus", "1"]) == 0
    seen = []

    def train_shape(cfg, run_id, shape, mlflow_run_id=None):
        seen.append((shape, _active_slots("dwk-gpu")))
        return str(tmp_path / f"{shape}.pt")

    monkeypatch.setattr(pipeline, "train_shape", train_shape)
    cfg = tiny_config(tmp_path)
    monkeypatch.setattr(train_mod, "on_gpu", lambda config: True)
    assert train_mod.train_flow(cfg, "run-1", "3x3") == str(tmp_path / "3x3.pt")
    monkeypatch.setattr(train_mod, "on_gpu", lambda config: False)  # on the CPU: no GPU slot
    train_mod.train_flow(cfg, "run-1", "5x5")
    assert seen == [("3x3", 1), ("5x5", 0)]
    assert _active_slots("dwk-gpu") == 0
    assert not train_mod.on_gpu(cfg.model_copy(update=dict(autoencoder=cfg.autoencoder.model_copy(
        update=dict(device="cpu")))))


# ----------------------------------------------------------------------------- Late training runs
def test_training_run_no_worker_takes_is_cancelled_and_the_error_names_the_pool(prefect_server, monkeypatch, tmp_path):
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    from conftest import tiny_config
    from dwk import pipeline
    from flows.analyze import _train

    pool = f"dwk-test-noworker-{uuid.uuid4().hex[:6]}"
    with _client() as client:
        client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
        flow_id = client.create_flow_from_name("dwk-train")
        dep_id = client.create_deployment(flow_id, pool, work_pool_name=pool, entrypoint="flows/train.py:train_flow")
    monkeypatch.setattr(pipeline, "trained_model", lambda *a: None)  # not a resumed run
    cfg = tiny_config(tmp_path, train_deployment=f"dwk-train/{pool}", train_timeout_s=1)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError) as err:
        _train(cfg, "run-late", "3x3", None)
    took = time.monotonic() - t0
    msg = str(err.value)
    assert f"work pool {pool!r}" in msg and f"prefect worker start --pool {pool}" in msg, msg
    assert "no worker took it" in msg and "train_timeout_s=1s" in msg and "will not start later" in msg, msg
    with _client() as client:
        (run,) = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep_id])))
    assert str(run.id) in msg
    assert run.state.type.value == "CANCELLED", run.state
    assert took < 30, took


# ----------------------------------------------------------------------------- the documented stack, by hand
def _worker_env() -> dict[str, str]:
    """A worker's environment: the test server, DWK_HOME (the deployments' pull step), quick polling."""
    from prefect.settings import PREFECT_API_URL

    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_CURRENT_TEST",)}
    env.update(PREFECT_API_URL=PREFECT_API_URL.value(), DWK_HOME=str(ROOT), PREFECT_WORKER_QUERY_SECONDS="2",
               PREFECT_LOGGING_EXTRA_LOGGERS="dwk", HF_HUB_OFFLINE="1")
    return env


@pytest.fixture(scope="module")
def deployed(prefect_server):
    """docs/cluster.md by hand: `dwk cluster init`, then `prefect deploy --all` of deployments/prefect.yaml from
    the checkout, with DWK_HOME unset (each worker fills in the pull step's directory from its own)."""
    env = _worker_env()
    t0 = time.monotonic()
    init = subprocess.run([sys.executable, "-m", "dwk.cli", "cluster", "init", "--gpus", "1"], env=env,
                          cwd=Path.home(), capture_output=True, text=True, timeout=120)
    assert init.returncode == 0, init.stderr[-3000:]
    deploy_env = {k: v for k, v in env.items() if k != "DWK_HOME"}
    deploy = subprocess.run([PREFECT, "--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml"],
                            env=deploy_env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]
    assert "Skipping deployment" not in deploy.stdout + deploy.stderr, deploy.stdout[-3000:]
    print(f"dwk cluster init + prefect deploy --all: {time.monotonic() - t0:.0f} s")
    return env


def test_documented_deployments_register_from_prefect_yaml(deployed):
    project = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    with _client() as client:
        got = {f"{client.read_flow(d.flow_id).name}/{d.name}": d for d in client.read_deployments()}
        pipe, weekly = got["dwk-pipeline/cpu"], got["dwk-pipeline/weekly-convnextv2"]
        train = got["dwk-train/gpu"]
    assert len([n for n in got if n.startswith("dwk-") and "/" in n and not n.startswith("dwk-logging")]) >= len(
        project["deployments"])
    for name in ("dwk-pipeline/cpu", "dwk-extract/cpu", "dwk-analyze/cpu"):
        assert got[name].parameters["config_path"] == "configs/cluster.yaml", name
        assert got[name].work_pool_name == "dwk-cpu", name
    assert pipe.parameters == {"config_path": "configs/cluster.yaml", "track": True}
    assert pipe.global_concurrency_limit.limit == 1 and pipe.concurrency_options.collision_strategy.value == "ENQUEUE"
    assert train.global_concurrency_limit.limit == 1 and train.work_pool_name == "dwk-gpu"
    assert pipe.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": "{{ $DWK_HOME }}"}}]
    (schedule,) = weekly.schedules
    assert schedule.active is False and schedule.schedule.cron == "0 3 * * 1" and schedule.schedule.timezone == "UTC"
    assert weekly.parameters["config_path"] == "configs/convnextv2-weekly.yaml"
    assert weekly.concurrency_options.collision_strategy.value == "CANCEL_NEW"
    with _client() as client:  # an inactive schedule makes no runs
        assert not client.read_flow_runs(deployment_filter=_deployment_filter(weekly.id))


# About 80 s here (2 shared cores), after the deployments above (about 30 s): slow, to keep the default
# suite under 10 minutes (`pytest -m slow -k hand_started` runs it).
@pytest.mark.slow
def test_pipeline_deployment_runs_on_a_hand_started_stack(deployed, tmp_path):
    """`prefect deployment run dwk-pipeline/cpu --param config_path=...` with a path relative to the worker's
    checkout: a dwk-cpu worker runs the pipeline, a dwk-gpu worker its training (train_deployment: dwk-train/gpu)."""
    env = deployed
    t0 = time.monotonic()
    with _client() as client:
        pipe = client.read_deployment_by_name("dwk-pipeline/cpu")
        train = client.read_deployment_by_name("dwk-train/gpu")
    # A small run config outside the checkout, named relative to it: the worker reads it from DWK_HOME.
    cfg_file = tmp_path / "cfg" / "tiny.yaml"
    cfg_file.parent.mkdir()
    cfg_file.write_text(yaml.safe_dump(dict(
        name="by-hand", checkpoints=[dict(id="p3", planted=dict(shape=[3, 3], n=400, seed=1))],
        store=str(tmp_path / "store.zarr"), out=str(tmp_path / "runs"), chunk_kernels=128,
        normalize=dict(chunk_kernels=128), autoencoder=dict(epochs=3, batch_size=128, device="cpu"),
        cluster=dict(n_init_clusters=24, n_null=2000), controls=dict(kmeans=False, fit_dog=False),
        dask=dict(n_workers=1), train_deployment="dwk-train/gpu", train_timeout_s=240)))
    rel = os.path.relpath(cfg_file, ROOT)
    started = subprocess.run([PREFECT, "deployment", "run", "dwk-pipeline/cpu", "--param", f"config_path={rel}",
                              "--param", "track=false"], env=env, cwd=tmp_path, capture_output=True, text=True,
                             timeout=120)
    assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
    gpu_log = (tmp_path / "gpu-worker.log").open("w")
    gpu_worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", "dwk-gpu", "--type", "process", "--limit", "1"],
                                  env=env, cwd=tmp_path, stdout=gpu_log, stderr=subprocess.STDOUT)
    try:
        cpu_worker = subprocess.run([PREFECT, "worker", "start", "--pool", "dwk-cpu", "--type", "process",
                                     "--run-once", "--limit", "1"], env=env, cwd=tmp_path, capture_output=True,
                                    text=True, timeout=420)
    finally:
        gpu_worker.terminate()
        try:
            gpu_worker.wait(30)
        except subprocess.TimeoutExpired:
            gpu_worker.kill()
        gpu_log.close()
    out = cpu_worker.stdout[-4000:] + cpu_worker.stderr[-4000:]
    assert cpu_worker.returncode == 0, out
    with _client() as client:
        (run,) = client.read_flow_runs(deployment_filter=_deployment_filter(pipe.id))
        assert run.state.is_completed(), (run.state, out, (tmp_path / "gpu-worker.log").read_text()[-3000:])
        assert run.parameters["config_path"] == rel
        train_runs = client.read_flow_runs(deployment_filter=_deployment_filter(train.id))
    assert [r.state.type.value for r in train_runs] == ["COMPLETED"], train_runs
    assert train_runs[0].name.startswith("train 3x3")
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert (run_dir / "summary.json").is_file() and list((run_dir / "models").iterdir())
    print(f"deployment run on two workers: {time.monotonic() - t0:.0f} s")


def _deployment_filter(dep_id):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    return DeploymentFilter(id=DeploymentFilterId(any_=[dep_id]))


@pytest.mark.slow
def test_a_worker_stops_on_sigterm_within_seconds(prefect_server):
    """Issue 12: "a worker stopped with SIGTERM keeps taking work". Measured with Prefect 3.9.1: an idle
    `prefect worker start` turns SIGTERM into SIGINT and exits in about a second (a worker running a
    flow run passes the SIGINT on to it: the run stops too, dwk marks its MLflow run KILLED)."""
    env = _worker_env()
    proc = subprocess.Popen([PREFECT, "worker", "start", "--pool", "dwk-sigterm-test", "--type", "process"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        with _client() as client:
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    if client.read_workers_for_work_pool("dwk-sigterm-test"):
                        break  # registered: polling for work
                except Exception:  # noqa: BLE001 - the pool is created by the worker a moment later
                    pass
                time.sleep(1)
        assert proc.poll() is None
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=30)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    out = proc.stdout.read()
    print(f"worker: SIGTERM to exit {took:.1f}s")
    assert rc == 0 and took < 10, out[-2000:]
    assert "Received SIGTERM" in out and "stopped" in out

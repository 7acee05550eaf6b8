"""The pipeline as Prefect flows on a real Prefect server, tracked in a real MLflow store."""
import json

import mlflow
import pytest

from conftest import tiny_config


@pytest.fixture(scope="module")
def flow_run(prefect_server, mlflow_uri, tmp_path_factory):
    from flows.pipeline import pipeline_flow

    cfg = tiny_config(tmp_path_factory.mktemp("flow"), checkpoints=[
        dict(id="planted-test_convnext", arch="test_convnext", planted=dict(seed=0, noise_share=0.1)),
        dict(id="planted-test_efficientnet", arch="test_efficientnet", planted=dict(seed=1, noise_share=0.1)),
        dict(id="null-test_convnext", arch="test_convnext", pretrained=False, seed=0),
        dict(id="corrupt", arch="test_convnext", file="/nonexistent/w.safetensors"),
    ], max_workers=2)
    state = pipeline_flow(cfg, return_state=True)
    return cfg, state


def test_pipeline_flow_completes_with_a_failed_checkpoint(flow_run):
    cfg, state = flow_run
    assert state.is_completed()
    summary = state.result()
    assert [f["id"] for f in summary["failed"]] == ["corrupt"]
    on_disk = json.loads((cfg.out / summary["run_id"] / "summary.json").read_text())
    # depthwise shapes, and the regular 3x3 convs (test_efficientnet's stem) as the comparison set
    assert set(on_disk["shapes"]) == {"3x3", "7x7", "regular-3x3"}
    eff = next(r for r in on_disk["checkpoints"] if r["id"] == "planted-test_efficientnet")
    assert eff["n_kernels"] == 320 and eff["n_regular"] > 0 and "regular_classified_share" in eff
    assert any(c["control"].startswith("regular convs") for c in on_disk["controls"])
    assert (cfg.out / summary["run_id"] / "figures" / "depth-depthwise-vs-regular.png").exists()
    rows = {r["id"]: r for r in on_disk["checkpoints"]}
    assert rows["planted-test_convnext"]["classified_share"] > 5 * max(rows["null-test_convnext"]["classified_share"], 0.01)


def test_flow_runs_tasks_and_artifacts_are_on_the_server(flow_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    cfg, state = flow_run
    with get_client(sync_client=True) as client:
        flows = {f.name for f in client.read_flows()}
        assert {"dwk-pipeline", "dwk-extract", "dwk-analyze", "dwk-train"} <= flows
        runs = client.read_flow_runs()
        assert sum(r.state.is_completed() for r in runs if r.name) >= 4
        tasks = client.read_task_runs()
        extract_states = {t.name.split(" ", 1)[-1]: t.state.type.value for t in tasks if t.name.startswith("extract ")}
        assert extract_states["corrupt"] == "FAILED" and extract_states["planted-test_convnext"] == "COMPLETED"
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["dwk-checkpoints"])))
        assert arts and arts[0].type == "table"
        assert "planted-test_convnext" in json.dumps(arts[0].data)
        links = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["dwk-mlflow-run"])))
        assert links and state.result()["mlflow_run_id"] in links[0].data


def test_flow_run_is_in_mlflow(flow_run):
    cfg, state = flow_run
    summary = state.result()
    run = mlflow.tracking.MlflowClient().get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == summary["run_id"]
    assert run.data.metrics["n_failed_checkpoints"] == 1
    c = mlflow.tracking.MlflowClient()
    kids = c.search_runs([run.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")
    assert {k.data.tags["dwk.group"] for k in kids} == {"3x3", "7x7", "regular-3x3"}
    assert all(k.info.status == "FINISHED" and "classified_share" in k.data.metrics for k in kids)
    assert run.data.tags["prefect.flow_run_url"].endswith(f"/runs/flow-run/{state.state_details.flow_run_id}")
    assert run.data.params["cluster.mode"] == "kmeans"
    # Issue 10: who held the run open (host, pid) and the Prefect flow run it belongs to.
    import os
    import socket

    assert run.data.tags["dwk.host"] == socket.gethostname() and run.data.tags["dwk.pid"] == str(os.getpid())
    assert run.data.tags["prefect.flow_run_id"] == str(state.state_details.flow_run_id)


def test_pipeline_flow_resumes_an_unfinished_run(flow_run):
    """Under Prefect too: a run stopped before clustering one group goes on with `resume`, reuses the
    trained models and the other groups' results, and ends in the same MLflow run. (Last in this
    file: it turns the module's run into a resumed one.)"""
    from dwk import tracking
    from dwk.store import KernelStore
    from flows.pipeline import pipeline_flow

    cfg, state = flow_run
    before = state.result()
    run_id = before["run_id"]
    store = KernelStore(cfg.store, create=False)
    models = {p: p.stat().st_mtime_ns for p in (cfg.out / run_id / "models").iterdir()}
    # As if the process had died after training, before clustering 7x7 (the store's view of it).
    store.record_stage(run_id, "7x7", "train", store.stage_record(run_id, "7x7", "train"), clear=("cluster",))
    store.update_run_meta(run_id, finished=None)
    # The config given is only where the store is: the run goes on with the config it started with.
    after = pipeline_flow(cfg.model_copy(update=dict(name="other")), resume=run_id)
    assert after["run_id"] == run_id and after["finished"]
    assert after["shapes"]["7x7"] == before["shapes"]["7x7"]  # clustered again, the same
    assert {p: p.stat().st_mtime_ns for p in (cfg.out / run_id / "models").iterdir()} == models  # not retrained
    assert [f["id"] for f in after["failed"]] == ["corrupt"]
    run = tracking.client().get_run(before["mlflow_run_id"])
    assert after["mlflow_run_id"] == before["mlflow_run_id"]
    assert run.info.status == "FINISHED" and run.data.tags[tracking.TAG_RESUMED] == "1"

"""Resumable runs (issue 10) and results that live in the store (issue 9, point 4).

A run records each finished stage of each analysis group in the store, and each group's result as a
typed record; ``dwk run --resume RUN_ID`` goes on with an unfinished run and skips what it finished;
``dwk show`` / ``dwk export`` need the store alone.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dwk import pipeline, results
from dwk.cli import main
from dwk.errors import StoreError, StoreSchemaError
from dwk.store import WRITER_KEY, KernelStore

from conftest import tiny_config

DWK = [sys.executable, "-m", "dwk.cli"]
# Two analysis groups (7x7: the planted test model and its control; 5x5: a planted population), so
# a kill can fall between the groups' stages.
CHECKPOINTS = [
    dict(id="planted-test_convnext", arch="test_convnext", planted=dict(seed=0, noise_share=0.1)),
    dict(id="null-test_convnext", arch="test_convnext", pretrained=False, seed=0),
    dict(id="pop-5x5", planted=dict(shape=[5, 5], n=1500, noise_share=0.2, seed=1)),
]


def write_config(tmp_path: Path, name: str, **overrides) -> Path:
    cfg = tiny_config(tmp_path / name, checkpoints=CHECKPOINTS, name=name, experiment=f"resume-{os.getpid()}",
                      **overrides)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json", exclude_none=True)))
    return path


def stage_of(store_path: Path) -> tuple[str | None, dict[str, set]]:
    """The store's (only) run and the finished stages of each of its groups, read while another
    process writes (a metadata file caught mid-write reads as nothing yet)."""
    try:
        store = KernelStore(store_path, create=False)
        runs = store.run_ids()
        if not runs:
            return None, {}
        meta = store.run_meta(runs[0])
        return runs[0], {g: {s for s in pipeline.STAGES if store.stage_record(runs[0], g, s)}
                         for g in meta.get("groups", {})}
    except Exception:  # noqa: BLE001 - not there yet, or half-written metadata
        return None, {}


def shares(summary: dict) -> dict[str, float]:
    return {r["id"]: r["classified_share"] for r in summary["checkpoints"]}


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, mlflow_uri) -> dict:
    """An uninterrupted run of the same config: what a resumed run must reproduce."""
    tmp = tmp_path_factory.mktemp("baseline")
    assert main(["run", "--no-prefect", "--config", str(write_config(tmp, "base"))]) == 0
    out = next((tmp / "base" / "runs").iterdir())
    return json.loads((out / "summary.json").read_text())


# Where the kill falls: after a group's stage has been recorded (the run then holds some of its
# outputs), before the run ends.
KILL_POINTS = {
    "after normalisation": lambda st: any("normalize" in s for s in st.values()),
    "after the first training": lambda st: any("train" in s for s in st.values()),
    "after the first clustering": lambda st: any("cluster" in s for s in st.values()),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_kill_9_during_analysis_then_resume_gives_the_uninterrupted_result(tmp_path, mlflow_uri, baseline, point,
                                                                           caplog):
    from dwk import tracking

    if point != "after the first training" and not os.environ.get("DWK_ALL_KILL_POINTS"):
        pytest.skip("one kill point in the default suite; DWK_ALL_KILL_POINTS=1 runs all three")
    cfg = write_config(tmp_path, "killed")
    store_path = tmp_path / "killed" / "store.zarr"
    env = dict(os.environ, MLFLOW_TRACKING_URI=mlflow_uri, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(DWK + ["run", "--no-prefect", "--config", str(cfg)], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            run_id, stages = stage_of(store_path)
            if KILL_POINTS[point](stages):
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"the run ended before the kill point:\n{proc.stdout.read()[-3000:]}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    run_id, done_before = stage_of(store_path)
    store = KernelStore(store_path, create=False)
    assert [r for r, _ in store.orphaned_runs()] == [run_id]  # dwk gc would list it
    mlflow_id = store.run_meta(run_id)["mlflow_run_id"]

    caplog.set_level("INFO", logger="dwk")
    assert main(["run", "--no-prefect", "--config", str(cfg), "--resume", run_id]) == 0
    skipped = {(r.args[0], r.msg.split(" already")[0].split()[-1]) for r in caplog.records
               if "already (run" in r.getMessage()}
    verbs = {"normalize": "normalised", "train": "trained", "cluster": "clustered"}
    assert skipped == {(g, verbs[s]) for g, ss in done_before.items() for s in ss}, (skipped, done_before)
    assert skipped  # something was skipped at every kill point

    summary = json.loads((tmp_path / "killed" / "runs" / run_id / "summary.json").read_text())
    assert summary["run_id"] == run_id and summary["finished"]
    assert shares(summary) == shares(baseline)
    assert {g: s["tau_null"] for g, s in summary["shapes"].items()} == \
        {g: s["tau_null"] for g, s in baseline["shapes"].items()}
    assert store.orphaned_runs() == [] and store.run_meta(run_id)["resumed"] == 1
    # The same MLflow run goes on and ends FINISHED, marked as resumed once.
    run = tracking.client().get_run(mlflow_id)
    assert summary["mlflow_run_id"] == mlflow_id
    assert run.info.status == "FINISHED" and run.data.tags[tracking.TAG_RESUMED] == "1"
    # A finished run is not resumed again.
    assert main(["run", "--no-prefect", "--config", str(cfg), "--resume", run_id]) == 2


# ----------------------------------------------------------------------------- results in the store
def test_show_and_export_need_only_the_store(tmp_path, baseline, capsys):
    """The run folder deleted: `dwk show RUN_ID --store` prints the same table, export writes the kernels."""
    store = baseline["store"]
    run_id = baseline["run_id"]
    folder = Path(baseline["out"])
    assert main(["show", str(folder)]) == 0
    from_folder = capsys.readouterr().out
    moved = tmp_path / "moved"
    shutil.move(folder, moved)
    try:
        assert main(["show", run_id, "--store", store]) == 0
        from_store = capsys.readouterr().out
        table = lambda text: text.split("results:")[0]  # noqa: E731
        assert table(from_store) == table(from_folder)
        assert main(["export", run_id, "--store", store, "--format", "csv", "--output", str(tmp_path / "k.csv")]) == 0
        import pandas as pd

        df = pd.read_csv(tmp_path / "k.csv")
        assert len(df) == sum(s["n_kernels"] for s in baseline["shapes"].values())
        assert main(["show", "no-such-run", "--store", store]) == 2
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        shutil.move(moved, folder)


def test_result_records_are_typed_and_versioned(tmp_path, baseline):
    store = KernelStore(baseline["store"], create=False)
    run_id = baseline["run_id"]
    for group, s in baseline["shapes"].items():
        rec = store.result(run_id, group)
        assert rec["version"] == results.RESULT_VERSION
        assert results.read_record(rec, group) == s  # summary.json holds exactly the stored records
        assert all(len(c["prototype"]) == len(baseline["shapes"][group]["clusters"][0]["prototype"])
                   for c in rec["clusters"])
    with pytest.raises(StoreSchemaError, match="version 99"):
        results.read_record({**rec, "version": 99}, "x")
    with pytest.raises(ValueError, match="does not fit GroupResult"):
        results.record_of({"shape": "7x7"})


# ----------------------------------------------------------------------------- who may resume
def test_resume_is_refused_while_the_writer_lives_and_for_finished_runs(tmp_path):
    store = KernelStore(tmp_path / "s.zarr")
    store.create_run("r", dict(config={}, checkpoints=[], groups={}))
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        meta = store.run_meta("r")
        store.update_run_meta("r", **{WRITER_KEY: {**meta[WRITER_KEY], "pid": sleeper.pid}})
        with pytest.raises(StoreError, match=f"being written by process {sleeper.pid}"):
            store.claim_run("r")
    finally:
        sleeper.kill()
        sleeper.wait()
    meta = store.claim_run("r")  # its writer is gone now
    assert meta[WRITER_KEY]["pid"] == os.getpid() and meta["resumed"] == 1
    store.finish_run("r")
    with pytest.raises(StoreError, match="is finished: nothing to resume"):
        store.claim_run("r")


def test_resumed_run_redoes_only_groups_whose_checkpoints_changed(tmp_path):
    """prepare_run(resume=True): a group keeps its finished stages only with the same checkpoints
    from the same weights (fingerprints)."""
    cfg = tiny_config(tmp_path, checkpoints=CHECKPOINTS)
    KernelStore(cfg.store)
    extracted = [dict(id="planted-test_convnext", source="planted", status="extracted", shapes={"7x7": 10},
                      fingerprint="a"),
                 dict(id="null-test_convnext", source="random", status="extracted", shapes={"7x7": 10},
                      fingerprint="b"),
                 dict(id="pop-5x5", source="planted", status="extracted", shapes={"5x5": 10}, fingerprint="c")]
    groups = pipeline.prepare_run(cfg, "r", extracted, None)
    store = KernelStore(cfg.store, create=False)
    for g in groups:
        for s in pipeline.STAGES:
            store.record_stage("r", g, s, {})
    extracted[2] = {**extracted[2], "fingerprint": "c2"}  # the 5x5 file changed
    assert pipeline.prepare_run(cfg, "r", extracted, None, resume=True) == groups
    assert {g: [s for s in pipeline.STAGES if store.stage_record("r", g, s)] for g in groups} == \
        {"7x7": list(pipeline.STAGES), "5x5": []}
    # A stage that runs again drops the records of the stages after it.
    store.record_stage("r", "7x7", "train", {}, clear=pipeline.STAGES[2:])
    assert store.stage_record("r", "7x7", "cluster") is None and store.stage_record("r", "7x7", "normalize")

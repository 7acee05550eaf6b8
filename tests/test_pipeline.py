"""The pipeline end to end in-process (no Prefect), with bad inputs beside good ones."""
import json
import os

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from conftest import tiny_config
from dwk import pipeline


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    torch.manual_seed(1)  # not the null checkpoint's seed: its kernels are in the fit set
    m = timm.create_model("test_convnext", pretrained=False)
    with torch.no_grad():
        m.stages[1].blocks[0].conv_dw.weight[:5] = float("nan")
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(d / "nan.safetensors"))
    (d / "corrupt.safetensors").write_bytes(b"\x00garbage" * 10)
    return d


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, bad_inputs, mlflow_uri):
    tmp = tmp_path_factory.mktemp("pipe")
    os.environ["DWK_SYSTEM_METRICS_INTERVAL_S"] = "0.2"  # a sample within the few seconds of training
    cfg = tiny_config(tmp, checkpoints=[
        dict(id="planted-test_convnext", arch="test_convnext", planted=dict(seed=0, noise_share=0.1)),
        dict(id="null-test_convnext", arch="test_convnext", pretrained=False, seed=0),
        dict(id="nan-weights", arch="test_convnext", file=bad_inputs / "nan.safetensors"),
        dict(id="corrupt", arch="test_convnext", file=bad_inputs / "corrupt.safetensors"),
        dict(id="no-depthwise", arch="test_resnet", pretrained=False),
        dict(id="unknown", arch="not_a_timm_model", pretrained=False),
    ])
    return cfg, pipeline.run(cfg)


def store_groups(cfg, run_id):
    from dwk.store import KernelStore

    return KernelStore(cfg.store).run_meta(run_id)["groups"]


def test_failures_are_recorded_and_the_others_go_on(first_run):
    cfg, s = first_run
    failed = {f["id"]: f["error"] for f in s["failed"]}
    assert set(failed) == {"corrupt", "no-depthwise", "unknown"}
    assert "cannot read corrupt.safetensors" in failed["corrupt"]
    assert "no depthwise convolution" in failed["no-depthwise"]
    assert "timm has no model" in failed["unknown"]
    rows = {r["id"]: r for r in s["checkpoints"]}
    assert set(rows) == {"planted-test_convnext", "null-test_convnext", "nan-weights"}
    assert rows["nan-weights"]["n_rejected"] == 5 and rows["nan-weights"]["n_kernels"] == 408


def test_summary_and_contrast(first_run):
    cfg, s = first_run
    on_disk = json.loads((cfg.out / s["run_id"] / "summary.json").read_text())
    assert on_disk["mlflow_run_id"] == s["mlflow_run_id"] and on_disk["store"] == str(cfg.store.resolve())
    for r in on_disk["checkpoints"]:
        assert {"id", "source", "n_kernels", "n_dead", "classified_share"} <= set(r)
    # nan-weights is a real (file) checkpoint of the same shape: the planted check is analysed apart.
    assert store_groups(cfg, s["run_id"]) == {"7x7": ["null-test_convnext", "nan-weights"],
                                               "planted-7x7": ["planted-test_convnext"]}
    from dwk.store import KernelStore

    store = KernelStore(cfg.store)
    assert store.run_meta(s["run_id"])["finished"] and store.orphaned_runs() == []  # dwk gc leaves it
    sh = on_disk["shapes"]["planted-7x7"]
    assert {"n_kernels", "tau", "tau_null", "classified_share", "clusters"} <= set(sh)
    assert all({"name", "size", "share", "prototype"} <= set(c) for c in sh["clusters"])
    assert len(sh["clusters"][0]["prototype"]) == 49
    rows = {r["id"]: r for r in on_disk["checkpoints"]}
    assert rows["planted-test_convnext"]["source"] == "planted"
    assert rows["null-test_convnext"]["source"] == "random"
    assert rows["planted-test_convnext"]["classified_share"] >= 0.6
    assert rows["null-test_convnext"]["classified_share"] <= 0.03
    assert sh["planted"]["planted-test_convnext"]["ari"] > 0.5
    assert 0 < sh["planted"]["planted-test_convnext"]["kmeans_ari_true_k"] <= 1  # its baseline, beside it
    assert -1 <= sh["paper"]["planted_ari"]["planted-test_convnext"] <= 1  # the paper mode, beside it
    assert sh["selection"]["refined"] and isinstance(sh["selection"]["dissolved"], list)
    layers = [l for l in on_disk["layers"] if l["checkpoint"] == "planted-test_convnext"]
    assert [l["layer"] for l in layers] == list(range(9))
    for l in layers:  # the per-layer classified-share curve agrees with the shares at tau and tau_null
        curve = dict(zip(s["shapes"]["planted-7x7"]["tau_curve"]["tau"], l["tau_curve"]))
        assert curve[0.7] == l["classified_share_tau"] and curve[0.0] >= curve[0.5] >= curve[1.0]
    for fig in ("gallery-7x7.png", "gallery-planted-7x7.png", "tau-layers-planted-test_convnext.png"):
        assert (cfg.out / s["run_id"] / "figures" / fig).stat().st_size > 1000


def children_of(c, run) -> dict:
    """The child runs of a parent run, by analysis group."""
    kids = c.search_runs([run.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")
    return {k.data.tags["dwk.group"]: k for k in kids}


def test_mlflow_holds_the_run(first_run):
    """A parent run per pipeline run, a child per analysis group with the same metric names,
    checkpoints as dataset inputs, provenance tags, the autoencoders logged in the children."""
    import mlflow

    cfg, s = first_run
    c = mlflow.tracking.MlflowClient()
    run = c.get_run(s["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["autoencoder.epochs"] == "15"
    assert run.data.params["checkpoints.n"] == "6"
    assert run.data.params["checkpoints.ids"].split(",")[:2] == ["planted-test_convnext", "null-test_convnext"]
    assert not any(k.startswith("checkpoints.planted") for k in run.data.params)  # not flattened
    assert run.data.tags["dwk.version"] and len(run.data.tags.get("mlflow.source.git.commit", "x" * 40)) == 40
    assert run.data.metrics["n_groups"] == 2 and run.data.metrics["n_failed_checkpoints"] == 3
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}  # the checkpoints that extracted
    assert set(inputs) == {"planted-test_convnext", "null-test_convnext", "nan-weights"}
    assert {t.value for t in inputs["null-test_convnext"].tags} == {"control"}
    kids = children_of(c, run)
    assert set(kids) == {"7x7", "planted-7x7"}
    for group, kid in kids.items():
        assert kid.info.status == "FINISHED" and kid.info.run_name == f"{s['run_id']}/{group}"
        assert {"classified_share", "tau_null", "n_clusters", "final_loss", "control.seed_stability.ari_mean"} \
            <= set(kid.data.metrics)
        assert abs(kid.data.metrics["classified_share"] - s["shapes"][group]["classified_share"]) < 1e-9
        losses = c.get_metric_history(kid.info.run_id, "loss")
        assert len(losses) == 15 and losses[-1].value < losses[0].value
        assert any(m.startswith("system/cpu") for m in kid.data.metrics)  # system metrics while training
        figs = {a.path for a in c.list_artifacts(kid.info.run_id, "figures")}
        assert f"figures/gallery-{group}.png" in figs
        models = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id],
                                             filter_string=f"source_run_id = '{kid.info.run_id}'", output_format="list")
        assert [m.name for m in models] == ["autoencoder"]
    assert kids["planted-7x7"].data.metrics["planted_ari"] == s["shapes"]["planted-7x7"]["planted"][
        "planted-test_convnext"]["ari"]
    arts = {a.path for a in c.list_artifacts(run.info.run_id, "tables")}
    assert {"tables/checkpoints.json", "tables/layers.json", "tables/clusters.json"} <= arts
    figs = {a.path for a in c.list_artifacts(run.info.run_id, "figures")}
    assert "figures/gallery-7x7.png" in figs and "figures/tau-curve-7x7.png" in figs


def test_second_run_skips_extraction_and_gives_the_same_numbers(first_run, caplog):
    cfg, s1 = first_run
    with caplog.at_level("INFO", logger="dwk.pipeline"):
        s2 = pipeline.run(cfg, track=False)
    assert "planted-test_convnext: already extracted" in caplog.text
    assert "null-test_convnext: already extracted" in caplog.text
    assert s2["run_id"] != s1["run_id"]
    for a, b in zip(s1["checkpoints"], s2["checkpoints"]):
        assert a == b | {"extraction": a["extraction"]}
    assert s1["shapes"]["7x7"]["tau_null"] == s2["shapes"]["7x7"]["tau_null"]


def test_changed_file_is_re_extracted(tmp_path, mlflow_uri):
    torch.manual_seed(0)
    m = timm.create_model("test_convnext", pretrained=False)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path))
    spec = tiny_config(tmp_path, checkpoints=[dict(id="f", arch="test_convnext", file=path)]).checkpoints[0]
    r1 = pipeline.extract_checkpoint(spec, tmp_path / "s.zarr", tmp_path, 64)
    assert r1["status"] == "extracted"
    assert pipeline.extract_checkpoint(spec, tmp_path / "s.zarr", tmp_path, 64)["status"] == "skipped"
    with torch.no_grad():
        m.stages[0].blocks[0].conv_dw.weight.mul_(2)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path))
    r3 = pipeline.extract_checkpoint(spec, tmp_path / "s.zarr", tmp_path, 64)
    assert r3["status"] == "extracted" and r3["fingerprint"] != r1["fingerprint"]
    from dwk.store import KernelStore

    k = KernelStore(tmp_path / "s.zarr").kernels("f", "7x7")[:24]
    np.testing.assert_array_equal(k, m.stages[0].blocks[0].conv_dw.weight.detach().numpy()[:, 0])


def test_controls_reported_and_tracked(first_run):
    import mlflow

    cfg, s = first_run
    controls = {(c["shape"], c["control"].split(" (")[0], c["metric"]): c["value"] for c in s["controls"]}
    assert controls[("all", "null checkpoint null-test_convnext", "classified_share@tau_null")] <= 0.03
    for key in (("7x7", "seed stability", "ari_mean"), ("7x7", "k-means", "ari_vs_clusters"),
                ("7x7", "master-key fit", "residual_median"),
                ("planted-7x7", "planted planted-test_convnext", "named_right_share"),
                ("7x7", "isotropic noise", "classified_share@tau_null")):
        assert key in controls, key
    assert abs(controls[("7x7", "isotropic noise", "classified_share@tau_null")] - 0.01) < 0.005
    assert "seed stability" in (cfg.out / s["run_id"] / "controls.txt").read_text()
    sel = s["shapes"]["7x7"]["selection"]
    assert sel["chosen_by"] == "seed stability" and sel["merge_cos"] in cfg.cluster.merge_grid
    named = [c for c in s["shapes"]["planted-7x7"]["clusters"] if not c["name"].startswith("unnamed")]
    assert named and all(c["dog_fit"]["cos"] > 0.8 for c in named)
    run = mlflow.tracking.MlflowClient().get_run(s["mlflow_run_id"])
    assert "control.seed_stability.ari_mean" in children_of(mlflow.tracking.MlflowClient(), run)["7x7"].data.metrics
    arts = {a.path for a in mlflow.tracking.MlflowClient().list_artifacts(run.info.run_id, "tables")}
    assert "tables/controls.json" in arts


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_export_per_kernel_rows(first_run, fmt, tmp_path):
    import pandas as pd

    from dwk.cli import main

    cfg, s = first_run
    out = tmp_path / f"k.{fmt}"
    assert main(["export", str(cfg.out / s["run_id"]), "--format", fmt, "--output", str(out)]) == 0
    df = pd.read_parquet(out) if fmt == "parquet" else pd.read_csv(out)
    assert {"checkpoint", "layer", "module", "channel", "shape", "cluster", "cluster_name", "cosine", "classified",
            "dead"} <= set(df.columns)
    rows = {r["id"]: r for r in s["checkpoints"]}
    assert len(df) == sum(r["n_kernels"] for r in rows.values())
    for ckpt, d in df.groupby("checkpoint"):
        ok = d["status"] == "ok"
        assert abs(d.loc[ok, "classified"].mean() - rows[ckpt]["classified_share"]) < 1e-3
    nan = df[df["checkpoint"] == "nan-weights"]
    assert (nan["status"] == "non-finite").sum() == 5 and not nan.loc[nan["status"] != "ok", "classified"].any()

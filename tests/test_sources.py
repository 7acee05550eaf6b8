import pickle

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from dwk.config import CheckpointSpec
from dwk.extract import extract_model
from dwk.sources import CheckpointError, fingerprint, is_control, kind_of, load


def _weights(arch="test_convnext", seed=1):
    torch.manual_seed(seed)
    return timm.create_model(arch, pretrained=False).state_dict()


def test_safetensors_file_loads_exact_weights(tmp_path):
    sd = _weights()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    spec = CheckpointSpec(id="a", arch="test_convnext", file=tmp_path / "w.safetensors")
    model = load(spec, tmp_path).model
    dw = [k for k in sd if k.endswith("conv_dw.weight")]
    assert dw and all(torch.equal(model.state_dict()[k], sd[k]) for k in dw)
    assert fingerprint(spec, tmp_path) == fingerprint(spec, tmp_path)


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model_ema", "module"])
def test_pth_wrappers_load_with_weights_only(tmp_path, wrap):
    sd = _weights()
    obj = {"plain": sd, "state_dict": {"state_dict": sd, "epoch": 3}, "model_ema": {"model_ema": sd},
           "module": {f"module.{k}": v for k, v in sd.items()}}[wrap]
    torch.save(obj, tmp_path / "w.pth")
    model = load(CheckpointSpec(id="a", arch="test_convnext", file=tmp_path / "w.pth"), tmp_path).model
    k = "stages.0.blocks.0.conv_dw.weight"
    assert torch.equal(model.state_dict()[k], sd[k])


class _Evil:
    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(_Evil.marker),))


def test_pickle_that_runs_code_is_refused(tmp_path):
    _Evil.marker = str(tmp_path / "pwned")
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"state_dict": _Evil()}, f)
    with pytest.raises(CheckpointError, match="weights_only"):
        load(CheckpointSpec(id="evil", arch="test_convnext", file=tmp_path / "evil.pth"), tmp_path)
    assert not (tmp_path / "pwned").exists()


def test_corrupt_mismatching_missing_and_unknown(tmp_path):
    good = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in _weights().items()}, str(good))
    (tmp_path / "trunc.safetensors").write_bytes(good.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="'t'.*cannot read trunc.safetensors"):
        load(CheckpointSpec(id="t", arch="test_convnext", file=tmp_path / "trunc.safetensors"), tmp_path)
    with pytest.raises(CheckpointError, match="does not match architecture 'test_efficientnet'"):
        load(CheckpointSpec(id="m", arch="test_efficientnet", file=good), tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        fingerprint(CheckpointSpec(id="x", arch="test_convnext", file=tmp_path / "nope.pth"), tmp_path)
    with pytest.raises(CheckpointError, match="timm has no model 'convnxt_atto'"):
        load(CheckpointSpec(id="u", arch="convnxt_atto", pretrained=False), tmp_path)


def test_random_init_is_seeded():
    a = load(CheckpointSpec(id="a", arch="test_convnext", pretrained=False, seed=5), None).model
    b = load(CheckpointSpec(id="b", arch="test_convnext", pretrained=False, seed=5), None).model
    c = load(CheckpointSpec(id="c", arch="test_convnext", pretrained=False, seed=6), None).model
    ka, kb, kc = (extract_model(m).kernels["7x7"] for m in (a, b, c))
    assert np.array_equal(ka, kb) and not np.array_equal(ka, kc)


def test_planted_checkpoint_is_a_real_file_with_labels(tmp_path):
    spec = CheckpointSpec(id="p", arch="test_convnext", planted={"seed": 2})
    loaded = load(spec, tmp_path)
    assert loaded.path.suffix == ".safetensors" and loaded.path.exists()
    assert loaded.labels and set(loaded.labels) == {n for n, m in loaded.model.named_modules() if n.endswith("conv_dw")}
    fp = fingerprint(spec, tmp_path)
    assert fingerprint(spec, tmp_path) == fp  # deterministic: not rewritten


def test_hub_offline_fails_clearly(monkeypatch):
    """The download path runs up to the Hub call; offline it says what to do."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="Hub is unreachable.*local file"):
        load(CheckpointSpec(id="test_convnext.r160_in1k"), None)


@pytest.mark.network
def test_hub_download(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    model = load(CheckpointSpec(id="test_convnext.r160_in1k"), None).model
    assert extract_model(model).n_kernels > 0


def test_bare_planted_population(tmp_path):
    from dwk.pipeline import extract_checkpoint
    from dwk.store import KernelStore

    spec = CheckpointSpec(id="pop", planted={"shape": [5, 5], "n": 300, "noise_share": 0.2, "seed": 4})
    assert kind_of(spec) == "planted" and not is_control(spec)
    rec = extract_checkpoint(spec, tmp_path / "s.zarr", tmp_path, 128)
    assert rec["status"] == "extracted" and rec["shapes"] == {"5x5": 300}
    labels = KernelStore(tmp_path / "s.zarr").kernel_index("pop", "5x5")["label"]
    assert ((labels == -1).mean() > 0.1) and set(np.unique(labels)) <= set(range(-1, 14))
    assert extract_checkpoint(spec, tmp_path / "s.zarr", tmp_path, 128)["status"] == "skipped"
    with pytest.raises(ValueError, match="needs 'arch'"):
        CheckpointSpec(id="p", planted={"seed": 0})  # no shape: a model to plant into is needed


def test_seeded_models_are_the_same_when_built_in_threads(tmp_path):
    """Prefect extracts checkpoints in threads; torch's global RNG must not leak between them."""
    from concurrent.futures import ThreadPoolExecutor

    specs = [CheckpointSpec(id=f"r{i}", arch=a, pretrained=False, seed=i)
             for i, a in enumerate(["test_convnext", "test_efficientnet"] * 3)]
    # Checkpoints read from files build a randomly initialised model too, before their weights are
    # loaded: that construction must not draw from the stream of a seeded one in another thread.
    save_file({k: v.contiguous() for k, v in _weights("mobilenetv3_small_050").items()}, str(tmp_path / "m.safetensors"))
    files = [CheckpointSpec(id=f"f{i}", arch="mobilenetv3_small_050", file=tmp_path / "m.safetensors") for i in range(6)]

    def weights(spec):
        sd = load(spec, tmp_path).model.state_dict()
        return {k: v.clone() for k, v in sd.items() if v.is_floating_point()}

    serial = [weights(s) for s in specs]
    for _ in range(3):
        with ThreadPoolExecutor(6) as pool:
            threaded = list(pool.map(weights, [s for pair in zip(specs, files) for s in pair]))[::2]
        for a, b in zip(serial, threaded):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

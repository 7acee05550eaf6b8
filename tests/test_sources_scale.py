"""Sources at scale: timm pattern expansion and metadata, Hub downloads (up to the network call),
local files of every kind, weights-only mode, and checkpoint integrity."""
import fnmatch
import json
import pickle
import threading
import time

import numpy as np
import pytest
import timm
import torch
import yaml
import zarr
from pydantic import ValidationError
from safetensors.torch import save_file

from dwk import pipeline, timm_registry
from dwk.sources import hub
from dwk.cli import main
from dwk.config import CheckpointPattern, CheckpointSpec, load_config
from dwk.extract import extract_model
from dwk.sources import CheckpointError, fingerprint, is_control, kind_of, load, sha256_file
from dwk.store import KernelStore, checkpoint_key


def _model(arch="test_convnext", seed=1):
    torch.manual_seed(seed)
    return timm.create_model(arch, pretrained=False)


def _save(sd, path):
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def _dw(model):
    return {n: m.weight.detach().numpy()[:, 0] for n, m in model.named_modules()
            if isinstance(m, torch.nn.Conv2d) and m.groups == m.in_channels > 1 and m.kernel_size != (1, 1)}


def _same_kernels(ex, model):
    """The extracted kernels are exactly the model's depthwise weights, layer by layer."""
    dw = _dw(model)
    assert [l.module for l in ex.layers] == list(dw) and ex.n_kernels == sum(len(w) for w in dw.values())
    for layer in ex.layers:
        sel = ex.layer[layer.shape] == layer.layer_index
        np.testing.assert_array_equal(ex.kernels[layer.shape][sel], dw[layer.module])


def _record(store, ckpt_id):
    return dict(zarr.open_group(str(store), mode="r")["checkpoints"][checkpoint_key(ckpt_id)].attrs["dwk"])


# ----------------------------------------------------------------------------- patterns and metadata
def test_pattern_expands_to_timm_pretrained_checkpoints():
    every = timm.list_models(pretrained=True)
    names = timm_registry.expand(CheckpointPattern(pattern="convnextv2_*.fcmae_ft_*"))
    assert names == sorted(fnmatch.filter(every, "convnextv2_*.fcmae_ft_*"), key=timm.models._registry._natural_key)
    assert len(names) >= 10 and all(n.startswith("convnextv2_") and ".fcmae_ft_" in n for n in names)
    # a filter without a tag selects every tag of the architecture
    assert timm_registry.expand(CheckpointPattern(pattern="convnext_atto")) == timm.list_models("convnext_atto.*", pretrained=True)
    # a family by timm module, with exclusions
    fam = timm_registry.expand(CheckpointPattern(module="convnext", exclude=["*clip*"]))
    archs = set(timm.list_models(module="convnext"))
    assert "convnext_atto.d2_in1k" in fam and "convnextv2_atto.fcmae_ft_in1k" in fam
    assert all(n.split(".")[0] in archs and "clip" not in n for n in fam)
    with pytest.raises(ValueError, match="matches no pretrained timm checkpoint"):
        timm_registry.expand(CheckpointPattern(pattern="nothing_like_this_*"))
    with pytest.raises(ValueError, match="more than max_checkpoints=3"):
        timm_registry.expand(CheckpointPattern(pattern="convnext*", max_checkpoints=3))


def test_load_config_expands_patterns_before_flows_see_them(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(dict(checkpoints=[
        {"id": "convnextv2_atto.fcmae_ft_in1k", "reparameterize": True},
        {"pattern": "convnextv2_*.fcmae_ft_in1k", "exclude": ["*huge*"]},
        {"pattern": ["convnextv2_a*", "convnextv2_f*"], "reparameterize": False},  # overlaps: no duplicates
        {"id": "null", "arch": "test_convnext", "pretrained": False},
        {"id": "local", "arch": "test_convnext", "file": "w/x.safetensors"},
    ])))
    cfg = load_config(p)
    ids = [c.id for c in cfg.checkpoints]
    assert len(ids) == len(set(ids))
    expected = [n for n in timm.list_models("convnextv2_*.fcmae_ft_in1k", pretrained=True) if "huge" not in n]
    assert set(expected) <= set(ids) and "convnextv2_huge.fcmae_ft_in1k" not in ids
    assert ids[0] == "convnextv2_atto.fcmae_ft_in1k" and ids[-2:] == ["null", "local"]
    assert all(isinstance(c, CheckpointSpec) for c in cfg.checkpoints)
    assert {kind_of(c) for c in cfg.checkpoints[:-2]} == {"hub"}
    femto_extra = [c for c in cfg.checkpoints if c.id.startswith("convnextv2_femto.") and c.id not in expected]
    assert femto_extra and not any(c.reparameterize for c in femto_extra)
    assert cfg.checkpoints[-1].file == str((tmp_path / "w/x.safetensors").resolve())
    with pytest.raises(ValidationError, match="pattern entry"):
        CheckpointSpec.model_validate({"pattern": "convnext*"})


def test_paper_preset_expands_to_the_paper_families():
    from pathlib import Path

    cfg = load_config(Path(__file__).parents[1] / "configs" / "paper.yaml")
    hubs = [c.id for c in cfg.checkpoints if kind_of(c) == "hub"]
    assert set(hubs) <= set(timm.list_models(pretrained=True))
    for family in ("convnext_", "convnextv2_", "mobilenetv", "efficientnet"):
        assert any(h.startswith(family) or f"_{family}" in h for h in hubs), family
    assert sum(is_control(c) for c in cfg.checkpoints) >= 2


@pytest.mark.parametrize("tag, pre, ft, res", [
    ("fb_in22k_ft_in1k_384", ["in22k"], ["in1k"], 384),
    ("fcmae_ft_in22k_in1k", [], ["in22k", "in1k"], None),
    ("d2_in1k", ["in1k"], [], None),
    ("clip_laion2b_augreg_ft_in12k_in1k_384", ["laion2b"], ["in12k", "in1k"], 384),
    ("ra4_e3600_r224_in1k", ["in1k"], [], 224),
    ("fcmae", [], [], None),
])
def test_tag_parsing(tag, pre, ft, res):
    t = timm_registry.parse_tag(tag)
    assert (t["pretrain_data"], t["finetune_data"], t["resolution"]) == (pre, ft, res)


def test_checkpoint_info_from_the_pretrained_config():
    info = timm_registry.checkpoint_info("convnext_base.fb_in22k_ft_in1k_384")
    assert info["architecture"] == "convnext_base" and info["tag"] == "fb_in22k_ft_in1k_384"
    assert info["data"] == "in22k>in1k" and info["resolution"] == 384 and info["license"] == "apache-2.0"
    assert info["num_classes"] == 1000 and info["hf_hub_id"] == "timm/convnext_base.fb_in22k_ft_in1k_384"
    assert timm_registry.checkpoint_info("convnextv2_atto.fcmae_ft_in1k")["resolution"] == 224  # from input_size
    json.dumps(info)  # store-ready
    with pytest.raises(CheckpointError, match="no pretrained tag 'convnext_atto.nope'"):
        timm_registry.pretrained_cfg("convnext_atto.nope")


def test_cli_sources_previews_a_pattern(capsys):
    assert main(["sources", "convnextv2_*.fcmae_ft_in22k_in1k*"]) == 0
    out = capsys.readouterr().out
    n = len(timm.list_models("convnextv2_*.fcmae_ft_in22k_in1k*", pretrained=True))
    assert f"{n} checkpoints of" in out and "in22k>in1k" in out and "384" in out and "cc-by-nc-4.0" in out
    assert main(["sources", "convnext_atto*", "--yaml"]) == 0
    assert "  - id: convnext_atto.d2_in1k" in capsys.readouterr().out
    assert main(["sources", "nothing_like_this_*"]) == 2


# ----------------------------------------------------------------------------- Hub downloads
NAME = "test_convnext.r160_in1k"


def _fake_cache(root, sd, commit="a" * 40):
    """The Hub client's cache layout for timm/test_convnext.r160_in1k, holding ``sd``."""
    repo = root / "models--timm--test_convnext.r160_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    return _save(sd, snap / "model.safetensors")


def test_offline_uses_the_hub_cache_only(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    calls = []
    real = hub._hf_hub_download
    monkeypatch.setattr(hub, "_hf_hub_download", lambda **kw: calls.append(kw) or real(**kw))
    spec = CheckpointSpec(id=NAME)
    # not cached: a clear error per checkpoint, at once, without touching the network
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match=rf"'{NAME}'.*not in the Hub cache.*HF_HUB_OFFLINE.*local file"):
        load(spec, None)
    assert time.perf_counter() - t0 < 5 and calls and all(c["local_files_only"] for c in calls)
    assert [c["filename"] for c in calls] == list(hub.HUB_FILES)
    # cached: loaded from the cache through the real Hub client
    model = _model("test_convnext", seed=3)
    path = _fake_cache(tmp_path / "hub", model.state_dict())
    loaded = load(spec, None)
    _same_kernels(extract_model(loaded.model), model)
    assert loaded.meta["hub"]["revision"] == "a" * 40 and loaded.meta["sha256"] == sha256_file(path)
    assert loaded.meta["timm"]["resolution"] == 160 and loaded.meta["timm"]["data"] == "in1k"
    # and the store's per-checkpoint record carries the metadata
    res = pipeline.extract_checkpoint(spec, tmp_path / "s.zarr", tmp_path, 64)
    rec = _record(tmp_path / "s.zarr", NAME)
    assert res["source"] == rec["source"] == "hub" and rec["sha256"] == sha256_file(path)
    assert rec["timm"]["tag"] == "r160_in1k" and rec["timm"]["license"] == "apache-2.0"
    assert rec["hub"]["repo_id"] == "timm/test_convnext.r160_in1k"


def test_one_retry_layer_with_backoff_then_the_breaker(tmp_path, monkeypatch):
    """A download makes one attempt; ``dwk.retry.call`` (Prefect's task retries under Prefect) retries
    transient failures with exponential backoff; after 3 transient failures in a row the breaker
    makes later downloads fail at once, saying why; a success closes it."""
    from dwk import retry
    from dwk.errors import TransientError

    weights = _save(_model().state_dict(), tmp_path / "w.safetensors")
    monkeypatch.setattr(hub, "is_offline", lambda: False)
    hub._breaker.reset()
    delays, calls = [], []

    def flaky(**kw):
        calls.append(kw)
        if len(calls) < 3:
            raise ConnectionError("connection reset")
        return str(weights)

    monkeypatch.setattr(hub, "_hf_hub_download", flaky)
    with pytest.raises(TransientError, match=rf"'{NAME}'.*did not answer.*ConnectionError.*local file"):
        hub.download(NAME)  # one attempt, no loop of its own
    assert len(calls) == 1
    f = retry.call(hub.download, NAME, retries=3, backoff_s=1.0, sleep=delays.append)
    assert f.path == weights and len(calls) == 3 and len(delays) == 1
    assert 0.5 <= delays[0] <= 1.5  # jittered around the first backoff
    assert retry.delays(3, 2.0) == [2.0, 4.0, 8.0]
    # each retry asks the client for the same file again (it resumes from its .incomplete blob)
    assert all(c == calls[0] for c in calls) and not any(c.get("force_download") for c in calls)

    # still unreachable: three failures in a row open the breaker ...
    calls.clear()
    monkeypatch.setattr(hub, "_hf_hub_download", lambda **kw: calls.append(kw) or (_ for _ in ()).throw(TimeoutError("timed out")))
    with pytest.raises(TransientError, match="timed out"):
        retry.call(hub.download, NAME, retries=2, backoff_s=0.0, sleep=delays.append)
    assert len(calls) == 3
    # ... so the next checkpoints fail at once without a network call, and that is final (not retried)
    calls.clear()
    with pytest.raises(CheckpointError, match="not tried: downloads .* failed 3 times in a row") as err:
        retry.call(hub.download, NAME, "another", retries=2, backoff_s=0.0, sleep=delays.append)
    assert not isinstance(err.value, TransientError) and calls == []
    hub._breaker.reset()
    monkeypatch.setattr(hub, "_hf_hub_download", lambda **kw: str(weights))
    assert hub.download(NAME).path == weights


def test_prefect_retries_transient_download_errors():
    from prefect.states import Failed

    from dwk.errors import NoDepthwiseError, TransientError
    from tasks.extract import _retry_unless_bad_input, extract_checkpoint_task

    retry = lambda exc: _retry_unless_bad_input(None, None, Failed(data=exc))  # noqa: E731
    assert retry(TransientError("c", "no answer"))  # a CheckpointError, but one that retrying may fix
    assert not retry(CheckpointError("c", "bad file")) and not retry(NoDepthwiseError("none"))
    assert extract_checkpoint_task.retry_jitter_factor == 0.5


def test_permanent_hub_errors_are_not_retried_and_missing_files_fall_back(tmp_path, monkeypatch):
    import httpx2
    from huggingface_hub import errors as hf

    req = httpx2.Request("GET", "https://huggingface.co/timm/x")
    weights = _save(_model().state_dict(), tmp_path / "w.safetensors")
    monkeypatch.setattr(hub, "is_offline", lambda: False)
    calls = []

    def no_safetensors(**kw):
        calls.append(kw["filename"])
        if kw["filename"] == "model.safetensors":
            raise hf.RemoteEntryNotFoundError("404", response=httpx2.Response(404, request=req))
        return str(weights)

    monkeypatch.setattr(hub, "_hf_hub_download", no_safetensors)
    assert hub.download(NAME).filename == "pytorch_model.bin" and calls == ["model.safetensors", "pytorch_model.bin"]

    def gated(**kw):
        raise hf.GatedRepoError("gated", response=httpx2.Response(401, request=req))

    monkeypatch.setattr(hub, "_hf_hub_download", gated)
    with pytest.raises(CheckpointError, match="refused.*HF_TOKEN"):
        hub.download(NAME)


def test_downloads_are_bounded_in_parallelism(tmp_path, monkeypatch):
    weights = _save(_model().state_dict(), tmp_path / "w.safetensors")
    monkeypatch.setattr(hub, "is_offline", lambda: False)
    running, peak, lock = [0], [0], threading.Lock()

    def slow(**kw):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        return str(weights)

    monkeypatch.setattr(hub, "_hf_hub_download", slow)
    hub.set_max_parallel(2)
    try:
        threads = [threading.Thread(target=hub.download, args=(NAME, f"c{i}")) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        hub.set_max_parallel(2)
    assert peak[0] == 2


# ----------------------------------------------------------------------------- local files
def test_nested_wrappers_and_compile_prefix(tmp_path):
    model = _model()
    sd = {f"module._orig_mod.{k}": v for k, v in model.state_dict().items()}
    torch.save({"model": {"state_dict": sd}, "epoch": 7, "args": {"lr": 0.1}}, tmp_path / "w.pt")
    loaded = load(CheckpointSpec(id="w", arch="test_convnext", file=tmp_path / "w.pt"), tmp_path)
    _same_kernels(extract_model(loaded.model), model)
    assert loaded.meta["wrapper"] == "model.state_dict" and loaded.meta["prefix"] == "module._orig_mod."


def _to_facebook_layout(sd):
    """timm ConvNeXt keys -> the original facebookresearch/ConvNeXt release layout."""
    import re

    out = {}
    for k, v in sd.items():
        k = k.replace("stem.", "downsample_layers.0.")
        k = re.sub(r"stages\.(\d+)\.downsample\.(\d+)", r"downsample_layers.\1.\2", k)
        k = re.sub(r"stages\.(\d+)\.blocks\.(\d+)", r"stages.\1.\2", k)
        k = k.replace("conv_dw", "dwconv").replace("mlp.fc", "pwconv")
        k = k.replace("head.norm.", "norm.").replace("head.fc.", "head.")
        out[k] = v
    return out


def test_original_convnext_checkpoint_through_timm_key_remapping(tmp_path):
    model = _model("convnext_atto", seed=4)
    fb = _to_facebook_layout(model.state_dict())
    assert "stages.0.0.dwconv.weight" in fb and not any("conv_dw" in k for k in fb)
    torch.save({"model": fb}, tmp_path / "convnext_atto_1k.pth")
    loaded = load(CheckpointSpec(id="fb", arch="convnext_atto", file=tmp_path / "convnext_atto_1k.pth"), tmp_path)
    _same_kernels(extract_model(loaded.model), model)
    assert loaded.meta["remapped"] is True
    # an ImageNet-22k release: another classifier size is dropped, the kernels load exactly
    fb["head.weight"], fb["head.bias"] = torch.randn(21, 320), torch.randn(21)
    torch.save({"model": fb}, tmp_path / "convnext_atto_22k.pth")
    loaded = load(CheckpointSpec(id="fb22k", arch="convnext_atto", file=tmp_path / "convnext_atto_22k.pth"), tmp_path)
    _same_kernels(extract_model(loaded.model), model)
    assert loaded.meta["classifier_dropped"] is True


def test_timm_local_dir_folder(tmp_path):
    from timm.models import save_for_hf

    model = _model("test_efficientnet", seed=5)
    save_for_hf(model, str(tmp_path / "folder"), safe_serialization=True)
    spec = CheckpointSpec(id="folder", file=tmp_path / "folder")
    assert kind_of(spec) == "local-dir"
    loaded = load(spec, tmp_path)
    _same_kernels(extract_model(loaded.model), model)
    fp = fingerprint(spec, tmp_path)
    assert loaded.meta["sha256"] == fp and loaded.meta["timm"]["architecture"] == "test_efficientnet"
    pipeline.extract_checkpoint(spec, tmp_path / "s.zarr", tmp_path, 64)
    rec = _record(tmp_path / "s.zarr", "folder")
    assert rec["source"] == "local-dir" and rec["model"] == "test_efficientnet" and rec["fingerprint"] == fp
    _save(_model("test_efficientnet", seed=6).state_dict(), tmp_path / "folder" / "model.safetensors")
    assert fingerprint(spec, tmp_path) != fp
    with pytest.raises(CheckpointError, match="'folder'.*names architecture 'test_efficientnet'"):
        load(CheckpointSpec(id="folder", arch="test_convnext", file=tmp_path / "folder"), tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="'e'.*no config.json"):
        fingerprint(CheckpointSpec(id="e", file=tmp_path / "empty"), tmp_path)


class _Evil:
    marker = ""

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(_Evil.marker),))


def test_pickle_that_runs_code_is_refused_in_a_local_dir(tmp_path):
    from timm.models import save_for_hf

    save_for_hf(_model(), str(tmp_path / "folder"), safe_serialization=False)  # pytorch_model.bin
    _Evil.marker = str(tmp_path / "pwned")
    with open(tmp_path / "folder" / "pytorch_model.bin", "wb") as f:
        pickle.dump({"state_dict": {"x": _Evil()}}, f)
    with pytest.raises(CheckpointError, match="'evil-dir'.*weights_only"):
        load(CheckpointSpec(id="evil-dir", file=tmp_path / "folder"), tmp_path)
    assert not (tmp_path / "pwned").exists()


# ----------------------------------------------------------------------------- weights-only mode
def test_weights_only_mode_reads_depthwise_tensors_without_a_model(tmp_path, monkeypatch):
    import safetensors

    model = _model("test_convnext", seed=7)
    sd = dict(model.state_dict())
    # shapes that must not count: a 1x1 "depthwise" tensor, a grouped conv, a single-channel kernel
    sd.update({"extra.pw_dw.weight": torch.randn(8, 1, 1, 1), "extra.grouped.weight": torch.randn(8, 2, 3, 3),
               "extra.single.weight": torch.randn(1, 1, 3, 3), "extra.ints": torch.ones(4, 1, 3, 3, dtype=torch.int32)})
    path = _save(sd, tmp_path / "w.safetensors")
    spec = CheckpointSpec(id="w", file=path)
    assert kind_of(spec) == "weights"
    opened = []
    real = safetensors.safe_open

    class Spy:
        def __init__(self, *a, **kw):
            self.f = real(*a, **kw)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *a):
            return self.f.__exit__(*a)

        def get_tensor(self, name):
            opened.append(name)
            return self.f.get_tensor(name)

        def __getattr__(self, item):
            return getattr(self.f, item)

    monkeypatch.setattr(safetensors, "safe_open", Spy)
    loaded = load(spec, tmp_path)
    assert loaded.model is None
    ex = loaded.extracted
    _same_kernels(ex, model)  # natural name order == module order; nothing but the depthwise kernels
    assert sorted(opened) == sorted(f"{m}.weight" for m in _dw(model))  # streamed: only those tensors read
    layer = ex.layers[0]
    assert layer.param == "stages.0.blocks.0.conv_dw.weight" and layer.stride is None and layer.multiplier is None
    assert layer.norm_after is None and loaded.meta["sha256"] == fingerprint(spec, tmp_path) == sha256_file(path)


def test_weights_only_bf16_and_natural_order(tmp_path):
    w = {f"blocks.{i}.dw.weight": torch.randn(3, 1, 5, 5).to(torch.bfloat16) for i in (10, 2, 1)}
    path = _save(w, tmp_path / "bf16.safetensors")
    ex = load(CheckpointSpec(id="bf", file=path), tmp_path).extracted
    assert [l.module for l in ex.layers] == ["blocks.1.dw", "blocks.2.dw", "blocks.10.dw"]
    np.testing.assert_array_equal(ex.kernels["5x5"][6:], w["blocks.10.dw.weight"].float().numpy()[:, 0])


def test_weights_only_checkpoint_goes_into_the_store(tmp_path):
    model = _model("test_efficientnet", seed=8)
    path = _save(model.state_dict(), tmp_path / "e.safetensors")
    res = pipeline.extract_checkpoint(CheckpointSpec(id="e", file=path), tmp_path / "s.zarr", tmp_path, 64)
    assert res["source"] == "weights" and res["n_kernels"] == sum(len(w) for w in _dw(model).values())
    rec = _record(tmp_path / "s.zarr", "e")
    assert rec["complete"] and rec["fingerprint"] == rec["sha256"] == sha256_file(path) and rec["model"] is None
    np.testing.assert_array_equal(KernelStore(tmp_path / "s.zarr").kernels("e", "3x3")[:],
                                  np.concatenate(list(_dw(model).values())))


# ----------------------------------------------------------------------------- integrity
def test_bad_files_fail_alone_and_clearly(tmp_path):
    good = _save(_model().state_dict(), tmp_path / "good.safetensors")
    (tmp_path / "trunc.safetensors").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (tmp_path / "notes.pth").write_text("these are my notes, not a checkpoint\n")
    torch.save({"epoch": 3, "best": 0.8}, tmp_path / "meta.pth")
    specs = [
        CheckpointSpec(id="good", arch="test_convnext", file=good),
        CheckpointSpec(id="good-weights", file=good),
        CheckpointSpec(id="trunc-weights", file=tmp_path / "trunc.safetensors"),
        CheckpointSpec(id="trunc-model", arch="test_convnext", file=tmp_path / "trunc.safetensors"),
        CheckpointSpec(id="mismatch", arch="test_efficientnet", file=good),
        CheckpointSpec(id="notes", arch="test_convnext", file=tmp_path / "notes.pth"),
        CheckpointSpec(id="no-tensors", arch="test_convnext", file=tmp_path / "meta.pth"),
        CheckpointSpec(id="test_convnext.r160_in1k"),  # offline (conftest) and not cached
    ]
    done, failed = [], {}
    for spec in specs:  # what pipeline.run and the extract flow do
        try:
            done.append(pipeline.extract_checkpoint(spec, tmp_path / "s.zarr", tmp_path / "data", 64)["id"])
        except CheckpointError as e:
            assert e.ckpt_id == spec.id and repr(spec.id) in str(e)
            failed[spec.id] = e.reason
    assert done == ["good", "good-weights"]
    assert "cannot read trunc.safetensors" in failed["trunc-weights"]
    assert "cannot read trunc.safetensors" in failed["trunc-model"]
    assert "does not match architecture 'test_efficientnet'" in failed["mismatch"]
    assert "cannot read notes.pth" in failed["notes"]
    assert "no state dict of tensors" in failed["no-tensors"]
    assert "not in the Hub cache" in failed["test_convnext.r160_in1k"]
    # content hash per checkpoint in the store
    assert _record(tmp_path / "s.zarr", "good")["sha256"] == sha256_file(good)

import json
import subprocess
import sys

import pytest
import yaml
from pydantic import ValidationError

from dwk.cli import main
from dwk.config import CheckpointSpec, RunConfig, load_config
from dwk.sources import is_control, kind_of


def test_embedded_default_leads_with_real_kernels_and_keeps_the_method_checks():
    cfg = load_config()
    kinds = [kind_of(c) for c in cfg.checkpoints]
    # Real trained checkpoints first: files inside the registry's weight packages.
    real = [c for c, k in zip(cfg.checkpoints, kinds) if k not in ("planted", "random")]
    assert [kinds[i] for i in range(len(real))] == ["weights", "torchvision"]
    assert all(c.file.startswith("pkg://") for c in real)
    # A random-init control of each real architecture.
    controls = {c.arch for c in cfg.checkpoints if is_control(c)}
    assert controls == {"efficientnet_lite0", "torchvision:mobilenet_v2"}
    # One planted population per kernel shape the run sees, the standard population of METHOD 2.7.
    populations = [c.planted for c in cfg.checkpoints if kind_of(c) == "planted" and not c.arch]
    assert {p.shape for p in populations} == {(7, 7), (5, 5), (3, 3)} and all(p.n == 20000 for p in populations)


def test_sources_and_validation(tmp_path):
    assert kind_of(CheckpointSpec(id="convnextv2_atto.fcmae_ft_in1k")) == "hub"
    assert kind_of(CheckpointSpec(id="a", arch="convnext_atto", file="w.pth")) == "file"
    assert is_control(CheckpointSpec(id="a", arch="convnext_atto", pretrained=False))
    # Which source reads an entry follows from its fields, never from the filesystem.
    assert kind_of(CheckpointSpec(id="a", file="w.pth")) == "weights"
    assert kind_of(CheckpointSpec(id="a", file="pkg://pkg/w.pth")) == "weights"
    assert kind_of(CheckpointSpec(id="a", file="exports/model")) == "local-dir"
    assert kind_of(CheckpointSpec(id="a", arch="torchvision:mobilenet_v2", file="w.pth")) == "torchvision"
    assert kind_of(CheckpointSpec(id="a", arch="torchvision:mobilenet_v2", pretrained=False)) == "random"
    assert CheckpointSpec(id="a", file="pkg://pkg/w.pth").file == "pkg://pkg/w.pth"
    with pytest.raises(ValidationError, match="needs 'arch'"):
        CheckpointSpec(id="a", pretrained=False)
    with pytest.raises(ValidationError, match="needs 'arch'"):
        CheckpointSpec(id="a", planted={"seed": 1})
    with pytest.raises(ValidationError, match="Extra inputs"):
        RunConfig.model_validate(dict(checkpoints=[dict(id="a")], autoencodr={}))
    with pytest.raises(ValidationError, match="repeated"):
        RunConfig.model_validate(dict(checkpoints=[dict(id="a"), dict(id="a")]))
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(dict(checkpoints=[dict(id="x", arch="convnext_atto", file="w/x.safetensors")])))
    assert load_config(p).checkpoints[0].file == str((tmp_path / "w/x.safetensors").resolve())


def test_flat_params_name_checkpoints_without_a_column_each():
    params = load_config().flat_params()
    assert params["checkpoints.n"] == 7 and params["checkpoints.ids"].split(",")[:2] == [
        "efficientnet_lite0.in1k", "mobilenet_v2.in1k"]
    assert not any(k.startswith("checkpoints.") and k not in ("checkpoints.n", "checkpoints.ids") for k in params)
    assert params["autoencoder.latent_dim"] == 1 and params["cluster.tau"] == 0.7


def test_cli_errors_are_clear(tmp_path, capsys):
    assert main(["run", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "embedded demo" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("checkpoints: [{id: a, pretrained: false}]\n")
    assert main(["run", "--config", str(bad)]) == 2
    assert "needs 'arch'" in capsys.readouterr().err
    assert main(["show", str(tmp_path)]) == 2


def test_cli_show_prints_a_run(tmp_path, capsys):
    summary = dict(run_id="r", mlflow_run_id=None, store="/s", out=str(tmp_path), config={}, failed=[],
                   checkpoints=[dict(id="c1", source="planted", control=False, n_kernels=10, n_dead=1,
                                     classified_share=0.9, classified_share_tau=0.8, top_clusters=["dog-on 50%"])],
                   shapes={"7x7": dict(n_kernels=10, clusters=[dict(name="dog-on")], tau_null=0.44,
                                       classified_share=0.9)})
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    assert main(["show", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "c1" in out and "90.0%" in out and "dog-on 50%" in out


def test_library_imports_without_prefect():
    code = ("import sys, dwk, dwk.pipeline, dwk.analysis, dwk.sources, dwk.store, dwk.normalize, dwk.report, "
            "dwk.tracking, dwk.cli; assert 'prefect' not in sys.modules, 'dwk imported prefect'")
    subprocess.run([sys.executable, "-c", code], check=True)

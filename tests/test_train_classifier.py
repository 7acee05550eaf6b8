"""The initialisation experiment (issue 13): generated data, the training flow, MLflow, the analysis after it."""
from __future__ import annotations

import json
import secrets
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dwk import classifier
from dwk.classifier import ExperimentConfig, load_experiment
from dwk.datasets import CLASSES, make_dataset
from dwk.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 2
# The analysis at its smallest: a few hundred 7x7 kernels per checkpoint.
TINY_ANALYSIS = dict(chunk_kernels=256, normalize=dict(chunk_kernels=256), autoencoder=dict(epochs=5, batch_size=256),
                     cluster=dict(n_init_clusters=12, n_null=500, seeds=2),
                     controls=dict(kmeans=False, master_key=False, fit_dog=False, regular=False), dask=dict(n_workers=1))


def tiny_experiment(tmp_path: Path, **overrides) -> ExperimentConfig:
    base = dict(
        name="tiny", experiment=f"test-init-{secrets.token_hex(3)}", model="test_convnext", out=tmp_path / "out",
        data=dict(root=tmp_path / "data", generate=dict(per_class=20, val_per_class=5, size=32)),
        schemes=["default", "dog"], seeds=[0], train=dict(epochs=EPOCHS, batch_size=50, lr=2e-3), cpu_threads=1,
        analysis=TINY_ANALYSIS)
    base.update(overrides)
    return ExperimentConfig.model_validate(base)


def bank_named_share(weight: torch.Tensor, cos: float = 0.95) -> float:
    from dwk.dog import reference_bank

    x = weight.detach().double().flatten(1).numpy()
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return float(((x @ reference_bank(tuple(weight.shape[-2:]))[1].T).max(1) >= cos).mean())


# ----------------------------------------------------------------------------- the generated data set
def test_make_dataset_cli_writes_a_seeded_imagefolder(tmp_path):
    from torchvision.datasets import ImageFolder

    from dwk.cli import main

    out = tmp_path / "ds"
    assert main(["make-dataset", str(out), "--per-class", "3", "--val-per-class", "2", "--size", "24"]) == 0
    train, val = ImageFolder(str(out / "train")), ImageFolder(str(out / "val"))
    assert train.classes == val.classes == sorted(CLASSES)
    assert len(train) == 30 and len(val) == 20
    img = Image.open(train.samples[0][0])
    assert img.size == (24, 24) and img.mode == "RGB"
    # seeded: the same parameters give the same images, another seed other ones
    again, other = tmp_path / "again", tmp_path / "other"
    make_dataset(again, per_class=3, val_per_class=2, size=24)
    make_dataset(other, per_class=3, val_per_class=2, size=24, seed=1)
    first = (out / "train" / "ring" / "00000.png").read_bytes()
    assert (again / "train" / "ring" / "00000.png").read_bytes() == first
    assert (other / "train" / "ring" / "00000.png").read_bytes() != first
    # the same call again writes nothing; a folder holding something else is refused (exit status 2)
    stamp = (out / "train" / "ring" / "00000.png").stat().st_mtime_ns
    make_dataset(out, per_class=3, val_per_class=2, size=24)
    assert (out / "train" / "ring" / "00000.png").stat().st_mtime_ns == stamp
    assert main(["make-dataset", str(out), "--per-class", "4"]) == 2
    assert main(["make-dataset", str(out), "--classes", "11"]) == 2


def test_generated_classes_differ_in_structure_not_colour(tmp_path):
    """A grating's orientation is its class: the image gradient's dominant direction tells them apart."""
    out = make_dataset(tmp_path / "ds", per_class=8, val_per_class=1, size=32)

    def orientation(path: Path) -> float:
        from scipy.ndimage import gaussian_filter

        g = gaussian_filter(np.asarray(Image.open(path), np.float64), (0.7, 0.7, 0))  # less pixel noise
        gy, gx = np.gradient(g, axis=(0, 1))
        # structure tensor over the colour channels: the dominant gradient direction, doubled to fold
        # opposite signs together (grey levels would lose stripes of two colours of equal luminance)
        return np.rad2deg(np.arctan2(2 * (gx * gy).sum(), ((gx**2) - (gy**2)).sum()) / 2) % 180

    for name, grad_dir in (("grating-000", 90), ("grating-090", 0), ("grating-045", 135), ("grating-135", 45)):
        for f in sorted((out / "train" / name).glob("*.png")):
            d = abs(orientation(f) - grad_dir) % 180
            assert min(d, 180 - d) < 20, (name, f.name, orientation(f))


# ----------------------------------------------------------------------------- config
def test_experiment_configs_in_the_repository_are_valid():
    full = load_experiment(ROOT / "configs" / "init-experiment.yaml")
    assert full.model == "convnext_tiny" and set(full.schemes) == {"default", "dog", "covariance"}
    assert full.data.image_size == 224 and full.train.amp
    tiny = load_experiment(ROOT / "configs" / "init-experiment-tiny.yaml")
    assert tiny.data.generate is not None and "dog" in tiny.schemes


@pytest.mark.parametrize("bad, match", [
    (dict(schemes=["covariance"]), "needs a 'covariance' section"),
    (dict(analysis=dict(checkpoints=[])), "set by the experiment"),
    (dict(analysis=dict(autoencoder=dict(epochs=0))), "autoencoder.epochs"),
    (dict(dog=dict(gamma=0.9)), "gamma"),
    (dict(schemes=["default", "default"]), "repeat"),
    (dict(epochs=3), "epochs"),  # a typo for train.epochs: unknown keys are errors
])
def test_experiment_config_errors_say_what_is_wrong(tmp_path, bad, match):
    import yaml

    raw = dict(data=dict(root=str(tmp_path)), **bad)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=match):
        load_experiment(path)


def test_missing_data_folder_is_a_user_error(tmp_path):
    from dwk.errors import MissingInputError

    cfg = ExperimentConfig.model_validate(dict(data=dict(root=tmp_path / "nothing")))
    with pytest.raises(MissingInputError, match="dwk make-dataset"):
        classifier.load_datasets(cfg.data)


def test_covariance_scheme_draws_from_a_stored_checkpoint(tmp_path):
    """The scheme extracts its source checkpoint into the store (once) and keeps the default scale."""
    from dwk.init import depthwise_layers

    cfg = tiny_experiment(tmp_path, schemes=["covariance"], covariance=dict(
        store=tmp_path / "store.zarr", checkpoint=dict(id="planted-src", arch="test_convnext", planted=dict(seed=0))))
    default, model = classifier.build_classifier(cfg, 10, 0), classifier.build_classifier(cfg, 10, 0)
    n = classifier.apply_scheme(model, cfg, "covariance", 0)
    assert n == sum(c.weight.shape[0] for _, c in depthwise_layers(model))
    from dwk.store import KernelStore

    assert KernelStore(tmp_path / "store.zarr", create=False).checkpoint("planted-src").complete
    for (path, conv), (_, ref) in zip(depthwise_layers(model), depthwise_layers(default)):
        assert not torch.equal(conv.weight, ref.weight)
        ratio = float(conv.weight.detach().pow(2).mean() / ref.weight.detach().pow(2).mean())
        assert 0.6 < ratio < 1.6, path


# ----------------------------------------------------------------------------- end to end
def test_flow_end_to_end_default_and_dog(tmp_path, prefect_server, mlflow_uri):
    """The flow on the generated set: MLflow shows a parent, one child per scheme with per-epoch
    metrics and the classified share; the checkpoints load; dwk analysed the trained checkpoints."""
    import timm
    from mlflow.tracking import MlflowClient
    from safetensors.torch import load_file

    from flows.train_classifier import train_classifier_flow

    cfg = tiny_experiment(tmp_path)
    result = train_classifier_flow(experiment=cfg, track=True)

    c = MlflowClient(mlflow_uri)
    exp = c.get_experiment_by_name(cfg.experiment)
    parent = c.get_run(result["parent_run_id"])
    assert parent.info.status == "FINISHED" and "mlflow.parentRunId" not in parent.data.tags
    children = c.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    schemes = {r.data.tags["dwk.scheme"]: r for r in children if "dwk.scheme" in r.data.tags}
    assert set(schemes) == {"default", "dog"} and len([r for r in children if "dwk.scheme" in r.data.tags]) == 2

    shares = {}
    for scheme, run in schemes.items():
        assert run.info.status == "FINISHED"
        for key in ("train_loss", "val_loss", "val_top1"):
            hist = c.get_metric_history(run.info.run_id, key)
            assert sorted(m.step for m in hist) == list(range(1, EPOCHS + 1)), (scheme, key)
            assert all(np.isfinite(m.value) for m in hist)
        assert all(0 <= m.value <= 1 for m in c.get_metric_history(run.info.run_id, "val_top1"))
        shares[scheme] = {s: run.data.metrics[f"classified_share.{s}"] for s in ("initial", "trained")}
        assert all(0.0 <= v <= 1.0 for v in shares[scheme].values())
    # Half the DoG run's kernels start as bank patterns: far more of them are classified than of a random init.
    assert shares["dog"]["initial"] > shares["default"]["initial"] + 0.2, shares
    assert schemes["dog"].data.metrics["n_initialised_kernels"] == sum(round(0.5 * c) for c in
                                                                      (24, 32, 32, 48, 48, 48, 48, 64, 64))
    assert schemes["default"].data.metrics["n_initialised_kernels"] == 0

    # checkpoints: safetensors that load into the architecture; DoG patterns in the initial one only where put
    rows = {r["scheme"]: r for r in result["results"]}
    for scheme, r in rows.items():
        sds = {stage: load_file(r[stage]) for stage in ("initial", "trained")}
        for stage, sd in sds.items():
            model = timm.create_model("test_convnext", pretrained=False, num_classes=10)
            model.load_state_dict(sd, strict=True)
        dw = "stages.3.blocks.1.conv_dw.weight"
        assert not torch.equal(sds["initial"][dw], sds["trained"][dw])  # trained
        named = bank_named_share(sds["initial"][dw])
        assert (0.4 <= named <= 0.6) if scheme == "dog" else named <= 0.05, (scheme, named)
    # every scheme of a seed starts from the same default initialisation: the non-DoG kernels agree
    ini_default, ini_dog = load_file(rows["default"]["initial"]), load_file(rows["dog"]["initial"])
    assert torch.equal(ini_default["stem.0.weight"], ini_dog["stem.0.weight"])

    # the analysis ran on the initial and trained checkpoints, as one dwk run nested under the experiment
    summary = json.loads((Path(result["analysis"]["out"]) / "summary.json").read_text())
    analysed = {r["id"]: r for r in summary["checkpoints"]}
    assert {"default-s0-initial", "default-s0-trained", "dog-s0-initial", "dog-s0-trained"} <= set(analysed)
    assert not summary["failed"]
    for scheme in ("default", "dog"):
        assert shares[scheme]["trained"] == analysed[f"{scheme}-s0-trained"]["classified_share"]
    analysis_run = c.get_run(result["analysis"]["mlflow_run_id"])
    assert analysis_run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert analysis_run.data.tags["dwk.run_id"] == summary["run_id"] == schemes["dog"].data.tags["dwk.analysis_run_id"]
    # the parent compares the schemes side by side
    assert {"val_top1.default", "val_top1.dog", "classified_share_trained.default",
            "classified_share_trained.dog"} <= set(parent.data.metrics)
    assert json.loads((Path(result["run_dir"]) / "results.json").read_text())["parent_run_id"] == parent.info.run_id


def test_gpu_deployment_runs_the_full_config():
    import yaml

    deps = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())["deployments"]
    (dep,) = [d for d in deps if d["entrypoint"] == "flows/train_classifier.py:train_classifier_flow"]
    assert dep["name"] == "gpu" and dep["work_pool"]["name"] == "dwk-gpu"
    cfg = load_experiment(ROOT / dep["parameters"]["config_path"])
    assert cfg.model == "convnext_tiny" and cfg.train.amp


def test_cli_train_classifier_without_prefect_or_tracking(tmp_path, capsys):
    """`dwk train-classifier --no-prefect --no-track`: trains, saves, prints the comparison (analysis off)."""
    import yaml

    from dwk.cli import main

    cfg = tiny_experiment(tmp_path, schemes=["dog"], train=dict(epochs=1, batch_size=100), analyze=False)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert main(["train-classifier", "--config", str(path), "--no-prefect", "--no-track",
                 "--out", str(tmp_path / "elsewhere")]) == 0
    printed = capsys.readouterr().out
    assert "classified (trained)" in printed and "dog " in printed
    (results,) = (tmp_path / "elsewhere").glob("tiny-*/results.json")
    out = json.loads(results.read_text())
    assert out["parent_run_id"] is None and out["analysis"] is None
    (row,) = out["results"]
    assert Path(row["trained"]).is_file() and len(row["history"]) == 1


def test_generated_data_with_other_parameters_is_refused_not_reused(tmp_path):
    make_dataset(tmp_path / "data", per_class=2, val_per_class=1, size=16)
    cfg = ExperimentConfig.model_validate(dict(data=dict(root=tmp_path / "data", generate=dict(per_class=3, size=16))))
    with pytest.raises(ConfigError, match="other parameters"):
        classifier.ensure_data(cfg.data)
    same = ExperimentConfig.model_validate(dict(data=dict(root=tmp_path / "data",
                                                          generate=dict(per_class=2, val_per_class=1, size=16))))
    assert classifier.ensure_data(same.data) == tmp_path / "data"

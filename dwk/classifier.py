"""The initialisation experiment: train a classifier per init scheme, track it, analyse its kernels.

The paper's second result (METHOD 1): DoG-initialised depthwise kernels raised ConvNeXt-Tiny's
accuracy and the share of identifiable kernels after training. This module runs that experiment
on any ImageFolder and timm model, without Prefect (``run_experiment``) or as the steps of the flow
``dwk-train-classifier`` (flows/train_classifier.py), which wraps the same functions:

1. ``start_experiment``: the run folder and the parent MLflow run;
2. ``train_scheme`` per (scheme, seed): build the model (torch-seeded), apply the scheme
   (``default``, ``dog``: :func:`dwk.init.dog_init_`, ``covariance``: :func:`dwk.init.covariance_init_`),
   save the initial weights, train (AMP on CUDA), save the trained weights (safetensors), with
   per-epoch train/val loss and top-1 in a child MLflow run;
3. ``analyze_experiment``: dwk's own pipeline (:func:`dwk.pipeline.run`) on every initial and
   trained checkpoint, then each scheme's classified share logged into its child run;
4. ``finish_experiment``: the comparison table in the parent run.

Every scheme of a seed starts from the same default initialisation (the model is built under the
same torch seed, and the schemes draw from NumPy generators only), so the schemes differ only in
the kernels they replace. Layout of a run folder (``out/<name>-<time>-<hex>``): ``checkpoints/
<scheme>-s<seed>/{initial,trained}.safetensors``, ``store.zarr`` and ``analysis/`` (dwk's run),
``results.json``.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dwk.config import CheckpointSpec, RunConfig
from dwk.errors import ConfigError, MissingInputError

logger = logging.getLogger(__name__)

SCHEMES = ("default", "dog", "covariance")
# RunConfig fields the experiment sets itself (the rest may be given under ``analysis``).
_ANALYSIS_OWN = ("name", "experiment", "checkpoints", "store", "out")
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own tag: the UI nests a run under its parent


class _Strict(BaseModel):
    # As dwk.config: unknown keys are errors, so a typo in a YAML config never runs the defaults.
    model_config = ConfigDict(extra="forbid", frozen=True)


class GenerateSpec(_Strict):
    """Make the generated set (:mod:`dwk.datasets`) at ``data.root`` first when it is not there."""

    classes: int = Field(10, ge=2)
    per_class: int = Field(40, ge=1)
    val_per_class: int | None = Field(None, ge=1)
    size: int = Field(32, ge=16)
    seed: int = 0


class DataConfig(_Strict):
    """An ImageFolder: ``root/train/<class>/*`` and ``root/val/<class>/*`` with the same classes."""

    root: Path
    train_dir: str = "train"
    val_dir: str = "val"
    image_size: int | None = Field(None, ge=8, description="resize (and crop) to this size; None: as stored")
    # "none": resize only (the generated set: flips would change a grating's orientation class);
    # "flip": plus horizontal flips; "imagenet": random-resized crops and flips, centre crop for val.
    augment: Literal["none", "flip", "imagenet"] = "none"
    num_workers: int = Field(0, ge=0)
    train_subset: int | None = Field(None, ge=1, description="a seeded random subset of the training images")
    val_subset: int | None = Field(None, ge=1, description="a seeded random subset of the validation images")
    generate: GenerateSpec | None = None

    @field_validator("root")
    @classmethod
    def _absolute(cls, v: Path) -> Path:
        return Path(v).expanduser().resolve()

    @model_validator(mode="after")
    def _imagenet_needs_size(self) -> "DataConfig":
        if self.augment == "imagenet" and self.image_size is None:
            raise ValueError("augment: imagenet crops to image_size: set data.image_size (e.g. 224)")
        return self


class DogInit(_Strict):
    """:func:`dwk.init.dog_init_` settings: the share of each layer's kernels and the ratio gamma."""

    share: float = Field(0.5, ge=0.0, le=1.0)
    gamma: float | tuple[float, float] = 2.0
    families: tuple[str, ...] = ("dog", "d1", "d2", "gauss")
    offset_px: float = Field(0.15, ge=0.0)
    angle_jitter: float = Field(5.0, ge=0.0)

    @model_validator(mode="after")
    def _valid(self) -> "DogInit":
        from dwk.init import _check_families, _check_gamma

        _check_gamma(self.gamma)
        _check_families(self.families)
        return self


class CovarianceInit(_Strict):
    """:func:`dwk.init.covariance_init_` settings: where the trained kernels' covariances come from.

    ``checkpoint`` is a dwk checkpoint entry (``{id: convnext_tiny.fb_in1k}``, ``{id: x, arch: a,
    file: f}``, ...); it is extracted into ``store`` first unless it is there already.
    """

    store: Path = Field(Path("runs/store.zarr"), validate_default=True)
    checkpoint: CheckpointSpec
    per: Literal["layer", "shape"] = "layer"
    share: float = Field(1.0, ge=0.0, le=1.0)

    @field_validator("store")
    @classmethod
    def _absolute(cls, v: Path) -> Path:
        return Path(v).expanduser().resolve()


class TrainConfig(_Strict):
    """The training loop: AdamW with linear warm-up and cosine decay per step."""

    epochs: int = Field(2, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(2e-3, gt=0.0)
    weight_decay: float = Field(0.05, ge=0.0)
    warmup_epochs: float = Field(0.0, ge=0.0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    grad_clip: float | None = Field(None, gt=0.0)
    amp: bool = Field(True, description="mixed precision (bfloat16, float16 where unsupported); CUDA only")
    channels_last: bool = Field(True, description="channels-last memory format on CUDA")
    device: Literal["auto", "cpu", "cuda"] = "auto"


class ExperimentConfig(_Strict):
    """The whole experiment: data, model, schemes x seeds, training, and dwk's analysis afterwards."""

    name: str = Field("init-experiment", min_length=1)
    experiment: str = Field("dwk-init", min_length=1, description="the MLflow experiment")
    model: str = Field("test_convnext", min_length=1, description="a timm model name (or torchvision:NAME)")
    model_kwargs: dict[str, Any] = Field(default_factory=dict, description="extra timm.create_model arguments")
    data: DataConfig
    schemes: list[Literal["default", "dog", "covariance"]] = Field(default_factory=lambda: ["default", "dog"],
                                                                    min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    dog: DogInit = DogInit()
    covariance: CovarianceInit | None = None
    train: TrainConfig = TrainConfig()
    out: Path = Field(Path("runs/init-experiment"), validate_default=True)
    cpu_threads: int | None = Field(None, ge=1, description="limit torch's and BLAS's CPU threads (None: their default)")
    analyze: bool = Field(True, description="run dwk's analysis on the initial and trained checkpoints")
    null_control: bool = Field(True, description="add a random-init control of the model to the analysis")
    # RunConfig fields for the analysis (autoencoder, cluster, controls, normalize, dask, ...);
    # name, experiment, checkpoints, store and out are the experiment's.
    analysis: dict[str, Any] = Field(default_factory=dict)

    @field_validator("out")
    @classmethod
    def _absolute(cls, v: Path) -> Path:
        return Path(v).expanduser().resolve()

    @model_validator(mode="after")
    def _consistent(self) -> "ExperimentConfig":
        for what, items in (("schemes", self.schemes), ("seeds", self.seeds)):
            if len(set(items)) != len(items):
                raise ValueError(f"{what} {items} repeat an entry")
        if "covariance" in self.schemes and self.covariance is None:
            raise ValueError("scheme 'covariance' needs a 'covariance' section: {store: PATH, checkpoint: {id: ...}} "
                             "(the trained checkpoint whose kernel covariances are drawn from)")
        own = sorted(set(self.analysis) & set(_ANALYSIS_OWN))
        if own:
            raise ValueError(f"analysis: {own} are set by the experiment; give only the analysis settings "
                             "(autoencoder, cluster, controls, normalize, dask, ...)")
        from pydantic import ValidationError

        try:  # the analysis settings make a valid RunConfig
            analysis_config(self, [], Path("/nonexistent"))
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())
            raise ValueError(f"analysis: {problems}") from None
        return self

    def flat_params(self) -> dict[str, Any]:
        """The config flattened to ``a.b.c -> value`` for MLflow params."""
        return _flatten(self.model_dump(mode="json"))


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def load_experiment(path: str | Path, **overrides: Any) -> ExperimentConfig:
    """Read and validate a YAML experiment config; ``overrides`` replace top-level keys.

    Relative paths (``data.root``, ``out``, ``covariance.store``) are taken from the current folder
    (the repository root, where the flows' workers run), as in dwk's run configs.
    """
    from pydantic import ValidationError

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise MissingInputError(f"experiment config {path} does not exist (see configs/init-experiment*.yaml)") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"experiment config {path} must hold a mapping at its top level")
    raw.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as e:
        lines = [f"  {'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg'].removeprefix('Value error, ')}"
                 for err in e.errors(include_url=False)]
        raise ConfigError(f"experiment config {path} is not valid:\n" + "\n".join(lines)) from e


# ----------------------------------------------------------------------------- data
def _transforms(cfg: DataConfig, train: bool):
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from torchvision import transforms as T

    steps: list = []
    if cfg.augment == "imagenet":
        size = cfg.image_size
        steps += ([T.RandomResizedCrop(size), T.RandomHorizontalFlip()] if train
                  else [T.Resize(int(round(size / 0.875))), T.CenterCrop(size)])
    else:
        if cfg.image_size is not None:
            steps += [T.Resize(cfg.image_size), T.CenterCrop(cfg.image_size)]
        if cfg.augment == "flip" and train:
            steps.append(T.RandomHorizontalFlip())
    steps += [T.ToTensor(), T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)]
    return T.Compose(steps)


def ensure_data(cfg: DataConfig) -> Path:
    """The ImageFolder root, generated first when ``cfg.generate`` says so; ``MissingInputError`` when absent.

    With ``generate``, a set already there with the same parameters is used as it is; a folder that
    holds anything else is refused (``ConfigError``), never overwritten.
    """
    if cfg.generate is not None:
        from dwk.datasets import make_dataset

        make_dataset(cfg.root, **cfg.generate.model_dump())
    for split in (cfg.train_dir, cfg.val_dir):
        if not (cfg.root / split).is_dir():
            raise MissingInputError(
                f"data.root {cfg.root} has no {split}/ folder: point data.root at an ImageFolder with "
                f"{cfg.train_dir}/<class>/ and {cfg.val_dir}/<class>/ (ImageNet: the extracted train and val "
                "folders), or make a small one with `dwk make-dataset OUT`")
    return cfg.root


def _subset(ds, n: int | None, seed: int):
    if n is None or n >= len(ds):
        return ds
    import torch

    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n]
    return torch.utils.data.Subset(ds, idx.tolist())


def load_datasets(cfg: DataConfig, seed: int = 0):
    """(train, val, class names) as torchvision ImageFolders; the two must have the same classes."""
    from torchvision.datasets import ImageFolder

    root = ensure_data(cfg)
    train = ImageFolder(str(root / cfg.train_dir), transform=_transforms(cfg, True))
    val = ImageFolder(str(root / cfg.val_dir), transform=_transforms(cfg, False))
    if train.classes != val.classes:
        raise ConfigError(f"{root}: {cfg.train_dir}/ and {cfg.val_dir}/ hold different classes "
                          f"({len(train.classes)} vs {len(val.classes)}): both need one folder per class, the same names")
    return _subset(train, cfg.train_subset, seed), _subset(val, cfg.val_subset, seed + 1), train.classes


def _loader(ds, batch_size: int, *, train: bool, workers: int, seed: int, pin: bool):
    import torch

    return torch.utils.data.DataLoader(
        ds, batch_size=batch_size, shuffle=train, drop_last=False, num_workers=workers, pin_memory=pin,
        persistent_workers=workers > 0, generator=torch.Generator().manual_seed(seed) if train else None)


# ----------------------------------------------------------------------------- model and schemes
def build_classifier(cfg: ExperimentConfig, n_classes: int, seed: int):
    """The model with its default initialisation, seeded by ``seed`` (the same for every scheme)."""
    from dwk.sources._torch import build_model

    return build_model(cfg.model, f"{cfg.model}-s{seed}", seed=seed, pretrained=False, num_classes=n_classes,
                       **cfg.model_kwargs)


def load_covariances(cfg: CovarianceInit) -> list:
    """The trained kernels' covariances: the checkpoint extracted into the store (unless there), then estimated."""
    from dwk import pipeline
    from dwk.init import estimate_covariance

    pipeline.extract_checkpoint(cfg.checkpoint, cfg.store, cfg.store.parent / "checkpoints", 16384)
    return estimate_covariance(cfg.store, cfg.checkpoint.id, per=cfg.per)


def apply_scheme(model, cfg: ExperimentConfig, scheme: str, seed: int, covariances: list | None = None) -> int:
    """Initialise ``model``'s depthwise kernels by ``scheme`` in place; returns how many kernels it set."""
    from dwk import init

    if scheme == "default":
        init.depthwise_layers(model)  # the experiment is about depthwise kernels: refuse a model without
        return 0
    if scheme == "dog":
        d = cfg.dog
        chosen = init.dog_init_(model, share=d.share, gamma=d.gamma, families=d.families, seed=seed,
                                offset_px=d.offset_px, angle_jitter=d.angle_jitter)
    elif scheme == "covariance":
        if covariances is None:
            covariances = load_covariances(cfg.covariance)
        chosen = init.covariance_init_(model, covariances, seed=seed, share=cfg.covariance.share)
    else:
        raise ConfigError(f"unknown init scheme {scheme!r}; choose one of {SCHEMES}")
    return int(sum(len(c) for c in chosen.values()))


def save_weights(model, path: Path, metadata: dict[str, str] | None = None) -> Path:
    """The model's state dict as safetensors (contiguous CPU copies), written to a temporary name then renamed."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    save_file(sd, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
    tmp.replace(path)
    return path


# ----------------------------------------------------------------------------- training
@contextlib.contextmanager
def cpu_threads(n: int | None) -> Iterator[None]:
    """Limit torch's intra-op threads and the BLAS/OpenMP pools to ``n`` inside the block (None: no limit).

    On a shared or small machine torch's default (one thread per core) oversubscribes the cores
    and a step waits on spinning threads: measured on 2 busy cores, 10x slower than one thread.
    """
    if n is None:
        yield
        return
    import torch
    from threadpoolctl import threadpool_limits

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        with threadpool_limits(limits=n):
            yield
    finally:
        torch.set_num_threads(old)


def resolve_device(name: str):
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but no CUDA GPU is visible: use 'auto' or 'cpu'")
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else ("cpu" if name == "auto" else name))


def _amp_dtype(tcfg: TrainConfig, device):
    """The autocast dtype, or None: AMP only on CUDA (bfloat16 where supported, else float16)."""
    import torch

    if not tcfg.amp:
        return None
    if device.type != "cuda":
        logger.info("train.amp is CUDA-only: training in float32 on %s", device)
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _lr_lambda(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))
    return f


def evaluate(model, loader, device, amp_dtype=None) -> tuple[float, float]:
    """(mean cross-entropy, top-1 accuracy) over a loader, in eval mode."""
    import torch
    import torch.nn.functional as F

    model.eval()
    loss = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    n = 0
    with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = model(x).float()
            loss += F.cross_entropy(logits, y, reduction="sum").double()
            correct += (logits.argmax(1) == y).sum()
            n += len(y)
    return loss.item() / max(n, 1), correct.item() / max(n, 1)


def train_model(model, train_loader, val_loader, tcfg: TrainConfig, device,
                on_epoch: Callable[[int, dict[str, float]], None] | None = None) -> list[dict[str, float]]:
    """Train in place; returns per-epoch metrics (train_loss, train_top1, val_loss, val_top1, lr, epoch_s,
    train_images_per_s) and calls ``on_epoch(epoch, metrics)`` (epoch counted from 1) after each epoch."""
    import torch
    import torch.nn.functional as F

    amp_dtype = _amp_dtype(tcfg, device)
    if device.type == "cuda" and tcfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay,
                            fused=device.type == "cuda")
    steps = tcfg.epochs * len(train_loader)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(int(tcfg.warmup_epochs * len(train_loader)), steps))
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    history: list[dict[str, float]] = []
    for epoch in range(1, tcfg.epochs + 1):
        model.train()
        t0 = time.perf_counter()
        # Summed on the device, read once per epoch: no host sync per step.
        total = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        n = 0
        for x, y in train_loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if device.type == "cuda" and tcfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = model(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=tcfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if tcfg.grad_clip is not None:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
            scaler.step(opt)
            scaler.update()
            sched.step()
            total += loss.detach().double() * len(y)
            correct += (logits.detach().argmax(1) == y).sum()
            n += len(y)
        train_s = time.perf_counter() - t0
        val_loss, val_top1 = evaluate(model, val_loader, device, amp_dtype)
        m = dict(train_loss=total.item() / max(n, 1), train_top1=correct.item() / max(n, 1), val_loss=val_loss,
                 val_top1=val_top1, lr=float(opt.param_groups[0]["lr"]), epoch_s=time.perf_counter() - t0,
                 train_images_per_s=n / max(train_s, 1e-9))
        history.append(m)
        logger.info("epoch %d/%d: train loss %.4f top-1 %.3f, val loss %.4f top-1 %.3f (%.0f img/s)", epoch,
                    tcfg.epochs, m["train_loss"], m["train_top1"], val_loss, val_top1, m["train_images_per_s"])
        if on_epoch is not None:
            on_epoch(epoch, m)
    return history


# ----------------------------------------------------------------------------- the experiment's steps
def run_name(scheme: str, seed: int) -> str:
    return f"{scheme}-s{seed}"


def start_experiment(cfg: ExperimentConfig, track: bool = True, tags: dict[str, str] | None = None) -> dict[str, Any]:
    """Make the run folder and open the parent MLflow run; returns ``{run_dir, parent_run_id}``."""
    run_dir = cfg.out / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    run_dir.mkdir(parents=True, exist_ok=False)
    (run_dir / "experiment.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=1))
    parent = None
    if track:
        from dwk import tracking

        tracking.preflight()
        parent = tracking.start_run(cfg.experiment, cfg.name, cfg.flat_params(),
                                    {"dwk.kind": "init-experiment", "dwk.run_dir": str(run_dir), **(tags or {})})
    logger.info("init experiment %s: %s schemes x %s seeds, run folder %s", cfg.name, cfg.schemes, cfg.seeds, run_dir)
    return dict(run_dir=str(run_dir), parent_run_id=parent)


def train_scheme(cfg: ExperimentConfig, scheme: str, seed: int, run_dir: str | Path,
                 parent_run_id: str | None = None) -> dict[str, Any]:
    """Build, initialise by ``scheme``, save, train and save again one model, in a child MLflow run.

    Returns ``{scheme, seed, name, run_id (the child's), initial, trained (paths), n_initialised,
    history (per-epoch metrics), final (the last epoch's), seconds}``.
    """
    from dwk import tracking

    name = run_name(scheme, seed)
    folder = Path(run_dir) / "checkpoints" / name
    train_ds, val_ds, classes = load_datasets(cfg.data, seed)
    device = resolve_device(cfg.train.device)
    model = build_classifier(cfg, len(classes), seed)
    child = None
    if parent_run_id:
        params = dict(scheme=scheme, seed=seed, model=cfg.model, n_classes=len(classes), n_train=len(train_ds),
                      n_val=len(val_ds), device=str(device), **{f"train.{k}": v for k, v in cfg.train.model_dump().items()})
        if scheme == "dog":
            params.update({f"dog.{k}": v for k, v in cfg.dog.model_dump().items()})
        if scheme == "covariance":
            params.update({f"covariance.{k}": v for k, v in cfg.covariance.model_dump(mode="json").items()})
        parent = tracking.client().get_run(parent_run_id)
        child = tracking.start_run(cfg.experiment, name, params,
                                   {PARENT_TAG: parent_run_id, "dwk.scheme": scheme, "dwk.seed": str(seed),
                                    "dwk.run_dir": str(run_dir), **{k: v for k, v in parent.data.tags.items()
                                                                    if k == "prefect.flow_run_id"}})
    t0 = time.perf_counter()
    with tracking.closed_on_error(child), cpu_threads(cfg.cpu_threads):
        n_init = apply_scheme(model, cfg, scheme, seed)
        meta = dict(arch=cfg.model, scheme=scheme, seed=seed, classes=json.dumps(classes))
        initial = save_weights(model, folder / "initial.safetensors", {**meta, "stage": "initial"})
        pin = device.type == "cuda"
        train_loader = _loader(train_ds, cfg.train.batch_size, train=True, workers=cfg.data.num_workers, seed=seed, pin=pin)
        val_loader = _loader(val_ds, cfg.train.batch_size, train=False, workers=cfg.data.num_workers, seed=seed, pin=pin)
        on_epoch = (lambda epoch, m: tracking.log_metrics(child, m, step=epoch)) if child else None
        history = train_model(model, train_loader, val_loader, cfg.train, device, on_epoch)
        trained = save_weights(model, folder / "trained.safetensors", {**meta, "stage": "trained",
                                                                        "epochs": cfg.train.epochs})
        seconds = time.perf_counter() - t0
        if child:
            tracking.log_metrics(child, {"n_initialised_kernels": n_init, "train_seconds": seconds})
            tracking.client().set_tag(child, "dwk.checkpoint.initial", str(initial))
            tracking.client().set_tag(child, "dwk.checkpoint.trained", str(trained))
            tracking.end_run(child)
    logger.info("%s: val top-1 %.3f after %d epochs (%.0fs)", name, history[-1]["val_top1"], cfg.train.epochs, seconds)
    return dict(scheme=scheme, seed=seed, name=name, run_id=child, initial=str(initial), trained=str(trained),
                n_initialised=n_init, history=history, final=history[-1], seconds=round(seconds, 2))


def analysis_config(cfg: ExperimentConfig, results: list[dict], run_dir: Path) -> RunConfig:
    """dwk's run config for the analysis: every result's initial and trained checkpoint (+ a null control)."""
    ckpts: list[dict[str, Any]] = []
    for r in results:
        for stage in ("initial", "trained"):
            ckpts.append(dict(id=f"{r['name']}-{stage}", arch=cfg.model, file=str(r[stage])))
    if cfg.null_control or not ckpts:
        ckpts.append(dict(id=f"null-{cfg.model.replace('/', '_').replace(':', '_')}", arch=cfg.model,
                          pretrained=False, seed=10_000 + cfg.seeds[0]))
    return RunConfig.model_validate({**cfg.analysis, "name": cfg.name, "experiment": cfg.experiment,
                                     "checkpoints": ckpts, "store": Path(run_dir) / "store.zarr",
                                     "out": Path(run_dir) / "analysis"})


def analyze_experiment(cfg: ExperimentConfig, results: list[dict], run_dir: str | Path,
                       parent_run_id: str | None = None, track: bool = True) -> dict[str, Any]:
    """dwk's pipeline on the initial and trained checkpoints; each scheme's classified share into its child run.

    Returns ``{run_id, mlflow_run_id, out, shares: {name: {initial, trained, initial_tau, trained_tau,
    top_clusters_trained}}, failed}``.
    """
    from dwk import pipeline, tracking

    rcfg = analysis_config(cfg, results, Path(run_dir))
    with cpu_threads(cfg.cpu_threads):
        summary = pipeline.run(rcfg, track=track)
    rows = {r["id"]: r for r in summary["checkpoints"]}
    failed = {f["id"]: f.get("error") for f in summary.get("failed", [])}
    shares: dict[str, dict[str, Any]] = {}
    for r in results:
        ini, tra = rows.get(f"{r['name']}-initial"), rows.get(f"{r['name']}-trained")
        shares[r["name"]] = dict(
            initial=ini and ini["classified_share"], trained=tra and tra["classified_share"],
            initial_tau=ini and ini["classified_share_tau"], trained_tau=tra and tra["classified_share_tau"],
            top_clusters_trained=tra and tra.get("top_clusters"))
        if r.get("run_id") and track:
            s = shares[r["name"]]
            tracking.log_metrics(r["run_id"], {
                "classified_share.initial": s["initial"], "classified_share.trained": s["trained"],
                "classified_share_tau.initial": s["initial_tau"], "classified_share_tau.trained": s["trained_tau"]})
            c = tracking.client()
            c.set_tag(r["run_id"], "dwk.analysis_run_id", summary["run_id"])
            if s["top_clusters_trained"]:
                c.set_tag(r["run_id"], "dwk.top_clusters.trained", ", ".join(s["top_clusters_trained"]))
            errors = {k: v for k, v in failed.items() if k.startswith(f"{r['name']}-")}
            if errors:
                c.set_tag(r["run_id"], "dwk.analysis_failed", json.dumps(errors)[:5000])
    if parent_run_id and summary.get("mlflow_run_id"):  # the analysis run nests under the experiment run
        tracking.client().set_tag(summary["mlflow_run_id"], PARENT_TAG, parent_run_id)
    return dict(run_id=summary["run_id"], mlflow_run_id=summary.get("mlflow_run_id"), out=summary["out"],
                shares=shares, failed=summary.get("failed", []))


def comparison_rows(results: list[dict], analysis: dict | None) -> list[dict[str, Any]]:
    """One row per (scheme, seed): final accuracy and loss, classified shares before and after training."""
    rows = []
    for r in results:
        s = (analysis or {}).get("shares", {}).get(r["name"], {})
        rows.append(dict(scheme=r["scheme"], seed=r["seed"], val_top1=round(r["final"]["val_top1"], 4),
                         val_loss=round(r["final"]["val_loss"], 4), train_loss=round(r["final"]["train_loss"], 4),
                         classified_share_initial=s.get("initial"), classified_share_trained=s.get("trained"),
                         n_initialised=r["n_initialised"], train_seconds=r["seconds"], run_id=r.get("run_id")))
    return rows


def finish_experiment(cfg: ExperimentConfig, results: list[dict], analysis: dict | None, run_dir: str | Path,
                      parent_run_id: str | None = None) -> dict[str, Any]:
    """The comparison table (``results.json``; in the parent run: a table and per-scheme means), parent closed."""
    rows = comparison_rows(results, analysis)
    out = dict(name=cfg.name, run_dir=str(run_dir), parent_run_id=parent_run_id, schemes=rows, results=results,
               analysis=analysis)
    Path(run_dir, "results.json").write_text(json.dumps(out, indent=1, default=str))
    if parent_run_id:
        from dwk import tracking

        metrics: dict[str, float] = {}
        for scheme in cfg.schemes:
            mine = [r for r in rows if r["scheme"] == scheme]
            for key in ("val_top1", "classified_share_initial", "classified_share_trained"):
                vals = [r[key] for r in mine if r[key] is not None]
                if vals:
                    metrics[f"{key}.{scheme}"] = float(np.mean(vals))
        tracking.log_metrics(parent_run_id, metrics)
        tracking.log_table(parent_run_id, rows, "tables/schemes.json")
        if analysis and analysis.get("mlflow_run_id"):
            tracking.client().set_tag(parent_run_id, "dwk.analysis_run_id", analysis["mlflow_run_id"])
        tracking.end_run(parent_run_id)
    return out


def run_experiment(cfg: ExperimentConfig, *, track: bool = True) -> dict[str, Any]:
    """The whole experiment in this process, without Prefect (the flow runs the same steps as tasks)."""
    from dwk import tracking

    started = start_experiment(cfg, track)
    run_dir, parent = started["run_dir"], started["parent_run_id"]
    with tracking.closed_on_error(parent):
        results = [train_scheme(cfg, scheme, seed, run_dir, parent) for seed in cfg.seeds for scheme in cfg.schemes]
        analysis = analyze_experiment(cfg, results, run_dir, parent, track) if cfg.analyze else None
        return finish_experiment(cfg, results, analysis, run_dir, parent)


def comparison_text(rows: list[dict]) -> str:
    """The comparison table as fixed-width text (the CLI prints it)."""
    def pct(v):
        return "-" if v is None else f"{v:.1%}"

    head = ("scheme", "seed", "val top-1", "val loss", "classified (initial)", "classified (trained)", "seconds")
    body = [(r["scheme"], str(r["seed"]), pct(r["val_top1"]), f"{r['val_loss']:.3f}", pct(r["classified_share_initial"]),
             pct(r["classified_share_trained"]), f"{r['train_seconds']:.0f}") for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip() for line in (head, *body))

"""Typed run configuration.

One config style for the whole project (STYLE habit 4): pydantic models whose defaults run the
embedded demo, used directly as Prefect flow parameters and flattened into MLflow params. Every
choice the paper leaves open (METHOD.md, marked "(dwk)") is a field here, so it is logged with the run.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import re
from collections.abc import Iterable
from pathlib import Path, PurePath
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dwk.errors import ConfigError

logger = logging.getLogger(__name__)

PKG_SCHEME = "pkg://"  # a file inside an installed package (resolved by dwk.sources, not here)


class _Strict(BaseModel):
    # Unknown keys are errors: a typo in a YAML config must not silently run the defaults.
    model_config = ConfigDict(extra="forbid", frozen=True)


class PlantedSpec(_Strict):
    """Depthwise weights drawn from the planted population of METHOD 2.7 (the demo's ground truth).

    With ``arch``, the depthwise weights of that timm model are planted. Without ``arch``, ``shape``
    and ``n`` give a bare population of ``n`` kernels (one pseudo-layer): the standard planted
    population of METHOD 2.7 is ``{shape: [7, 7], n: 20000, noise_share: 0.2}``.
    """

    seed: int = 0
    noise_share: float = Field(0.1, ge=0.0, le=1.0)
    snr: float = Field(2.0, gt=0.0)
    shape: tuple[int, int] | None = None
    n: int = Field(20000, ge=2)


class CheckpointSpec(_Strict):
    """Where one checkpoint's weights come from. Exactly one way to get weights:

    - ``id: convnextv2_atto.fcmae_ft_in1k`` (no ``arch``): timm pretrained weights from the Hub;
    - ``arch`` + ``file``: an architecture with a local weights file (``.safetensors``,
      ``.pth/.pt/.bin``; wrapped and original-layout checkpoints are remapped through timm).
      ``arch: torchvision:NAME`` is any ``torchvision.models`` builder;
    - ``file: FOLDER`` (``arch`` optional): a timm ``local-dir`` folder (``config.json`` + weights);
    - ``file: X.safetensors`` / ``X.pth`` without ``arch``: weights-only mode, depthwise kernels read
      from the file by tensor shape, no model built;
    - ``file: pkg://PACKAGE/PATH``: a file inside an installed Python package (either mode);
    - ``onnx: X.onnx``: the depthwise Conv nodes of an ONNX graph;
    - ``arch`` + ``pretrained: false``: random initialisation with ``seed`` (the null control);
    - ``arch: torchvision:NAME`` alone: torchvision's published weights;
    - ``arch`` + ``planted``: a planted-structure checkpoint that dwk writes itself (the demo);
    - ``planted: {shape, n, ...}`` without ``arch``: a bare planted population (no model).

    Which kind of source reads an entry is decided by ``dwk.sources.kind_of`` from these fields
    alone; this module never looks at the filesystem. A ``pattern:`` / ``module:`` entry is not a
    checkpoint: ``load_config`` expands it into one entry per matching timm pretrained checkpoint
    (see ``CheckpointPattern``).
    """

    id: str = Field(min_length=1)
    arch: str | None = None
    file: str | None = Field(None, description="a weights file or timm local-dir folder, or pkg://PACKAGE/PATH")
    onnx: str | None = None
    pretrained: bool = True
    seed: int = 0
    planted: PlantedSpec | None = None
    reparameterize: bool = Field(
        True, description="fuse re-parameterisable models (RepVGG/MobileOne-style branches) before extraction")

    @model_validator(mode="before")
    @classmethod
    def _not_a_pattern(cls, data: Any) -> Any:
        if isinstance(data, dict) and CheckpointFiles.is_files(data):
            raise ValueError(f"{data['files']!r} is a files entry: load_config expands it into one checkpoint per file")
        if isinstance(data, dict) and CheckpointPattern.is_pattern(data):
            raise ValueError(
                f"{data.get('pattern') or data.get('module')!r} is a pattern entry: load_config expands it into "
                "concrete checkpoints (or call dwk.config.expand_checkpoints on the list first)"
            )
        return data

    @field_validator("file", "onnx", mode="before")
    @classmethod
    def _path_text(cls, v: Any) -> Any:
        # Kept as text, not Path: ``pkg://x/y`` would lose a slash as a Path.
        if isinstance(v, PurePath):
            return str(v)
        if isinstance(v, str) and not v.startswith(PKG_SCHEME):
            return str(Path(v).expanduser())
        return v

    @field_validator("id")
    @classmethod
    def _safe_id(cls, v: str) -> str:
        if "/" in v or v.startswith("__") or v.strip() != v:
            raise ValueError(f"checkpoint id {v!r} may not contain '/', start with '__' or have outer spaces")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> "CheckpointSpec":
        given = [k for k in ("file", "onnx", "planted") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"checkpoint {self.id!r}: give one of 'file', 'onnx' or 'planted', not {given}")
        if self.onnx is not None and (self.arch or not self.pretrained):
            raise ValueError(f"checkpoint {self.id!r}: an 'onnx' model carries its own graph and weights; "
                             "drop 'arch' / 'pretrained'")
        if self.planted is not None and not self.arch and self.planted.shape is None:
            raise ValueError(f"checkpoint {self.id!r}: 'planted' needs 'arch' (the architecture whose depthwise "
                             "convs are planted, e.g. arch: convnext_atto) or 'shape' (a bare population)")
        if not self.pretrained and not self.arch and self.file is None and self.planted is None:
            raise ValueError(f"checkpoint {self.id!r}: 'pretrained: false' needs 'arch' (the architecture to build "
                             "with random weights), e.g. arch: convnext_atto or arch: torchvision:mobilenet_v2")
        return self

    @property
    def model_name(self) -> str:
        """The name to build: ``arch`` when given, else the id (``arch.tag`` for Hub weights)."""
        return self.arch or self.id


class CheckpointPattern(_Strict):
    """A config entry that selects timm pretrained checkpoints by name pattern or timm module.

    ``{pattern: "convnextv2_*.fcmae_ft_*"}``, ``{pattern: [convnext_tiny, convnext_small]}``
    (every tag of each), ``{module: convnext, exclude: ["*_384"]}``. ``load_config`` expands it via
    timm's registry into ``{id: arch.tag}`` entries (``expand_checkpoints``).
    """

    pattern: str | list[str] = "*"
    module: str | list[str] | None = None
    exclude: list[str] = []
    reparameterize: bool = True
    max_checkpoints: int = Field(200, ge=1, description="refuse an expansion larger than this (a too-broad pattern)")

    @staticmethod
    def is_pattern(entry: dict) -> bool:
        return "id" not in entry and ("pattern" in entry or "module" in entry)

    @property
    def patterns(self) -> tuple[str, ...]:
        return (self.pattern,) if isinstance(self.pattern, str) else tuple(self.pattern)

    @property
    def modules(self) -> tuple[str, ...]:
        if self.module is None:
            return ()
        return (self.module,) if isinstance(self.module, str) else tuple(self.module)


class CheckpointFiles(_Strict):
    """A config entry for a folder of weight files: one checkpoint per file matching a glob.

    ``{files: "ckpts/**/*.pth"}`` (weights-only mode) or ``{files: "ckpts/*.pth", arch: convnext_tiny}``
    (each file loaded into the architecture). A relative glob is taken from the config file's folder.
    Each file's id is ``id_prefix`` + its path below the glob's fixed part, without the suffix, with
    ``/`` written as ``.`` (``ckpts/run1/epoch_90.pth`` -> ``run1.epoch_90``). Files are taken in
    natural order (``epoch_9`` before ``epoch_10``).
    """

    files: str
    arch: str | None = None
    id_prefix: str = ""
    reparameterize: bool = True
    max_checkpoints: int = Field(1000, ge=1, description="refuse an expansion larger than this (a too-broad glob)")

    @staticmethod
    def is_files(entry: dict) -> bool:
        return "id" not in entry and "files" in entry

    def expand(self) -> list[dict[str, Any]]:
        """The concrete ``{id, file[, arch]}`` entries (reads the filesystem: called by ``load_config``)."""
        import glob
        import re

        pattern = str(Path(self.files).expanduser())
        paths = [Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file()]
        if not paths:
            raise ValueError(f"files: {self.files!r} matches no file")
        if len(paths) > self.max_checkpoints:
            raise ValueError(f"files: {self.files!r} matches {len(paths)} files, more than max_checkpoints="
                             f"{self.max_checkpoints}: narrow it (or raise max_checkpoints)")
        parts = Path(pattern).parts
        n_fixed = next((i for i, part in enumerate(parts) if glob.has_magic(part)), len(parts) - 1)
        fixed = Path(*parts[:n_fixed]) if n_fixed else Path(".")

        def natural(p: Path) -> list:
            return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(p))]

        out = []
        for path in sorted(paths, key=natural):
            rel = path.relative_to(fixed) if path.is_relative_to(fixed) else Path(path.name)
            ident = self.id_prefix + ".".join(rel.with_suffix("").parts)
            entry: dict[str, Any] = {"id": ident, "file": str(path.resolve())}
            if self.arch:
                entry["arch"] = self.arch
            if not self.reparameterize:
                entry["reparameterize"] = False
            out.append(entry)
        return out


class NormalizeConfig(_Strict):
    """METHOD 2.2 (dwk): cleaning and per-kernel normalisation."""

    method: Literal["l2", "maxabs", "center_l2"] = "l2"
    dead_eps: float = Field(1e-8, ge=0.0)
    dead_rel: float = Field(1e-3, ge=0.0, lt=1.0)
    chunk_kernels: int = Field(16384, gt=0)  # benchmarks/README.md: fewer, larger Dask tasks


class AutoencoderConfig(_Strict):
    """METHOD 2.3 (dwk): the MLP autoencoder and its training."""

    latent_dim: int = Field(1, ge=1)
    sigmoid: bool = True
    hidden: tuple[int, ...] = (256, 128)
    epochs: int = Field(300, ge=1)
    max_steps: int | None = Field(
        5000, ge=1, description="training budget in optimizer steps: epochs are cut to fit it, so training "
        "time does not grow with the number of kernels (None: every epoch)")
    max_train_kernels: int = Field(
        262_144, ge=2, description="train on a seeded sample of at most this many fit kernels (memory and "
        "device use bounded whatever the group's size)")
    batch_size: int = Field(4096, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    log_every: int = Field(25, ge=1)


class ClusterConfig(_Strict):
    """METHOD 2.4-2.6 (dwk): cutting clusters, naming them, classifying kernels."""

    # The default mode was chosen by measurement on planted populations (README, "Method choices"):
    # k-means over-segmentation + merge recovers the planted classes (7x7 ARI 0.97), the paper's 1-D
    # code intervals do not (ARI 0.1-0.2). Paper mode is always computed and reported beside it.
    mode: Literal["paper", "kmeans"] = "kmeans"
    n_init_clusters: int = Field(48, ge=2)
    # "auto": the merge threshold (so the number of clusters) is chosen by seed stability over merge_grid.
    merge_cos: float | Literal["auto"] = "auto"
    merge_grid: tuple[float, ...] = (0.6, 0.65, 0.7, 0.75, 0.8, 0.85)
    seeds: int = Field(3, ge=1, description="k-means seeds: stability-based choice and the seed-stability control")
    # The data decides the clusters, the reference bank only names them (issue 9). Joining clusters
    # that get the same reference name, and dissolving unnamed clusters that blend two named ones,
    # let the bank decide; measured on planted families (benchmarks/README.md, method_suite.py) both
    # rules collapse separable classes (finite differences 5x5: ARI 0.64 with them, 0.80 without;
    # k-means told the true k 0.77) and are off by default. Off, the DoG-bank 5x5 population keeps
    # seed stability 0.94 and ARI 0.65 (k-means 0.68).
    merge_same_name: bool = False
    # Then settle into nearest-prototype clusters (spherical k-means from the merged prototypes):
    # every kernel in the cluster whose prototype it matches best. Makes 5x5 partitions seed-stable.
    refine: bool = True
    # While refining, dissolve unnamed clusters whose prototype is a non-negative blend of two named
    # prototypes (cosine >= name_cos), listed in summary.json (selection.dissolved). Off by default
    # (see merge_same_name): an unnamed cluster is a finding, not an error.
    dissolve_blends: bool = False
    # Classification out of sample (METHOD 2.6): each kernel's cosine is measured against the
    # clusters of a fit on the other half of the kernels (two folds), and tau_null is calibrated the
    # same way. In sample, noise kernels shape small clusters around themselves and pass: measured
    # on 2,000-kernel planted groups, 7-28% of pure noise classified in sample, 0.5-1.2% cross-fitted
    # (benchmarks/method_suite.py; README "Classification out of sample").
    crossfit: bool = True
    max_fit_kernels: int = Field(200_000, ge=100, description="subsample size for fitting the clusters")
    grid: int = Field(64, ge=2)
    paper_merge_cos: float = Field(0.95, ge=-1.0, le=1.0)
    min_share: float = Field(0.005, ge=0.0, lt=1.0)
    tau: float = Field(0.7, ge=-1.0, le=1.0)
    alpha: float = Field(0.01, gt=0.0, lt=1.0)
    n_null: int = Field(20000, ge=100)
    name_cos: float = Field(0.8, ge=-1.0, le=1.0)
    seed: int = 0


class ControlsConfig(_Strict):
    """METHOD 2.7: the controls computed and reported with every run."""

    kmeans: bool = True  # k-means on raw kernels with the same number of clusters: ARI and classified share
    master_key: bool = True  # sign-invariant a*p + b fit of every kernel to every prototype
    fit_dog: bool = True  # least-squares DoG parameters of each named cluster
    # The same analysis on regular (groups == 1) convs of the depthwise shapes, by layer depth.
    regular: bool = True
    regular_max_per_layer: int = Field(256, ge=1, description="regular kernels sampled per layer (seeded)")


class DaskConfig(_Strict):
    """Where normalisation runs. ``address`` joins an existing scheduler (``tcp://host:8786``)."""

    address: str | None = None
    n_workers: int = Field(2, ge=1)
    threads_per_worker: int = Field(1, ge=1)


class RunConfig(_Strict):
    """A whole pipeline run. The defaults are the embedded offline demo (see ``default_config``)."""

    name: str = "dwk"
    checkpoints: list[CheckpointSpec] = Field(min_length=1)
    store: Path = Field(Path("runs/store.zarr"), validate_default=True)  # absolute (see _absolute), defaults too
    out: Path = Field(Path("runs"), validate_default=True)
    experiment: str = "dwk"
    max_workers: int = Field(2, ge=1)
    retries: int = Field(2, ge=0, description="retries of a checkpoint whose extraction failed for a reason "
                         "other than bad input (a download that got no answer, an I/O error): dwk.retry")
    retry_backoff_s: float = Field(2.0, ge=0, description="the first retry's delay; doubled for each next one")
    chunk_kernels: int = Field(16384, gt=0)  # kernels per Zarr chunk (about 3 MB of 7x7 float32)
    normalize: NormalizeConfig = NormalizeConfig()
    autoencoder: AutoencoderConfig = AutoencoderConfig()
    cluster: ClusterConfig = ClusterConfig()
    controls: ControlsConfig = ControlsConfig()
    dask: DaskConfig = DaskConfig()
    train_deployment: str | None = Field(
        None,
        description="Prefect deployment ('flow/deployment') that trains on a GPU pool; None trains in-process.",
    )
    train_timeout_s: float = Field(24 * 3600, gt=0, description="how long to wait for a deployed training run")

    @field_validator("store", "out")
    @classmethod
    def _absolute(cls, v: Path) -> Path:
        # Absolute, so every process and node (Dask workers, Prefect workers) opens the same folder.
        return Path(v).expanduser().resolve()

    @model_validator(mode="after")
    def _unique_ids(self) -> "RunConfig":
        ids = [c.id for c in self.checkpoints]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"checkpoint ids must be unique; repeated: {dupes}")
        return self

    def fingerprint(self) -> str:
        """A short hash of the analysis-relevant config (not paths), for run ids and comparisons."""
        payload = self.model_dump(mode="json", exclude={"store", "out", "dask", "max_workers", "retries", "retry_backoff_s",
                                                         "train_deployment", "train_timeout_s"})
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:10]

    def flat_params(self) -> dict[str, Any]:
        """The config flattened to ``a.b.c -> value`` for MLflow params.

        Checkpoints are not flattened (hundreds of them would make hundreds of columns in MLflow's
        Compare view): ``checkpoints.n`` and their ids; each checkpoint is a dataset input of the
        run instead (``dwk.tracking.log_checkpoint_inputs``)."""
        d = self.model_dump(mode="json")
        ids = [c["id"] for c in d.pop("checkpoints")]
        return {"checkpoints.n": len(ids), "checkpoints.ids": ",".join(ids), **_flatten(d)}


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def expand_checkpoints(entries: list[Any]) -> list[Any]:
    """Replace the pattern and ``files:`` entries of a raw ``checkpoints:`` list by concrete entries.

    Explicit entries win: a name already listed (or selected by an earlier pattern) is not repeated.
    Patterns are looked up in timm's registry (:mod:`dwk.timm_registry`, which imports timm), only
    when the list has one.
    """

    explicit = {e.get("id") for e in entries if isinstance(e, dict) and "id" in e}
    out: list[Any] = []
    seen = set(explicit)
    for e in entries:
        if isinstance(e, dict) and CheckpointFiles.is_files(e):
            files = CheckpointFiles.model_validate(e).expand()
            out.extend(f for f in files if f["id"] not in seen)
            seen.update(f["id"] for f in files)
            continue
        if not (isinstance(e, dict) and CheckpointPattern.is_pattern(e)):
            out.append(e)
            continue
        pat = CheckpointPattern.model_validate(e)
        from dwk import timm_registry

        names = timm_registry.expand(pat)
        new = [n for n in names if n not in seen]
        seen.update(new)
        extra = {} if pat.reparameterize else {"reparameterize": False}
        out.extend({"id": n, **extra} for n in new)
        logger.info("pattern %s: %d pretrained checkpoints (%d new)", list(pat.patterns), len(names), len(new))
    return out


DEFAULT_CONFIG = Path(__file__).with_name("default.yaml")


def load_config(path: str | Path | None = None, sets: Iterable[str] = (), **overrides: Any) -> RunConfig:
    """Read a YAML run config (the embedded demo when ``path`` is None) and validate it.

    Relative ``file:`` and ``onnx:`` paths are resolved against the config file's folder, so a config
    and its weights can move together. ``sets`` (``KEY=VALUE``, the CLI's ``--set``) are applied to
    the YAML as written, before validation (see :func:`apply_sets`; a relative path they give is taken
    from the current folder). Pattern entries (``pattern:`` / ``module:``) are expanded here,
    through timm's registry, into concrete ``arch.tag`` checkpoints: flows only ever see those.
    """
    path = Path(path) if path is not None else DEFAULT_CONFIG
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise FileNotFoundError(f"config file {path} does not exist; omit --config to run the embedded demo") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(e)}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"config file {path} must hold a mapping at its top level, got {type(raw).__name__}")
    _resolve_checkpoint_paths(raw, path.parent)
    if sets:
        raw = apply_sets(raw, sets)
        _resolve_checkpoint_paths(raw, Path.cwd())  # what --set gave is relative to where the command runs
    ckpts = raw.get("checkpoints")
    if isinstance(ckpts, list) and any(isinstance(c, dict) and (CheckpointPattern.is_pattern(c) or
                                                                CheckpointFiles.is_files(c)) for c in ckpts):
        raw["checkpoints"] = expand_checkpoints(ckpts)
    raw.update({k: v for k, v in overrides.items() if v is not None})
    return RunConfig.model_validate(raw)


def _resolve_checkpoint_paths(raw: dict[str, Any], base: Path) -> None:
    """Make the relative ``file:``, ``onnx:`` and ``files:`` paths of ``raw``'s checkpoints absolute, from ``base``."""
    ckpts = raw.get("checkpoints")
    for ckpt in ckpts if isinstance(ckpts, list) else []:
        for key in ("file", "onnx"):
            value = ckpt.get(key) if isinstance(ckpt, dict) else None
            if value and not str(value).startswith(PKG_SCHEME) and not Path(value).expanduser().is_absolute():
                ckpt[key] = str((base / value).resolve())
        # A relative glob is taken from base too (not resolved: it holds glob characters).
        if isinstance(ckpt, dict) and CheckpointFiles.is_files(ckpt) and ckpt.get("files") \
                and not Path(ckpt["files"]).expanduser().is_absolute():
            ckpt["files"] = str(base.resolve() / ckpt["files"])


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML parse error in one line: ``line 3, column 5: mapping values are not allowed here``."""
    mark = getattr(e, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + str(getattr(e, "problem", None) or e).replace("\n", " ")


# ----------------------------------------------------------------------------- --set KEY=VALUE
SET_EXAMPLE = "--set autoencoder.epochs=5, --set cluster.seed=1 or --set checkpoints[0].id=my-model"
_SET_PART = re.compile(r"([A-Za-z_][A-Za-z0-9_-]*)((?:\[-?\d+\])*)")


def parse_set(item: str) -> tuple[list[str | int], Any]:
    """``KEY=VALUE`` as (path, value): ``checkpoints[0].planted.seed=3`` -> (['checkpoints', 0, 'planted', 'seed'], 3).

    The key is dotted mapping keys with optional list indices (``[0]``, ``[-1]``); the value is read
    as YAML (``5`` an int, ``0.5`` a float, ``true`` a bool, ``null`` None, ``[3, 3]`` a list, text
    otherwise). A malformed item is a ``ConfigError`` that shows the right form.
    """
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. {SET_EXAMPLE}")
    path: list[str | int] = []
    for part in key.split("."):
        m = _SET_PART.fullmatch(part)
        if not m:
            raise ConfigError(f"--set {item!r}: {part!r} is not a key; keys are names joined by '.', with list "
                              f"indices in brackets, e.g. {SET_EXAMPLE}")
        path.append(m.group(1))
        path.extend(int(i) for i in re.findall(r"-?\d+", m.group(2)))
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {item!r}: the value is not valid YAML ({_yaml_problem(e)}); "
                          f"quote the whole item, e.g. --set 'name=\"a: b\"'") from None
    return path, value


def set_path_text(path: list[str | int]) -> str:
    """``['checkpoints', 0, 'id']`` -> ``checkpoints[0].id`` (how errors name a place in the config)."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def apply_sets(raw: dict[str, Any], sets: Iterable[str]) -> dict[str, Any]:
    """A copy of the YAML mapping ``raw`` with each ``KEY=VALUE`` of ``sets`` applied, in order.

    Missing mappings on the way are created (``--set dask.address=tcp://h:8786`` works without a
    ``dask:`` section); a list index may be one past the end, to append (``checkpoints[3].id=x``
    on a list of 3). Keys are not checked here: validation names an unknown key with the allowed ones.
    """
    out = copy.deepcopy(raw)
    for item in sets:
        path, value = parse_set(item)
        node: Any = out
        for depth, part in enumerate(path):
            here = set_path_text(path[:depth]) or "the config's top level"
            last = depth == len(path) - 1
            if isinstance(part, int):
                if not isinstance(node, list):
                    raise ConfigError(f"--set {item!r}: {here} is not a list (it is {type(node).__name__}); "
                                      f"drop the [{part}]")
                if part == len(node):
                    node.append(None)
                elif not -len(node) <= part < len(node):
                    raise ConfigError(f"--set {item!r}: {here} has {len(node)} entries: use an index from 0 to "
                                      f"{len(node) - 1}, or {len(node)} to add one")
            elif not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {here} is {node!r}, not a mapping: set {here} itself, "
                                  f"e.g. --set {here}=VALUE")
            if last:
                node[part] = value
                break
            child = node[part] if isinstance(node, list) else node.get(part)
            if child is None:
                child = [] if isinstance(path[depth + 1], int) else {}
                node[part] = child
            node = child
    return out

"""dwk from Python or a notebook: kernels as a DataFrame, a whole analysis in one call.

Two functions, no config file, no Prefect, no store to set up (``import dwk`` exposes both lazily)::

    import timm, dwk

    model = timm.create_model("convnext_atto.d2_in1k", pretrained=True)
    df = dwk.kernels(model)              # one row per depthwise kernel: its (7, 7) values and its layer
    df.groupby("layer").norm.mean()      # e.g. the kernels' L2 norm by depth

    r = dwk.analyze([model, "mobilenetv3_large_100.ra_in1k", "weights/mine.pth"],
                    autoencoder={"epochs": 20})          # + a random-init control per known architecture
    r                                    # in a notebook: the checkpoint table (classified share, top clusters)
    r.layers.query("checkpoint == 'convnext_atto'")      # per layer: classified share, cluster shares, stride
    r.kernels.query("cluster_name == 'dog-center'")      # per kernel: cluster, cosine, values
    r.groups.loc["7x7"]                  # the clusters of one analysis group: names, shares, prototypes
    r.figures.show("gallery-*")          # the run's PNGs, inline

Inputs (to both): a torch ``nn.Module`` (timm or torchvision), a weights file (``.safetensors``,
``.pth/.pt/.bin/.ckpt``, read weights-only: by tensor shape, no model built and no pickle code run; or
with ``arch=``), an ``.onnx`` file, a timm local-dir folder, ``pkg://PACKAGE/PATH`` (a file inside an
installed package), a timm name ``arch.tag`` (pretrained weights through the Hugging Face Hub cache),
``torchvision:NAME`` (torchvision's published weights), or a config entry (a dict with ``id``, or a
:class:`~dwk.config.CheckpointSpec`). Every input goes through :mod:`dwk.sources`, as in a run config.

``kernels`` holds each kernel in one column, ``kernel``, as its (kh, kw) NumPy array rather than as
``k0..kN`` tap columns: one model often has several kernel shapes (EfficientNet: 3x3 and 5x5), whose
taps would not line up in one set of columns (a 3x3 kernel's ``k3`` is its middle row, a 5x5 kernel's
its top row) and would leave NaN columns; an array keeps its 2-D layout for plotting
(``plt.imshow(df.kernel[0])``), and ``np.stack(df[df["shape"] == "3x3"].kernel)`` gives the (n, 3, 3)
array back for NumPy or scikit-learn.
"""
from __future__ import annotations

import base64
import fnmatch
import html
import logging
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dwk.config import PKG_SCHEME, CheckpointSpec
from dwk.errors import CheckpointError, ConfigError, NoDepthwiseError
from dwk.sources._base import WEIGHT_SUFFIXES

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["Figures", "Result", "analyze", "kernels"]

logger = logging.getLogger(__name__)

KERNEL_COLUMNS = ["checkpoint", "layer", "module", "channel", "shape", "depth", "stride", "dilation", "out_channels",
                  "multiplier", "norm_after", "norm", "kernel"]  # + "label" for planted checkpoints
_ONNX_SUFFIX = ".onnx"


# ----------------------------------------------------------------------------- inputs -> checkpoint specs
def _is_module(obj: Any) -> bool:
    try:
        import torch.nn as nn
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    return isinstance(obj, nn.Module)


def _default_id(obj: Any) -> str:
    """The checkpoint id an input gets when none is given: the architecture, the file's stem, the name."""
    if _is_module(obj):
        name = (getattr(obj, "pretrained_cfg", None) or {}).get("architecture")
        return name or type(obj).__name__.lower()
    text = str(obj)
    if text.startswith(PKG_SCHEME):
        text = text[len(PKG_SCHEME):]
    path = Path(text)
    is_file = Path(str(obj)).expanduser().exists() or path.suffix.lower() in (_ONNX_SUFFIX, *WEIGHT_SUFFIXES)
    return (path.stem if is_file else path.name) or text.strip("/").replace("/", "-")


def _spec(obj: Any, ckpt_id: str | None = None, arch: str | None = None) -> CheckpointSpec:
    """The checkpoint spec (a config entry) that reads a path, a name or a config entry."""
    if isinstance(obj, CheckpointSpec):
        return obj if ckpt_id is None else obj.model_copy(update={"id": ckpt_id})
    if isinstance(obj, Mapping):
        return _validated(CheckpointSpec, {**obj, **({"id": ckpt_id} if ckpt_id else {})}, "checkpoint entry")
    if not isinstance(obj, (str, Path)):
        raise TypeError(f"dwk reads an nn.Module, a path, a name or a config entry (dict), not {type(obj).__name__}")
    text = str(obj)
    ckpt_id = ckpt_id or _default_id(obj)
    entry: dict[str, Any] = {"id": ckpt_id}
    local = Path(text).expanduser()
    if text.lower().endswith(_ONNX_SUFFIX) and not text.startswith(PKG_SCHEME):
        entry["onnx"] = str(local.resolve())
    elif text.startswith(PKG_SCHEME):
        entry["file"] = text
    elif local.exists() or isinstance(obj, Path) or local.suffix.lower() in WEIGHT_SUFFIXES or "/" in text:
        entry["file"] = str(local.resolve())  # a missing file fails in its source, with the path in the message
    elif text.startswith("torchvision:"):
        entry["arch"] = text  # torchvision's published weights
    elif ckpt_id != text:
        entry["arch"] = text  # a timm name ``arch.tag`` under another id: still the Hub's pretrained weights
    if arch is not None:
        entry["arch"] = arch
    return _validated(CheckpointSpec, entry, f"input {text!r}")


def _validated(model: type, data: dict, where: str):
    from pydantic import ValidationError

    from dwk.config import set_path_text

    try:
        return model.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"{set_path_text(list(x['loc'])) or '(top level)'}: "
                             f"{x['msg'].removeprefix('Value error, ')}" for x in e.errors(include_url=False))
        raise ConfigError(f"{where} is not valid: {problems}") from None


def _check_depthwise(model: Any, ckpt_id: str) -> None:
    from dwk.extract import iter_depthwise_convs

    if next(iter_depthwise_convs(model), None) is None:
        raise NoDepthwiseError(
            f"{ckpt_id!r}: {type(model).__name__} has no depthwise convolution (no 2-D conv with groups == "
            "in_channels > 1 and a kernel larger than 1x1); dwk analyses depthwise-separable CNNs such as "
            "ConvNeXt, EfficientNet or MobileNet")


def _shapes_match(model: Any, build, ignore: tuple[str, ...] = ()) -> bool:
    """Whether a model that ``build()`` makes (on the meta device: no memory, no init cost) has the
    same state-dict keys and shapes as ``model`` (keys under ``ignore``, a classifier, excepted)."""
    import torch

    try:
        with torch.device("meta"):
            ref = build()
    except Exception as e:  # noqa: BLE001 - an architecture that cannot be built is not this model's
        logger.debug("cannot build a reference model: %s: %s", type(e).__name__, e)
        return False
    own = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith(ignore)}
    other = {k: tuple(v.shape) for k, v in ref.state_dict().items() if not k.startswith(ignore)}
    return own == other


def infer_arch(model: Any) -> str | None:
    """The architecture name dwk's sources build ``model`` as: timm's (``pretrained_cfg["architecture"]``)
    or ``torchvision:NAME``; None when unknown, or when the model's parameters differ from that
    architecture's (built with other arguments, fused): it is then read by tensor shape."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("architecture")
    if name:
        import timm

        cls = cfg.get("classifier")
        ignore = tuple(f"{c}." for c in ((cls,) if isinstance(cls, str) else cls or ()))  # dropped when loading
        if _shapes_match(model, lambda: timm.create_model(name, pretrained=False), ignore):
            return name
        logger.info("%s: parameters differ from timm's %r (other arguments?): read by tensor shape", name, name)
        return None
    module = type(model).__module__
    if not module.startswith("torchvision.models."):
        return None
    import torchvision

    found = [n for n in torchvision.models.list_models(torchvision.models)
             if torchvision.models.get_model_builder(n).__module__ == module
             and _shapes_match(model, lambda n=n: torchvision.models.get_model(n, weights=None))]
    return f"torchvision:{found[0]}" if len(found) == 1 else None


def save_module(model: Any, folder: Path, ckpt_id: str) -> Path:
    """Write a module's state dict as ``<folder>/<id>-<sha256[:12]>.safetensors`` (the same weights,
    the same file: a second run finds them extracted already); returns its path."""
    import torch
    from safetensors.torch import save_file

    from dwk.sources import sha256_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").clone(memory_format=torch.contiguous_format)
             for k, v in model.state_dict().items()}
    fd, name = tempfile.mkstemp(dir=folder, prefix=f".{ckpt_id}-", suffix=".safetensors")
    os.close(fd)
    tmp = Path(name)
    try:
        save_file(state, str(tmp), metadata={"dwk": "nn.Module", "class": type(model).__name__})
        path = folder / f"{ckpt_id}-{sha256_file(tmp)[:12]}.safetensors"
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# ----------------------------------------------------------------------------- kernels
def kernels(model_or_path: Any, *, id: str | None = None, arch: str | None = None,  # noqa: A002 - the config's name
            reparameterize: bool = True) -> pd.DataFrame:
    """One row per depthwise kernel of a model or checkpoint, with its values and its layer.

    ``model_or_path``: an ``nn.Module``, a weights file, an ``.onnx`` file, ``pkg://PACKAGE/PATH``, a
    timm name ``arch.tag``, ``torchvision:NAME`` or a config entry (see the module docstring). Files
    are read weights-only (by tensor shape) unless ``arch`` names the architecture to load them into
    (then stride and what follows each conv are known too). ``id``: the ``checkpoint`` column (default:
    the architecture, the file's stem or the name). ``reparameterize``: fuse re-parameterisable models
    (RepVGG, MobileOne, ...) first, as a run does; a module passed in is copied, never changed.

    Columns: checkpoint, layer (index in model order), module (its path), channel (output channel),
    shape (``"7x7"``), depth (layer / (layers - 1)), stride and dilation (``"2x2"``; None when the source
    cannot know: weights-only files), out_channels, multiplier, norm_after (a normalization layer takes
    the conv's output; None when unknown), norm (the kernel's L2 norm), kernel (the (kh, kw) float32
    array), and label for planted checkpoints. Rows are in model order: by layer, then channel.

    Raises :class:`~dwk.errors.NoDepthwiseError` when there is no depthwise kernel, and
    :class:`~dwk.errors.CheckpointError` for an input that cannot be read.
    """
    from dwk.extract import extract_model

    if _is_module(model_or_path):
        ckpt_id = id or _default_id(model_or_path)
        _check_depthwise(model_or_path, ckpt_id)
        model = model_or_path
        if reparameterize:
            from dwk.extract import is_reparameterizable

            if is_reparameterizable(model):
                import copy

                model = copy.deepcopy(model)  # fused in place: never the caller's model
        extracted = extract_model(model, reparameterize=reparameterize)
        return _kernel_frame(ckpt_id, extracted)
    spec = _spec(model_or_path, id, arch)
    if not reparameterize:
        spec = spec.model_copy(update={"reparameterize": False})
    return _kernel_frame(spec.id, _extract_spec(spec))


def _extract_spec(spec: CheckpointSpec):
    """What ``dwk.pipeline.extract_checkpoint`` extracts from a spec, without a store."""
    from dwk import pipeline, sources

    data_dir = Path(tempfile.mkdtemp(prefix="dwk-checkpoints-")) if spec.planted is not None else None
    try:
        return pipeline.load_and_extract(sources.source_for(spec, data_dir))[1]
    except CheckpointError as e:
        if isinstance(e.__cause__, NoDepthwiseError):
            raise NoDepthwiseError(str(e)) from e
        raise


def _xy(v) -> str | None:
    return None if v is None else "x".join(str(int(a)) for a in v)


def _kernel_frame(ckpt_id: str, ex) -> pd.DataFrame:
    import pandas as pd

    from dwk.extract import REGULAR_PREFIX

    layers = {l.layer_index: l for l in ex.layers}
    parts = []
    for shape, arr in ex.kernels.items():
        if shape.startswith(REGULAR_PREFIX):
            continue
        lay, ch = ex.layer[shape], ex.channel[shape]
        values = np.empty(len(arr), dtype=object)
        for i, k in enumerate(arr):
            values[i] = k
        meta = [layers[int(i)] for i in lay]
        d = dict(
            checkpoint=ckpt_id, layer=lay.astype(np.int32), module=[m.module for m in meta],
            channel=(ch + np.array([m.channel_offset for m in meta], np.int32)).astype(np.int32), shape=shape,
            depth=np.array([m.depth for m in meta], np.float32), stride=[_xy(m.stride) for m in meta],
            dilation=[_xy(m.dilation) for m in meta], out_channels=[m.out_channels for m in meta],
            multiplier=pd.array([m.multiplier for m in meta], dtype="Int64"),
            norm_after=pd.array([m.norm_after for m in meta], dtype="boolean"),
            norm=np.sqrt((arr.astype(np.float64) ** 2).sum(axis=(1, 2))).astype(np.float32), kernel=values,
        )
        if ex.labels is not None:
            d["label"] = ex.labels[shape].astype(np.int16)
        parts.append(pd.DataFrame(d))
    df = pd.concat(parts, ignore_index=True)
    df = df.sort_values(["layer", "channel"], kind="stable", ignore_index=True)
    return df[KERNEL_COLUMNS + (["label"] if "label" in df else [])]


# ----------------------------------------------------------------------------- analyze
def analyze(models_or_paths: Any, *, store: str | Path | None = None, out: str | Path | None = None,
            controls: bool | Mapping[str, Any] = True, track: bool = False, **config_overrides: Any) -> Result:
    """The whole analysis of some models or checkpoints, in this process; returns a :class:`Result`.

    ``models_or_paths``: one input or a list of them (anything :func:`kernels` reads), or a dict
    ``{id: input}`` to name them. Each input becomes one checkpoint of a run config: an ``nn.Module``
    is saved as a safetensors file under ``<store's folder>/checkpoints/modules/`` and loaded into its
    architecture when that is known (timm's ``pretrained_cfg["architecture"]``, or the torchvision
    builder with exactly its parameters), else read by tensor shape.

    ``controls``: add a random-init null control (``{id: null-<arch>, arch: <arch>, pretrained:
    false}``) for each architecture that is known; a mapping is the config's ``controls:`` section
    (k-means, master key, regular convs, ...), with the null controls on. ``store`` / ``out``: the
    kernel store and the run folders (default: a new temporary folder; a store given keeps its
    extractions, so a second call skips them). ``track``: log the run to MLflow
    (``MLFLOW_TRACKING_URI``). ``config_overrides``: sections or fields of a run config
    (:class:`~dwk.config.RunConfig`), e.g. ``autoencoder={"epochs": 20}``, ``cluster={"seed": 1}``,
    ``dask={"n_workers": 1}``.

    A checkpoint that fails is in ``Result.failed`` (and logged) while the others go on; when none
    can be read, :class:`~dwk.errors.CheckpointsFailedError`. An ``nn.Module`` without a depthwise
    conv raises :class:`~dwk.errors.NoDepthwiseError` before anything runs.
    """
    from dwk import pipeline
    from dwk.config import RunConfig

    for key in ("checkpoints", "store", "out"):
        if key in config_overrides:
            raise ConfigError(f"analyze(): {key!r} is not a config override here; "
                              + ("pass the inputs as the first argument" if key == "checkpoints" else f"use {key}="))
    if isinstance(controls, Mapping):
        config_overrides["controls"] = dict(controls)
    tmp = Path(tempfile.mkdtemp(prefix="dwk-")) if store is None or out is None else None
    store_path = Path(store).expanduser().resolve() if store is not None else tmp / "store.zarr"
    out_path = Path(out).expanduser().resolve() if out is not None else (
        store_path.parent / "runs" if store is not None else tmp / "runs")

    named = _named_inputs(models_or_paths)
    specs: list[dict[str, Any]] = []
    for ckpt_id, obj in named:
        if _is_module(obj):
            _check_depthwise(obj, ckpt_id)
            arch = infer_arch(obj)
            path = save_module(obj, store_path.parent / "checkpoints" / "modules", ckpt_id)
            specs.append(dict(id=ckpt_id, file=str(path), **({"arch": arch} if arch else {})))
        else:
            specs.append(_spec(obj, ckpt_id).model_dump(exclude_defaults=True))
    if controls:
        specs += _null_controls(specs)
    cfg = _validated(RunConfig, {"checkpoints": specs, "store": store_path, "out": out_path, **config_overrides},
                     "analyze()'s config")
    summary = pipeline.run(cfg, track=track)
    return Result.from_summary(summary)


def _named_inputs(inputs: Any) -> list[tuple[str, Any]]:
    """``[(id, input)]`` with unique ids: a dict without ``id`` maps ids to inputs; anything else is one
    input or a list of them (config entries keep their ``id``)."""
    if isinstance(inputs, Mapping) and "id" not in inputs:
        pairs = [(str(k), v) for k, v in inputs.items()]
    else:
        if isinstance(inputs, (str, Path, Mapping, CheckpointSpec)) or _is_module(inputs) \
                or not isinstance(inputs, Iterable):
            inputs = [inputs]
        pairs = []
        for obj in inputs:
            if isinstance(obj, CheckpointSpec):
                pairs.append((obj.id, obj))
            elif isinstance(obj, Mapping):
                pairs.append((obj.get("id") or _default_id(obj.get("file") or obj.get("onnx") or obj.get("arch")
                                                           or "checkpoint"), obj))
            else:
                pairs.append((_default_id(obj), obj))
    if not pairs:
        raise ConfigError("analyze(): no input given")
    seen: dict[str, int] = {}
    out = []
    for ckpt_id, obj in pairs:
        n = seen.get(ckpt_id, 0) + 1
        seen[ckpt_id] = n
        out.append((ckpt_id if n == 1 else f"{ckpt_id}-{n}", obj))
    return out


def _arch_of(spec: dict[str, Any]) -> str | None:
    """The architecture a (validated) entry builds, for its random-init control; None when unknown."""
    from dwk import sources

    kind = sources.kind_of(CheckpointSpec.model_validate(spec))
    if kind in ("file", "planted", "torchvision") and spec.get("arch"):
        arch = spec["arch"]
    elif kind == "hub":
        arch = spec.get("arch") or spec["id"]
    else:
        return None  # weights-only, ONNX, local-dir, planted population: no architecture to initialise
    return arch.split(".", 1)[0]  # timm arch.tag -> arch; torchvision:NAME.WEIGHTS -> torchvision:NAME


def _null_controls(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from dwk import sources

    ids = {s["id"] for s in specs}
    have = {s["arch"] for s in specs if s.get("arch") and sources.is_control(CheckpointSpec.model_validate(s))}
    out = []
    for s in specs:
        arch = _arch_of(s)
        if arch is None or arch in have:
            continue
        have.add(arch)
        ckpt_id = f"null-{arch}"
        if ckpt_id not in ids:
            out.append(dict(id=ckpt_id, arch=arch, pretrained=False))
    return out


# ----------------------------------------------------------------------------- the result
_SHOWN = ["id", "source", "role", "n_kernels", "n_dead", "classified_share", "classified_share_tau", "top_clusters"]
_GROUP_FIGURES = ("gallery-*", "tau-curve-*", "depth-*", "latent-*")


def _png_html(path: Path, width: int | None = None) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    w = f' width="{width}"' if width else ""
    return (f'<figure style="display:inline-block;margin:4px"><img src="data:image/png;base64,{data}"{w}>'
            f'<figcaption style="font-size:smaller">{html.escape(path.name)}</figcaption></figure>')


class Figures(dict):
    """A run's figures: file name -> path of the PNG. In a notebook the group-level figures (cluster
    galleries, tau curves) show inline; ``show(pattern)`` shows those whose names match."""

    def show(self, pattern: str = "*") -> _Images:
        names = [n for n in self if fnmatch.fnmatch(n, pattern)]
        if not names:
            raise KeyError(f"no figure matches {pattern!r}; the run has {sorted(self)}")
        return _Images([self[n] for n in names])

    def _repr_html_(self) -> str:
        first = [n for p in _GROUP_FIGURES for n in self if fnmatch.fnmatch(n, p)]
        rest = [n for n in self if n not in first]
        body = "".join(_png_html(self[n], 420) for n in dict.fromkeys(first))
        if rest:
            body += ("<p>also: " + ", ".join(html.escape(n) for n in rest)
                     + " (<code>.show(pattern)</code>)</p>")
        return body


@dataclass
class _Images:
    paths: list[Path]

    def _repr_html_(self) -> str:
        return "".join(_png_html(p) for p in self.paths)


@dataclass(repr=False, eq=False)
class Result:
    """A finished run as DataFrames: per checkpoint, per layer, per kernel (``kernels``, read from the
    store when first used), per cluster (``groups``), with its figures and summary.

    - ``checkpoints``: one row per checkpoint (id, source, control, role, n_kernels, n_dead, n_rejected,
      classified_share, classified_share_tau, top_clusters, shapes, extraction, and the timm or
      torchvision metadata when known); ``tau_curves`` has their classified share over tau (index tau).
    - ``layers``: one row per (checkpoint, layer, shape): module, depth, n_kernels, n_dead,
      classified_share, classified_share_tau, cluster_shares (a dict), stride, out_channels, norm_after, kind.
    - ``kernels``: one row per kernel (:func:`dwk.export.kernels_table`'s columns: checkpoint, source,
      control, layer, module, depth, channel, shape, cluster, cluster_name, cosine, classified,
      classified_tau, dead, status) and ``kernel``, its (kh, kw) values.
    - ``groups``: one row per cluster, indexed by (group, cluster): name, size, share, minor,
      classified_share, prototype (a (kh, kw) array) and the nearest references (``ref_*``).
    - ``failed``: the checkpoints that could not be read (id, source, error).
    - ``figures`` (:class:`Figures`), ``summary`` (``summary.json`` as a dict), ``run_id``, ``store``,
      ``out`` (the run folder).
    """

    run_id: str
    store: Path
    out: Path
    summary: dict = field(repr=False)
    checkpoints: pd.DataFrame = field(repr=False)
    layers: pd.DataFrame = field(repr=False)
    groups: pd.DataFrame = field(repr=False)
    failed: pd.DataFrame = field(repr=False)
    tau_curves: pd.DataFrame = field(repr=False)
    figures: Figures = field(repr=False)

    @classmethod
    def load(cls, run: str | Path, store: str | Path | None = None) -> Result:
        """The result of a run: its folder (``runs/<run_id>``), its ``summary.json``, or a run id of ``store``."""
        from dwk.export import load_summary

        return cls.from_summary(load_summary(run, store)[0])

    @classmethod
    def from_summary(cls, summary: dict) -> Result:
        import pandas as pd

        rows = [{k: v for k, v in r.items() if k != "tau_curve"} for r in summary["checkpoints"]]
        checkpoints = pd.DataFrame(rows)
        tau = next((s["tau_curve"]["tau"] for s in summary["shapes"].values()), None)
        tau_curves = pd.DataFrame({r["id"]: r["tau_curve"] for r in summary["checkpoints"]},
                                  index=pd.Index(tau, name="tau") if tau else None)
        out = Path(summary["out"])
        fig_dir = out / "figures"
        figures = Figures({p.name: p for p in sorted(fig_dir.glob("*.png"))} if fig_dir.is_dir() else {})
        return cls(run_id=summary["run_id"], store=Path(summary["store"]), out=out, summary=summary,
                   checkpoints=checkpoints, layers=_layer_frame(summary), groups=_group_frame(summary),
                   failed=pd.DataFrame(summary.get("failed") or [], columns=["id", "source", "error"]),
                   tau_curves=tau_curves, figures=figures)

    @cached_property
    def kernels(self) -> pd.DataFrame:
        """One row per kernel of the run (every group), with its values (``kernel``)."""
        from dwk.export import _kernels_frame

        df = _kernels_frame(self.summary)
        df["kernel"] = _kernel_values(self.summary)
        return df

    def __repr__(self) -> str:
        shown = self.checkpoints[[c for c in _SHOWN if c in self.checkpoints]]
        text = f"dwk run {self.run_id} ({self.out})\n{shown.to_string(index=False)}"
        if len(self.failed):
            text += "\nfailed:\n" + self.failed.to_string(index=False)
        return text

    def _repr_html_(self) -> str:
        shown = self.checkpoints[[c for c in _SHOWN if c in self.checkpoints]].copy()
        if "top_clusters" in shown:
            shown["top_clusters"] = shown["top_clusters"].map(", ".join)
        groups = ", ".join(f"{g} (tau_null {s['tau_null']:.2f}, {len(s['clusters'])} clusters)"
                           for g, s in self.summary["shapes"].items())
        parts = [f"<p><b>dwk run</b> <code>{html.escape(self.run_id)}</code>: {len(shown)} checkpoints; "
                 f"groups {html.escape(groups)}<br>run folder <code>{html.escape(str(self.out))}</code>, store "
                 f"<code>{html.escape(str(self.store))}</code></p>",
                 shown.to_html(index=False, float_format=lambda v: f"{v:.3f}")]
        if len(self.failed):
            parts += ["<p><b>failed</b></p>", self.failed.to_html(index=False)]
        parts.append("<p><code>.layers</code>, <code>.kernels</code>, <code>.groups</code>, <code>.figures</code>, "
                     "<code>.tau_curves</code>, <code>.summary</code></p>")
        return "\n".join(parts)


def _layer_frame(summary: dict) -> pd.DataFrame:
    """The summary's per-layer rows, with each layer's stride, width and norm from the store's record."""
    import pandas as pd

    from dwk.store import KernelStore

    order = {r["id"]: i for i, r in enumerate(summary["checkpoints"])}  # as the checkpoint table: subjects first
    rows = sorted(({k: v for k, v in r.items() if k != "tau_curve"} for r in summary["layers"]),
                  key=lambda r: (order.get(r["checkpoint"], len(order)), r["layer"], r["shape"]))
    df = pd.DataFrame(rows)
    try:
        store = KernelStore(summary["store"], create=False)
    except Exception as e:  # noqa: BLE001 - a moved or deleted store: the summary's columns only
        logger.warning("store %s cannot be read (%s): layer metadata left out", summary["store"], e)
        return df
    info = {}
    for ckpt in df["checkpoint"].unique() if len(df) else []:
        rec = store.checkpoint(ckpt)
        for layer in rec.layers if rec is not None else []:
            info[(ckpt, layer["layer_index"])] = dict(
                stride=_xy(layer.get("stride")), out_channels=layer.get("out_channels"),
                norm_after=layer.get("norm_after"), kind=layer.get("kind", "depthwise"))
    extra = pd.DataFrame([info.get((c, l), {}) for c, l in zip(df["checkpoint"], df["layer"])],
                         columns=["stride", "out_channels", "norm_after", "kind"])
    return pd.concat([df, extra], axis=1)


def _group_frame(summary: dict) -> pd.DataFrame:
    import pandas as pd

    from dwk.extract import group_shape
    from dwk.pipeline import cluster_table

    rows = cluster_table(summary["shapes"])
    for r in rows:
        r["prototype"] = np.asarray(r["prototype"], np.float32).reshape(group_shape(r["shape"]))
    cols = ["group", "cluster", "name", "size", "share", "minor", "classified_share", "prototype"]
    df = pd.DataFrame(rows).rename(columns={"shape": "group", "id": "cluster"}) if rows else pd.DataFrame(columns=cols)
    df = df[cols + [c for c in df.columns if c not in cols]]
    return df.set_index(["group", "cluster"])


def _kernel_values(summary: dict) -> np.ndarray:
    """Each kernel's (kh, kw) values, in the row order of ``dwk.export.kernels_table`` (group by group,
    checkpoints at their offsets in the run), from the store."""
    from dwk.extract import stored_group
    from dwk.store import KernelStore

    store = KernelStore(summary["store"], create=False)
    offsets = store.run_meta(summary["run_id"])["offsets"]
    parts = []
    for group in summary["shapes"]:
        spans = offsets[group]
        n = max(b for _, b in spans.values())
        values = np.empty(n, dtype=object)
        for ckpt, (a, b) in spans.items():
            arr = store.kernels_verified(ckpt, stored_group(group))
            for i, k in enumerate(arr):
                values[a + i] = k
        parts.append(values)
    return np.concatenate(parts) if parts else np.empty(0, dtype=object)

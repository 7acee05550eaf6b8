"""Find depthwise kernels by structure and group them by shape (METHOD 2.1).

A depthwise (DW) kernel is the weight of a 2-D convolution with ``groups == in_channels > 1`` and a
kernel larger than 1x1. Detection looks at module types and attributes only, never at names, so
timm's ``Conv2dSame``, ``MixedConv2d`` parts and re-parameterised convs are found alike. With a
channel multiplier m (``out_channels = m * in_channels``) each output channel is one kernel.

Layers are indexed in module-definition order (``named_modules``), which is forward order for the
architectures timm ships. Sources without a torch model (a bare safetensors file, an ONNX graph)
describe their layers as :class:`KernelLayer` items and go through the same :func:`assemble`.

Per layer dwk also records whether a **normalization layer follows** the depthwise conv. For a torch
model this is observed, not guessed from names: one forward pass on a small random input, with
hooks, finds the first layer that runs after the conv; the answer is yes when that layer is a
normalization layer and its input is the conv's output (or a view of it, as ConvNeXt's permute).
When the model cannot run on a probe input the answer is ``None`` (unknown).

Re-parameterisable models (RepVGG, MobileOne, FastViT, RepViT, RepGhost: training-time branches
that fuse into one conv for inference) are fused with ``timm.utils.reparameterize_model`` first when
asked, so the kernels are the ones the deployed network computes with; ``Extracted.reparameterized``
records it.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from dwk.errors import NoDepthwiseError  # noqa: F401 - raised here; callers import it from either module



logger = logging.getLogger(__name__)

# Bump when the extracted content or its metadata changes: stores extracted by an older version
# are redone on the next run.
# 2: per-layer norm_after / part_of / channel_offset / param; re-parameterisation before extraction.
# 3: the regular-convolution comparison set ("regular-<shape>" groups, Layer.kind).
EXTRACTOR_VERSION = 3
REGULAR_PREFIX = "regular-"
# A run's analysis group of planted checkpoints, kept apart from real ones of the same shape (see
# dwk.pipeline.analysis_groups); it reads the checkpoints' ``<shape>`` arrays.
PLANTED_PREFIX = "planted-"

# Modules that pass their input through unchanged (at inference): skipped when looking for what
# follows a depthwise conv.
_NOOP_TYPES = ("Identity", "Dropout", "Dropout2d", "DropPath", "DropBlock2d")
# timm modules whose classes are all normalization layers (plain or fused with an activation).
_TIMM_NORM_MODULES = ("timm.layers.norm", "timm.layers.norm_act", "timm.layers.evo_norm",
                      "timm.layers.filter_response_norm")


def is_depthwise(conv) -> bool:
    """True for a 2-D conv whose every group sees one input channel, with a kernel larger than 1x1."""
    import torch.nn as nn

    if not isinstance(conv, nn.Conv2d):
        return False
    return conv.groups > 1 and conv.groups == conv.in_channels and tuple(conv.kernel_size) != (1, 1)


def iter_depthwise_convs(model) -> Iterator[tuple[str, object]]:
    """Yield ``(module_path, conv)`` for every depthwise conv of a torch module, in definition order."""
    for path, module in model.named_modules():
        if is_depthwise(module):
            yield path, module


@dataclass(frozen=True)
class Layer:
    """Per-layer metadata recorded beside the kernels.

    Fields a source cannot know are ``None``: a bare weights file has no stride, padding or input
    channels (``multiplier`` is then unknown too), and no graph to tell what follows the conv.
    """

    layer_index: int
    module: str
    shape: str
    stride: tuple[int, int] | None
    dilation: tuple[int, int] | None
    padding: str | None
    in_channels: int | None
    out_channels: int
    multiplier: int | None
    depth: float  # layer_index / (n_layers - 1), 0 for a single layer
    norm_after: bool | None = None  # a normalization layer takes this conv's output
    part_of: str | None = None  # the mixed-kernel layer (timm MixedConv2d) this conv is one part of
    channel_offset: int = 0  # first output channel of this part within ``part_of``
    param: str | None = None  # the weight tensor's name in the checkpoint
    kind: str = "depthwise"  # or "regular": the comparison set (see extract_regular)

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("stride", "dilation"):
            if d[k] is not None:
                d[k] = [int(x) for x in d[k]]
        return d


@dataclass
class KernelLayer:
    """One depthwise layer as a source found it, before indexing: ``weight`` is (out, kh, kw)."""

    module: str
    weight: np.ndarray
    stride: tuple[int, int] | None = None
    dilation: tuple[int, int] | None = None
    padding: str | None = None
    in_channels: int | None = None
    norm_after: bool | None = None
    part_of: str | None = None
    channel_offset: int = 0
    param: str | None = None


def shape_key(kh: int, kw: int) -> str:
    """The shape group name: ``7x7``, ``1x11``."""
    return f"{kh}x{kw}"


def group_shape(group: str) -> tuple[int, int]:
    """The kernel shape of a group name: ``7x7``, ``regular-7x7`` and ``planted-7x7`` -> (7, 7)."""
    kh, kw = stored_group(group).removeprefix(REGULAR_PREFIX).split("x")
    return int(kh), int(kw)


def stored_group(group: str) -> str:
    """The checkpoint arrays an analysis group reads: ``planted-7x7`` -> ``7x7``; others as they are."""
    return group.removeprefix(PLANTED_PREFIX)


@dataclass
class Extracted:
    """All depthwise kernels of one checkpoint, grouped by shape.

    ``kernels[shape]`` is (n, kh, kw) float32 ordered by layer then channel; ``layer[shape]`` and
    ``channel[shape]`` give each kernel's layer index and output channel; ``labels[shape]`` holds
    planted labels when the checkpoint has them.
    """

    layers: list[Layer]
    kernels: dict[str, np.ndarray]
    layer: dict[str, np.ndarray]
    channel: dict[str, np.ndarray]
    labels: dict[str, np.ndarray] | None = None
    reparameterized: bool = False

    @property
    def n_kernels(self) -> int:
        """Depthwise kernels (the regular comparison set is not counted)."""
        return sum(len(v) for k, v in self.kernels.items() if not k.startswith(REGULAR_PREFIX))


def assemble(items: Sequence[KernelLayer], labels: dict[str, np.ndarray] | None = None, *,
             reparameterized: bool = False) -> Extracted:
    """Index depthwise layers (in the given order) and group their kernels by shape.

    ``labels`` maps a layer's ``module`` to one planted label per output channel.
    """
    n = len(items)
    if not n:
        raise NoDepthwiseError("no depthwise kernels to assemble")
    layers: list[Layer] = []
    parts: dict[str, list[tuple[np.ndarray, int, np.ndarray | None]]] = {}
    for i, it in enumerate(items):
        w = np.asarray(it.weight, dtype=np.float32)
        if w.ndim != 3:
            raise ValueError(f"layer {it.module!r}: expected (out, kh, kw) kernels, got shape {w.shape}")
        out_ch, kh, kw = w.shape
        key = shape_key(kh, kw)
        layers.append(Layer(
            layer_index=i, module=it.module, shape=key,
            stride=None if it.stride is None else tuple(int(s) for s in it.stride),
            dilation=None if it.dilation is None else tuple(int(d) for d in it.dilation),
            padding=it.padding, in_channels=it.in_channels, out_channels=int(out_ch),
            multiplier=None if not it.in_channels else int(out_ch // it.in_channels),
            depth=i / (n - 1) if n > 1 else 0.0, norm_after=it.norm_after, part_of=it.part_of,
            channel_offset=int(it.channel_offset), param=it.param,
        ))
        lab = None
        if labels is not None:
            lab = labels.get(it.module)
            if lab is None or len(lab) != out_ch:
                raise ValueError(f"planted labels for layer {it.module!r} are missing or of the wrong length")
        parts.setdefault(key, []).append((w, i, lab))
    return Extracted(
        layers=layers,
        kernels={k: np.concatenate([w for w, _, _ in v]) for k, v in parts.items()},
        layer={k: np.concatenate([np.full(len(w), i, np.int32) for w, i, _ in v]) for k, v in parts.items()},
        channel={k: np.concatenate([np.arange(len(w), dtype=np.int32) for w, _, _ in v]) for k, v in parts.items()},
        labels=None if labels is None else {k: np.concatenate([l for _, _, l in v]).astype(np.int16) for k, v in parts.items()},
        reparameterized=reparameterized,
    )


# ----------------------------------------------------------------------------- re-parameterisation
def is_reparameterizable(model) -> bool:
    """True when a submodule can fuse its training-time branches (what timm's reparameterize_model calls)."""
    return any(hasattr(m, a) for m in model.modules() if m is not model
               for a in ("fuse", "reparameterize", "switch_to_deploy"))


def fuse_branches(model):
    """Fuse a re-parameterisable model in place; returns ``(model, fused)``.

    ``timm.utils.reparameterize_model`` folds parallel branches and batch norms into one conv per
    block, which is the conv the deployed network runs: its kernels are what dwk analyses.
    """
    if not is_reparameterizable(model):
        return model, False
    from timm.utils import reparameterize_model

    model = reparameterize_model(model, inplace=True)
    logger.info("re-parameterised %s before extraction", type(model).__name__)
    return model, True


# ----------------------------------------------------------------------------- what follows a conv
def _is_norm(module) -> bool:
    import torch.nn as nn

    norms = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.LayerNorm, nn.GroupNorm,
             nn.LocalResponseNorm, nn.RMSNorm)
    t = type(module)
    return isinstance(module, norms) or t.__module__ in _TIMM_NORM_MODULES or t.__name__ == "FrozenBatchNorm2d"


def _storage(t) -> int | None:
    import torch

    return t.untyped_storage().data_ptr() if isinstance(t, torch.Tensor) else None


def _probe_sizes(model) -> tuple[int, list[tuple[int, int]]]:
    """Input channels and the spatial sizes to try for the probe pass: small first, then the native one."""
    import torch.nn as nn

    cfg = getattr(model, "pretrained_cfg", None) or {}
    input_size = cfg.get("input_size")
    if input_size:
        in_chans = int(input_size[0])
    else:
        first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        in_chans = first.in_channels if first is not None else 3
    native = tuple(int(s) for s in input_size[1:]) if input_size else (224, 224)
    if cfg.get("fixed_input_size"):
        return in_chans, [native]
    return in_chans, [(64, 64), native] if native != (64, 64) else [native]


def trace_norm_after(model, units: dict[str, object]) -> dict[str, bool | None]:
    """For each unit (a depthwise conv or the mixed layer it is part of): is it followed by a norm layer?

    One forward pass in eval mode with hooks records the order in which modules start and the
    storage of each unit's output. After a unit finishes, no-op modules (Identity, Dropout,
    DropPath) and containers are skipped; the first remaining module decides: True when it is a
    normalization layer whose input shares the unit output's storage. ``None`` when no probe input
    runs through the model.
    """
    import torch

    result: dict[str, bool | None] = {p: None for p in units}
    if not units:
        return result
    in_chans, sizes = _probe_sizes(model)
    events: list[tuple] = []
    keep: list = []  # unit outputs stay alive during the pass, so their storage is never reused

    def pre(mod, args):
        events.append(("enter", mod, _storage(args[0]) if args else None))

    def post(path):
        def hook(mod, args, out):
            keep.append(out)
            events.append(("exit", path, _storage(out)))
        return hook

    handles = [m.register_forward_pre_hook(pre) for m in model.modules()]
    handles += [m.register_forward_hook(post(p)) for p, m in units.items()]
    was_training = model.training
    model.eval()
    ran = False
    try:
        gen = torch.Generator().manual_seed(0)
        for size in sizes:
            events.clear()
            keep.clear()
            try:
                with torch.no_grad():
                    model(torch.randn(1, in_chans, *size, generator=gen))
                ran = True
                break
            except Exception as e:  # noqa: BLE001 - any failure of a probe pass only means "unknown"
                logger.debug("probe pass at %s failed: %s: %s", size, type(e).__name__, e)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
        keep.clear()
    if not ran:
        logger.warning("%s: no probe input runs through the model; norm_after is unknown", type(model).__name__)
        return result
    for i, ev in enumerate(events):
        if ev[0] != "exit" or result.get(ev[1]) is not None:
            continue
        _, path, ptr = ev
        verdict = False
        for kind, mod, in_ptr in events[i + 1:]:
            if kind != "enter":
                continue
            if _is_norm(mod):
                verdict = ptr is not None and in_ptr == ptr
                break
            if type(mod).__name__ in _NOOP_TYPES or next(mod.children(), None) is not None:
                continue
            break
        result[path] = verdict
    return result


# ----------------------------------------------------------------------------- torch models
def _mixed_parts(model) -> dict[str, tuple[str, int]]:
    """conv path -> (MixedConv2d path, channel offset) for the parts of timm's mixed-kernel convs."""
    try:
        from timm.layers import MixedConv2d
    except ImportError:  # timm is a dependency; a torch-only install still extracts plain convs
        return {}
    out = {}
    for path, m in model.named_modules():
        if isinstance(m, MixedConv2d):
            offset = 0
            for name, part in m.named_children():
                out[f"{path}.{name}" if path else name] = (path, offset)
                offset += part.out_channels
    return out


def extract_model(model, labels: dict[str, np.ndarray] | None = None, *, reparameterize: bool = False,
                  trace_norms: bool = True) -> Extracted:
    """Extract every depthwise kernel of a torch module. ``labels`` maps module path -> per-channel label.

    ``reparameterize=True`` fuses re-parameterisable models first (in place); ``trace_norms``
    runs the probe pass that fills ``Layer.norm_after``.
    """
    fused = False
    if reparameterize:
        model, fused = fuse_branches(model)
    convs = list(iter_depthwise_convs(model))
    if not convs:
        n_convs = sum(1 for m in model.modules() if type(m).__name__.endswith("Conv2d"))
        raise NoDepthwiseError(
            f"{type(model).__name__} has no depthwise convolution (found {n_convs} 2-D convs, none with "
            "groups == in_channels > 1 and a kernel larger than 1x1); dwk analyses depthwise-separable CNNs "
            "such as ConvNeXt, EfficientNet or MobileNet"
        )
    mixed = _mixed_parts(model)
    norm_after: dict[str, bool | None] = {}
    if trace_norms:
        units = {}
        for path, _ in convs:
            unit = mixed[path][0] if path in mixed else path
            units[unit] = model.get_submodule(unit) if unit else model
        traced = trace_norm_after(model, units)
        norm_after = {path: traced[mixed[path][0] if path in mixed else path] for path, _ in convs}
    items = []
    for path, conv in convs:
        w = conv.weight.detach().to("cpu").float().numpy()  # (out, 1, kh, kw)
        out_ch, _, kh, kw = w.shape
        pad = conv.padding if isinstance(conv.padding, str) else "x".join(map(str, conv.padding))
        part_of, offset = mixed.get(path, (None, 0))
        items.append(KernelLayer(
            module=path, weight=w.reshape(out_ch, kh, kw), stride=tuple(conv.stride), dilation=tuple(conv.dilation),
            padding=str(pad), in_channels=conv.in_channels, norm_after=norm_after.get(path), part_of=part_of,
            channel_offset=offset, param=f"{path}.weight" if path else "weight",
        ))
    return assemble(items, labels, reparameterized=fused)


# ----------------------------------------------------------------------------- regular convs
def is_regular(conv) -> bool:
    """A dense 2-D conv (groups == 1) with a kernel larger than 1x1: the comparison set."""
    import torch.nn as nn

    return isinstance(conv, nn.Conv2d) and conv.groups == 1 and tuple(conv.kernel_size) != (1, 1)


def extract_regular(model, max_per_layer: int = 256, seed: int = 0) -> Extracted | None:
    """Regular (non-depthwise) kernels as a comparison set, at most ``max_per_layer`` per layer.

    A regular conv of shape (out, in, kh, kw) holds out*in kernels; a seeded sample of
    ``max_per_layer`` of them is kept, and ``channel`` holds each one's flat ``out * in + in`` index.
    Shape groups are named ``regular-<shape>``; layer indices follow the model's order among the
    regular convs. Returns None when the model has none.
    """
    rng = np.random.default_rng(seed)
    convs = [(p, m) for p, m in model.named_modules() if is_regular(m)]
    if not convs:
        return None
    n = len(convs)
    layers, parts = [], {}
    for i, (path, conv) in enumerate(convs):
        w = conv.weight.detach().to("cpu").float().numpy()
        out_ch, in_ch, kh, kw = w.shape
        flat = w.reshape(out_ch * in_ch, kh, kw)
        idx = np.arange(len(flat)) if len(flat) <= max_per_layer else np.sort(
            rng.choice(len(flat), max_per_layer, replace=False))
        key = REGULAR_PREFIX + shape_key(kh, kw)
        pad = conv.padding if isinstance(conv.padding, str) else "x".join(map(str, conv.padding))
        layers.append(Layer(layer_index=i, module=path, shape=key, stride=tuple(conv.stride),
                            dilation=tuple(conv.dilation), padding=str(pad), in_channels=in_ch, out_channels=out_ch,
                            multiplier=None, depth=i / (n - 1) if n > 1 else 0.0, param=f"{path}.weight",
                            kind="regular"))
        parts.setdefault(key, []).append((flat[idx], i, idx.astype(np.int32)))
    return Extracted(
        layers=layers,
        kernels={k: np.concatenate([w for w, _, _ in v]) for k, v in parts.items()},
        layer={k: np.concatenate([np.full(len(w), i, np.int32) for w, i, _ in v]) for k, v in parts.items()},
        channel={k: np.concatenate([c for _, _, c in v]) for k, v in parts.items()},
    )


def with_regular(ex: Extracted, reg: Extracted | None) -> Extracted:
    """Add a regular-conv comparison set to a depthwise extraction (layer indices follow the DW ones)."""
    if reg is None:
        return ex
    off = len(ex.layers)
    layers = ex.layers + [Layer(**{**r.to_dict(), "layer_index": r.layer_index + off,
                                   "stride": tuple(r.stride), "dilation": tuple(r.dilation)}) for r in reg.layers]
    labels = None
    if ex.labels is not None:  # regular kernels are never planted: label -2
        labels = {**ex.labels, **{k: np.full(len(v), -2, np.int16) for k, v in reg.kernels.items()}}
    return Extracted(
        layers=layers,
        kernels={**ex.kernels, **reg.kernels},
        layer={**ex.layer, **{k: v + off for k, v in reg.layer.items()}},
        channel={**ex.channel, **reg.channel},
        labels=labels,
        reparameterized=ex.reparameterized,
    )

"""Find depthwise kernels by structure and group them by shape (METHOD 2.1).

A depthwise (DW) kernel is the weight of a 2-D convolution with ``groups == in_channels > 1`` and a
kernel larger than 1x1. Detection looks at module types and attributes only, never at names, so
timm's ``Conv2dSame``, ``MixedConv2d`` parts and re-parameterised convs are found alike. With a
channel multiplier m (``out_channels = m * in_channels``) each output channel is one kernel.

Layers are indexed in module-definition order (``named_modules``), which is forward order for the
architectures timm ships.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np

logger = logging.getLogger(__name__)

# Bump when the extracted content or its metadata changes: stores extracted by an older version
# are redone on the next run.
EXTRACTOR_VERSION = 1


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
    """Per-layer metadata recorded beside the kernels."""

    layer_index: int
    module: str
    shape: str
    stride: tuple[int, int]
    dilation: tuple[int, int]
    padding: str
    in_channels: int
    out_channels: int
    multiplier: int
    depth: float  # layer_index / (n_layers - 1), 0 for a single layer

    def to_dict(self) -> dict:
        return asdict(self)


def shape_key(kh: int, kw: int) -> str:
    """The shape group name: ``7x7``, ``1x11``."""
    return f"{kh}x{kw}"


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

    @property
    def n_kernels(self) -> int:
        return sum(len(v) for v in self.kernels.values())


class NoDepthwiseError(ValueError):
    """The model holds no depthwise convolution: nothing to analyse."""


def extract_model(model, labels: dict[str, np.ndarray] | None = None) -> Extracted:
    """Extract every depthwise kernel of a torch module. ``labels`` maps module path -> per-channel label."""
    convs = list(iter_depthwise_convs(model))
    if not convs:
        n_convs = sum(1 for m in model.modules() if type(m).__name__.endswith("Conv2d"))
        raise NoDepthwiseError(
            f"{type(model).__name__} has no depthwise convolution (found {n_convs} 2-D convs, none with "
            "groups == in_channels > 1 and a kernel larger than 1x1); dwk analyses depthwise-separable CNNs "
            "such as ConvNeXt, EfficientNet or MobileNet"
        )
    n = len(convs)
    layers: list[Layer] = []
    parts: dict[str, list[tuple[np.ndarray, int, np.ndarray | None]]] = {}
    for i, (path, conv) in enumerate(convs):
        w = conv.weight.detach().to("cpu").float().numpy()  # (out, 1, kh, kw)
        out_ch, _, kh, kw = w.shape
        key = shape_key(kh, kw)
        pad = conv.padding if isinstance(conv.padding, str) else "x".join(map(str, conv.padding))
        layers.append(
            Layer(
                layer_index=i, module=path, shape=key, stride=tuple(conv.stride), dilation=tuple(conv.dilation),
                padding=str(pad), in_channels=conv.in_channels, out_channels=out_ch,
                multiplier=out_ch // conv.in_channels, depth=i / (n - 1) if n > 1 else 0.0,
            )
        )
        lab = None
        if labels is not None:
            lab = labels.get(path)
            if lab is None or len(lab) != out_ch:
                raise ValueError(f"planted labels for layer {path!r} are missing or of the wrong length")
        parts.setdefault(key, []).append((w.reshape(out_ch, kh, kw), i, lab))
    return Extracted(
        layers=layers,
        kernels={k: np.concatenate([w for w, _, _ in v]) for k, v in parts.items()},
        layer={k: np.concatenate([np.full(len(w), i, np.int32) for w, i, _ in v]) for k, v in parts.items()},
        channel={k: np.concatenate([np.arange(len(w), dtype=np.int32) for w, _, _ in v]) for k, v in parts.items()},
        labels=None if labels is None else {k: np.concatenate([l for _, _, l in v]).astype(np.int16) for k, v in parts.items()},
    )

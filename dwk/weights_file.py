"""Weights-only mode: depthwise kernels straight from a safetensors file, no model built.

A config entry with ``file:`` and no ``arch:`` means this mode. Without the architecture, a
depthwise kernel is recognised by its tensor shape alone (METHOD 2.1): a 4-D floating-point tensor
of shape (C, 1, kh, kw) with C > 1 and a kernel larger than 1x1. The file is read tensor by tensor
through ``safetensors.safe_open`` (memory-mapped): only the header is parsed for every tensor, and
only the depthwise ones are materialised, so a multi-GB checkpoint costs the size of its
depthwise kernels in memory.

What the file cannot say is recorded as unknown (``None``): stride, padding, input channels (so
the channel multiplier), and whether a normalization layer follows. Layers are ordered by the
natural order of their tensor names (``stages.2`` before ``stages.10``), since a safetensors file
keeps no module order. One ambiguity is inherent: a regular conv with a single input channel (a
grayscale stem) has the same (C, 1, kh, kw) shape; use ``arch:`` for such checkpoints.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

from dwk.extract import Extracted, KernelLayer, NoDepthwiseError, assemble

logger = logging.getLogger(__name__)


def natural_key(name: str) -> list:
    """Sort key that orders embedded integers numerically: ``blocks.2`` < ``blocks.10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def is_depthwise_shape(shape) -> bool:
    """(C, 1, kh, kw) with C > 1 and a kernel larger than 1x1."""
    return len(shape) == 4 and shape[1] == 1 and shape[0] > 1 and shape[2] * shape[3] > 1


def depthwise_tensor_names(path: Path) -> list[str]:
    """Names of the depthwise-shaped floating-point tensors of a safetensors file, in natural order.

    Reads the header only.
    """
    from safetensors import safe_open

    names = []
    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():
            sl = f.get_slice(name)
            if is_depthwise_shape(sl.get_shape()) and sl.get_dtype().startswith(("F", "BF")):
                names.append(name)
    return sorted(names, key=natural_key)


def extract_safetensors(path: Path) -> Extracted:
    """Every depthwise-shaped tensor of a safetensors file, one layer per tensor, streamed.

    Raises ``NoDepthwiseError`` when the file holds none; parse errors propagate (the caller
    turns them into a ``CheckpointError`` naming the checkpoint).
    """
    from safetensors import safe_open

    names = depthwise_tensor_names(path)
    if not names:
        raise NoDepthwiseError(
            f"{path.name} holds no tensor of shape (C, 1, kh, kw) with C > 1 and kh*kw > 1: no depthwise "
            "kernels in weights-only mode (give 'arch' to build the model and find convs by structure)"
        )
    items = []
    with safe_open(str(path), framework="pt") as f:
        for name in names:
            t = f.get_tensor(name).float().numpy()  # (C, 1, kh, kw); bf16/fp16 widened to fp32
            module = name[: -len(".weight")] if name.endswith(".weight") else name
            items.append(KernelLayer(module=module, weight=t.reshape(t.shape[0], *t.shape[2:]), param=name))
    logger.info("%s: %d depthwise-shaped tensors (weights-only mode)", path.name, len(items))
    return assemble(items)

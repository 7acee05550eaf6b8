"""Weights-only source: depthwise kernels straight from a weights file, no model built.

A config entry with ``file:`` (a ``.safetensors``, ``.pth``, ``.pt``, ``.bin`` or ``.ckpt`` file,
or ``pkg://PACKAGE/PATH``) and no ``arch:`` means this mode. Without the architecture, a depthwise
kernel is recognised by its tensor shape alone (METHOD 2.1): a 4-D floating-point tensor of shape
(C, 1, kh, kw) with C > 1 and a kernel larger than 1x1.

- **safetensors** is read tensor by tensor through ``safe_open`` (memory-mapped): only the header
  is parsed for every tensor and only the depthwise ones are materialised. The file keeps no module
  order, so layers follow the natural order of their names (``blocks.2`` before ``blocks.10``).
- **pickles** are read with ``torch.load(weights_only=True, mmap=True)`` (legacy-format files,
  which cannot be mapped, whole), unwrapped like the arch mode (``state_dict``, ``model``, ...,
  ``module.`` prefixes). A state dict keeps the order in which the model registered its modules,
  which is forward order: layers follow it.

What the file cannot say is recorded as unknown (``None``): stride, padding, input channels (so
the channel multiplier), and whether a normalization layer follows. One ambiguity is inherent: a
regular conv with a single input channel (a grayscale stem) has the same (C, 1, kh, kw) shape;
give ``arch:`` for such checkpoints.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

from dwk.errors import CheckpointError, NoDepthwiseError
from dwk.sources._base import Loaded, Source, existing_file, is_weight_file, package_meta, sha256_file

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


def _no_depthwise(path: Path) -> NoDepthwiseError:
    return NoDepthwiseError(
        f"no depthwise kernels in {path.name}: it holds no tensor of shape (C, 1, kh, kw) with C > 1 and "
        "kh*kw > 1 (weights-only mode); give 'arch' to build the model and find convs by structure"
    )


def _layer(name: str, weight):
    from dwk.extract import KernelLayer

    t = weight.float().numpy()  # (C, 1, kh, kw); bf16/fp16 widened to fp32
    module = name[: -len(".weight")] if name.endswith(".weight") else name
    return KernelLayer(module=module, weight=t.reshape(t.shape[0], *t.shape[2:]), param=name)


def extract_safetensors(path: Path):
    """Every depthwise-shaped tensor of a safetensors file, one layer per tensor, streamed.

    Raises ``NoDepthwiseError`` when the file holds none; parse errors propagate (the source turns
    them into a ``CheckpointError`` naming the checkpoint).
    """
    from safetensors import safe_open

    from dwk.extract import assemble

    names = depthwise_tensor_names(path)
    if not names:
        raise _no_depthwise(path)
    with safe_open(str(path), framework="pt") as f:
        items = [_layer(name, f.get_tensor(name)) for name in names]
    logger.info("%s: %d depthwise-shaped tensors (weights-only mode)", path.name, len(items))
    return assemble(items)


def extract_pickle(path: Path, ckpt_id: str, info: dict | None = None):
    """Every depthwise-shaped tensor of a ``.pth/.pt/.bin`` state dict, in the state dict's order."""
    from dwk.extract import assemble
    from dwk.sources._torch import read_state_dict

    sd = read_state_dict(path, ckpt_id, info)
    items = [_layer(name, t) for name, t in sd.items() if t.is_floating_point() and is_depthwise_shape(tuple(t.shape))]
    if not items:
        raise _no_depthwise(path)
    logger.info("%s: %d depthwise-shaped tensors (weights-only mode)", path.name, len(items))
    return assemble(items)


class WeightsOnlySource(Source):
    kind = "weights"
    builds_model = False

    @staticmethod
    def claims(spec) -> bool:
        return spec.file is not None and not spec.arch and is_weight_file(spec.file)

    def fingerprint(self) -> str:
        return sha256_file(existing_file(self.spec.file, self.spec.id))

    def load(self) -> Loaded:
        spec = self.spec
        path = existing_file(spec.file, spec.id)
        meta: dict = {}
        try:
            if path.suffix == ".safetensors":
                extracted = extract_safetensors(path)
                meta["format"] = "safetensors"
            else:
                extracted = extract_pickle(path, spec.id, meta)
        except NoDepthwiseError as e:
            raise CheckpointError(spec.id, str(e)) from e
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - safetensors raises its own types for a corrupt or foreign file
            raise CheckpointError(
                spec.id, f"cannot read {path.name} as a {path.suffix} checkpoint ({type(e).__name__}: "
                f"{str(e)[:300]}); the file is truncated, corrupt or not a checkpoint"
            ) from e
        meta.update(mode="weights-only", sha256=sha256_file(path))
        if pkg := package_meta(spec.file):
            meta["package"] = pkg
        return Loaded(None, None, path, extracted=extracted, meta=meta)

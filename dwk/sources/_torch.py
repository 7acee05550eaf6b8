"""Torch machinery shared by the sources that build a model: safe reading, unwrapping, key matching, building.

- :func:`read_state_dict` reads safetensors, or a pickle with ``torch.load(weights_only=True)`` only
  (a pickle that would run code is refused), memory-mapped where the file format allows it, and
  takes wrappers (``state_dict``, ``model_ema``, ...) and prefixes (``module.``, ``_orig_mod.``) apart.
- :func:`load_weights_into` loads a state dict into a model exactly, through the timm family's own
  key-remapping when the keys are in another layout, dropping a classifier of another size.
- :func:`build_model` builds a timm architecture, or a torchvision one (``torchvision:NAME``),
  with its random initialisation seeded and serialised (see :mod:`dwk._random`).
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from dwk._random import torch_seeded
from dwk.errors import CheckpointError

logger = logging.getLogger(__name__)

TORCHVISION_PREFIX = "torchvision:"


def is_torchvision(arch: str | None) -> bool:
    return bool(arch) and arch.startswith(TORCHVISION_PREFIX)


def build_model(arch: str, ckpt_id: str, *, seed: int = 0, **kwargs):
    """Build ``arch`` (a timm name, or ``torchvision:NAME`` for any ``torchvision.models`` builder)
    with its random initialisation seeded by ``seed``.

    Every construction holds the lock of :func:`dwk._random.torch_seeded`, also when weights are
    loaded over the random ones afterwards: an unseeded construction in one extraction thread draws
    from torch's global RNG while another thread builds a seeded (random-init or planted) model, and
    that model then differs between runs. (Found in a fresh clone: a planted MobileNet's non-planted
    weights changed between two extractions.) timm's URL-only fallback downloads inside the lock;
    the Hub path downloads before it.
    """
    if is_torchvision(arch):
        name = arch[len(TORCHVISION_PREFIX):].split(".", 1)[0]  # torchvision:NAME[.WEIGHTS]
        return _build_torchvision(name, ckpt_id, seed, **kwargs)
    import timm

    try:
        with torch_seeded(seed):
            return timm.create_model(arch, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            close = timm.list_models(f"*{arch.split('.')[0][:8]}*")[:5]
            raise CheckpointError(
                ckpt_id, f"timm has no model {arch!r}" + (f"; similar names: {close}" if close else "")
                + " (torchvision models are written torchvision:NAME)"
            ) from None
        raise


def _build_torchvision(name: str, ckpt_id: str, seed: int, **kwargs):
    import difflib

    import torchvision

    names = torchvision.models.list_models()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=5)
        raise CheckpointError(ckpt_id, f"torchvision has no model builder {name!r}"
                                       + (f"; similar names: {close}" if close else ""))
    if kwargs.pop("pretrained", False):
        raise ValueError("torchvision models are built without weights here; the torchvision source loads them")
    with torch_seeded(seed):
        return torchvision.models.get_model(name, weights=None, **kwargs)


# Keys under which checkpoints commonly wrap their weights, in the order they are tried.
WRAPPER_KEYS = ("state_dict", "model_ema", "state_dict_ema", "model", "module")
# Key prefixes of wrapped modules: DistributedDataParallel, torch.compile.
PREFIXES = ("module.", "_orig_mod.")


def read_state_dict(path: Path, ckpt_id: str, info: dict[str, Any] | None = None) -> dict:
    """Read a weights file safely: safetensors, or a pickle with ``weights_only=True``.

    Pickles in torch's zip format are memory-mapped (``mmap=True``): tensors are read from the page
    cache as they are touched, so a weights-only extraction of a large file materialises only its
    depthwise tensors. The legacy (pre-1.6) format cannot be mapped and is read whole. Wrappers and
    prefixes are taken apart; ``info`` (when given) records which (``wrapper``, ``prefix``) and the
    file ``format``.
    """
    import zipfile

    import torch

    if not path.exists():
        raise CheckpointError(ckpt_id, f"weights file {path} does not exist")
    if path.is_dir():
        raise CheckpointError(ckpt_id, f"{path} is a folder, not a weights file")
    info = {} if info is None else info
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
            info["format"] = "safetensors"
        else:
            mmap = zipfile.is_zipfile(path)
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            info["format"] = "pickle (weights_only" + (", mmap)" if mmap else ", legacy format)")
    except Exception as e:  # noqa: BLE001 - any parse failure means a corrupt or foreign file
        raise CheckpointError(
            ckpt_id, f"cannot read {path.name} as a checkpoint ({type(e).__name__}: {str(e)[:300]}); "
            "the file is truncated, corrupt, not a checkpoint, or a pickle that needs code to load "
            "(refused: dwk loads pickles with weights_only=True only)"
        ) from e
    # Checkpoints often wrap the weights, sometimes twice ({"model": {"state_dict": ...}}).
    wrappers = []
    for _ in range(3):
        key = next((k for k in WRAPPER_KEYS if isinstance(sd, dict) and isinstance(sd.get(k), dict)), None)
        if key is None:
            break
        wrappers.append(key)
        sd = sd[key]
    if wrappers:
        info["wrapper"] = ".".join(wrappers)
    if isinstance(sd, dict):
        sd = {k: v for k, v in sd.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not isinstance(sd, dict) or not sd:
        raise CheckpointError(ckpt_id, f"{path.name} holds no state dict of tensors: not a checkpoint")
    stripped = []
    changed = True
    while changed:
        changed = False
        for p in PREFIXES:
            if all(k.startswith(p) for k in sd):
                sd = {k[len(p):]: v for k, v in sd.items()}
                stripped.append(p)
                changed = True
    if stripped:
        info["prefix"] = "".join(stripped)
    return sd


def _compare(model, sd: dict) -> tuple[list[str], list[str], list[str]]:
    """Missing keys, unexpected keys and shape mismatches of ``sd`` against ``model``."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    mismatched = sorted(f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                        for k in set(own) & set(sd) if tuple(sd[k].shape) != tuple(own[k].shape))
    return missing, unexpected, mismatched


def _describe(problems: tuple[list[str], list[str], list[str]]) -> str:
    missing, unexpected, mismatched = problems
    parts = []
    for what, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatches", mismatched)):
        if items:
            parts.append(f"{len(items)} {what} (e.g. {', '.join(items[:3])})")
    return "; ".join(parts)


def _classifier_prefixes(model) -> tuple[str, ...]:
    cls = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    if not cls:
        return ()
    return tuple(f"{c}." for c in ((cls,) if isinstance(cls, str) else cls))


def _timm_filter_fn(model):
    """The key-remapping function timm uses when it loads weights for this model's family, if any."""
    return getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)


def load_weights_into(model, sd: dict, ckpt_id: str, what: str, info: dict[str, Any] | None = None):
    """Load ``sd`` into ``model`` exactly; returns the model (possibly without its classifier).

    Tried in order: the keys as they are; the model family's timm key-remapping (original
    releases such as Facebook's ConvNeXt checkpoints). When only the classifier differs (another
    number of classes, or none), it is dropped from both sides: the depthwise convs are all that
    dwk reads. Anything else is a ``CheckpointError`` saying what does not match.
    """
    info = {} if info is None else info
    candidates: list[tuple[str, Any]] = [("as is", sd)]
    fn = _timm_filter_fn(model)
    if fn is not None:
        candidates.append(("timm key-remapping", fn))
    first_problems = None
    cls = _classifier_prefixes(model)
    for how, cand in candidates:
        if callable(cand):
            try:
                cand = cand(dict(sd), model)
            except Exception as e:  # noqa: BLE001 - a filter that cannot read these keys: not this layout
                logger.debug("%s: %s failed: %s: %s", ckpt_id, how, type(e).__name__, e)
                continue
            if not isinstance(cand, dict):
                continue
        problems = _compare(model, cand)
        first_problems = first_problems or problems
        if not any(problems):
            model.load_state_dict(cand, strict=True)
            info["remapped"] = how != "as is"
            return model
        keys = [p.split(":")[0] for group in problems for p in group]
        if cls and keys and all(k.startswith(cls) for k in keys) and hasattr(model, "reset_classifier"):
            model.reset_classifier(0)
            cand = {k: v for k, v in cand.items() if not k.startswith(cls)}
            if not any(_compare(model, cand)):
                model.load_state_dict(cand, strict=True)
                info["remapped"] = how != "as is"
                info["classifier_dropped"] = True
                logger.info("%s: classifier of another size dropped (%s)", ckpt_id, _describe(problems))
                return model
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__
    raise CheckpointError(
        ckpt_id, f"{what} does not match architecture {arch!r}: {_describe(first_problems)} (check 'arch' in the config)"
    )


def timm_info(name: str) -> dict[str, Any] | None:
    """timm's pretrained config and tag metadata when ``name`` carries a tag (``arch.tag``)."""
    if "." not in name:
        return None
    from dwk import timm_registry

    try:
        return timm_registry.checkpoint_info(name)
    except (CheckpointError, RuntimeError) as e:
        logger.debug("no pretrained metadata for %s: %s", name, e)
        return None

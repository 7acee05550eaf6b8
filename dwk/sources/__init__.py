"""Checkpoint sources: from a config entry to weights (the only package that knows how).

One module per kind of source, and one registry, :data:`REGISTRY`: the first kind whose
``claims(spec)`` is true reads the spec. Each source object has ``kind``, ``fingerprint()`` (a content
hash, known without building a model: a changed input is extracted again) and ``load()`` (a torch
model, or the extracted kernels for model-free kinds). A new kind of source is one module with a
:class:`~dwk.sources._base.Source` subclass and one line here.

| kind | config entry | module |
|---|---|---|
| ``planted`` | ``arch`` + ``planted: {...}``, or ``planted: {shape, n}`` alone | :mod:`.planted` |
| ``onnx`` | ``onnx: X.onnx`` | :mod:`.onnx` |
| ``random`` | ``arch`` + ``pretrained: false`` (the null control) | :mod:`.random_init` |
| ``torchvision`` | ``arch: torchvision:NAME`` with ``file:``, or alone (published weights) | :mod:`.torchvision` |
| ``weights`` | ``file:`` a weights file, no ``arch`` (kernels by tensor shape) | :mod:`.weights` |
| ``file`` | timm ``arch`` + ``file:`` a weights file | :mod:`.file` |
| ``local-dir`` | ``file:`` a timm local-dir folder | :mod:`.local_dir` |
| ``hub`` | ``id: arch.tag`` alone (timm pretrained, Hugging Face Hub) | :mod:`.hub` |

``file:`` may be ``pkg://PACKAGE/PATH``: a file inside an installed Python package
(:func:`~dwk.sources._base.resolve_file`). Every failure a user can cause is a
:class:`~dwk.errors.CheckpointError` naming the checkpoint and what to do; the flows record it and
go on with the other checkpoints.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from dwk.errors import CheckpointError
from dwk.sources._base import Loaded, Source, sha256_file
from dwk.sources.file import FileSource
from dwk.sources.hub import HubSource
from dwk.sources.local_dir import LocalDirSource
from dwk.sources.onnx import OnnxSource
from dwk.sources.planted import PlantedSource
from dwk.sources.random_init import RandomSource
from dwk.sources.torchvision import TorchvisionSource
from dwk.sources.weights import WeightsOnlySource

if TYPE_CHECKING:
    from dwk.config import CheckpointSpec

__all__ = ["REGISTRY", "CheckpointError", "Loaded", "Source", "fingerprint", "is_control", "kind_of", "load",
           "sha256_file", "source_for"]

# In claim order: the first kind that claims a spec reads it.
REGISTRY: tuple[type[Source], ...] = (
    PlantedSource,
    OnnxSource,
    RandomSource,
    TorchvisionSource,
    WeightsOnlySource,
    FileSource,
    LocalDirSource,
    HubSource,
)
KINDS = tuple(s.kind for s in REGISTRY)


def _source_class(spec: CheckpointSpec) -> type[Source]:
    for cls in REGISTRY:
        if cls.claims(spec):
            return cls
    raise CheckpointError(spec.id, "no source reads this entry; see the README's 'Sources' section")


def source_for(spec: CheckpointSpec, data_dir: Path | None = None) -> Source:
    """The source object that reads ``spec``; ``data_dir`` holds files dwk writes (planted checkpoints)."""
    return _source_class(spec)(spec, data_dir)


def kind_of(spec: CheckpointSpec) -> str:
    """The kind of source a spec names (``hub``, ``file``, ...), from its fields alone."""
    return _source_class(spec).kind


def is_control(spec: CheckpointSpec) -> bool:
    """Random-init checkpoints are the null control: they never shape the clusters."""
    return _source_class(spec).control


def fingerprint(spec: CheckpointSpec, data_dir: Path | None = None) -> str:
    return source_for(spec, data_dir).fingerprint()


def load(spec: CheckpointSpec, data_dir: Path | None = None) -> Loaded:
    return source_for(spec, data_dir).load()

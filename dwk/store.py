"""The kernel store: one chunked Zarr v3 hierarchy on disk (the only module that knows its layout).

Schema (``SCHEMA_VERSION``)::

    <store>.zarr/                         attrs.dwk = {schema_version}
      checkpoints/<key>/                  attrs.dwk = {id, source, fingerprint, extractor_version,
                                                       layers: [...], shapes: {shape: n}, complete}
        <shape>/kernels   (kernel, y, x)  float32, chunked along kernel only
        <shape>/layer     (kernel,)       int32   layer index (into attrs.layers)
        <shape>/channel   (kernel,)       int32   output channel within the layer
        <shape>/label     (kernel,)       int16   planted label (planted checkpoints only; -1 = noise)
        regular-<shape>/  the same arrays for regular convs (the comparison set); channel = out*in + in
      runs/<run_id>/                      attrs.dwk = {config, checkpoints, offsets, stages}
        <shape>/normalized (kernel, tap)  float32 normalised, flattened kernels of all checkpoints
        <shape>/status     (kernel,)      int8    0 ok, 1 non-finite, 2 dead
        <shape>/code, cluster, cosine     written by the analysis

Concurrency: every checkpoint owns its arrays, so extraction tasks never write into the same chunk.
A checkpoint is complete only when ``complete: true`` is written, after all its arrays; anything else
is redone on the next run. Consolidated metadata is not used (experimental in Zarr v3).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
STATUS_OK, STATUS_NONFINITE, STATUS_DEAD = 0, 1, 2


def checkpoint_key(ckpt_id: str) -> str:
    """A Zarr-safe node name for a checkpoint id (ids like ``convnext_atto.fb_in1k`` stay as they are)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", ckpt_id)


def check_chunks(chunk_kernels: int, n: int | None = None) -> int:
    """Validate a chunk length along the kernel axis (the only chunked axis)."""
    if not isinstance(chunk_kernels, (int, np.integer)) or chunk_kernels <= 0:
        raise ValueError(f"chunk_kernels must be a positive integer, got {chunk_kernels!r}")
    return int(chunk_kernels if n is None else max(1, min(chunk_kernels, n)))


@dataclass
class CheckpointRecord:
    """What the store knows of one extracted checkpoint."""

    id: str
    source: str
    fingerprint: str
    extractor_version: int
    layers: list[dict]
    shapes: dict[str, int]
    complete: bool
    extra: dict[str, Any] = field(default_factory=dict)  # source metadata: sha256, timm pretrained config, ...

    @property
    def n_kernels(self) -> int:
        """Depthwise kernels; ``regular-<shape>`` groups are the comparison set (``n_regular``)."""
        return sum(n for s, n in self.shapes.items() if not s.startswith("regular-"))

    @property
    def n_regular(self) -> int:
        return sum(n for s, n in self.shapes.items() if s.startswith("regular-"))


class KernelStore:
    """A handle on one store. Cheap to create; every process (Prefect task, Dask worker) opens its own."""

    def __init__(self, path: str | Path, *, create: bool = True):
        self.path = Path(path)
        if not create and not (self.path / "zarr.json").exists():
            raise FileNotFoundError(f"no dwk store at {self.path}; run `dwk extract` (or `dwk run`) first")
        self.root = zarr.open_group(store=str(self.path), mode="a", zarr_format=3)
        meta = self.root.attrs.get("dwk")
        if meta is None:
            self.root.attrs["dwk"] = {"schema_version": SCHEMA_VERSION}
        elif meta.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(
                f"store {self.path} has schema version {meta.get('schema_version')}, this dwk writes "
                f"{SCHEMA_VERSION}: use a new store path (--store) or re-extract into an empty folder"
            )
        for name in ("checkpoints", "runs"):
            if name not in self.root:
                self.root.create_group(name)

    # ----------------------------------------------------------------- checkpoints
    def _ckpt(self, ckpt_id: str) -> zarr.Group:
        return self.root["checkpoints"][checkpoint_key(ckpt_id)]

    def checkpoint(self, ckpt_id: str) -> CheckpointRecord | None:
        key = checkpoint_key(ckpt_id)
        if key not in self.root["checkpoints"]:
            return None
        meta = dict(self.root["checkpoints"][key].attrs.get("dwk") or {})
        if not meta:
            return None
        known = set(CheckpointRecord.__dataclass_fields__) - {"extra"}
        return CheckpointRecord(**{f: meta[f] for f in known}, extra={k: v for k, v in meta.items() if k not in known})

    def is_complete(self, ckpt_id: str, fingerprint: str, extractor_version: int) -> bool:
        """True when the checkpoint was fully extracted from the same weights by the same extractor."""
        rec = self.checkpoint(ckpt_id)
        return bool(
            rec and rec.complete and rec.fingerprint == fingerprint and rec.extractor_version == extractor_version
        )

    def write_checkpoint(
        self,
        ckpt_id: str,
        *,
        source: str,
        fingerprint: str,
        extractor_version: int,
        extracted,
        chunk_kernels: int,
        extra: dict[str, Any] | None = None,
    ) -> CheckpointRecord:
        """Write one checkpoint's kernels (an ``extract.Extracted``), then mark it complete.

        Any earlier, possibly partial, copy is removed first, so an interrupted write is redone whole.
        """
        key = checkpoint_key(ckpt_id)
        group = self.root["checkpoints"]
        if key in group:
            existing = dict(group[key].attrs.get("dwk") or {})
            if existing.get("id", ckpt_id) != ckpt_id:
                raise ValueError(f"checkpoint ids {ckpt_id!r} and {existing['id']!r} map to the same store key {key!r}")
            del group[key]
        g = group.create_group(key)
        shapes = {s: int(len(k)) for s, k in extracted.kernels.items()}
        meta = dict(
            id=ckpt_id, source=source, fingerprint=fingerprint, extractor_version=extractor_version,
            layers=[layer.to_dict() for layer in extracted.layers], shapes=shapes, complete=False, **(extra or {}),
        )
        g.attrs["dwk"] = meta
        for shape, kernels in extracted.kernels.items():
            n = len(kernels)
            c = check_chunks(chunk_kernels, n)
            sg = g.create_group(shape)
            sg.create_array("kernels", data=kernels.astype(np.float32), chunks=(c, *kernels.shape[1:]),
                            dimension_names=("kernel", "y", "x"))
            sg.create_array("layer", data=extracted.layer[shape], chunks=(c,), dimension_names=("kernel",))
            sg.create_array("channel", data=extracted.channel[shape], chunks=(c,), dimension_names=("kernel",))
            if extracted.labels is not None:
                sg.create_array("label", data=extracted.labels[shape], chunks=(c,), dimension_names=("kernel",))
        meta["complete"] = True  # the completion marker, written last
        g.attrs["dwk"] = meta
        return self.checkpoint(ckpt_id)

    def kernels(self, ckpt_id: str, shape: str) -> zarr.Array:
        """The (kernel, y, x) array of one checkpoint and shape, for Dask (``da.from_zarr``) or slicing."""
        return self._ckpt(ckpt_id)[shape]["kernels"]

    def kernel_index(self, ckpt_id: str, shape: str) -> dict[str, np.ndarray]:
        """The small per-kernel arrays (layer, channel and label if planted) of one checkpoint and shape."""
        g = self._ckpt(ckpt_id)[shape]
        return {name: g[name][:] for name in ("layer", "channel", "label") if name in g}

    # ----------------------------------------------------------------- runs
    def _run(self, run_id: str) -> zarr.Group:
        runs = self.root["runs"]
        if run_id not in runs:
            raise KeyError(f"store {self.path} has no run {run_id!r}; runs here: {sorted(runs.group_keys())}")
        return runs[run_id]

    def create_run(self, run_id: str, meta: dict[str, Any]) -> None:
        """Create (or reset) a run's group. A run's arrays are derived data: a re-run rewrites them."""
        runs = self.root["runs"]
        if run_id in runs:
            del runs[run_id]
        runs.create_group(run_id).attrs["dwk"] = meta

    def run_meta(self, run_id: str) -> dict[str, Any]:
        return dict(self._run(run_id).attrs.get("dwk") or {})

    def update_run_meta(self, run_id: str, **items: Any) -> None:
        g = self._run(run_id)
        meta = dict(g.attrs.get("dwk") or {})
        meta.update(items)
        g.attrs["dwk"] = meta

    def create_run_array(self, run_id: str, shape: str, name: str, array_shape: tuple[int, ...], dtype, chunk_kernels: int,
                         dims: tuple[str, ...]) -> zarr.Array:
        """Pre-allocate a run array chunked along the kernel axis only (writers fill whole chunks)."""
        g = self._run(run_id)
        sg = g[shape] if shape in g else g.create_group(shape)
        c = check_chunks(chunk_kernels, array_shape[0])
        return sg.create_array(name, shape=array_shape, dtype=dtype, chunks=(c, *array_shape[1:]),
                               dimension_names=dims, overwrite=True, fill_value=0)

    def run_array(self, run_id: str, shape: str, name: str) -> zarr.Array:
        g = self._run(run_id)
        if shape not in g or name not in g[shape]:
            raise KeyError(f"run {run_id!r} has no array {shape}/{name}; run the stage that writes it first")
        return g[shape][name]

    def write_run_array(self, run_id: str, shape: str, name: str, data: np.ndarray, chunk_kernels: int,
                        dims: tuple[str, ...]) -> None:
        arr = self.create_run_array(run_id, shape, name, data.shape, data.dtype, chunk_kernels, dims)
        arr[...] = data

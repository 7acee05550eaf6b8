"""The kernel store: one chunked Zarr v3 hierarchy on disk (the only module that knows its layout).

Schema (``SCHEMA_VERSION``)::

    <store>.zarr/                         attrs.dwk = {schema_version}
      checkpoints/<key>/                  attrs.dwk = {id, source, fingerprint, extractor_version,
                                                       layers: [...], shapes: {shape: n}, complete}
                                          attrs.dwk_complete = the completion record (below)
        <shape>/kernels   (kernel, y, x)  float32, chunked along kernel only, fill value NaN
        <shape>/layer     (kernel,)       int32   layer index (into attrs.layers)
        <shape>/channel   (kernel,)       int32   output channel within the layer
        <shape>/label     (kernel,)       int16   planted label (planted checkpoints only; -1 = noise)
        regular-<shape>/  the same arrays for regular convs (the comparison set); channel = out*in + in
      checkpoints/.tmp-<key>-<uuid>/      a checkpoint being written (attrs.dwk_writer = {host, pid, started})
      checkpoints/.old-<key>-<uuid>/      a stale copy moved aside by the writer replacing it (deleted by it)
      checkpoints/.damaged-<key>-<time>/  a damaged copy moved aside by ``dwk verify --repair`` (kept to inspect)
      runs/<run_id>/                      attrs.dwk = {config, checkpoints, groups, offsets, failed,
                                                       mlflow_run_id, dwk_writer, finished, resumed}
        <group>/                          attrs.dwk_stages = {stage: record} of its finished stages
                                          attrs.dwk_result = its result record (dwk.results.GroupResult)
        <group>/normalized (kernel, tap)  float32 normalised, flattened kernels of all checkpoints
        <group>/status     (kernel,)      int8    0 ok, 1 non-finite, 2 dead
        <group>/code, cluster, cosine, prototypes   written by the analysis

Names that start with ``.`` are never checkpoints: readers go by key and ``dwk verify`` skips them.

**Atomic checkpoints.** A writer builds the whole checkpoint under its own unique key
``checkpoints/.tmp-<key>-<uuid>`` (nobody else writes there), writes the completion record last, then
publishes with one ``os.rename`` of the folder to ``checkpoints/<key>``. rename(2) is atomic and does
not replace a non-empty folder, so of two writers one publishes and the other finds the published
copy: when that copy is complete, of the same weights and extractor, and its checksums verify, the
second writer drops its own copy and reuses it; otherwise (stale or damaged) it moves the published
copy aside (another atomic rename to its own ``.old-`` key) and publishes its own. A reader sees
either no checkpoint or a whole one, never a half one, and no writer ever deletes another writer's
work in progress. Temporary folders of dead writers are ignored by readers and removed by the next
writer of that checkpoint (or ``dwk verify --repair``): at once when the writer ran on this host and
its process is gone, otherwise when older than ``TMP_MAX_AGE_S``.

**The completion record** (``attrs.dwk_complete``, written in the same metadata write that sets
``complete: true``) names every array of the checkpoint with its shape, dtype, chunk length, number
of kernels and one checksum per chunk (crc32 of the chunk's little-endian bytes). It is designed to
be enough on object storage too, which has no rename: there a writer would leave its arrays under
the temporary prefix and publish by writing the record last at ``checkpoints/<key>/zarr.json`` (a
conditional put, so one writer wins) with ``location`` naming that prefix. Readers already resolve
arrays through ``location`` (``"."`` here: the arrays sit in the published folder); only the
local-filesystem writer is implemented.

**Integrity.** ``is_complete`` checks the record against what is on disk (cheap: array metadata,
shapes, dtypes and one stat per chunk file, no data read): a checkpoint that lost a chunk file, or
whose chunk file was truncated or replaced by one of another size, is extracted again. Every chunk is written, even one that equals the fill value
(``write_empty_chunks``), so a missing chunk file always means damage. Kernel arrays have NaN as
fill value: a chunk that is missing anyway reads as non-finite kernels, never as zeros ("dead").
``kernels()`` and ``kernel_index()`` verify the checksum of every chunk they read by default and
raise :class:`StoreDamageError` naming checkpoint, array and chunk on a mismatch or a chunk that
cannot be decoded; ``verify_checkpoint`` / ``verify`` check whole checkpoints (``dwk verify``).

Concurrency: every checkpoint owns its arrays, so extraction tasks never write into the same chunk.
Consolidated metadata is not used (experimental in Zarr v3). Durability across power loss (fsync
before the rename) is not attempted: the guarantees hold for crashed and killed processes.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import socket
import time
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.errors import ContainsGroupError

from dwk.errors import StoreDamageError, StoreError, StoreSchemaError

logger = logging.getLogger(__name__)

# 2: atomic checkpoints (published by rename), completion record with per-chunk crc32 checksums,
#    NaN fill value for kernel arrays, every chunk stored. A version-1 store has none of these.
SCHEMA_VERSION = 2
STATUS_OK, STATUS_NONFINITE, STATUS_DEAD = 0, 1, 2

RECORD_KEY = "dwk_complete"  # the completion record's attribute on a checkpoint group
WRITER_KEY = "dwk_writer"  # who writes a temporary checkpoint or a run: {host, pid, pidns, started}
STAGES_KEY = "dwk_stages"  # on a run's group: {stage: record} of the stages that finished for it
RESULT_KEY = "dwk_result"  # on a run's group: its result record (dwk.results.GroupResult)
TMP_PREFIX, OLD_PREFIX, DAMAGED_PREFIX = ".tmp-", ".old-", ".damaged-"
# A temporary checkpoint whose writer cannot be checked (another host) is removed after this long.
# Generous on purpose: removing a live writer's folder makes its publication fail (it says so),
# and a day is far beyond any single checkpoint's write time.
TMP_MAX_AGE_S = 24 * 3600
OLD_MAX_AGE_S = 600  # a moved-aside stale copy is deleted by its mover at once; this only catches a dead mover
_PUBLISH_ATTEMPTS = 20
_VERIFY_BATCH = 64  # chunks per read when verifying a whole checkpoint
# Decoding a damaged chunk raises these (numcodecs' zstd: RuntimeError; others: ValueError, OSError).
_DECODE_ERRORS = (RuntimeError, ValueError, OSError)


def checkpoint_key(ckpt_id: str) -> str:
    """A Zarr-safe node name for a checkpoint id (ids like ``convnext_atto.fb_in1k`` stay as they are)."""
    key = re.sub(r"[^A-Za-z0-9._-]", "_", ckpt_id)
    # A leading dot would make it look like a temporary or moved-aside folder (ignored by readers).
    return "_" + key[1:] if key.startswith(".") else key


def check_chunks(chunk_kernels: int, n: int | None = None) -> int:
    """Validate a chunk length along the kernel axis (the only chunked axis)."""
    if not isinstance(chunk_kernels, (int, np.integer)) or chunk_kernels <= 0:
        raise ValueError(f"chunk_kernels must be a positive integer, got {chunk_kernels!r}")
    return int(chunk_kernels if n is None else max(1, min(chunk_kernels, n)))


def chunk_checksum(data: np.ndarray) -> int:
    """The checksum of one chunk's values: crc32 of their little-endian bytes.

    Measured on this project's 2-core machine on 7x7 float32 kernels: crc32 (zlib 1.2.13) costs
    0.3-0.45 ms per MB, xxh3_64 (the xxhash package) 0.09 ms per MB, and zstd decoding of the same
    chunk 1.8 ms per MB. crc32 adds at most a quarter to a read that decodes anyway and needs no
    extra dependency, so it is the one used; the record names the algorithm so it can change.
    """
    a = np.ascontiguousarray(data)
    if a.dtype.byteorder == ">" or (a.dtype.byteorder == "=" and np.little_endian is False):
        a = a.astype(a.dtype.newbyteorder("<"))
    return zlib.crc32(memoryview(a).cast("B")) if a.size else 0


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


@dataclass(frozen=True)
class Damage:
    """One thing wrong with a checkpoint: ``array`` and ``chunk`` are None when it is not about one."""

    checkpoint: str
    problem: str
    array: str | None = None
    chunk: int | None = None

    def __str__(self) -> str:
        where = f"checkpoint {self.checkpoint!r}"
        if self.array is not None:
            where += f", array {self.array}"
        if self.chunk is not None:
            where += f", chunk {self.chunk}"
        return f"{where}: {self.problem}"

    def error(self, store: Path) -> StoreDamageError:
        return StoreDamageError(self.checkpoint, self.array, self.chunk, self.problem,
                                f"Run `dwk verify --store {store} --repair`, then `dwk extract` to extract it again")


@dataclass(frozen=True)
class VerifyResult:
    """What ``KernelStore.verify`` found: damage per checkpoint key, and what it checked."""

    damaged: dict[str, list[Damage]]
    n_checkpoints: int
    n_arrays: int
    n_chunks: int
    n_bytes: int
    leftovers: list[str]

    @property
    def ok(self) -> bool:
        return not self.damaged


class VerifiedArray(zarr.Array):
    """A checkpoint array whose reads check each chunk against the completion record.

    A ``zarr.Array`` (so ``da.from_zarr`` and slicing work as before) whose ``__getitem__`` reads the
    whole chunks a selection touches, compares each one's checksum with the record and raises
    :class:`StoreDamageError` naming checkpoint, array and chunk on a mismatch or on a chunk that
    cannot be decoded. Dask's blocks from ``da.from_zarr`` are whole chunks, so nothing is read twice
    there; a small slice of a large chunk costs the read of that chunk. Plain attributes, so it
    pickles to Dask worker processes.
    """

    _dwk_ckpt: str
    _dwk_name: str
    _dwk_checksums: list[int]
    _dwk_store: str

    @classmethod
    def wrap(cls, arr: zarr.Array, ckpt_id: str, name: str, checksums: list[int], store: Path) -> VerifiedArray:
        v = cls(arr._async_array)
        v._dwk_ckpt, v._dwk_name, v._dwk_checksums, v._dwk_store = ckpt_id, name, list(checksums), str(store)
        return v

    def _damage(self, chunk: int, problem: str) -> StoreDamageError:
        c = self.chunks[0]
        lo, hi = chunk * c, min(self.shape[0], (chunk + 1) * c)
        return Damage(self._dwk_ckpt, f"kernels {lo}-{hi - 1}: {problem}", self._dwk_name, chunk).error(
            Path(self._dwk_store))

    def read_chunks(self, first: int, stop: int) -> np.ndarray:
        """Chunks ``first`` to ``stop - 1`` along the kernel axis, each verified."""
        c, n = self.chunks[0], self.shape[0]
        lo, hi = first * c, min(n, stop * c)
        try:
            data = zarr.Array.__getitem__(self, slice(lo, hi))
        except _DECODE_ERRORS as e:
            # Find which chunk it was: read them one by one (only on this error path).
            for j in range(first, stop):
                try:
                    zarr.Array.__getitem__(self, slice(j * c, min(n, (j + 1) * c)))
                except _DECODE_ERRORS as e2:
                    raise self._damage(j, f"cannot be decoded ({type(e2).__name__}: {e2})") from e2
            raise StoreError(f"checkpoint {self._dwk_ckpt!r}, array {self._dwk_name}: kernels {lo}-{hi - 1} "
                             f"cannot be read ({type(e).__name__}: {e})") from e
        for j in range(first, stop):
            if chunk_checksum(data[j * c - lo:(j + 1) * c - lo]) != self._dwk_checksums[j]:
                raise self._damage(j, "checksum mismatch: the stored chunk differs from what was written "
                                      "(chunk file missing, truncated or altered)")
        return data

    def __getitem__(self, selection):
        n = self.shape[0]
        sel = selection if isinstance(selection, tuple) else (selection,)
        head, rest = (sel[0], sel[1:]) if sel and sel[0] is not Ellipsis else (slice(None), sel)
        c = self.chunks[0]
        if isinstance(head, (int, np.integer)):
            i = int(head) + n if head < 0 else int(head)
            if not 0 <= i < n:
                raise IndexError(f"index {head} is out of bounds for axis 0 with size {n}")
            data = self.read_chunks(i // c, i // c + 1)
            return data[(i - i // c * c, *rest)]
        if isinstance(head, slice):
            start, stop, step = head.indices(n)
            idx = range(start, stop, step)
            if not len(idx):
                return zarr.Array.__getitem__(self, selection)
            first, last = min(idx[0], idx[-1]) // c, max(idx[0], idx[-1]) // c
            data = self.read_chunks(first, last + 1)
            off = first * c
            local = slice(start - off, stop - off, step) if step > 0 else np.asarray(idx) - off
            return data[(local, *rest)]
        # Any other selection (integer arrays, masks): read and verify everything, then select.
        return self.read_chunks(0, -(-n // c))[selection]


class KernelStore:
    """A handle on one store. Cheap to create; every process (Prefect task, Dask worker) opens its own."""

    def __init__(self, path: str | Path, *, create: bool = True):
        self.path = Path(path)
        if not create and not (self.path / "zarr.json").exists():
            raise FileNotFoundError(f"no dwk store at {self.path}; run `dwk extract` (or `dwk run`) first")
        self.root = self._open_root()
        meta = self.root.attrs.get("dwk")
        if meta is None:  # a Zarr group made by something else, or a dwk store of the very first layout
            self.root.attrs["dwk"] = {"schema_version": SCHEMA_VERSION}
        elif meta.get("schema_version") != SCHEMA_VERSION:
            raise StoreSchemaError(
                f"store {self.path} has schema version {meta.get('schema_version')}, this dwk writes "
                f"{SCHEMA_VERSION}: use a new store path (--store) or re-extract into an empty folder"
            )
        for name in ("checkpoints", "runs"):
            # Race-free: another process may create the group between our look and our write;
            # creation writes one identical zarr.json (atomically, by Zarr's LocalStore), so
            # "already there" is success.
            if name not in self.root:
                try:
                    self.root.create_group(name)
                except ContainsGroupError:
                    logger.debug("%s/%s was created by another process", self.path, name)

    def _open_root(self) -> zarr.Group:
        # The schema version goes into the root's first metadata write, so no process ever sees a
        # root without it. Two processes creating a fresh store at once both write the same root
        # zarr.json (atomic replace); the one that looked before the other wrote gets
        # ContainsGroupError and opens what is there.
        attrs = {"dwk": {"schema_version": SCHEMA_VERSION}}
        for attempt in range(3):
            try:
                return zarr.open_group(store=str(self.path), mode="a", zarr_format=3, attributes=attrs)
            except ContainsGroupError:
                logger.debug("store %s was created by another process (attempt %d)", self.path, attempt + 1)
        return zarr.open_group(store=str(self.path), mode="r+", zarr_format=3)

    # ----------------------------------------------------------------- checkpoint layout helpers
    @property
    def _ckpt_dir(self) -> Path:
        return self.path / "checkpoints"

    def _group(self, key: str) -> zarr.Group | None:
        """The published group of a checkpoint key, or None."""
        try:
            node = zarr.open_group(store=str(self._ckpt_dir / key), mode="r", zarr_format=3)
        except FileNotFoundError:
            return None
        return node

    def _meta_and_record(self, key: str) -> tuple[dict, dict | None] | None:
        """(attrs.dwk, completion record) of a published checkpoint; None when there is none.

        Raises StoreError when its metadata cannot be read (a damaged zarr.json).
        """
        try:
            g = self._group(key)
        except (ValueError, KeyError, TypeError) as e:  # JSON that does not parse or is not Zarr metadata
            raise StoreError(f"checkpoint {key!r} in {self.path}: its metadata cannot be read ({e})") from e
        if g is None:
            return None
        attrs = g.attrs.asdict()
        return dict(attrs.get("dwk") or {}), attrs.get(RECORD_KEY)

    def _base(self, key: str, record: dict | None) -> str:
        """Where a checkpoint's arrays live (the record's ``location``; "." = the published folder)."""
        loc = (record or {}).get("location", ".")
        return key if loc == "." else loc

    def _open_array(self, key: str, record: dict | None, name: str) -> zarr.Array:
        return zarr.open_array(store=str(self._ckpt_dir / self._base(key, record) / name), mode="r", zarr_format=3)

    # ----------------------------------------------------------------- checkpoints
    def checkpoint(self, ckpt_id: str) -> CheckpointRecord | None:
        """The record of a published checkpoint (None when there is none).

        ``complete`` is true only when the completion record is there too; ``is_complete`` also
        checks it against the arrays on disk.
        """
        got = self._meta_and_record(checkpoint_key(ckpt_id))
        if got is None or not got[0]:
            return None
        meta, record = got
        known = set(CheckpointRecord.__dataclass_fields__) - {"extra", "complete"}
        return CheckpointRecord(**{f: meta[f] for f in known}, complete=bool(meta.get("complete") and record),
                                extra={k: v for k, v in meta.items() if k not in known | {"complete"}})

    def is_complete(self, ckpt_id: str, fingerprint: str, extractor_version: int) -> bool:
        """True when the checkpoint was fully extracted from the same weights by the same extractor.

        Checks the completion record against what is on disk, cheaply (metadata and one stat per
        chunk file, no data): a checkpoint that lost an array or a chunk file, or whose chunk file
        has another size than the one written (truncated, replaced), is not complete, so it is
        extracted again. Checksums are checked when data is read (``kernels``) and by ``dwk verify``.
        """
        try:
            rec = self.checkpoint(ckpt_id)
        except StoreError as e:
            logger.warning("%s; it will be extracted again", e)
            return False
        if not (rec and rec.complete and rec.fingerprint == fingerprint and rec.extractor_version == extractor_version):
            return False
        damage = self.verify_checkpoint(ckpt_id, full=False)
        if damage:
            logger.warning("checkpoint %r is damaged (%s%s); it will be extracted again", ckpt_id, damage[0],
                           f" and {len(damage) - 1} more" if len(damage) > 1 else "")
            return False
        return True

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
        """Write one checkpoint's kernels (an ``extract.Extracted``) and publish it atomically.

        The copy is built under a temporary key and published in one rename (module docstring). If
        another writer published the same checkpoint (same fingerprint and extractor) meanwhile and
        it verifies, that copy is kept and its record returned; a stale or damaged published copy is
        replaced whole.
        """
        key = checkpoint_key(ckpt_id)
        self._check_same_id(key, ckpt_id)
        self.cleanup(key=key)
        shapes = {s: int(len(k)) for s, k in extracted.kernels.items()}
        meta = dict(
            id=ckpt_id, source=source, fingerprint=fingerprint, extractor_version=extractor_version,
            layers=[layer.to_dict() for layer in extracted.layers], shapes=shapes, complete=False, **(extra or {}),
        )
        tmp_key = f"{TMP_PREFIX}{key}-{uuid.uuid4().hex}"
        tmp = self._ckpt_dir / tmp_key
        try:
            self._write_tmp(tmp, meta, extracted, chunk_kernels)
            return self._publish(ckpt_id, key, tmp, meta)
        finally:
            if tmp.exists():  # not published (reused another copy, or failed): our own folder, ours to remove
                shutil.rmtree(tmp, ignore_errors=True)

    def _check_same_id(self, key: str, ckpt_id: str) -> None:
        try:
            got = self._meta_and_record(key)
        except StoreError:
            return  # damaged metadata: it will be replaced
        if got and got[0].get("id", ckpt_id) != ckpt_id:
            raise ValueError(f"checkpoint ids {ckpt_id!r} and {got[0]['id']!r} map to the same store key {key!r}")

    def _write_tmp(self, tmp: Path, meta: dict, extracted, chunk_kernels: int) -> None:
        """Build a whole checkpoint (arrays, then record) in a folder nobody else writes to."""
        writer = dict(host=socket.gethostname(), pid=os.getpid(), pidns=_pid_namespace(), started=time.time())
        # A standalone hierarchy rooted at the temporary folder: after the rename it is the
        # checkpoint's group inside the store (Zarr v3 metadata holds no paths).
        g = zarr.open_group(store=str(tmp), mode="w-", zarr_format=3, attributes={"dwk": meta, WRITER_KEY: writer})
        arrays: dict[str, dict] = {}
        for shape, kernels in extracted.kernels.items():
            n = len(kernels)
            c = check_chunks(chunk_kernels, n)
            named = {"kernels": np.asarray(kernels, dtype=np.float32), "layer": extracted.layer[shape],
                     "channel": extracted.channel[shape]}
            if extracted.labels is not None:
                named["label"] = extracted.labels[shape]
            for name, data in named.items():
                data = np.asarray(data)
                if len(data) != n:
                    raise ValueError(f"{shape}/{name} has {len(data)} rows for {n} kernels")
                # NaN for kernels: a chunk that goes missing reads as non-finite, never as zero
                # kernels; for the integer index arrays the dtype's minimum (never a valid index).
                fill = np.nan if data.dtype.kind == "f" else np.iinfo(data.dtype).min
                dims = ("kernel", "y", "x") if data.ndim == 3 else ("kernel",)
                arr = g.create_array(f"{shape}/{name}", shape=data.shape, dtype=data.dtype, chunks=(c, *data.shape[1:]),
                                     fill_value=fill, dimension_names=dims, config={"write_empty_chunks": True})
                arr[...] = data
                n_chunks = -(-n // c) if n else 0
                arrays[f"{shape}/{name}"] = dict(
                    shape=list(data.shape), dtype=str(data.dtype), chunk=c, n_chunks=n_chunks,
                    count=n, crc32=[chunk_checksum(data[i:i + c]) for i in range(0, n, c)],
                    # Encoded sizes: the cheap check (is_complete) finds a truncated or swapped chunk file.
                    nbytes=[_chunk_file(tmp / shape / name, arr, j).stat().st_size for j in range(n_chunks)],
                )
        record = dict(format=1, checksum="crc32", location=".", written_at=time.time(), writer=writer, arrays=arrays)
        # The completion record goes last, in the same metadata write as complete=True.
        g.attrs.update({"dwk": {**meta, "complete": True}, RECORD_KEY: record})

    def _publish(self, ckpt_id: str, key: str, tmp: Path, meta: dict) -> CheckpointRecord:
        final = self._ckpt_dir / key
        for _ in range(_PUBLISH_ATTEMPTS):
            try:
                os.rename(tmp, final)  # atomic; fails when a (non-empty) published copy is there
            except FileNotFoundError as e:
                raise StoreError(f"checkpoint {ckpt_id!r}: its temporary copy {tmp.name} disappeared before "
                                 "publication (removed by a cleanup?); run the extraction again") from e
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
            else:
                logger.debug("published checkpoint %r", ckpt_id)
                return self._record_of({**meta, "complete": True})
            # Someone published first. Keep theirs if it is what we were writing and verifies.
            try:
                theirs = self.checkpoint(ckpt_id)
            except StoreError:
                theirs = None
            if theirs is not None and theirs.id != ckpt_id:
                raise ValueError(f"checkpoint ids {ckpt_id!r} and {theirs.id!r} map to the same store key {key!r}")
            if (theirs is not None and theirs.complete and theirs.fingerprint == meta["fingerprint"]
                    and theirs.extractor_version == meta["extractor_version"]
                    and not self.verify_checkpoint(ckpt_id, full=True)):
                logger.info("checkpoint %r was published by another writer meanwhile; using that copy", ckpt_id)
                return theirs
            # Stale, incomplete or damaged: move it aside (atomic; it is then ours alone) and retry.
            aside = self._ckpt_dir / f"{OLD_PREFIX}{key}-{uuid.uuid4().hex}"
            try:
                os.rename(final, aside)
            except FileNotFoundError:
                continue  # another writer moved it first
            logger.info("checkpoint %r: replacing a %s copy", ckpt_id,
                        "stale" if theirs is not None and theirs.complete else "incomplete or damaged")
            shutil.rmtree(aside, ignore_errors=True)
        raise StoreError(f"checkpoint {ckpt_id!r}: could not publish after {_PUBLISH_ATTEMPTS} attempts "
                         "(other writers keep replacing it); run the extraction again")

    @staticmethod
    def _record_of(meta: dict) -> CheckpointRecord:
        known = set(CheckpointRecord.__dataclass_fields__) - {"extra"}
        return CheckpointRecord(**{f: meta[f] for f in known}, extra={k: v for k, v in meta.items() if k not in known})

    def kernels(self, ckpt_id: str, shape: str, *, verify: bool = True) -> zarr.Array:
        """The (kernel, y, x) array of one checkpoint and shape, for Dask (``da.from_zarr``) or slicing.

        With ``verify`` (the default) a :class:`VerifiedArray`: every chunk read is checked against
        the completion record; damage raises :class:`StoreDamageError` naming checkpoint, array, chunk.
        """
        return self._array(ckpt_id, f"{shape}/kernels", verify)

    def kernels_verified(self, ckpt_id: str, shape: str) -> np.ndarray:
        """All kernels of one checkpoint and shape as a NumPy array, every chunk verified."""
        return self.kernels(ckpt_id, shape, verify=True)[:]

    def kernel_index(self, ckpt_id: str, shape: str, *, verify: bool = True) -> dict[str, np.ndarray]:
        """The small per-kernel arrays (layer, channel and label if planted) of one checkpoint and shape."""
        key = checkpoint_key(ckpt_id)
        got = self._meta_and_record(key)
        record = got[1] if got else None
        names = ([n for n in ("layer", "channel", "label") if f"{shape}/{n}" in record["arrays"]] if record
                 else [n for n in ("layer", "channel", "label") if (self._ckpt_dir / key / shape / n).is_dir()])
        return {n: self._array(ckpt_id, f"{shape}/{n}", verify)[:] for n in names}

    def _array(self, ckpt_id: str, name: str, verify: bool) -> zarr.Array:
        key = checkpoint_key(ckpt_id)
        got = self._meta_and_record(key)
        if got is None:
            raise KeyError(f"store {self.path} has no checkpoint {ckpt_id!r}; run `dwk extract` first")
        record = got[1]
        if verify and record is None:
            raise StoreError(f"checkpoint {ckpt_id!r} has no completion record (an interrupted or repaired "
                             f"extraction): run `dwk extract` to extract it again")
        if verify and name not in record["arrays"]:
            raise KeyError(f"checkpoint {ckpt_id!r} has no array {name}; it has {sorted(record['arrays'])}")
        try:
            arr = self._open_array(key, record, name)
        except FileNotFoundError as e:
            if not verify:
                raise KeyError(f"checkpoint {ckpt_id!r} has no array {name}") from e
            raise Damage(ckpt_id, "array missing", name).error(self.path) from e
        if not verify:
            return arr
        entry = record["arrays"][name]
        if list(arr.shape) != entry["shape"] or str(arr.dtype) != entry["dtype"]:
            raise Damage(ckpt_id, f"array is {arr.dtype}{list(arr.shape)}, the record says "
                                  f"{entry['dtype']}{entry['shape']}", name).error(self.path)
        return VerifiedArray.wrap(arr, ckpt_id, name, entry["crc32"], self.path)

    # ----------------------------------------------------------------- integrity
    def checkpoint_keys(self) -> list[str]:
        """Keys of the published checkpoints (temporary and moved-aside folders excluded)."""
        if not self._ckpt_dir.is_dir():
            return []
        return sorted(p.name for p in self._ckpt_dir.iterdir() if p.is_dir() and not p.name.startswith("."))

    def verify_checkpoint(self, ckpt_id: str, full: bool = True) -> list[Damage]:
        """What is wrong with a published checkpoint (empty when nothing is).

        Always: metadata readable, completion record present, every recorded array there with its
        shape and dtype, every chunk file there. ``full``: also read every chunk and compare its
        checksum with the record (decoding errors are reported per chunk).
        """
        return self._verify_key(checkpoint_key(ckpt_id), full, ckpt_id)[0]

    def _verify_key(self, key: str, full: bool, ckpt_id: str | None = None) -> tuple[list[Damage], int, int, int]:
        """(damage, arrays, chunks, bytes read and checksummed) of the checkpoint at ``key``."""
        name = ckpt_id or key
        try:
            got = self._meta_and_record(key)
        except StoreError as e:
            return [Damage(name, str(e).split(": ", 1)[-1])], 0, 0, 0
        if got is None:
            return [Damage(name, "not in the store")], 0, 0, 0
        meta, record = got
        name = meta.get("id", name)
        if not meta.get("complete") or not record:
            return [Damage(name, "no completion record (an interrupted extraction or an older dwk)")], 0, 0, 0
        damage: list[Damage] = []
        counts = {s: meta.get("shapes", {}).get(s) for s in meta.get("shapes", {})}
        n_arrays = n_chunks = n_bytes = 0
        for aname, entry in record["arrays"].items():
            shape = aname.split("/")[0]
            if counts.get(shape) != entry["count"]:
                damage.append(Damage(name, f"record says {entry['count']} kernels, metadata says {counts.get(shape)}",
                                     aname))
            try:
                arr = self._open_array(key, record, aname)
            except FileNotFoundError:
                damage.append(Damage(name, "array missing", aname))
                continue
            except (ValueError, KeyError, TypeError) as e:
                damage.append(Damage(name, f"array metadata cannot be read ({e})", aname))
                continue
            n_arrays += 1
            if list(arr.shape) != entry["shape"] or str(arr.dtype) != entry["dtype"]:
                damage.append(Damage(name, f"array is {arr.dtype}{list(arr.shape)}, the record says "
                                           f"{entry['dtype']}{entry['shape']}", aname))
                continue
            n_chunks += entry["n_chunks"]
            folder = self._ckpt_dir / self._base(key, record) / aname
            sizes = entry.get("nbytes")  # absent in records written before sizes were recorded
            for j in range(entry["n_chunks"]):
                try:
                    size = _chunk_file(folder, arr, j).stat().st_size
                except FileNotFoundError:
                    damage.append(Damage(name, "chunk file missing", aname, j))
                    continue
                if sizes is not None and size != sizes[j]:
                    damage.append(Damage(name, f"chunk file is {size} bytes, the record says {sizes[j]} "
                                               "(truncated or replaced)", aname, j))
            if not full:
                continue
            v = VerifiedArray.wrap(arr, name, aname, entry["crc32"], self.path)
            missing = {d.chunk for d in damage if d.array == aname}
            # Batches of chunks (one Zarr read each: per-chunk reads cost about 1 ms each in call
            # overhead); a batch with damage is read again chunk by chunk to name every bad chunk.
            for a in range(0, entry["n_chunks"], _VERIFY_BATCH):
                b = min(entry["n_chunks"], a + _VERIFY_BATCH)
                if not missing.intersection(range(a, b)):
                    try:
                        n_bytes += v.read_chunks(a, b).nbytes
                        continue
                    except StoreDamageError:
                        pass
                for j in range(a, b):
                    if j in missing:
                        continue  # already reported
                    try:
                        n_bytes += v.read_chunks(j, j + 1).nbytes
                    except StoreDamageError as e:
                        damage.append(Damage(name, e.problem, aname, j))
        return damage, n_arrays, n_chunks, n_bytes

    def verify(self, full: bool = True) -> VerifyResult:
        """Check every published checkpoint (``verify_checkpoint``); leftovers are listed, not damage."""
        damaged: dict[str, list[Damage]] = {}
        n_arrays = n_chunks = n_bytes = 0
        keys = self.checkpoint_keys()
        for key in keys:
            d, a, c, b = self._verify_key(key, full)
            n_arrays, n_chunks, n_bytes = n_arrays + a, n_chunks + c, n_bytes + b
            if d:
                damaged[key] = d
        leftovers = sorted(p.name for p in self._ckpt_dir.iterdir() if p.name.startswith(".")) \
            if self._ckpt_dir.is_dir() else []
        return VerifyResult(damaged, len(keys), n_arrays, n_chunks, n_bytes, leftovers)

    def mark_incomplete(self, key: str) -> Path:
        """Move a published checkpoint aside (``.damaged-<key>-<time>``): the next extraction redoes it.

        One rename, so a reader sees either the old copy or none. The moved copy is kept to inspect.
        """
        aside = self._ckpt_dir / f"{DAMAGED_PREFIX}{key}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        os.rename(self._ckpt_dir / key, aside)
        logger.info("moved damaged checkpoint %s aside to %s", key, aside.name)
        return aside

    def cleanup(self, *, key: str | None = None, max_age_s: float = TMP_MAX_AGE_S) -> list[str]:
        """Remove temporary folders of dead writers (of checkpoint ``key``, or all); returns their names.

        A writer's folder is removed when its process ran on this host (same host name and pid
        namespace) and is gone, or, for a writer elsewhere (which cannot be asked), when it is older
        than ``max_age_s``; a live writer of this host is never disturbed. Stale copies moved aside by a writer that died before deleting them go after
        ``OLD_MAX_AGE_S``. ``.damaged-`` folders stay (``dwk verify`` lists them).
        """
        if not self._ckpt_dir.is_dir():
            return []
        removed, now = [], time.time()
        for p in self._ckpt_dir.iterdir():
            if p.name.startswith(TMP_PREFIX):
                if key is not None and not p.name.startswith(f"{TMP_PREFIX}{key}-"):
                    continue
                writer = _writer_of(p)
                state = _writer_state(writer)
                started = writer.get("started") if writer else None
                age = now - (started if isinstance(started, (int, float)) else _mtime(p, now))
                # A live writer of this host is never disturbed, however slow; one elsewhere only by age.
                if state == "alive" or (state == "unknown" and age <= max_age_s):
                    continue
            elif p.name.startswith(OLD_PREFIX):
                if (key is not None and not p.name.startswith(f"{OLD_PREFIX}{key}-")) or now - _mtime(p, now) <= OLD_MAX_AGE_S:
                    continue
            else:
                continue
            shutil.rmtree(p, ignore_errors=True)
            if not p.exists():
                removed.append(p.name)
                logger.info("removed %s left by a writer that is gone", p.name)
        return removed

    # ----------------------------------------------------------------- runs
    def _run(self, run_id: str) -> zarr.Group:
        runs = self.root["runs"]
        if run_id not in runs:
            raise KeyError(f"store {self.path} has no run {run_id!r}; runs here: {sorted(runs.group_keys())}")
        return runs[run_id]

    def create_run(self, run_id: str, meta: dict[str, Any]) -> None:
        """Create (or reset) a run's group. A run's arrays are derived data: a re-run rewrites them.

        The run's writer (host, pid namespace, pid, start time) is recorded beside ``meta``, so a
        run whose process died before :meth:`finish_run` can be told from one still running.
        """
        runs = self.root["runs"]
        if run_id in runs:
            del runs[run_id]
        writer = dict(host=socket.gethostname(), pid=os.getpid(), pidns=_pid_namespace(), started=time.time())
        runs.create_group(run_id).attrs["dwk"] = {**meta, WRITER_KEY: writer, "finished": None}

    def finish_run(self, run_id: str) -> None:
        """Mark a run's store group complete: its results are all written (the last step of a run)."""
        self.update_run_meta(run_id, finished=time.time())

    def orphaned_runs(self, *, max_age_s: float = TMP_MAX_AGE_S) -> list[tuple[str, str]]:
        """Runs that never finished and never will: ``(run_id, why)``.

        A run is orphaned when it has no ``finished`` mark and its process ran on this host and is
        gone (killed, crashed), or ran elsewhere (which cannot be asked) and started more than
        ``max_age_s`` ago. A run of a live process on this host is never listed. Runs written by
        a dwk older than this mark count as finished.
        """
        out, now = [], time.time()
        runs = self.root["runs"]
        for run_id in sorted(runs.group_keys()):
            meta = dict(runs[run_id].attrs.get("dwk") or {})
            if "finished" not in meta or meta["finished"]:
                continue
            writer = meta.get(WRITER_KEY)
            state = _writer_state(writer)
            started = writer.get("started") if isinstance(writer, dict) else None
            age = now - started if isinstance(started, (int, float)) else float("inf")
            if state == "dead":
                out.append((run_id, f"its process {writer.get('pid')} on {writer.get('host')} is gone"))
            elif state == "unknown" and age > max_age_s:
                out.append((run_id, f"unfinished, started {age / 3600:.1f} h ago on {(writer or {}).get('host', '?')}"))
        return out

    def delete_run(self, run_id: str) -> None:
        """Remove a run's store group (its derived arrays; checkpoints are untouched)."""
        self._run(run_id)  # a clear KeyError for an unknown run
        del self.root["runs"][run_id]

    def run_ids(self) -> list[str]:
        return sorted(self.root["runs"].group_keys())

    def run_meta(self, run_id: str) -> dict[str, Any]:
        return dict(self._run(run_id).attrs.get("dwk") or {})

    def update_run_meta(self, run_id: str, **items: Any) -> None:
        g = self._run(run_id)
        meta = dict(g.attrs.get("dwk") or {})
        meta.update(items)
        g.attrs["dwk"] = meta

    def claim_run(self, run_id: str) -> dict[str, Any]:
        """Make this process the writer of an unfinished run (to resume it); returns its metadata.

        Refused while the run's recorded writer is alive on this host (two processes must never
        write one run), and for a finished run (nothing to resume).
        """
        meta = self.run_meta(run_id)
        writer = meta.get(WRITER_KEY)
        if meta.get("finished"):
            raise StoreError(f"run {run_id!r} in {self.path} is finished: nothing to resume "
                             "(`dwk show` prints it; `dwk run` starts a new run)")
        if _writer_state(writer) == "alive" and writer.get("pid") != os.getpid():
            raise StoreError(f"run {run_id!r} is being written by process {writer['pid']} on {writer['host']}; "
                             "wait for it to end (or stop it) before resuming")
        me = dict(host=socket.gethostname(), pid=os.getpid(), pidns=_pid_namespace(), started=time.time())
        self.update_run_meta(run_id, **{WRITER_KEY: me, "resumed": int(meta.get("resumed") or 0) + 1})
        return self.run_meta(run_id)

    # Stage records: what a stage of a run wrote for one analysis group, recorded after its outputs,
    # so a resumed run skips the stages that have one. The stage order is the pipeline's.
    def _group_of(self, run_id: str, group: str) -> zarr.Group:
        g = self._run(run_id)
        return g[group] if group in g else g.create_group(group)

    def stage_record(self, run_id: str, group: str, stage: str) -> dict[str, Any] | None:
        """The record of a finished stage of one group of a run (None when it has not finished)."""
        g = self._run(run_id)
        if group not in g:
            return None
        return dict(g[group].attrs.get(STAGES_KEY) or {}).get(stage)

    def record_stage(self, run_id: str, group: str, stage: str, info: dict[str, Any], *,
                     clear: tuple[str, ...] = ()) -> None:
        """Record that ``stage`` finished for ``group`` (after its outputs are written); drop the
        records of ``clear`` (the later stages, whose outputs are now stale)."""
        g = self._group_of(run_id, group)
        stages = {k: v for k, v in dict(g.attrs.get(STAGES_KEY) or {}).items() if k not in clear}
        stages[stage] = {**info, "at": time.time()}
        g.attrs[STAGES_KEY] = stages

    def clear_stages(self, run_id: str, group: str) -> None:
        """Forget every finished stage of a group (its inputs changed): the next run redoes them."""
        g = self._run(run_id)
        if group in g and STAGES_KEY in g[group].attrs:
            del g[group].attrs[STAGES_KEY]

    def write_result(self, run_id: str, group: str, record: dict[str, Any]) -> None:
        """Store a group's result record (``dwk.results.GroupResult`` as JSON) under the run."""
        self._group_of(run_id, group).attrs[RESULT_KEY] = record

    def result(self, run_id: str, group: str) -> dict[str, Any] | None:
        """A group's stored result record, as written (``dwk.results.read_record`` checks it)."""
        g = self._run(run_id)
        return g[group].attrs.get(RESULT_KEY) if group in g else None

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


def _chunk_file(folder: Path, arr: zarr.Array, j: int) -> Path:
    """The file of chunk ``j`` (along the kernel axis) of an array stored in ``folder``."""
    return folder / arr.metadata.encode_chunk_key((j,) + (0,) * (arr.ndim - 1))


# --------------------------------------------------------------------------- writers of temporary folders
def _pid_namespace() -> int | None:
    """This process's pid namespace (Linux): two containers may share a host name, not a namespace."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def _writer_of(folder: Path) -> dict | None:
    try:
        g = zarr.open_group(store=str(folder), mode="r", zarr_format=3)
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None  # killed before its first metadata write, or unreadable: age decides
    w = g.attrs.get(WRITER_KEY)
    return w if isinstance(w, dict) else None


def _writer_state(writer: dict | None) -> str:
    """"alive" or "dead" when the writer ran in this host's pid namespace, else "unknown"."""
    if not writer or writer.get("host") != socket.gethostname():
        return "unknown"
    ns = _pid_namespace()
    if ns is None or writer.get("pidns") != ns or not isinstance(writer.get("pid"), int):
        return "unknown"
    try:
        os.kill(writer["pid"], 0)
    except ProcessLookupError:
        return "dead"
    except PermissionError:  # alive, another user's
        return "alive"
    return "alive"


def _mtime(p: Path, default: float) -> float:
    try:
        return p.stat().st_mtime
    except OSError:
        return default

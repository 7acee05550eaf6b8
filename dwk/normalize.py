"""Cleaning and normalisation of kernels, out of core with Dask (METHOD 2.2).

Per kernel (flattened to k*k taps):
- non-finite (NaN/Inf anywhere): status 1, counted, never crashes the run;
- dead: ``max|w| <= dead_eps`` or ``max|w| < dead_rel * (largest max|w| of its layer)``: status 2;
- otherwise normalised by ``method``: ``l2`` (default; sign kept, no centring), ``maxabs``
  (as CNN Filter DB) or ``center_l2`` (subtract the mean, then L2; as the master-key code).
Rejected kernels are written as zeros and excluded downstream through ``status``.

Two passes over the store: one computes max|w| per kernel (N floats, small), the per-layer maxima
are taken in NumPy, and a second pass writes normalised chunks straight into the run's Zarr array.
Dask chunks are whole Zarr chunks of the output, so parallel writers never share a chunk.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from dwk.config import NormalizeConfig
from dwk.store import STATUS_DEAD, STATUS_NONFINITE, STATUS_OK, KernelStore

logger = logging.getLogger(__name__)


def normalize_block(x: np.ndarray, method: str) -> np.ndarray:
    """Normalise rows of a (n, d) block. Rows with zero norm stay zero."""
    x = x.astype(np.float32, copy=True)
    if method == "center_l2":
        x -= x.mean(axis=1, keepdims=True)
    if method == "maxabs":
        s = np.abs(x).max(axis=1, keepdims=True)
    else:
        s = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, s, out=x, where=s > 0)
    x[(s == 0).ravel()] = 0.0
    return x


def kernel_status(maxabs: np.ndarray, layer: np.ndarray, cfg: NormalizeConfig) -> np.ndarray:
    """Status per kernel from its max|w| (NaN for non-finite kernels) and its layer index."""
    status = np.full(len(maxabs), STATUS_OK, np.int8)
    nonfinite = ~np.isfinite(maxabs)
    status[nonfinite] = STATUS_NONFINITE
    m = np.where(nonfinite, 0.0, maxabs)
    layer_max = np.zeros(layer.max() + 1 if len(layer) else 0, np.float64)
    np.maximum.at(layer_max, layer, m)
    dead = (m <= cfg.dead_eps) | (m < cfg.dead_rel * layer_max[layer])
    status[dead & ~nonfinite] = STATUS_DEAD
    return status


def _maxabs_block(x: np.ndarray) -> np.ndarray:
    finite = np.isfinite(x).all(axis=1)
    return np.where(finite, np.abs(np.nan_to_num(x)).max(axis=1), np.nan)


def _clean_block(x: np.ndarray, status: np.ndarray, method: str) -> np.ndarray:
    # status arrives as an (n, 1) block aligned with x's (n, d) block.
    x = np.where(status.reshape(-1, 1) == STATUS_OK, np.nan_to_num(x), 0.0)
    return normalize_block(x, method)


@dataclass
class NormalizeResult:
    shape: str
    n_kernels: int
    n_nonfinite: int
    n_dead: int
    per_checkpoint: dict[str, dict[str, int]]  # id -> {n_kernels, n_nonfinite, n_dead}


def normalize_shape(
    store: KernelStore,
    run_id: str,
    shape: str,
    ckpt_ids: list[str],
    cfg: NormalizeConfig,
    *,
    chunk_kernels: int,
    client=None,
) -> NormalizeResult:
    """Normalise all kernels of ``shape`` from ``ckpt_ids`` into ``runs/<run_id>/<shape>/normalized``.

    The run's kernel axis is the concatenation of the checkpoints in the given order; their
    ``[start, stop)`` offsets go into the run's metadata. ``client``: a ``distributed.Client`` to
    compute on (None: Dask's current default scheduler).
    """
    import dask.array as da

    from dwk.extract import stored_group

    parts, layers, offsets, start = [], [], {}, 0
    for cid in ckpt_ids:
        arr = store.kernels(cid, stored_group(shape))
        n, kh, kw = arr.shape
        parts.append(da.from_zarr(arr).reshape(n, kh * kw))
        layers.append(store.kernel_index(cid, stored_group(shape))["layer"])
        offsets[cid] = [start, start + n]
        start += n
    if not parts:
        raise ValueError(f"no checkpoint holds {shape} kernels")
    d = parts[0].shape[1]
    # Rechunk to the output's Zarr chunks: every Dask block is then exactly one output chunk.
    x = da.concatenate(parts).rechunk((chunk_kernels, d))
    compute = client.compute if client is not None else None

    maxabs_ = x.map_blocks(_maxabs_block, drop_axis=1, dtype=np.float64)
    maxabs = (compute(maxabs_).result() if compute else maxabs_.compute())
    # Layer indices are per checkpoint: offset them so layers of different checkpoints stay apart.
    layer_ids, base = [], 0
    for lay in layers:
        layer_ids.append(lay.astype(np.int64) + base)
        base += int(lay.max()) + 1 if len(lay) else 0
    status = kernel_status(maxabs, np.concatenate(layer_ids), cfg)

    out = store.create_run_array(run_id, shape, "normalized", (start, d), np.float32, chunk_kernels, ("kernel", "tap"))
    store.write_run_array(run_id, shape, "status", status, chunk_kernels, ("kernel",))
    status_da = da.from_array(status, chunks=(chunk_kernels,))
    y = da.map_blocks(_clean_block, x, status_da[:, None], cfg.method, dtype=np.float32)
    stored = da.store(y, out, lock=False, compute=False)
    if compute:
        compute(stored).result()
    else:
        stored.compute()

    per = {}
    for cid, (a, b) in offsets.items():
        s = status[a:b]
        per[cid] = dict(n_kernels=int(b - a), n_nonfinite=int((s == STATUS_NONFINITE).sum()),
                        n_dead=int((s == STATUS_DEAD).sum()))
    meta = store.run_meta(run_id)
    meta.setdefault("offsets", {})[shape] = offsets
    store.update_run_meta(run_id, offsets=meta["offsets"])
    res = NormalizeResult(shape, start, int((status == STATUS_NONFINITE).sum()), int((status == STATUS_DEAD).sum()), per)
    logger.info("normalised %d %s kernels (%s): %d non-finite, %d dead", start, shape, cfg.method, res.n_nonfinite, res.n_dead)
    return res

"""The analysis of one run, shape by shape: train, cluster, name, classify, summarise.

Each function reads what it needs from the store and writes its result back to it (or to the
run's output folder, for the small trained models), so every stage can run in its own process,
on its own machine, and be redone alone.

Controls never shape the clusters: the autoencoder and the clusters are fitted on the kernels of
non-control checkpoints (all kernels, when every checkpoint is a control) and then applied to all.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from dwk import autoencoder as ae
from dwk.clusters import (
    KMeansMergeClusterer,
    PaperClusterer,
    calibrate_tau,
    classify,
    prototypes_of,
    tau_curve,
)
from dwk.config import RunConfig
from dwk.dog import name_prototypes
from dwk.store import STATUS_DEAD, STATUS_OK, KernelStore

logger = logging.getLogger(__name__)

TAU_GRID = np.round(np.linspace(0.0, 1.0, 101), 2)


def _shape_tuple(shape: str) -> tuple[int, int]:
    kh, kw = shape.split("x")
    return int(kh), int(kw)


def kernel_table(store: KernelStore, run_id: str, shape: str) -> dict[str, np.ndarray]:
    """Per-kernel bookkeeping of a run's shape group, in the run's kernel order.

    ``ckpt`` (index into the run's checkpoints), ``layer``, ``channel``, ``label`` (-2 when not
    planted), ``control`` (bool).
    """
    meta = store.run_meta(run_id)
    ckpts = meta["checkpoints"]
    offsets = meta["offsets"][shape]
    n = max(b for _, b in offsets.values())
    out = dict(ckpt=np.full(n, -1, np.int32), layer=np.zeros(n, np.int32), channel=np.zeros(n, np.int32),
               label=np.full(n, -2, np.int16), control=np.zeros(n, bool))
    for i, c in enumerate(ckpts):
        if c["id"] not in offsets:
            continue
        a, b = offsets[c["id"]]
        idx = store.kernel_index(c["id"], shape)
        out["ckpt"][a:b] = i
        out["layer"][a:b] = idx["layer"]
        out["channel"][a:b] = idx["channel"]
        out["control"][a:b] = c["control"]
        if "label" in idx:
            out["label"][a:b] = idx["label"]
    return out


def fit_mask(status: np.ndarray, control: np.ndarray) -> np.ndarray:
    ok = status == STATUS_OK
    subjects = ok & ~control
    return subjects if subjects.any() else ok


def model_path(model_dir: Path, shape: str) -> Path:
    return model_dir / f"autoencoder-{shape}.safetensors"


def train_shape(
    store: KernelStore,
    run_id: str,
    shape: str,
    cfg: RunConfig,
    model_dir: Path,
    on_epoch: Callable[[int, float], None] | None = None,
) -> tuple[Path, list[float]]:
    """Train the autoencoder of one shape group on its fit set; save it; return (path, losses)."""
    x = store.run_array(run_id, shape, "normalized")[:]
    mask = fit_mask(store.run_array(run_id, shape, "status")[:], kernel_table(store, run_id, shape)["control"])
    model, losses = ae.train(x[mask], cfg.autoencoder, on_epoch=on_epoch)
    model_dir.mkdir(parents=True, exist_ok=True)
    path = model_path(model_dir, shape)
    ae.save(model, path)
    return path, losses


def _clusters(x_fit, clusterer, min_share, shape, name_cos):
    """Fit-set labels, prototypes, shares, minor flags and names of a fitted clusterer."""
    lab = clusterer.predict(x_fit)
    k = clusterer.n_clusters_
    protos = prototypes_of(x_fit, lab, k)
    share = np.bincount(lab, minlength=k) / max(len(lab), 1)
    return protos, share, share < min_share, name_prototypes(protos, _shape_tuple(shape), name_cos)


def cluster_shape(store: KernelStore, run_id: str, shape: str, cfg: RunConfig, model_path: Path) -> dict:
    """Cut clusters, name them, classify every kernel of the shape group; write per-kernel results.

    Writes ``code``, ``cluster`` (-1 for rejected kernels), ``cosine`` (NaN for rejected kernels,
    -inf in minor clusters) to the store, and returns the shape's summary.
    """
    cc = cfg.cluster
    x = store.run_array(run_id, shape, "normalized")[:].astype(np.float64)
    status = store.run_array(run_id, shape, "status")[:]
    table = kernel_table(store, run_id, shape)
    ok = status == STATUS_OK
    fit = fit_mask(status, table["control"])
    model = ae.load(model_path)

    paper = PaperClusterer(model, cc.grid, cc.paper_merge_cos).fit(x[fit]) if model.latent_dim == 1 else None
    if cc.mode == "paper":
        if paper is None:
            raise ValueError("cluster.mode 'paper' needs autoencoder.latent_dim: 1")
        primary = paper
    else:
        primary = KMeansMergeClusterer(cc.n_init_clusters, cc.merge_cos, random_state=cc.seed).fit(x[fit])

    protos, share, minor, names = _clusters(x[fit], primary, cc.min_share, shape, cc.name_cos)
    tau_null, null_cos = calibrate_tau(primary, protos, minor, x.shape[1], cfg.normalize.method,
                                       alpha=cc.alpha, n=cc.n_null, seed=cc.seed)
    labels = np.full(len(x), -1, np.int32)
    cos = np.full(len(x), np.nan, np.float32)
    labels[ok] = primary.predict(x[ok])
    cos[ok] = classify(x[ok], labels[ok], protos, minor)
    codes = np.full((len(x), model.latent_dim), np.nan, np.float32)
    codes[ok] = ae.encode(model, x[ok].astype(np.float32))

    chunk = cfg.chunk_kernels
    store.write_run_array(run_id, shape, "cluster", labels, chunk, ("kernel",))
    store.write_run_array(run_id, shape, "cosine", cos, chunk, ("kernel",))
    store.write_run_array(run_id, shape, "code", codes, chunk, ("kernel", "latent"))
    store.write_run_array(run_id, shape, "prototypes", protos.astype(np.float32), max(len(protos), 1), ("cluster", "tap"))

    fit_cos = cos[fit]
    summary = dict(
        shape=shape,
        n_kernels=int(len(x)),
        n_fit=int(fit.sum()),
        n_dead=int((status == STATUS_DEAD).sum()),
        n_rejected=int((~ok).sum()),
        mode=cc.mode,
        tau=cc.tau,
        tau_null=round(tau_null, 4),
        classified_share=float((fit_cos >= tau_null).mean()) if fit.any() else 0.0,
        classified_share_tau=float((fit_cos >= cc.tau).mean()) if fit.any() else 0.0,
        tau_curve=dict(tau=TAU_GRID.tolist(), fit=tau_curve(fit_cos, TAU_GRID).round(4).tolist(),
                       null=tau_curve(null_cos, TAU_GRID).round(4).tolist()),
        clusters=[
            dict(id=int(i), name=names[i]["name"], size=int(round(share[i] * fit.sum())), share=round(float(share[i]), 4),
                 minor=bool(minor[i]), reference=names[i], prototype=protos[i].round(5).tolist())
            for i in np.argsort(-share)
        ],
    )
    if paper is not None:
        summary["paper"] = _paper_summary(paper, x, fit, ok, cc, shape, cfg.normalize.method)
    planted = fit & (table["label"] >= -1)
    if planted.any():
        summary["planted"] = _planted_summary(table["label"][planted], labels[planted], cos[planted], tau_null)
    logger.info("%s: %d clusters (%d minor), tau_null %.3f, classified %.1f%% of %d fitted kernels",
                shape, len(protos), int(minor.sum()), tau_null, 100 * summary["classified_share"], fit.sum())
    return summary


def _paper_summary(paper: PaperClusterer, x, fit, ok, cc, shape, method) -> dict:
    protos, share, minor, names = _clusters(x[fit], paper, cc.min_share, shape, cc.name_cos)
    tau_null, _ = calibrate_tau(paper, protos, minor, x.shape[1], method, alpha=cc.alpha, n=cc.n_null, seed=cc.seed)
    cos = classify(x[fit], paper.predict(x[fit]), protos, minor)
    codes = paper.codes(x[fit])
    hist, edges = np.histogram(codes, bins=paper.grid, range=(0, 1))
    return dict(
        n_clusters=paper.n_clusters_,
        tau_null=round(tau_null, 4),
        classified_share=float((cos >= tau_null).mean()) if len(cos) else 0.0,
        intervals=[dict(lo=lo, hi=hi, name=names[i]["name"], share=round(float(share[i]), 4))
                   for i, (lo, hi) in enumerate(paper.intervals_)],
        code_hist=dict(counts=hist.tolist(), edges=edges.round(4).tolist()),
    )


def _planted_summary(truth: np.ndarray, pred: np.ndarray, cos: np.ndarray, tau_null: float) -> dict:
    from sklearn.metrics import adjusted_rand_score

    s = truth >= 0
    return dict(
        ari=round(float(adjusted_rand_score(truth[s], pred[s])), 4) if s.sum() > 1 else None,
        structured_classified=float((cos[s] >= tau_null).mean()) if s.any() else None,
        noise_classified=float((cos[~s] >= tau_null).mean()) if (~s).any() else None,
    )


def checkpoint_tables(store: KernelStore, run_id: str, shapes: dict[str, dict]) -> tuple[list[dict], list[dict]]:
    """Per-checkpoint rows (the paper's Table 1) and per-layer rows (its per-layer bars)."""
    meta = store.run_meta(run_id)
    ckpts = meta["checkpoints"]
    acc = {i: dict(n=0, dead=0, rejected=0, ok=0, cls=0, cls_tau=0, clusters={}) for i in range(len(ckpts))}
    layer_rows = []
    for shape, s in shapes.items():
        t = kernel_table(store, run_id, shape)
        status = store.run_array(run_id, shape, "status")[:]
        lab = store.run_array(run_id, shape, "cluster")[:]
        cos = store.run_array(run_id, shape, "cosine")[:]
        names = {c["id"]: c["name"] for c in s["clusters"]}
        ok = status == STATUS_OK
        cls_null, cls_tau = ok & (cos >= s["tau_null"]), ok & (cos >= s["tau"])
        for i in range(len(ckpts)):
            m = t["ckpt"] == i
            if not m.any():
                continue
            a = acc[i]
            a["n"] += int(m.sum()); a["dead"] += int((m & (status == STATUS_DEAD)).sum())
            a["rejected"] += int((m & ~ok).sum()); a["ok"] += int((m & ok).sum())
            a["cls"] += int((m & cls_null).sum()); a["cls_tau"] += int((m & cls_tau).sum())
            for c in lab[m & cls_null]:
                a["clusters"][names[int(c)]] = a["clusters"].get(names[int(c)], 0) + 1
            for layer in np.unique(t["layer"][m]):
                lm = m & (t["layer"] == layer)
                lok = lm & ok
                shares = {}
                for c in lab[lm & cls_null]:
                    shares[names[int(c)]] = shares.get(names[int(c)], 0) + 1
                n_ok = max(int(lok.sum()), 1)
                layer_rows.append(dict(
                    checkpoint=ckpts[i]["id"], layer=int(layer), shape=shape, n_kernels=int(lm.sum()),
                    n_dead=int((lm & (status == STATUS_DEAD)).sum()),
                    classified_share=round(int((lm & cls_null).sum()) / n_ok, 4),
                    cluster_shares={k: round(v / n_ok, 4) for k, v in sorted(shares.items())},
                ))
    rows = []
    for i, c in enumerate(ckpts):
        a = acc[i]
        denom = max(a["ok"], 1)
        # Top clusters among the classified kernels; shares under 1% are chance, not a top cluster.
        top = [kv for kv in sorted(a["clusters"].items(), key=lambda kv: -kv[1]) if kv[1] >= 0.01 * denom][:3]
        rows.append(dict(
            id=c["id"], source=c["source"], control=c["control"], n_kernels=a["n"], n_dead=a["dead"],
            n_rejected=a["rejected"], classified_share=round(a["cls"] / denom, 4),
            classified_share_tau=round(a["cls_tau"] / denom, 4),
            top_clusters=[f"{k} {v / denom:.0%}" for k, v in top],
        ))
    layer_rows.sort(key=lambda r: (r["checkpoint"], r["layer"]))
    return rows, layer_rows

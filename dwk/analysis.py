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
from dwk import progress
from dwk.clusterer import KernelClusterer
from dwk.clusters import FittedClusters, PaperClusterer, fit_clusters, noise_kernels, tau_curve
from dwk.config import RunConfig
from dwk.controls import kmeans_baseline, kmeans_true_k_ari, master_key_fit, planted_recovery
from dwk.dog import fit_reference, name_prototypes
from dwk.extract import REGULAR_PREFIX, group_shape, stored_group
from dwk.planted import STANDARD_CLASSES
from dwk.store import STATUS_DEAD, STATUS_OK, KernelStore

logger = logging.getLogger(__name__)

TAU_GRID = np.round(np.linspace(0.0, 1.0, 101), 2)


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
        idx = store.kernel_index(c["id"], stored_group(shape))
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
    """Train the autoencoder of one shape group on its fit set (a seeded sample of at most
    ``autoencoder.max_train_kernels`` of it); save it; return (path, losses)."""
    arr = store.run_array(run_id, shape, "normalized")
    idx = np.flatnonzero(fit_mask(store.run_array(run_id, shape, "status")[:],
                                  kernel_table(store, run_id, shape)["control"]))
    cap, n_fit = cfg.autoencoder.max_train_kernels, len(idx)
    if n_fit > cap:  # sorted, so the rows are read chunk by chunk, in order
        idx = np.sort(np.random.default_rng(cfg.autoencoder.seed).choice(idx, cap, replace=False))
        logger.info("%s: training on a seeded sample of %d of %d fit kernels (max_train_kernels)", shape, cap, n_fit)
    x = arr.oindex[idx, :] if len(idx) < arr.shape[0] else arr[:]
    model, losses = ae.train(x, cfg.autoencoder, on_epoch=on_epoch)
    model_dir.mkdir(parents=True, exist_ok=True)
    path = model_path(model_dir, shape)
    ae.save(model, path)
    return path, losses


def fit_sample(fit: np.ndarray, ckpt: np.ndarray, cap: int, seed: int) -> np.ndarray:
    """Indices of the kernels the clusters are fitted on: every fit kernel, or, beyond ``cap``, a
    seeded sample stratified by checkpoint (each contributes its share), sorted (read in order)."""
    idx = np.flatnonzero(fit)
    if len(idx) <= cap:
        return idx
    rng = np.random.default_rng(seed)
    owners, counts = np.unique(ckpt[idx], return_counts=True)
    take = np.floor(counts / counts.sum() * cap).astype(int)
    take[np.argsort(-(counts / counts.sum() * cap - take))[: cap - take.sum()]] += 1  # largest remainders
    parts = [rng.choice(idx[ckpt[idx] == o], t, replace=False) for o, t in zip(owners, take) if t]
    return np.sort(np.concatenate(parts))


def _blocks(n: int, size: int):
    for a in range(0, n, size):
        yield a, min(n, a + size)


def cluster_shape(store: KernelStore, run_id: str, shape: str, cfg: RunConfig, model_path: Path) -> dict:
    """Cut clusters, name them, classify every kernel of the shape group, run the controls.

    The clusters are fitted on the fit kernels, or on a seeded sample of ``cluster.max_fit_kernels``
    of them stratified by checkpoint; every kernel is then assigned chunk by chunk (memory bounded by
    the sample, not the group). A fit kernel's classifying cosine is out of sample either way: the
    sample's through cross-fitting, the others' because no fit saw them.

    Writes ``code``, ``cluster`` (-1 for rejected kernels), ``cosine`` (NaN for rejected kernels,
    -inf in minor clusters) and ``prototypes`` to the store, and returns the shape's summary.
    """
    cc, ctl = cfg.cluster, cfg.controls
    arr = store.run_array(run_id, shape, "normalized")
    n_all = arr.shape[0]
    status = store.run_array(run_id, shape, "status")[:]
    table = kernel_table(store, run_id, shape)
    ok = status == STATUS_OK
    fit = fit_mask(status, table["control"])
    sample = fit_sample(fit, table["ckpt"], cc.max_fit_kernels, cc.seed)
    in_sample = np.zeros(n_all, bool)
    in_sample[sample] = True
    x_fit = (arr[:] if len(sample) == n_all else arr.oindex[sample, :]).astype(np.float64)
    if len(sample) < fit.sum():
        logger.info("%s: clusters fitted on a stratified sample of %d of %d fit kernels (max_fit_kernels)", shape,
                    len(sample), int(fit.sum()))
    model = ae.load(model_path)
    noise = noise_kernels(cc.n_null, arr.shape[1], cfg.normalize.method, cc.seed + 1_000_003)
    kshape = group_shape(shape)
    common = dict(min_share=cc.min_share, alpha=cc.alpha)

    paper = None
    if model.latent_dim == 1:
        paper = fit_clusters(PaperClusterer(model, cc.grid, cc.paper_merge_cos).fit(x_fit), x_fit, noise, **common)
    selection, est = None, None
    if cc.mode == "paper":
        if paper is None:
            raise ValueError("cluster.mode 'paper' needs autoencoder.latent_dim: 1")
        primary = paper
        tau_null, null_cos = primary.tau_null, primary.null_cos
    else:
        est = KernelClusterer.from_config(cc, kshape, cfg.normalize.method).fit(x_fit)
        primary, selection = est.fitted_, est.selection_
        tau_null = est.tau_null_
        null_cos = est.crossfit_.null_cos if est.crossfit_ is not None else primary.null_cos
    # Assignment, chunk by chunk (float32 storage, float64 arithmetic per chunk only).
    labels = np.full(n_all, -1, np.int32)
    cos = np.full(n_all, np.nan, np.float32)
    codes = np.full((n_all, model.latent_dim), np.nan, np.float32)
    paper_lab = np.full(n_all, -1, np.int32) if paper is not None else None
    outside_all = ok & ~in_sample  # scored against the fit, not fitted on (controls; beyond the sample)
    folds = est.new_folds(int(outside_all.sum())) if est is not None else None
    first = 0  # outside kernels scored so far: this chunk's folds start here
    for a, b in progress.track(list(_blocks(n_all, max(cfg.chunk_kernels, 1))), f"assigning {shape} kernels"):
        okb = ok[a:b]
        if not okb.any():
            continue
        xb = arr[a:b].astype(np.float64)[okb]
        rows = np.flatnonzero(okb) + a
        if est is None:
            labels[rows], cos[rows] = primary.assign(xb)
        else:
            labels[rows] = primary.clusterer.predict(xb)
            outside = ~in_sample[rows]
            if outside.any():
                n_out = int(outside.sum())
                cos[rows[outside]] = est.score_samples(xb[outside], fold=folds[first:first + n_out])
                first += n_out
        codes[rows] = ae.encode(model, xb.astype(np.float32))
        if paper_lab is not None:
            paper_lab[rows] = paper.clusterer.predict(xb)
    if est is not None:
        cos[sample] = est.cosines_  # out of sample when cross-fitted
    chunk = cfg.chunk_kernels
    store.write_run_array(run_id, shape, "cluster", labels, chunk, ("kernel",))
    store.write_run_array(run_id, shape, "cosine", cos, chunk, ("kernel",))
    store.write_run_array(run_id, shape, "code", codes, chunk, ("kernel", "latent"))
    store.write_run_array(run_id, shape, "prototypes", primary.prototypes.astype(np.float32),
                          max(len(primary.prototypes), 1), ("cluster", "tap"))

    names = name_prototypes(primary.prototypes, kshape, cc.name_cos)
    fit_cos, fit_lab = cos[fit], labels[fit]
    clusters = []
    for i in np.argsort(-primary.share):
        c = dict(id=int(i), name=names[i]["name"], size=int((fit_lab == i).sum()), share=round(float(primary.share[i]), 4),
                 minor=bool(primary.minor[i]), classified_share=round(float((fit_cos[fit_lab == i] >= tau_null).mean()), 4)
                 if (fit_lab == i).any() else 0.0, reference=names[i], prototype=primary.prototypes[i].round(5).tolist())
        if ctl.fit_dog and not names[i]["name"].startswith("unnamed"):
            c["dog_fit"] = fit_reference(primary.prototypes[i], kshape, names[i])
        clusters.append(c)
    summary = dict(
        shape=shape,
        n_kernels=int(n_all),
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
        clusters=clusters,
        controls=dict(noise=dict(n=int(len(noise)), classified_share_tau_null=round(float((null_cos >= tau_null).mean()), 4),
                                 classified_share_tau=round(float((null_cos >= cc.tau).mean()), 4))),
        classification=dict(out_of_sample=est is not None and est.crossfit_ is not None,
                            tau_null_in_sample=round(primary.tau_null, 4),
                            fold_clusters=[int(f.clusterer.n_clusters_) for f in est.crossfit_.fits]
                            if est is not None and est.crossfit_ is not None else None),
    )
    if selection is not None:
        summary["selection"] = selection
        summary["controls"]["seed_stability"] = selection["seed_stability"]
    sample_lab = labels[sample]
    if ctl.kmeans and len(sample) > primary.clusterer.n_clusters_:
        km = kmeans_baseline(x_fit, primary.clusterer.n_clusters_, noise, sample_lab, seed=cc.seed,
                             max_fit=cc.max_fit_kernels, **common)
        summary["controls"]["kmeans"] = {k: v for k, v in km.items() if k != "labels"}
    if ctl.master_key:
        summary["controls"]["master_key"] = master_key_fit(x_fit, primary.prototypes, sample_lab)
    if paper is not None:
        summary["paper"] = _paper_summary(paper, x_fit, kshape, cc.name_cos)
    # Planted-structure recovery, per checkpoint that carries planted labels.
    ckpt_ids = [c["id"] for c in store.run_meta(run_id)["checkpoints"]]
    planted = {}
    for i in np.unique(table["ckpt"][fit & (table["label"] >= -1)]):
        m = fit & (table["label"] >= -1) & (table["ckpt"] == i)
        planted[ckpt_ids[i]] = planted_recovery(table["label"][m], labels[m], cos[m], tau_null,
                                                [n["name"] for n in names], [c.name for c in STANDARD_CLASSES])
        if ctl.kmeans:
            s = m & (table["label"] >= 0) & in_sample
            planted[ckpt_ids[i]]["kmeans_ari_true_k"] = kmeans_true_k_ari(
                x_fit[s[sample]], table["label"][s], seed=cc.seed, max_fit=cc.max_fit_kernels)
    if planted:
        summary["planted"] = planted
        if paper is not None:  # how the paper's 1-D code intervals recover the same planted classes
            from sklearn.metrics import adjusted_rand_score

            summary["paper"]["planted_ari"] = {}
            for i in np.unique(table["ckpt"][fit & (table["label"] >= 0)]):
                m = fit & (table["label"] >= 0) & (table["ckpt"] == i)
                summary["paper"]["planted_ari"][ckpt_ids[i]] = round(
                    float(adjusted_rand_score(table["label"][m], paper_lab[m])), 4)
    logger.info("%s: %d clusters (%d minor), tau_null %.3f, classified %.1f%% of %d fitted kernels",
                shape, len(clusters), int(primary.minor.sum()), tau_null, 100 * summary["classified_share"], fit.sum())
    return summary


def _paper_summary(paper: FittedClusters, x_fit: np.ndarray, kshape: tuple[int, int], name_cos: float) -> dict:
    names = name_prototypes(paper.prototypes, kshape, name_cos)
    _, cos = paper.assign(x_fit)
    codes = paper.clusterer.codes(x_fit)
    hist, edges = np.histogram(codes, bins=paper.clusterer.grid, range=(0, 1))
    return dict(
        n_clusters=paper.clusterer.n_clusters_,
        tau_null=round(paper.tau_null, 4),
        classified_share=float((cos >= paper.tau_null).mean()) if len(cos) else 0.0,
        intervals=[dict(lo=lo, hi=hi, name=names[i]["name"], share=round(float(paper.share[i]), 4))
                   for i, (lo, hi) in enumerate(paper.clusterer.intervals_)],
        code_hist=dict(counts=hist.tolist(), edges=edges.round(4).tolist()),
    )


def kernel_frame(store: KernelStore, run_id: str, shape: str, shape_summary: dict):
    """One row per kernel of a shape group: where it comes from and how it was classified.

    Columns: checkpoint, source, control, layer, module, depth, channel, shape, status (ok,
    non-finite, dead), cluster, cluster_name, cosine, classified (at tau_null), classified_tau.
    """
    import pandas as pd

    meta = store.run_meta(run_id)
    ckpts = meta["checkpoints"]
    t = kernel_table(store, run_id, shape)
    status = store.run_array(run_id, shape, "status")[:]
    lab = store.run_array(run_id, shape, "cluster")[:]
    cos = store.run_array(run_id, shape, "cosine")[:]
    ok = status == STATUS_OK
    names = np.array([""] * (max([c["id"] for c in shape_summary["clusters"]], default=-1) + 2), dtype=object)
    for c in shape_summary["clusters"]:
        names[c["id"]] = c["name"]
    modules, depth = {}, {}
    for i, c in enumerate(ckpts):
        for layer in store.checkpoint(c["id"]).layers:
            modules[(i, layer["layer_index"])] = layer["module"]
            depth[(i, layer["layer_index"])] = layer["depth"]
    keys = list(zip(t["ckpt"].tolist(), t["layer"].tolist()))
    return pd.DataFrame(dict(
        checkpoint=pd.Categorical.from_codes(t["ckpt"], [c["id"] for c in ckpts]),
        source=np.array([c["source"] for c in ckpts])[t["ckpt"]],
        control=t["control"],
        layer=t["layer"],
        module=[modules[k] for k in keys],
        depth=np.array([depth[k] for k in keys], np.float32),
        channel=t["channel"],
        shape=shape,
        status=pd.Categorical.from_codes(status, ["ok", "non-finite", "dead"]),
        cluster=lab,
        cluster_name=names[lab],  # lab -1 (rejected) indexes the trailing ""
        cosine=cos,
        classified=ok & (cos >= shape_summary["tau_null"]),
        classified_tau=ok & (cos >= shape_summary["tau"]),
    ))


def checkpoint_tables(store: KernelStore, run_id: str, shapes: dict[str, dict]) -> tuple[list[dict], list[dict]]:
    """Per-checkpoint rows (the paper's Table 1) and per-layer rows (its per-layer bars)."""
    import pandas as pd

    meta = store.run_meta(run_id)
    df = pd.concat([kernel_frame(store, run_id, shape, s) for shape, s in shapes.items()], ignore_index=True)
    df["ok"] = df["status"] == "ok"
    df["dead"] = df["status"] == "dead"
    df["regular"] = df["shape"].str.startswith(REGULAR_PREFIX)
    rows = []
    for c in meta["checkpoints"]:
        reg = df[(df["checkpoint"] == c["id"]) & df["regular"]]
        d = df[(df["checkpoint"] == c["id"]) & ~df["regular"]]
        n_ok = max(int(d["ok"].sum()), 1)
        counts = d.loc[d["classified"], "cluster_name"].value_counts()
        top = [f"{name} {v / n_ok:.0%}" for name, v in counts.items() if v >= 0.01 * n_ok][:3]
        # The classified share over tau, pooled over shapes (each kernel against its cluster's prototype).
        cos_ok = np.where(d["ok"], d["cosine"], -np.inf)
        rows.append(dict(
            id=c["id"], source=c["source"], control=c["control"], role=c.get("role"), n_kernels=int(len(d)), n_dead=int(d["dead"].sum()),
            n_rejected=int((~d["ok"]).sum()), classified_share=round(int(d["classified"].sum()) / n_ok, 4),
            classified_share_tau=round(int(d["classified_tau"].sum()) / n_ok, 4), top_clusters=top,
            shapes=sorted(d["shape"].unique().tolist()),
            tau_curve=(tau_curve(cos_ok[d["ok"].to_numpy()], TAU_GRID).round(4).tolist()),
        ))
        extra = store.checkpoint(c["id"]).extra or {}
        info = extra.get("timm") or {}
        rows[-1].update({k: info[k] for k in ("architecture", "tag", "data", "resolution", "license") if info.get(k)})
        tv = extra.get("torchvision") or {}
        if tv.get("weights"):  # torchvision's published weights: their name and ImageNet top-1
            rows[-1].update(architecture=tv["builder"], data=tv["weights"], top1=tv.get("acc@1"))
        if len(reg):  # the comparison set, analysed the same way
            rows[-1].update(n_regular=int(len(reg)),
                            regular_classified_share=round(int(reg["classified"].sum()) / max(int(reg["ok"].sum()), 1), 4))
    # Real checkpoints lead, then their random-init controls, then the method's planted checks.
    order = {"subject": 0, "control": 1, "method-check": 2}
    rows.sort(key=lambda r: order.get(r["role"], 0))
    layer_rows = []
    for (ckpt, layer, shape), d in df.groupby(["checkpoint", "layer", "shape"], observed=True, sort=True):
        n_ok = max(int(d["ok"].sum()), 1)
        shares = d.loc[d["classified"], "cluster_name"].value_counts().sort_index()
        layer_rows.append(dict(
            checkpoint=str(ckpt), layer=int(layer), shape=shape, module=d["module"].iloc[0],
            depth=round(float(d["depth"].iloc[0]), 4), n_kernels=int(len(d)), n_dead=int(d["dead"].sum()),
            classified_share=round(int(d["classified"].sum()) / n_ok, 4),
            classified_share_tau=round(int(d["classified_tau"].sum()) / n_ok, 4),
            cluster_shares={k: round(v / n_ok, 4) for k, v in shares.items()},
            tau_curve=tau_curve(d.loc[d["ok"], "cosine"].to_numpy(), TAU_GRID).round(4).tolist(),
        ))
    layer_rows.sort(key=lambda r: (r["checkpoint"], r["layer"]))
    return rows, layer_rows

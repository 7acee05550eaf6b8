"""Clusters of kernels, their prototypes, and the classified share (METHOD 2.4, 2.6).

Two ways to cut clusters, both sklearn-style estimators (``__init__`` stores parameters, ``fit``
returns self, learned state ends in ``_``):

- :class:`PaperClusterer` (the published procedure): decode a uniform grid of ``grid`` codes in
  [0, 1] into patterns; a kernel belongs to the grid cell nearest its 1-D code; neighbouring cells
  whose decoded patterns have cosine >= ``merge_cos`` form one cluster, so a cluster is an
  interval of the code.
- :class:`KMeansMergeClusterer`: over-segment the normalised kernels into ``n_init`` k-means
  clusters, then merge clusters whose prototypes have cosine >= ``merge_cos`` (average linkage).
  :func:`select_merge` chooses ``merge_cos`` (so the number of clusters) by seed stability.
- :func:`refine` then settles the merged clusters into a :class:`PrototypeClusterer`: spherical
  k-means (Lloyd) started from their prototypes, so each kernel belongs to the prototype it
  matches best; :func:`blends` finds border clusters (unnamed blends of two named prototypes)
  and :func:`dissolve` removes them (``dwk.clusterer.fit_kmeans_mode`` alternates the steps).

A cluster's prototype is the unit-norm mean of its member kernels. A kernel is *classified* when
its cosine to its cluster's prototype is >= tau and its cluster is not minor (< ``min_share`` of
the kernels). ``tau_null`` calibrates tau against isotropic noise of the same shape, normalised the
same way and assigned by the same model: the smallest tau at which at most ``alpha`` of the noise
would be classified.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from dwk.normalize import normalize_block

logger = logging.getLogger(__name__)


def unit_rows(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, n, out=np.zeros_like(x, dtype=np.float64), where=n > 0)


def prototypes_of(x: np.ndarray, labels: np.ndarray, n_clusters: int) -> np.ndarray:
    """Unit-norm mean of the members of each cluster: (n_clusters, d); empty clusters are zero."""
    from scipy import sparse

    # A one-hot (clusters x kernels) product: np.add.at did the same 50x slower, and refinement
    # recomputes prototypes every iteration.
    onehot = sparse.csr_matrix((np.ones(len(labels)), (labels, np.arange(len(labels)))), shape=(n_clusters, len(labels)))
    return unit_rows(np.asarray(onehot @ x, dtype=np.float64))


class PaperClusterer:
    """Intervals of a 1-D code (the paper's procedure). Needs an autoencoder with d = 1."""

    def __init__(self, model, grid: int = 64, merge_cos: float = 0.9):
        self.model, self.grid, self.merge_cos = model, grid, merge_cos

    def fit(self, x: np.ndarray) -> "PaperClusterer":
        from dwk.autoencoder import decode

        if self.model.latent_dim != 1:
            raise ValueError("paper mode cuts intervals of a 1-D code: set autoencoder.latent_dim: 1, or use mode: kmeans")
        self.grid_codes_ = np.linspace(0.0, 1.0, self.grid)
        self.grid_patterns_ = unit_rows(decode(self.model, self.grid_codes_[:, None]))  # (G, k*k)
        cos_next = (self.grid_patterns_[:-1] * self.grid_patterns_[1:]).sum(1)
        # A new interval starts wherever neighbouring decoded patterns differ.
        self.cell_cluster_ = np.concatenate([[0], np.cumsum(cos_next < self.merge_cos)]).astype(np.int32)
        cells = self.cells(x)
        # Renumber so only intervals that hold kernels count as clusters.
        used = np.unique(self.cell_cluster_[cells])
        remap = np.full(self.cell_cluster_.max() + 1, -1, np.int32)
        remap[used] = np.arange(len(used))
        # Empty intervals join their nearest used neighbour so every code has a cluster.
        for i in range(len(remap)):
            if remap[i] < 0:
                j = used[np.argmin(np.abs(used - i))]
                remap[i] = remap[j]
        self.cell_cluster_ = remap[self.cell_cluster_]
        self.n_clusters_ = len(used)
        self.intervals_ = [
            (float(self.grid_codes_[self.cell_cluster_ == c].min()), float(self.grid_codes_[self.cell_cluster_ == c].max()))
            for c in range(self.n_clusters_)
        ]
        return self

    def codes(self, x: np.ndarray) -> np.ndarray:
        from dwk.autoencoder import encode

        return encode(self.model, x.astype(np.float32))[:, 0]

    def cells(self, x: np.ndarray) -> np.ndarray:
        return np.clip(np.rint(self.codes(x) * (self.grid - 1)), 0, self.grid - 1).astype(np.int64)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.cell_cluster_[self.cells(x)]


class KMeansMergeClusterer:
    """Over-segment with k-means, then merge clusters whose prototypes are alike (average linkage).

    ``fit(x, kmeans=...)`` reuses an already fitted k-means, so several merge thresholds can be
    tried on one over-segmentation. At most ``max_fit`` kernels (a seeded subsample) fit k-means.
    """

    def __init__(self, n_init: int = 48, merge_cos: float = 0.75, random_state: int = 0, max_fit: int = 200_000):
        self.n_init, self.merge_cos, self.random_state, self.max_fit = n_init, merge_cos, random_state, max_fit

    def fit(self, x: np.ndarray, kmeans=None) -> "KMeansMergeClusterer":
        from sklearn.cluster import AgglomerativeClustering

        self.kmeans_ = kmeans if kmeans is not None else overseg(x, self.n_init, self.random_state, self.max_fit)
        k = self.kmeans_.n_clusters
        protos = unit_rows(self.kmeans_.cluster_centers_)
        if k > 1:
            agg = AgglomerativeClustering(n_clusters=None, metric="cosine", linkage="average",
                                          distance_threshold=1.0 - self.merge_cos).fit(protos)
            self.center_cluster_ = agg.labels_.astype(np.int32)
        else:
            self.center_cluster_ = np.zeros(1, np.int32)
        self.n_clusters_ = int(self.center_cluster_.max()) + 1
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.center_cluster_[self.kmeans_.predict(x)]


class PrototypeClusterer:
    """Each kernel belongs to the prototype it matches best (largest cosine; rows are unit-norm)."""

    BLOCK = 65536  # kernels per matrix product, so predicting a whole run stays small in memory

    def __init__(self, prototypes: np.ndarray):
        self.prototypes_ = np.asarray(prototypes, np.float64)
        self.n_clusters_ = len(self.prototypes_)

    def predict(self, x: np.ndarray) -> np.ndarray:
        out = np.empty(len(x), np.int32)
        for a in range(0, len(x), self.BLOCK):
            out[a:a + self.BLOCK] = np.argmax(x[a:a + self.BLOCK] @ self.prototypes_.T, axis=1)
        return out


# k-means restarts per over-segmentation. With refinement, 5x5 standard populations 1-6 reached
# seed stability 0.91-0.99 at 10 restarts; at 4, one of the six fell to 0.86 (README, "Method choices").
N_INIT = 10
MIN_PER_CLUSTER = 25  # kernels per over-segment at least: a cluster of a few kernels fits them by itself


def overseg(x: np.ndarray, n_clusters: int, random_state: int, max_fit: int = 200_000):
    """k-means over-segmentation on at most ``max_fit`` kernels (seeded subsample).

    Small groups get fewer clusters (``MIN_PER_CLUSTER`` kernels each on average): with one kernel
    per cluster every kernel would match its own prototype perfectly.
    """
    from sklearn.cluster import KMeans

    n_clusters = max(2, min(n_clusters, len(x) // MIN_PER_CLUSTER))
    if len(x) > max_fit:
        x = x[np.random.default_rng(random_state).choice(len(x), max_fit, replace=False)]
    return KMeans(n_clusters=min(n_clusters, len(x)), n_init=N_INIT, random_state=random_state).fit(x)


@dataclass
class FittedClusters:
    """A fitted clustering with what classification needs: prototypes, minor flags, tau_null."""

    clusterer: object
    prototypes: np.ndarray  # (K, d) unit-norm means of the fit kernels' members
    share: np.ndarray  # (K,) share of the fit kernels
    minor: np.ndarray  # (K,) bool
    tau_null: float
    null_cos: np.ndarray  # the calibration noise's cosines to its clusters' prototypes
    dissolved: list[dict] = field(default_factory=list)  # border clusters removed while settling (see blends)

    def assign(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(cluster, cosine to its prototype; -inf in minor clusters) for unit-norm kernels."""
        lab = self.clusterer.predict(x)
        return lab, classify(x, lab, self.prototypes, self.minor)

    def classified_labels(self, x: np.ndarray, tau: float | None = None) -> np.ndarray:
        """Cluster of each kernel when classified at ``tau`` (default tau_null), else -1."""
        lab, cos = self.assign(x)
        return np.where(cos >= (self.tau_null if tau is None else tau), lab, -1)


def fit_clusters(clusterer, x_fit: np.ndarray, noise: np.ndarray, *, min_share: float, alpha: float) -> FittedClusters:
    """Prototypes, shares, minor flags and the null-calibrated tau of a fitted clusterer."""
    lab = clusterer.predict(x_fit)
    k = clusterer.n_clusters_
    protos = prototypes_of(x_fit, lab, k)
    share = np.bincount(lab, minlength=k) / max(len(lab), 1)
    minor = share < min_share
    null_cos = classify(noise, clusterer.predict(noise), protos, minor)
    return FittedClusters(clusterer, protos, share, minor, null_tau(null_cos, alpha), null_cos)


def null_tau(null_cos: np.ndarray, alpha: float) -> float:
    """The smallest tau at which at most ``alpha`` of the noise has cosine >= tau."""
    finite = null_cos[np.isfinite(null_cos)]
    if len(finite) == 0 or (len(finite) / len(null_cos)) <= alpha:
        return -1.0
    q = np.quantile(null_cos, 1.0 - alpha, method="higher")  # -inf (minor) counts as never classified
    return float(np.nextafter(q, np.inf))


def noise_kernels(n: int, n_taps: int, method: str, seed: int) -> np.ndarray:
    """Isotropic Gaussian kernels, normalised like the data: the null population."""
    return normalize_block(np.random.default_rng(seed).standard_normal((n, n_taps)), method).astype(np.float64)


def pairwise_ari(partitions: list[np.ndarray]) -> list[float]:
    from sklearn.metrics import adjusted_rand_score

    return [float(adjusted_rand_score(partitions[i], partitions[j]))
            for i in range(len(partitions)) for j in range(i + 1, len(partitions))]


def select_merge(
    x_fit: np.ndarray,
    noise: np.ndarray,
    *,
    n_init: int,
    grid: tuple[float, ...],
    seeds: tuple[int, ...],
    min_share: float,
    alpha: float,
    max_fit: int = 200_000,
    post=None,
) -> tuple[float, list[dict], dict[int, FittedClusters]]:
    """Choose the merge threshold by seed stability (METHOD 2.4: choosing the number of clusters).

    For each seed, one k-means over-segmentation; for each threshold, the partition into classified
    clusters (kernels not classified at tau_null form one group) is compared across seeds by ARI.
    The most stable threshold wins; near-ties (within 0.005) go to the higher threshold (more
    clusters). ``post`` (FittedClusters -> FittedClusters) is applied to every clustering before it
    is scored, so the threshold is chosen for the final partitions. Returns (threshold, the table
    over the grid, the fitted clusterings per seed at it).
    """
    kms = {s: overseg(x_fit, n_init, s, max_fit) for s in seeds}
    table, fits = [], {}
    done: dict[tuple[int, bytes], FittedClusters] = {}  # neighbouring thresholds often merge alike

    def final(s: int, merged: KMeansMergeClusterer) -> FittedClusters:
        key = (s, merged.center_cluster_.tobytes())
        if key not in done:
            f = fit_clusters(merged, x_fit, noise, min_share=min_share, alpha=alpha)
            done[key] = post(f) if post is not None else f
        return done[key]

    for mc in grid:
        per_seed = {s: final(s, KMeansMergeClusterer(n_init, mc, s, max_fit).fit(x_fit, kmeans=km)) for s, km in kms.items()}
        aris = pairwise_ari([f.classified_labels(x_fit) for f in per_seed.values()]) if len(seeds) > 1 else [1.0]
        table.append(dict(merge_cos=mc, stability_mean=round(float(np.mean(aris)), 4),
                          stability_min=round(float(np.min(aris)), 4),
                          n_clusters=[f.clusterer.n_clusters_ for f in per_seed.values()]))
        fits[mc] = per_seed
    best = max(table, key=lambda r: (round(r["stability_mean"] / 0.005), r["merge_cos"]))["merge_cos"]
    logger.info("merge threshold %.2f chosen by seed stability: %s", best,
                ", ".join(f"{r['merge_cos']:.2f}: {r['stability_mean']:.3f}" for r in table))
    return best, table, fits[best]


class RelabelledClusterer:
    """A fitted clusterer whose clusters are re-grouped by ``mapping`` (old cluster -> new cluster)."""

    def __init__(self, inner, mapping: np.ndarray):
        self.inner, self.mapping = inner, np.asarray(mapping, np.int32)
        self.n_clusters_ = int(self.mapping.max()) + 1

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.mapping[self.inner.predict(x)]


def merge_same_name(fitted: FittedClusters, names: list[str], x_fit: np.ndarray, noise: np.ndarray, *,
                    min_share: float, alpha: float) -> FittedClusters:
    """Join clusters whose prototypes carry the same reference name (unnamed clusters stay apart).

    Over-segmentation splits one pattern family into pieces (wide and narrow DoGs, say); at the
    resolution of the reference bank they are one identified cluster. Prototypes, shares, minor
    flags and tau_null are recomputed for the joined clusters.
    """
    ids: dict[str, int] = {}
    mapping = [ids.setdefault(n if not n.startswith("unnamed") else f"\0{i}", len(ids)) for i, n in enumerate(names)]
    if len(ids) == len(names):
        return fitted
    return fit_clusters(RelabelledClusterer(fitted.clusterer, mapping), x_fit, noise, min_share=min_share, alpha=alpha)


REFINE_MAX_ITER = 100


def refine(fitted: FittedClusters, x_fit: np.ndarray, noise: np.ndarray, *, min_share: float, alpha: float,
           max_iter: int = REFINE_MAX_ITER) -> FittedClusters:
    """Spherical k-means (Lloyd iterations on the cosine) started from ``fitted``'s prototypes.

    Over-segmentation and merging leave clusters whose borders are those of the k-means
    over-segments, so a kernel can sit in one cluster while matching another's prototype better,
    and a cluster of ambiguous kernels (between two orientations, say) is cut differently by every
    seed. After refinement every kernel belongs to the prototype it matches best, the same cosine
    that classifies it, and the partition no longer depends on where the over-segments fell:
    on the 5x5 standard populations 1 and 3, seed stability went from 0.82-0.84 to 0.93-0.94
    (0.98-0.99 with 10 k-means restarts; README, "The method, and the choices dwk made"). Clusters that lose all members are dropped. Hand-written rather
    than sklearn's KMeans(init=...): KMeans is Euclidean and would re-centre on unnormalised means.
    """
    protos, prev = fitted.prototypes[np.linalg.norm(fitted.prototypes, axis=1) > 0], None
    for _ in range(max_iter):
        lab = PrototypeClusterer(protos).predict(x_fit)
        if prev is not None and np.array_equal(lab, prev):
            break
        used = np.bincount(lab, minlength=len(protos)) > 0
        protos, prev = prototypes_of(x_fit, lab, len(protos))[used], lab
        if not used.all():
            prev = None  # numbering changed; compare again after the next assignment
    else:
        logger.info("refinement stopped after %d iterations without converging", max_iter)
    return fit_clusters(PrototypeClusterer(protos), x_fit, noise, min_share=min_share, alpha=alpha)


def blends(prototypes: np.ndarray, named: np.ndarray, min_cos: float) -> dict[int, tuple[int, int, float]]:
    """Unnamed clusters whose prototype is a non-negative blend of two named prototypes.

    For each unnamed prototype p, the best a*p_i + b*p_j (a, b >= 0, i and j named) by cosine to p;
    those at ``min_cos`` or above are returned as {cluster: (i, j, cosine)}. Such a cluster holds
    the kernels on the border between two identified clusters (a first derivative blurring into a
    second, say): different seeds cut different borders, and it is no pattern of its own. On the
    5x5 standard population these border clusters had blend cosines of 0.95-0.98, noise clusters
    0.55 at most.
    """
    from scipy.optimize import nnls

    idx = np.flatnonzero(named)
    out = {}
    for c in np.flatnonzero(~named):
        best = (-1.0, -1, -1)
        for a in range(len(idx)):
            for b in range(a + 1, len(idx)):
                pair = prototypes[[idx[a], idx[b]]].T  # (d, 2)
                w, _ = nnls(pair, prototypes[c])
                v = pair @ w
                cos = float(v @ prototypes[c] / max(np.linalg.norm(v) * np.linalg.norm(prototypes[c]), 1e-12))
                best = max(best, (cos, int(idx[a]), int(idx[b])))
        if best[0] >= min_cos:
            out[int(c)] = (best[1], best[2], round(best[0], 4))
    return out


def dissolve(fitted: FittedClusters, drop: list[int], x_fit: np.ndarray, noise: np.ndarray, *, min_share: float,
             alpha: float) -> FittedClusters:
    """Remove clusters ``drop``: their kernels go to the nearest remaining prototype."""
    keep = np.setdiff1d(np.arange(len(fitted.prototypes)), drop)
    return fit_clusters(PrototypeClusterer(fitted.prototypes[keep]), x_fit, noise, min_share=min_share, alpha=alpha)


def classify(
    x: np.ndarray,
    labels: np.ndarray,
    prototypes: np.ndarray,
    minor: np.ndarray,
) -> np.ndarray:
    """Cosine of each unit-norm kernel to its cluster's prototype; -inf for kernels of minor clusters."""
    cos = (x * prototypes[labels]).sum(axis=1)
    return np.where(minor[labels], -np.inf, cos)


def tau_curve(cos: np.ndarray, taus: np.ndarray) -> np.ndarray:
    """Share of kernels with cosine >= tau, for each tau (the classified-share curve)."""
    if len(cos) == 0:
        return np.zeros(len(taus))
    s = np.sort(np.where(np.isfinite(cos), cos, -np.inf))
    return 1.0 - np.searchsorted(s, taus, side="left") / len(s)

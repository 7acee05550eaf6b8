"""Clusters of kernels, their prototypes, and the classified share (METHOD 2.4, 2.6).

Two ways to cut clusters, both sklearn-style estimators (``__init__`` stores parameters, ``fit``
returns self, learned state ends in ``_``):

- :class:`PaperClusterer` (the published procedure): decode a uniform grid of ``grid`` codes in
  [0, 1] into patterns; a kernel belongs to the grid cell nearest its 1-D code; neighbouring cells
  whose decoded patterns have cosine >= ``merge_cos`` form one cluster, so a cluster is an
  interval of the code.
- :class:`KMeansMergeClusterer`: over-segment the normalised kernels (or the autoencoder's
  reconstructions) into ``n_init`` k-means clusters, then merge clusters whose prototypes have
  cosine >= ``merge_cos`` (average linkage). No number of clusters to guess.

A cluster's prototype is the unit-norm mean of its member kernels. A kernel is *classified* when
its cosine to its cluster's prototype is >= tau and its cluster is not minor (< ``min_share`` of
the kernels). ``tau_null`` calibrates tau against isotropic noise of the same shape, normalised the
same way and assigned by the same model: the smallest tau at which at most ``alpha`` of the noise
would be classified.
"""
from __future__ import annotations

import logging

import numpy as np

from dwk.normalize import normalize_block

logger = logging.getLogger(__name__)


def unit_rows(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, n, out=np.zeros_like(x, dtype=np.float64), where=n > 0)


def prototypes_of(x: np.ndarray, labels: np.ndarray, n_clusters: int) -> np.ndarray:
    """Unit-norm mean of the members of each cluster: (n_clusters, d); empty clusters are zero."""
    sums = np.zeros((n_clusters, x.shape[1]))
    np.add.at(sums, labels, x)
    return unit_rows(sums)


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
    """Over-segment with k-means, then merge clusters whose prototypes are alike (average linkage)."""

    def __init__(self, n_init: int = 48, merge_cos: float = 0.8, features=None, random_state: int = 0):
        self.n_init, self.merge_cos, self.features, self.random_state = n_init, merge_cos, features, random_state

    def _feat(self, x: np.ndarray) -> np.ndarray:
        return unit_rows(self.features(x) if self.features is not None else x)

    def fit(self, x: np.ndarray) -> "KMeansMergeClusterer":
        from sklearn.cluster import AgglomerativeClustering, KMeans

        f = self._feat(x)
        k = min(self.n_init, len(f))
        self.kmeans_ = KMeans(n_clusters=k, n_init=4, random_state=self.random_state).fit(f)
        protos = prototypes_of(f, self.kmeans_.labels_, k)
        if k > 1:
            agg = AgglomerativeClustering(n_clusters=None, metric="cosine", linkage="average",
                                          distance_threshold=1.0 - self.merge_cos).fit(protos)
            self.center_cluster_ = agg.labels_.astype(np.int32)
        else:
            self.center_cluster_ = np.zeros(1, np.int32)
        self.n_clusters_ = int(self.center_cluster_.max()) + 1
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.center_cluster_[self.kmeans_.predict(self._feat(x))]


def classify(
    x: np.ndarray,
    labels: np.ndarray,
    prototypes: np.ndarray,
    minor: np.ndarray,
) -> np.ndarray:
    """Cosine of each unit-norm kernel to its cluster's prototype; -inf for kernels of minor clusters."""
    cos = (x * prototypes[labels]).sum(axis=1)
    return np.where(minor[labels], -np.inf, cos)


def calibrate_tau(
    clusterer,
    prototypes: np.ndarray,
    minor: np.ndarray,
    n_taps: int,
    method: str,
    *,
    alpha: float = 0.01,
    n: int = 20000,
    seed: int = 0,
) -> tuple[float, np.ndarray]:
    """The null-calibrated tau and the noise kernels' cosines (for the tau curve)."""
    rng = np.random.default_rng(seed)
    noise = normalize_block(rng.standard_normal((n, n_taps)), method)
    cos = classify(noise, clusterer.predict(noise), prototypes, minor)
    q = np.quantile(cos[np.isfinite(cos)], 1.0 - alpha) if np.isfinite(cos).any() else -1.0
    # "at most alpha classified" with classified meaning cos >= tau: step just above the quantile.
    tau = float(np.nextafter(q, np.inf))
    return tau, cos


def tau_curve(cos: np.ndarray, taus: np.ndarray) -> np.ndarray:
    """Share of kernels with cosine >= tau, for each tau (the classified-share curve)."""
    if len(cos) == 0:
        return np.zeros(len(taus))
    s = np.sort(np.where(np.isfinite(cos), cos, -np.inf))
    return 1.0 - np.searchsorted(s, taus, side="left") / len(s)

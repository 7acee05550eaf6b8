"""The default clustering of a shape group as one scikit-learn estimator, :class:`KernelClusterer`.

The procedure (METHOD 2.4-2.6, chosen by measurement; README "The method, and the choices dwk made"):
over-segment the unit-norm kernels with k-means, merge alike over-segments at the threshold that is
most stable across seeds, refine into nearest-prototype clusters (joining same-named clusters and
dissolving border blends are options, off by default: the bank only names), then classify out of sample: each kernel's cosine is measured against the
clusters of a fit on the other half of the kernels, and ``tau_null`` is calibrated on isotropic noise
measured the same way. The functions :func:`fit_kmeans_mode` and :func:`crossfit` are its two steps;
``dwk.analysis`` and the benchmarks call them with a :class:`~dwk.config.ClusterConfig`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from sklearn.base import BaseEstimator, ClusterMixin

from dwk.clusters import (
    FittedClusters,
    blends,
    dissolve,
    merge_same_name,
    noise_kernels,
    null_tau,
    refine,
    select_merge,
)
from dwk.config import ClusterConfig
from dwk.dog import name_prototypes

logger = logging.getLogger(__name__)

SETTLE_ROUNDS = 8  # refine / join / dissolve rounds; planted populations settle in 1-4
MIN_FOLD = 25  # fit kernels per fold at least (x4) for cross-fitting: tiny groups are classified in sample


def fit_kmeans_mode(x_fit: np.ndarray, noise: np.ndarray, cc: ClusterConfig,
                    kshape: tuple[int, int] | None) -> tuple[FittedClusters, dict]:
    """The default clusters: over-segment, merge at the seed-stability-chosen threshold, refine into
    nearest-prototype clusters (optionally joining same-named clusters and dissolving blends). Returns the clusters of seed
    ``cc.seed`` and the selection record (the threshold grid and the seed stability of the final
    partitions)."""
    common = dict(min_share=cc.min_share, alpha=cc.alpha)
    seeds = tuple(cc.seed + i for i in range(cc.seeds))
    grid = cc.merge_grid if cc.merge_cos == "auto" else (float(cc.merge_cos),)

    def by_name(f: FittedClusters) -> FittedClusters:
        if not cc.merge_same_name or kshape is None:
            return f
        names = [n["name"] for n in name_prototypes(f.prototypes, kshape, cc.name_cos)]
        return merge_same_name(f, names, x_fit, noise, **common)

    def settle(f: FittedClusters) -> FittedClusters:
        """Join same-named clusters, refine, and dissolve border clusters, until none of the three
        changes anything (a refined prototype can drift onto a neighbour's name, and a dissolved
        border moves its neighbours' prototypes)."""
        f = by_name(f)
        if not cc.refine:
            return f
        gone: list[dict] = []
        for _ in range(SETTLE_ROUNDS):
            f = refine(f, x_fit, noise, **common)
            joined = by_name(f)
            if joined is not f:
                f = joined
                continue
            if not cc.dissolve_blends or kshape is None:
                break
            names = [n["name"] for n in name_prototypes(f.prototypes, kshape, cc.name_cos)]
            found = blends(f.prototypes, np.array([not n.startswith("unnamed") for n in names]), cc.name_cos)
            if not found:
                break
            gone += [dict(share=round(float(f.share[c]), 4), blend_of=[names[i], names[j]], cos=cos)
                     for c, (i, j, cos) in found.items()]
            f = dissolve(f, list(found), x_fit, noise, **common)
        else:
            logger.info("clusters still changing after %d settle rounds; keeping the last", SETTLE_ROUNDS)
        f.dissolved = gone
        return f

    merge, table, fits = select_merge(x_fit, noise, n_init=cc.n_init_clusters, grid=grid, seeds=seeds,
                                      max_fit=cc.max_fit_kernels, post=settle, **common)
    best = next(r for r in table if r["merge_cos"] == merge)
    selection = dict(merge_cos=merge, chosen_by="seed stability" if len(grid) > 1 else "config", grid=table,
                     merged_same_name=cc.merge_same_name, refined=cc.refine,
                     dissolved=fits[cc.seed].dissolved,
                     seed_stability=dict(seeds=list(seeds), ari_mean=best["stability_mean"], ari_min=best["stability_min"]))
    return fits[cc.seed], selection


@dataclass
class CrossFit:
    """Two clusterings, each fitted on one half of the fit kernels: the out-of-sample classifier.

    A kernel of fold k is measured against the clusters of fold 1 - k, which were fitted without it;
    any other kernel (a control, a noise kernel) against the fold it is drawn into. ``tau_null`` is
    calibrated on isotropic noise measured the same way.
    """

    fold: np.ndarray  # (n_fit,) fold of each fit kernel
    fits: tuple[FittedClusters, FittedClusters]
    tau_null: float
    null_cos: np.ndarray

    def cosines(self, x: np.ndarray, fold: np.ndarray) -> np.ndarray:
        """Cosine of each kernel to the prototype of its nearest cluster in the other fold's fit
        (-inf when that cluster is minor)."""
        out = np.empty(len(x), np.float64)
        for k in (0, 1):
            m = fold == k
            if m.any():
                out[m] = self.fits[1 - k].assign(x[m])[1]
        return out


def crossfit(x_fit: np.ndarray, noise: np.ndarray, cc: ClusterConfig, kshape: tuple[int, int] | None,
             merge_cos: float) -> CrossFit:
    """Fit the default clustering on each half of ``x_fit`` at the chosen ``merge_cos`` (one seed)."""
    rng = np.random.default_rng(cc.seed + 7919)
    fold = rng.permutation(len(x_fit)) % 2
    one = cc.model_copy(update=dict(merge_cos=merge_cos, seeds=1))
    fits = tuple(fit_kmeans_mode(x_fit[fold == k], noise, one, kshape)[0] for k in (0, 1))
    cf = CrossFit(fold, fits, 0.0, np.empty(0))
    cf.null_cos = cf.cosines(noise, rng.permutation(len(noise)) % 2)
    cf.tau_null = null_tau(cf.null_cos, cc.alpha)
    return cf


class KernelClusterer(ClusterMixin, BaseEstimator):
    """Clusters of kernels, their prototypes and the out-of-sample classification (sklearn estimator).

    ``X`` is (n_kernels, kh*kw); rows are normalised with ``normalize`` (as ``dwk.normalize`` does)
    before fitting. Parameters mirror :class:`~dwk.config.ClusterConfig` (validated by it), plus
    ``kernel_shape`` (for naming clusters after the reference bank; ``None`` names nothing) and
    ``random_state`` (the config's ``seed``).

    Learned: ``labels_`` (cluster of each training kernel), ``cluster_centers_`` (the prototypes,
    unit-norm), ``n_clusters_``, ``cosines_`` (each training kernel's classifying cosine, out of
    sample when ``crossfit``), ``tau_null_``, ``classified_`` (``cosines_ >= tau_null_``),
    ``names_`` (reference names, or None), ``selection_`` (the threshold grid, seed stability, what
    was dissolved), ``fitted_`` and ``crossfit_`` (the underlying fits).
    """

    def __init__(self, kernel_shape: tuple[int, int] | None = None, normalize: str = "l2", n_init_clusters: int = 48,
                 merge_cos: float | str = "auto", merge_grid: tuple[float, ...] = (0.6, 0.65, 0.7, 0.75, 0.8, 0.85),
                 seeds: int = 3, merge_same_name: bool = False, refine: bool = True, dissolve_blends: bool = False,
                 crossfit: bool = True, max_fit_kernels: int = 200_000, min_share: float = 0.005, alpha: float = 0.01,
                 n_null: int = 20000, name_cos: float = 0.8, random_state: int = 0):
        self.kernel_shape = kernel_shape
        self.normalize = normalize
        self.n_init_clusters = n_init_clusters
        self.merge_cos = merge_cos
        self.merge_grid = merge_grid
        self.seeds = seeds
        self.merge_same_name = merge_same_name
        self.refine = refine
        self.dissolve_blends = dissolve_blends
        self.crossfit = crossfit
        self.max_fit_kernels = max_fit_kernels
        self.min_share = min_share
        self.alpha = alpha
        self.n_null = n_null
        self.name_cos = name_cos
        self.random_state = random_state

    @classmethod
    def from_config(cls, cc: ClusterConfig, kernel_shape: tuple[int, int] | None, normalize: str = "l2"):
        params = {k: getattr(cc, k) for k in cls._get_param_names() if k not in ("kernel_shape", "normalize", "random_state")}
        return cls(kernel_shape=kernel_shape, normalize=normalize, random_state=cc.seed, **params)

    def _config(self) -> ClusterConfig:
        params = {k: v for k, v in self.get_params().items() if k not in ("kernel_shape", "normalize", "random_state")}
        return ClusterConfig(seed=int(self.random_state), **params)

    def _unit(self, X) -> np.ndarray:
        from dwk.normalize import normalize_block

        return normalize_block(np.asarray(X, np.float64), self.normalize).astype(np.float64)

    def fit(self, X, y=None) -> "KernelClusterer":
        from sklearn.utils.validation import validate_data

        X = validate_data(self, X, dtype=np.float64, ensure_min_samples=2)
        cc = self._config()
        names_shape = self.kernel_shape if self.kernel_shape and np.prod(self.kernel_shape) == X.shape[1] else None
        x = self._unit(X)
        noise = noise_kernels(cc.n_null, x.shape[1], self.normalize, cc.seed + 1_000_003)
        self.fitted_, self.selection_ = fit_kmeans_mode(x, noise, cc, names_shape)
        self.cluster_centers_ = self.fitted_.prototypes
        self.n_clusters_ = len(self.cluster_centers_)
        self.labels_, self.cosines_ = self.fitted_.assign(x)
        self.tau_null_ = self.fitted_.tau_null
        self.crossfit_ = None
        if cc.crossfit and len(x) >= 4 * MIN_FOLD:
            self.crossfit_ = crossfit(x, noise, cc, names_shape, self.selection_["merge_cos"])
            self.cosines_ = self.crossfit_.cosines(x, self.crossfit_.fold)
            self.tau_null_ = self.crossfit_.tau_null
        self.classified_ = self.cosines_ >= self.tau_null_
        self.names_ = [n["name"] for n in name_prototypes(self.cluster_centers_, names_shape, cc.name_cos)] \
            if names_shape else None
        return self

    def predict(self, X) -> np.ndarray:
        from sklearn.utils.validation import check_is_fitted, validate_data

        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float64, reset=False)
        return self.fitted_.clusterer.predict(self._unit(X))

    def new_folds(self, n: int) -> np.ndarray:
        """The folds ``score_samples`` draws for ``n`` new kernels (seeded): give slices of it to
        ``score_samples(..., fold=)`` to score many kernels chunk by chunk exactly as in one call."""
        return np.random.default_rng(self.random_state + 104729).integers(0, 2, n)

    def score_samples(self, X, fold: np.ndarray | None = None) -> np.ndarray:
        """Each new kernel's classifying cosine, measured like the training kernels (against one
        fold's clusters, drawn at random or given by ``fold``, when cross-fitted); classified when
        >= ``tau_null_``."""
        from sklearn.utils.validation import check_is_fitted, validate_data

        check_is_fitted(self)
        x = self._unit(validate_data(self, X, dtype=np.float64, reset=False))
        if self.crossfit_ is None:
            return self.fitted_.assign(x)[1]
        return self.crossfit_.cosines(x, self.new_folds(len(x)) if fold is None else fold)

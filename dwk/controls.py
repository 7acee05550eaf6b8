"""Controls that make a clustering trustworthy (METHOD 2.7), computed from arrays.

- k-means baseline on the normalised raw kernels with the same number of clusters;
- planted-structure recovery (ARI, right names, noise classified), beside k-means given the true
  number of planted classes;
- the sign-invariant master-key fit of the follow-up paper: each kernel y as a*p + b for each
  zero-mean, unit-norm prototype p (a = <y, p>, b = mean(y)); a may be negative.
The null model (random-init checkpoints, isotropic noise) and seed stability live with the
clusters themselves (``clusters.fit_clusters``, ``clusters.select_merge``).
"""
from __future__ import annotations

import logging

import numpy as np

from dwk.clusters import fit_clusters, overseg, unit_rows

logger = logging.getLogger(__name__)


class _PlainKMeans:
    def __init__(self, kmeans):
        self.kmeans_, self.n_clusters_ = kmeans, kmeans.n_clusters

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.kmeans_.predict(x)


def kmeans_baseline(x_fit: np.ndarray, n_clusters: int, noise: np.ndarray, primary_labels: np.ndarray, *,
                    min_share: float, alpha: float, seed: int, max_fit: int) -> dict:
    """Plain k-means with the primary's number of clusters: its agreement and classified share."""
    from sklearn.metrics import adjusted_rand_score

    fitted = fit_clusters(_PlainKMeans(overseg(x_fit, n_clusters, seed, max_fit)), x_fit, noise,
                          min_share=min_share, alpha=alpha)
    lab, cos = fitted.assign(x_fit)
    return dict(
        n_clusters=int(n_clusters),
        ari_vs_clusters=round(float(adjusted_rand_score(primary_labels, lab)), 4),
        tau_null=round(fitted.tau_null, 4),
        classified_share=round(float((cos >= fitted.tau_null).mean()), 4),
        labels=lab,
    )


def planted_recovery(truth: np.ndarray, labels: np.ndarray, cos: np.ndarray, tau_null: float, names: list[str],
                     class_names: list[str] | None) -> dict:
    """ARI on the structured part, the share of planted classes whose majority cluster has the right
    name, and the classified shares of the structured and noise parts (truth -1 = noise)."""
    from sklearn.metrics import adjusted_rand_score

    s = truth >= 0
    out = dict(
        ari=round(float(adjusted_rand_score(truth[s], labels[s])), 4) if s.sum() > 1 else None,
        structured_classified=round(float((cos[s] >= tau_null).mean()), 4) if s.any() else None,
        noise_classified=round(float((cos[~s] >= tau_null).mean()), 4) if (~s).any() else None,
    )
    if class_names is not None and s.any():
        right = []
        for c in np.unique(truth[s]):
            members = labels[truth == c]
            majority = int(np.bincount(members).argmax())
            right.append(names[majority] == class_names[c])
        out["named_right_share"] = round(float(np.mean(right)), 4)
    return out


def kmeans_true_k_ari(x: np.ndarray, truth: np.ndarray, *, seed: int, max_fit: int) -> float | None:
    """Planted recovery's baseline: k-means given the true number of planted classes, on the
    structured kernels ``x`` (truth >= 0), scored by ARI against the planted labels."""
    from sklearn.metrics import adjusted_rand_score

    k = len(np.unique(truth))
    if k < 2 or len(x) <= k:
        return None
    return round(float(adjusted_rand_score(truth, overseg(x, k, seed, max_fit).predict(x))), 4)


def master_key_fit(x: np.ndarray, prototypes: np.ndarray, labels: np.ndarray) -> dict:
    """Fit every kernel as a*p + b to every prototype; report which prototype fits best.

    With p zero-mean and unit-norm, the residual ``||y - a p - b||^2 = ||y||^2 - a^2 - d b^2``, so the
    best prototype is the one with the largest |<y, p>|.
    """
    d = x.shape[1]
    p = prototypes - prototypes.mean(axis=1, keepdims=True)
    p = unit_rows(p)
    a = x @ p.T  # (n, K)
    best = np.abs(a).argmax(axis=1)
    a_best = a[np.arange(len(x)), best]
    b = x.mean(axis=1)
    norm2 = (x**2).sum(axis=1)
    resid = np.sqrt(np.clip(norm2 - a_best**2 - d * b**2, 0, None)) / np.sqrt(np.maximum(norm2, 1e-24))
    usage = np.bincount(best, minlength=len(prototypes)) / max(len(x), 1)
    return dict(
        usage=usage.round(4).tolist(),
        negative_share=round(float((a_best < 0).mean()), 4),
        residual_median=round(float(np.median(resid)), 4) if len(x) else None,
        residual_p90=round(float(np.quantile(resid, 0.9)), 4) if len(x) else None,
        agreement_with_clusters=round(float((best == labels).mean()), 4) if len(x) else None,
    )



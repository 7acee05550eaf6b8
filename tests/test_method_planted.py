"""Issue 3's acceptance on the standard planted population (METHOD 2.7): 14 DoG-family classes,
SNR 2, 20% pure noise, 20,000 kernels. The clusters choose their own number (seed-stability merge
selection); k-means is given the true k as the baseline. About 10 s on 2 cores."""
import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from dwk.clusters import noise_kernels, select_merge
from dwk.controls import kmeans_baseline
from dwk.dog import name_prototypes
from dwk.normalize import normalize_block
from dwk.planted import STANDARD_CLASSES, planted_population


def check(shape, n, seed=1):
    k, lab = planted_population(n, shape, noise_share=0.2, snr=2.0, seed=seed)
    x = normalize_block(k.reshape(n, -1), "l2").astype(np.float64)
    noise = noise_kernels(20000, x.shape[1], "l2", seed=11)
    merge, table, fits = select_merge(x, noise, n_init=48, grid=(0.6, 0.65, 0.7, 0.75, 0.8, 0.85), seeds=(0, 1, 2),
                                      min_share=0.005, alpha=0.01)
    f = fits[0]
    pred, cos = f.assign(x)
    s = lab >= 0
    names = [r["name"] for r in name_prototypes(f.prototypes, shape)]
    majority = [int(np.bincount(pred[lab == c]).argmax()) for c in range(len(STANDARD_CLASSES))]
    km = kmeans_baseline(x[s], 14, noise, lab[s], min_share=0.005, alpha=0.01, seed=0, max_fit=200_000)
    best = next(r for r in table if r["merge_cos"] == merge)
    return dict(
        ari=adjusted_rand_score(lab[s], pred[s]),
        kmeans_ari=km["ari_vs_clusters"],  # k-means with the true k, against the planted labels
        named_right=np.mean([names[m] == c.name for m, c in zip(majority, STANDARD_CLASSES)]),
        noise_classified=(cos[~s] >= f.tau_null).mean(),
        stability=best["stability_min"],
    )


@pytest.mark.parametrize("shape", [(7, 7), (5, 5)])
def test_planted_standard_population(shape):
    r = check(shape, 20000)
    print(shape, r)
    if shape == (7, 7):
        assert r["ari"] >= 0.9, r
    else:
        assert r["ari"] >= r["kmeans_ari"], r
    assert r["named_right"] >= 0.9, r
    assert r["noise_classified"] <= 0.03, r
    assert r["stability"] >= 0.9, r

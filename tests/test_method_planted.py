"""Issue 3's acceptance on the standard planted population (METHOD 2.7): 14 DoG-family classes,
SNR 2, 20% pure noise, 20,000 kernels, through the same clustering code as a run (default
ClusterConfig: the clusters choose their own number by seed stability). k-means is given the true
k as the baseline. Two population seeds per shape; about a minute and a half on 2 cores.

At 5x5 the classes overlap: even the nearest true class mean puts only 88% of the structured
kernels in their class (ARI 0.75-0.76), so 5x5 is held to 0.9x the k-means baseline (issue 9)."""
import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from dwk.clusterer import fit_kmeans_mode
from dwk.clusters import noise_kernels
from dwk.config import ClusterConfig
from dwk.controls import kmeans_true_k_ari
from dwk.dog import name_prototypes
from dwk.normalize import normalize_block
from dwk.planted import STANDARD_CLASSES, planted_population


def check(shape, seed, n=20000):
    k, lab = planted_population(n, shape, noise_share=0.2, snr=2.0, seed=seed)
    x = normalize_block(k.reshape(n, -1), "l2").astype(np.float64)
    noise = noise_kernels(20000, x.shape[1], "l2", seed=11)
    f, selection = fit_kmeans_mode(x, noise, ClusterConfig(), shape)
    pred, cos = f.assign(x)
    s = lab >= 0
    names = [r["name"] for r in name_prototypes(f.prototypes, shape)]
    majority = [int(np.bincount(pred[lab == c]).argmax()) for c in range(len(STANDARD_CLASSES))]
    return dict(
        ari=adjusted_rand_score(lab[s], pred[s]),
        kmeans_ari=kmeans_true_k_ari(x[s], lab[s], seed=0, max_fit=200_000),  # the run's own baseline
        named_right=np.mean([names[m] == c.name for m, c in zip(majority, STANDARD_CLASSES)]),
        noise_classified=(cos[~s] >= f.tau_null).mean(),
        stability=selection["seed_stability"]["ari_min"],
        n_clusters=f.clusterer.n_clusters_,
        dissolved=selection["dissolved"],
    )


@pytest.mark.parametrize("shape", [(7, 7), (5, 5)])
@pytest.mark.parametrize("seed", [1, pytest.param(3, marks=pytest.mark.slow)])  # one seed in the default suite
def test_planted_standard_population(shape, seed):
    r = check(shape, seed)
    print(shape, seed, r, flush=True)
    # Issue 9's criteria: ARI at least 0.9x k-means told the true k (and 0.9 where it gets 0.95);
    # the bank only names clusters, so nothing is joined by name or dissolved as a blend.
    assert r["ari"] >= 0.9 * r["kmeans_ari"], r
    if r["kmeans_ari"] >= 0.95:
        assert r["ari"] >= 0.9, r
    # Classes whose largest cluster carries their bank name. Without joining by name, 5x5 classes
    # that overlap split into pieces, and 2 of the 14 majority pieces get a neighbour's name
    # (measured 12/14 on both populations; 14/14 when the bank joined clusters, issue 3).
    assert r["named_right"] >= (0.9 if shape == (7, 7) else 0.8), r
    assert r["noise_classified"] <= 0.03, r
    assert r["stability"] >= 0.9, r
    assert r["dissolved"] == [], r

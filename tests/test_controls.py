import numpy as np
import pytest

from dwk.clusters import noise_kernels
from dwk.controls import kmeans_baseline, kmeans_true_k_ari, master_key_fit, planted_recovery
from dwk.dog import fit_reference, name_prototypes, pattern
from dwk.normalize import normalize_block
from dwk.planted import STANDARD_CLASSES, planted_population


def test_master_key_fit_is_sign_invariant(rng):
    protos = np.stack([pattern(f, (7, 7), angle=a).ravel() for f, a in (("dog", 0), ("d1", 0), ("d2", 90))])
    which = rng.integers(0, 3, 600)
    a = rng.uniform(0.5, 2, 600) * rng.choice([-1, 1], 600)
    centred = protos - protos.mean(1, keepdims=True)
    y = a[:, None] * centred[which] + rng.uniform(-0.1, 0.1, (600, 1)) + 0.01 * rng.standard_normal((600, 49))
    mk = master_key_fit(y, protos, which)
    assert mk["agreement_with_clusters"] == 1.0
    assert 0.4 < mk["negative_share"] < 0.6          # a < 0 fits as well as a > 0
    assert mk["residual_median"] < 0.1              # only the 0.01 noise is left
    assert np.isclose(sum(mk["usage"]), 1.0)


def test_kmeans_baseline_and_planted_recovery():
    k, lab = planted_population(3000, (7, 7), noise_share=0.2, seed=3)
    x = normalize_block(k.reshape(len(k), -1), "l2").astype(np.float64)
    noise = noise_kernels(2000, 49, "l2", seed=1)
    truth_like = np.where(lab >= 0, lab, 14)
    km = kmeans_baseline(x, 14, noise, truth_like, min_share=0.005, alpha=0.01, seed=0, max_fit=10_000)
    assert km["ari_vs_clusters"] > 0.6 and 0 < km["classified_share"] <= 1
    names = [c.name for c in STANDARD_CLASSES] + ["unnamed-0"]
    cos = np.where(lab >= 0, 0.9, 0.1)
    rec = planted_recovery(lab, truth_like, cos, 0.5, names, [c.name for c in STANDARD_CLASSES])
    assert rec == dict(ari=1.0, structured_classified=1.0, noise_classified=0.0, named_right_share=1.0)
    wrong = names[1:] + names[:1]
    assert planted_recovery(lab, truth_like, cos, 0.5, wrong, [c.name for c in STANDARD_CLASSES])["named_right_share"] == 0
    s = lab >= 0
    assert kmeans_true_k_ari(x[s], lab[s], seed=0, max_fit=10_000) > 0.6
    shuffled = np.random.default_rng(0).permutation(lab[s])  # labels that say nothing about the kernels
    assert abs(kmeans_true_k_ari(x[s], shuffled, seed=0, max_fit=10_000)) < 0.05
    assert kmeans_true_k_ari(x[s], np.zeros(s.sum(), int), seed=0, max_fit=10_000) is None  # one class: no baseline


@pytest.mark.parametrize("family, kw", [("dog", dict(sigma=0.9, ratio=2.2, sign=-1)),
                                        ("d1", dict(sigma=1.1, ratio=1.8, angle=30)),
                                        ("d2", dict(sigma=1.0, ratio=2.5, angle=100))])
def test_dog_fit_recovers_parameters(family, kw):
    p = pattern(family, (7, 7), offset=(0.2, -0.15), **kw).ravel()
    fit = fit_reference(p, (7, 7), name_prototypes(p[None], (7, 7))[0])
    assert fit["residual"] < 0.02 and fit["cos"] > 0.999
    assert abs(fit["sigma"] - kw["sigma"]) < 0.05 and abs(fit["ratio"] - kw["ratio"]) < 0.1
    if "angle" in kw:
        period = 360 if family == "d1" else 180
        assert min(abs(fit["angle"] - kw["angle"]) % period, period - abs(fit["angle"] - kw["angle"]) % period) < 2

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from dwk.clusters import (
    KMeansMergeClusterer,
    PaperClusterer,
    PrototypeClusterer,
    blends,
    fit_clusters,
    noise_kernels,
    null_tau,
    prototypes_of,
    refine,
    select_merge,
    tau_curve,
)
from dwk.dog import name_prototypes, pattern, reference_bank
from dwk.normalize import normalize_block
from dwk.planted import STANDARD_CLASSES, planted_population


@pytest.mark.parametrize("shape", [(3, 3), (5, 5), (7, 7), (1, 11)])
def test_bank_unit_norm(shape):
    refs, pats = reference_bank(shape)
    np.testing.assert_allclose(np.linalg.norm(pats, axis=1), 1, rtol=1e-9)
    assert {r.family for r in refs} == {"dog", "d1", "d2", "gauss", "point"}


def test_pattern_symmetries():
    dog = pattern("dog", (7, 7), sigma=1.0, ratio=2.0)
    assert np.allclose(dog, np.rot90(dog)) and dog[3, 3] > 0                 # on-centre, isotropic
    np.testing.assert_allclose(pattern("dog", (7, 7), sign=-1), -pattern("dog", (7, 7)))
    d1 = pattern("d1", (7, 7), angle=0)
    np.testing.assert_allclose(d1, -d1[:, ::-1], atol=1e-12)                # odd along x
    np.testing.assert_allclose(pattern("d1", (7, 7), angle=180), -d1, atol=1e-12)
    d2 = pattern("d2", (7, 7), angle=0)
    np.testing.assert_allclose(d2, d2[:, ::-1], atol=1e-12)                  # even along x
    np.testing.assert_allclose(pattern("d2", (7, 7), angle=90), d2.T, atol=1e-12)


def test_naming_finds_the_planted_families():
    protos = np.stack([pattern(c.family, (7, 7), sigma=1.0, ratio=2.0, angle=c.angle, sign=c.sign).ravel()
                       for c in STANDARD_CLASSES])
    names = [n["name"] for n in name_prototypes(protos, (7, 7))]
    assert names == [c.name for c in STANDARD_CLASSES]
    noise = normalize_block(np.random.default_rng(0).standard_normal((3, 49)), "l2")
    assert [n["name"] for n in name_prototypes(noise, (7, 7))] == ["unnamed-0", "unnamed-1", "unnamed-2"]


def test_planted_7x7_recovered_named_and_calibrated():
    k, lab = planted_population(4000, (7, 7), noise_share=0.2, seed=1)
    x = normalize_block(k.reshape(len(k), -1), "l2").astype(np.float64)
    noise = noise_kernels(5000, 49, "l2", seed=7)
    fitted = fit_clusters(KMeansMergeClusterer(n_init=48, merge_cos=0.75).fit(x), x, noise, min_share=0.005, alpha=0.01)
    pred, cos = fitted.assign(x)
    s = lab >= 0
    assert adjusted_rand_score(lab[s], pred[s]) >= 0.9
    names = {n["name"] for n in name_prototypes(fitted.prototypes, (7, 7))}
    assert sum(cl.name in names for cl in STANDARD_CLASSES) >= 13
    assert abs(tau_curve(fitted.null_cos, np.array([fitted.tau_null]))[0] - 0.01) < 0.002
    assert (cos[s] >= fitted.tau_null).mean() > 0.95
    assert (cos[~s] >= fitted.tau_null).mean() < 0.15


def test_refine_settles_into_nearest_prototype_clusters():
    k, lab = planted_population(3000, (7, 7), noise_share=0.0, seed=4)
    x = normalize_block(k.reshape(len(k), -1), "l2").astype(np.float64)
    noise = noise_kernels(2000, 49, "l2", seed=7)
    common = dict(min_share=0.005, alpha=0.01)
    truth = prototypes_of(x, lab, 14)
    # Start from the true prototypes, badly perturbed, plus a duplicate that can win no kernel.
    start = normalize_block(truth + 0.15 * np.random.default_rng(0).standard_normal(truth.shape), "l2")
    start = np.vstack([start, start[:1]])
    rough = fit_clusters(PrototypeClusterer(start), x, noise, **common)
    fitted = refine(rough, x, noise, **common)
    assert fitted.clusterer.n_clusters_ == 14  # the duplicate lost every kernel and was dropped
    pred = fitted.clusterer.predict(x)
    # A fixed point: each prototype is the unit mean of the kernels that match it best.
    np.testing.assert_allclose(prototypes_of(x, pred, 14), fitted.prototypes, atol=1e-12)
    assert adjusted_rand_score(lab, pred) > adjusted_rand_score(lab, rough.clusterer.predict(x))
    assert adjusted_rand_score(lab, pred) >= 0.95


def test_blends_of_two_named_prototypes_are_found_and_noise_is_not():
    named = np.stack([pattern(c.family, (5, 5), sigma=0.8, ratio=2.0, angle=c.angle, sign=c.sign).ravel()
                      for c in STANDARD_CLASSES[:4]])
    border = normalize_block((0.6 * named[1] + 0.4 * named[3])[None], "l2")[0]  # between classes 1 and 3
    noise = normalize_block(np.random.default_rng(0).standard_normal((2, 25)), "l2")
    protos = np.vstack([named, border, noise])
    found = blends(protos, np.array([True] * 4 + [False] * 3), min_cos=0.8)
    assert list(found) == [4] and found[4][:2] == (1, 3) and found[4][2] > 0.99
    assert blends(protos, np.array([True] * 4 + [False] * 3), min_cos=1.01) == {}


def test_select_merge_prefers_the_stable_threshold():
    k, lab = planted_population(3000, (7, 7), noise_share=0.2, seed=2)
    x = normalize_block(k.reshape(len(k), -1), "l2").astype(np.float64)
    noise = noise_kernels(3000, 49, "l2", seed=7)
    best, table, fits = select_merge(x, noise, n_init=32, grid=(0.3, 0.75), seeds=(0, 1, 2), min_share=0.005, alpha=0.01)
    by = {r["merge_cos"]: r for r in table}
    assert best == 0.75 and by[0.75]["stability_mean"] > by[0.3]["stability_mean"]
    assert set(fits) == {0, 1, 2} and by[0.75]["stability_min"] >= 0.85


def test_null_tau_counts_minor_noise_as_unclassified():
    cos = np.array([-np.inf] * 50 + list(np.linspace(0, 1, 50)))
    tau = null_tau(cos, 0.1)
    assert (cos >= tau).mean() <= 0.1 and (cos >= np.nextafter(tau, -1) - 0.03).mean() > 0.1


def test_paper_mode_intervals_cover_the_code():
    from dwk import autoencoder as ae
    from dwk.config import AutoencoderConfig

    k, _ = planted_population(800, (5, 5), seed=2)
    x = normalize_block(k.reshape(len(k), -1), "l2")
    model, _ = ae.train(x, AutoencoderConfig(epochs=5, batch_size=128))
    p = PaperClusterer(model, grid=16, merge_cos=0.95).fit(x)
    assert len(p.intervals_) == p.n_clusters_ >= 1
    assert p.intervals_[0][0] == 0.0 and p.intervals_[-1][1] == 1.0
    pred = p.predict(x)
    assert pred.min() >= 0 and pred.max() < p.n_clusters_
    los = [lo for lo, _ in p.intervals_]
    assert los == sorted(los)   # clusters are intervals of the code, in order
    with pytest.raises(ValueError, match="latent_dim: 1"):
        model4, _ = ae.train(x, AutoencoderConfig(epochs=1, latent_dim=2))
        PaperClusterer(model4).fit(x)

"""The planted families of the method-evaluation suite (benchmarks/method_suite.py), and a quick row of it.

The families must be what they claim: classes the reference bank names alike but that are separable
(finite differences), classes the bank cannot name (random fields), labels and imbalance as asked.
"""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from dwk.controls import kmeans_true_k_ari
from dwk.dog import name_prototypes
from dwk.normalize import normalize_block
from dwk.planted import family_classes, planted_family

SUITE = Path(__file__).parents[1] / "benchmarks" / "method_suite.py"


def _suite():
    spec = importlib.util.spec_from_file_location("method_suite", SUITE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _class_means(family, shape, n=6000, **kw):
    k, lab = planted_family(family, n, shape, noise_share=0.0, snr=1e9, seed=0, **kw)
    x = normalize_block(k.reshape(n, -1), "l2")
    names = family_classes(family, shape)
    m = np.stack([x[lab == c].mean(0) for c in range(len(names))])
    return m / np.linalg.norm(m, axis=1, keepdims=True), names


def test_finite_differences_are_named_alike_by_the_bank_but_separable():
    means, names = _class_means("finite-diff", (7, 7))
    bank = [r["name"] for r in name_prototypes(means, (7, 7))]
    diffs = [bank[names.index(f"{kind}-pos")] for kind in ("forward", "backward", "centred")]
    assert len(set(diffs)) < 3, bank  # the bank cannot tell the three differences apart
    cos = means @ means.T
    np.fill_diagonal(cos, -1)
    assert 0.8 <= cos.max() <= 0.95  # alike, as issue 9 asks (class means at cosine 0.85-0.93)
    # ... yet separable at SNR 2: k-means told the true k recovers them.
    k, lab = planted_family("finite-diff", 4000, (7, 7), noise_share=0.0, seed=1)
    x = normalize_block(k.reshape(len(k), -1), "l2").astype(np.float64)
    assert kmeans_true_k_ari(x, lab, seed=0, max_fit=10_000) >= 0.7


def test_random_fields_are_unnamed_and_signed():
    means, names = _class_means("random-fields", (7, 7))
    assert all(r["name"].startswith("unnamed") for r in name_prototypes(means, (7, 7)))
    np.testing.assert_allclose(means[0::2], -means[1::2], atol=0.05)  # the two signs of each field
    assert len(names) == 12


def test_labels_noise_share_and_imbalance():
    w = _suite().imbalanced_weights(10)
    assert np.isclose(w.sum(), 1.0) and (np.isclose(w, 0.01)).sum() == 4
    k, lab = planted_family("random-fields", 20000, (5, 5), noise_share=0.2, seed=3, weights=np.r_[w, w[:2]])
    assert k.shape == (20000, 5, 5) and k.dtype == np.float32
    assert abs((lab == -1).mean() - 0.2) < 0.01
    counts = np.bincount(lab[lab >= 0], minlength=12) / (lab >= 0).sum()
    assert abs(counts[2] - w[2] / np.r_[w, w[:2]].sum()) < 0.005  # a rare class, near 1%
    with pytest.raises(ValueError, match="unknown planted family"):
        family_classes("nope")


def test_a_suite_row_measures_the_default_method():
    r = _suite().evaluate("random-fields", (7, 7), 2000, seed=2)
    assert r["n_true"] == 12 and r["kmeans_ari_true_k"] >= 0.95
    # Separable fields the bank cannot name: the default recovers them, and classifies little noise.
    assert r["ari"] >= 0.9 and r["noise_classified"] <= 0.03, r
    assert r["ok"].startswith("AN"), r


def test_classification_out_of_sample_keeps_noise_near_alpha_in_small_groups():
    # 2,000 kernels, 20% pure noise: in sample, noise kernels shape small clusters around themselves
    # and pass tau_null (measured 28% here); cross-fitted, about alpha (1%) of them pass.
    suite = _suite()
    out = suite.evaluate("random-fields", (7, 7), 2000, seed=1)
    ins = suite.evaluate("random-fields", (7, 7), 2000, seed=1, cluster_overrides={"crossfit": False})
    assert out["noise_classified"] <= 0.03 and ins["noise_classified"] >= 0.1, (out, ins)
    assert out["ari"] == ins["ari"]  # the clusters are the same; only how kernels are measured changed

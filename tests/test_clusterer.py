"""KernelClusterer: the default clustering as a scikit-learn estimator."""
import numpy as np
import pytest
from sklearn.base import clone
from sklearn.metrics import adjusted_rand_score
from sklearn.utils.estimator_checks import parametrize_with_checks

from dwk.clusterer import KernelClusterer
from dwk.config import ClusterConfig
from dwk.planted import family_classes, planted_family

SMALL = dict(n_init_clusters=4, seeds=2, merge_grid=(0.7, 0.8), n_null=500)


@parametrize_with_checks([KernelClusterer(**SMALL)])
def test_sklearn_estimator_contract(estimator, check):
    check(estimator)


def test_fits_a_planted_population_and_classifies_out_of_sample():
    k, lab = planted_family("dog-bank", 3000, (7, 7), seed=5)
    x = k.reshape(len(k), -1)
    est = KernelClusterer(kernel_shape=(7, 7)).fit(x)
    s = lab >= 0
    assert adjusted_rand_score(lab[s], est.labels_[s]) >= 0.9
    assert est.cluster_centers_.shape == (est.n_clusters_, 49)
    np.testing.assert_allclose(np.linalg.norm(est.cluster_centers_, axis=1), 1.0)
    np.testing.assert_array_equal(est.predict(x), est.labels_)
    assert est.crossfit_ is not None and est.classified_[~s].mean() <= 0.03 and est.classified_[s].mean() >= 0.9
    # The 14 planted families are named after their bank family.
    majority = [int(np.bincount(est.labels_[lab == c]).argmax()) for c in range(14)]
    assert np.mean([est.names_[m] == n for m, n in zip(majority, family_classes("dog-bank"))]) >= 0.9
    # New isotropic noise is classified about alpha of the time.
    noise = np.random.default_rng(0).standard_normal((4000, 49))
    assert (est.score_samples(noise) >= est.tau_null_).mean() <= 0.03
    # Parameters round-trip through the run config, which validates them.
    assert clone(KernelClusterer.from_config(ClusterConfig(seed=3), (7, 7))).get_params()["random_state"] == 3
    with pytest.raises(ValueError, match="alpha"):
        KernelClusterer(alpha=2.0).fit(x[:100])

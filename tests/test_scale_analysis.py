"""Clustering beyond ``cluster.max_fit_kernels`` (issue 11, item 3): fitted on a stratified sample,
every kernel assigned chunk by chunk, each fit kernel's cosine still out of sample."""
from __future__ import annotations

import numpy as np

from dwk import pipeline
from dwk.analysis import fit_sample
from dwk.store import STATUS_OK, KernelStore

from conftest import tiny_config


def test_fit_sample_is_stratified_seeded_and_sorted():
    ckpt = np.repeat([0, 1, 2], [7000, 2000, 1000])
    fit = np.ones(len(ckpt), bool)
    fit[::10] = False  # controls or dead kernels are never sampled
    s = fit_sample(fit, ckpt, 1000, seed=0)
    assert len(s) == 1000 and np.all(np.diff(s) > 0) and fit[s].all()
    per = np.bincount(ckpt[s], minlength=3)
    np.testing.assert_allclose(per, [700, 200, 100], atol=1)  # each checkpoint its share
    np.testing.assert_array_equal(s, fit_sample(fit, ckpt, 1000, seed=0))
    assert not np.array_equal(s, fit_sample(fit, ckpt, 1000, seed=1))
    np.testing.assert_array_equal(fit_sample(fit, ckpt, 10**6, seed=0), np.flatnonzero(fit))  # under the cap: all


def test_group_beyond_the_fit_cap_is_assigned_chunk_by_chunk(tmp_path, caplog):
    pop = dict(id="pop", planted=dict(shape=[5, 5], n=2000, noise_share=0.2, seed=1))
    ctl = dict(id="null-pop", planted=dict(shape=[5, 5], n=500, noise_share=1.0, seed=2))
    cfg = tiny_config(tmp_path, checkpoints=[pop, ctl], cluster=dict(n_init_clusters=24, n_null=2000, max_fit_kernels=800),
                      chunk_kernels=512, normalize=dict(chunk_kernels=512))
    caplog.set_level("INFO", logger="dwk")
    s = pipeline.run(cfg, track=False)
    assert "stratified sample of 800 of 2500 fit kernels" in caplog.text
    g = s["shapes"]["5x5"]
    assert g["n_fit"] == 2500
    rows = {r["id"]: r for r in s["checkpoints"]}
    # structured kernels are classified, pure noise is not (at alpha 1%, out of sample)
    assert rows["pop"]["classified_share"] > 0.5 and rows["null-pop"]["classified_share"] < 0.05
    store = KernelStore(cfg.store, create=False)
    cos = store.run_array(s["run_id"], "5x5", "cosine")[:]
    ok = store.run_array(s["run_id"], "5x5", "status")[:] == STATUS_OK
    assert not np.isnan(cos[ok]).any()  # every usable kernel got a cosine, in or out of the sample
    assert g["planted"]["pop"]["ari"] > 0.5

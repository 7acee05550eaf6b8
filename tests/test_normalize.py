import numpy as np
import pytest
import timm
import torch

from dwk.config import NormalizeConfig
from dwk.extract import extract_model
from dwk.normalize import kernel_status, normalize_block, normalize_shape
from dwk.store import STATUS_DEAD, STATUS_NONFINITE, STATUS_OK, KernelStore


def test_methods(rng):
    x = rng.standard_normal((5, 9))
    l2 = normalize_block(x, "l2")
    np.testing.assert_allclose(np.linalg.norm(l2, axis=1), 1, rtol=1e-6)
    assert np.all(np.sign(l2) == np.sign(x))  # sign kept, no centring
    np.testing.assert_allclose(np.abs(normalize_block(x, "maxabs")).max(1), 1, rtol=1e-6)
    c = normalize_block(x, "center_l2")
    np.testing.assert_allclose(c.mean(1), 0, atol=1e-6)
    assert np.all(normalize_block(np.zeros((2, 9)), "l2") == 0)


def test_status_nonfinite_and_dead():
    cfg = NormalizeConfig(dead_eps=1e-8, dead_rel=1e-3)
    maxabs = np.array([np.nan, 1e-9, 1.0, 5e-4, 0.5, 1e-4])
    layer = np.array([0, 0, 0, 0, 1, 1])
    s = kernel_status(maxabs, layer, cfg)
    # 5e-4 < 1e-3 * 1.0 is dead in layer 0; 1e-4 is not dead relative to layer 1's 0.5? 1e-4 < 5e-4 -> dead
    assert s.tolist() == [STATUS_NONFINITE, STATUS_DEAD, STATUS_OK, STATUS_DEAD, STATUS_OK, STATUS_DEAD]


def _store_with_bad_kernels(tmp_path):
    model = timm.create_model("test_convnext", pretrained=False)
    with torch.no_grad():
        w = model.stages[0].blocks[0].conv_dw.weight
        w[0, 0, 3, 3] = float("nan")
        w[1] = float("inf")
        w[2] = 0.0
    ex = extract_model(model)
    store = KernelStore(tmp_path / "s.zarr")
    store.write_checkpoint("c", source="random", fingerprint="f", extractor_version=1, extracted=ex, chunk_kernels=64)
    store.create_run("r", dict(checkpoints=[dict(id="c", source="random", control=True)], shapes=["7x7"], offsets={}))
    return store, ex


@pytest.mark.parametrize("method", ["l2", "maxabs", "center_l2"])
def test_normalize_shape_counts_and_writes(tmp_path, sync_dask, method):
    store, ex = _store_with_bad_kernels(tmp_path)
    res = normalize_shape(store, "r", "7x7", ["c"], NormalizeConfig(method=method), chunk_kernels=64)
    assert (res.n_kernels, res.n_nonfinite, res.n_dead) == (ex.n_kernels, 2, 1)
    status = store.run_array("r", "7x7", "status")[:]
    y = store.run_array("r", "7x7", "normalized")
    assert y.chunks == (64, 49)
    y = y[:]
    assert np.all(y[status != STATUS_OK] == 0) and np.isfinite(y).all()
    expected = normalize_block(ex.kernels["7x7"].reshape(-1, 49)[status == STATUS_OK], method)
    np.testing.assert_allclose(y[status == STATUS_OK], expected, rtol=1e-5, atol=1e-6)
    assert store.run_meta("r")["offsets"]["7x7"] == {"c": [0, ex.n_kernels]}


def test_normalize_on_a_real_dask_cluster(tmp_path):
    """Worker processes open the store themselves and write disjoint chunks."""
    from distributed import Client, LocalCluster

    store, ex = _store_with_bad_kernels(tmp_path)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster, Client(cluster) as client:
        res = normalize_shape(store, "r", "7x7", ["c"], NormalizeConfig(), chunk_kernels=50, client=client)
    assert res.n_nonfinite == 2
    y = store.run_array("r", "7x7", "normalized")[:]
    ok = store.run_array("r", "7x7", "status")[:] == STATUS_OK
    np.testing.assert_allclose(np.linalg.norm(y[ok], axis=1), 1, rtol=1e-5)

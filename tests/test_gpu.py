"""The training device: CUDA when present (`device: auto`), a clear error when asked for and absent."""
import numpy as np
import pytest
import torch

from dwk import autoencoder as ae
from dwk.config import AutoencoderConfig
from dwk.normalize import normalize_block
from dwk.planted import planted_population


def _x(n=2000):
    k, _ = planted_population(n, (7, 7), seed=0)
    return normalize_block(k.reshape(n, -1), "l2")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_requested_without_gpu_says_so():
    assert ae.resolve_device("auto").type == "cpu"
    with pytest.raises(RuntimeError, match="no CUDA GPU is visible; use 'auto' or 'cpu'"):
        ae.train(_x(100), AutoencoderConfig(epochs=1, device="cuda"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_trains_on_gpu_and_matches_cpu_quality():
    x = _x()
    cfg = dict(epochs=30, batch_size=256)
    gpu_model, gpu_losses = ae.train(x, AutoencoderConfig(device="cuda", **cfg))
    _, cpu_losses = ae.train(x, AutoencoderConfig(device="cpu", **cfg))
    assert next(gpu_model.parameters()).device.type == "cpu"  # returned on CPU, ready to save
    assert gpu_losses[-1] < 0.8 * gpu_losses[0]
    assert abs(gpu_losses[-1] - cpu_losses[-1]) < 0.05
    assert np.isfinite(ae.encode(gpu_model, x[:10])).all()

import numpy as np
import torch

from dwk import autoencoder as ae
from dwk.config import AutoencoderConfig
from dwk.normalize import normalize_block
from dwk.planted import planted_population


def _data(n=1500):
    k, _ = planted_population(n, (7, 7), seed=0)
    return normalize_block(k.reshape(n, -1), "l2")


def test_loss_falls_and_code_in_unit_interval(tmp_path):
    x = _data()
    seen = []
    model, losses = ae.train(x, AutoencoderConfig(epochs=40, batch_size=128), on_epoch=lambda e, l: seen.append(e))
    assert seen == list(range(40)) and len(losses) == 40
    assert losses[-1] < 0.75 * losses[0], losses[::10]
    z = ae.encode(model, x)
    assert z.shape == (len(x), 1) and z.min() >= 0 and z.max() <= 1
    ae.save(model, tmp_path / "m.safetensors")
    again = ae.load(tmp_path / "m.safetensors")
    np.testing.assert_allclose(ae.encode(again, x[:10]), z[:10], rtol=1e-5)


def test_seeded_and_latent_dim():
    x = _data(300)
    cfg = AutoencoderConfig(epochs=3, batch_size=64, latent_dim=4, sigmoid=False)
    (m1, l1), (m2, l2) = ae.train(x, cfg), ae.train(x, cfg)
    assert l1 == l2
    assert ae.encode(m1, x).shape == (300, 4)
    assert torch.equal(m1.encoder[0].weight, m2.encoder[0].weight)


def test_training_budget_in_steps_does_not_grow_with_the_kernels(caplog):
    """max_steps cuts the epochs (the last one partial): ten times the kernels, the same steps."""
    rng = np.random.default_rng(0)
    cfg = AutoencoderConfig(epochs=50, batch_size=100, max_steps=125, hidden=(16,))
    caplog.set_level("INFO", logger="dwk.autoencoder")
    for n, epochs in ((1000, 13), (10_000, 2)):  # 10 and 100 steps per epoch
        x = rng.standard_normal((n, 9)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        _, losses = ae.train(x, cfg)
        assert len(losses) == epochs
        assert f"125 steps of 100 ({epochs} epochs, cut from 50 by max_steps 125)" in caplog.text
    _, losses = ae.train(x[:1000], cfg.model_copy(update=dict(max_steps=None)))
    assert len(losses) == 50  # no budget: every epoch

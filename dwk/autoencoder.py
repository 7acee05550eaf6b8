"""The kernel autoencoder and its training loop (METHOD 2.3).

The paper's published facts: a cosine-similarity loss and a 1-D latent code (the follow-up puts a
sigmoid on it, so the code lies in [0, 1]). Everything else is dwk's default: an MLP
k*k -> 256 -> 128 -> d (GELU) with the sigmoid, and the mirror decoder; Adam with cosine decay.

The trainer knows nothing about logging: it calls ``on_epoch(epoch, loss)`` (nanoGPT habit).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dwk import progress
from dwk._random import torch_seeded
from dwk.config import AutoencoderConfig

logger = logging.getLogger(__name__)


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.GELU())
    return nn.Sequential(*layers)


class KernelAutoencoder(nn.Module):
    def __init__(self, n_taps: int, latent_dim: int = 1, hidden: tuple[int, ...] = (256, 128), sigmoid: bool = True):
        super().__init__()
        self.n_taps, self.latent_dim, self.hidden, self.sigmoid = n_taps, latent_dim, tuple(hidden), sigmoid
        self.encoder = _mlp([n_taps, *hidden, latent_dim])  # (B, k*k) -> (B, d)
        self.decoder = _mlp([latent_dim, *reversed(hidden), n_taps])  # (B, d) -> (B, k*k)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        z = self.encoder(x)
        return torch.sigmoid(z) if self.sigmoid else z

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


def cosine_loss(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """1 - cos(x, x_hat), averaged over the batch: scale-free, sign-sensitive."""
    return (1.0 - F.cosine_similarity(x, x_hat, dim=1, eps=1e-8)).mean()


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("autoencoder.device is 'cuda' but no CUDA GPU is visible; use 'auto' or 'cpu'")
    return torch.device(device)


def train(
    x: np.ndarray,
    cfg: AutoencoderConfig,
    on_epoch: Callable[[int, float], None] | None = None,
) -> tuple[KernelAutoencoder, list[float]]:
    """Train on normalised kernels ``x`` (n, k*k); returns the model (on CPU, eval mode) and per-epoch losses.

    Seeded: the same data and config give the same model on the same device.
    """
    if len(x) < 2:
        raise ValueError(f"need at least 2 kernels to train an autoencoder, got {len(x)}")
    device = resolve_device(cfg.device)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    with torch_seeded(cfg.seed):
        model = KernelAutoencoder(x.shape[1], cfg.latent_dim, cfg.hidden, cfg.sigmoid).to(device)
    data = torch.as_tensor(x, dtype=torch.float32, device=device)  # the shape group fits in memory
    bs = min(cfg.batch_size, len(x))
    steps_per_epoch = math.ceil(len(x) / bs)
    # The budget: epochs x steps per epoch, cut to max_steps (the last epoch may be partial), so the
    # training time is bounded whatever the number of kernels.
    total_steps = cfg.epochs * steps_per_epoch if cfg.max_steps is None else min(cfg.epochs * steps_per_epoch,
                                                                                  cfg.max_steps)
    epochs = math.ceil(total_steps / steps_per_epoch)
    # Fused Adam on the GPU: one kernel for all parameters instead of several per tensor; the MLP is
    # so small that launches, not arithmetic, set the speed there.
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=device.type == "cuda")
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    losses: list[float] = []
    logger.info("training autoencoder on %d kernels of %d taps (d=%d) on %s: %d steps of %d (%d epochs%s)",
                len(x), x.shape[1], cfg.latent_dim, device, total_steps, bs, epochs,
                f", cut from {cfg.epochs} by max_steps {cfg.max_steps}" if epochs < cfg.epochs else "")
    model.train()
    step = 0
    for epoch in progress.track(range(epochs), f"training autoencoder ({x.shape[1]} taps, {len(x)} kernels)"):
        perm = torch.randperm(len(x), generator=gen).to(device)
        # Summed on the device and read once per epoch: a loss.item() per step made the CPU wait
        # for the GPU at every step.
        total = torch.zeros((), dtype=torch.float64, device=device)
        seen = 0
        for i in range(min(steps_per_epoch, total_steps - step)):
            batch = data[perm[i * bs:(i + 1) * bs]]
            loss = cosine_loss(batch, model(batch))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.detach().double() * len(batch)
            seen += len(batch)
        step += i + 1
        losses.append(total.item() / seen)
        if on_epoch is not None:
            on_epoch(epoch, losses[-1])
        if (epoch + 1) % cfg.log_every == 0 or epoch + 1 == epochs:
            logger.info("epoch %d/%d: cosine loss %.4f", epoch + 1, epochs, losses[-1])
    return model.cpu().eval(), losses


@torch.no_grad()
def encode(model: KernelAutoencoder, x: np.ndarray, batch: int = 65536) -> np.ndarray:
    return np.concatenate([model.encode(torch.as_tensor(x[i:i + batch])).numpy() for i in range(0, len(x), batch)]) \
        if len(x) else np.zeros((0, model.latent_dim), np.float32)


@torch.no_grad()
def decode(model: KernelAutoencoder, z: np.ndarray) -> np.ndarray:
    return model.decode(torch.as_tensor(z, dtype=torch.float32)).numpy()


def save(model: KernelAutoencoder, path) -> None:
    """Save as safetensors with the constructor arguments in its metadata (no pickle)."""
    import json

    from safetensors.torch import save_file

    meta = dict(n_taps=model.n_taps, latent_dim=model.latent_dim, hidden=list(model.hidden), sigmoid=model.sigmoid)
    save_file(model.state_dict(), str(path), metadata={"dwk_autoencoder": json.dumps(meta)})


def load(path) -> KernelAutoencoder:
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["dwk_autoencoder"])
    model = KernelAutoencoder(meta["n_taps"], meta["latent_dim"], tuple(meta["hidden"]), meta["sigmoid"])
    model.load_state_dict(load_file(str(path)))
    return model.eval()

"""Planted populations: labelled kernels drawn from the DoG families (METHOD 2.7).

The standard population has 14 classes: DoG on and off; first derivatives at 0, 45, ..., 315
degrees; second derivatives at 0 and 90 degrees, both signs. Per kernel: s_c ~ U[0.6, 1.2] * k/7,
r ~ U[1.6, 3], centre offset ~ U(+/-0.3 px) per axis, angle jitter ~ U(+/-10 deg); the unit-norm
pattern plus isotropic noise of L2 norm 1/SNR, times an amplitude ~ U[0.01, 1]. A share of pure
isotropic-noise kernels carries label -1.

``plant_model`` overwrites the depthwise weights of a real timm model with such a population and
returns the labels per layer: the demo's checkpoints are ordinary safetensors files made this way.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from dwk.dog import pattern

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlantedClass:
    family: str
    angle: float
    sign: int

    @property
    def name(self) -> str:
        if self.family == "d1":
            return f"d1-{int(self.angle) % 360:03d}"
        s = "on" if self.sign > 0 else "off"
        return f"{self.family}-{s}" if self.family == "dog" else f"{self.family}-{int(self.angle) % 180:03d}-{s}"


STANDARD_CLASSES: tuple[PlantedClass, ...] = (
    PlantedClass("dog", 0, 1),
    PlantedClass("dog", 0, -1),
    *(PlantedClass("d1", a, 1) for a in range(0, 360, 45)),
    PlantedClass("d2", 0, 1),
    PlantedClass("d2", 0, -1),
    PlantedClass("d2", 90, 1),
    PlantedClass("d2", 90, -1),
)


def planted_population(
    n: int,
    shape: tuple[int, int] = (7, 7),
    *,
    noise_share: float = 0.2,
    snr: float = 2.0,
    seed: int | np.random.Generator = 0,
    classes: tuple[PlantedClass, ...] = STANDARD_CLASSES,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``n`` kernels: (kernels (n, kh, kw) float32, labels (n,) int16, -1 = pure noise)."""
    rng = np.random.default_rng(seed)
    k = max(shape)
    d = shape[0] * shape[1]
    labels = rng.integers(0, len(classes), size=n).astype(np.int16)
    labels[rng.random(n) < noise_share] = -1
    out = np.empty((n, d), dtype=np.float64)
    for i, lab in enumerate(labels):
        noise = rng.standard_normal(d)
        if lab < 0:
            out[i] = noise / np.linalg.norm(noise)
            continue
        c = classes[lab]
        p = pattern(
            c.family,
            shape,
            sigma=rng.uniform(0.6, 1.2) * k / 7,
            ratio=rng.uniform(1.6, 3.0),
            angle=c.angle + rng.uniform(-10, 10),
            sign=c.sign,
            offset=tuple(rng.uniform(-0.3, 0.3, size=2)),
        ).ravel()
        out[i] = p + noise / np.linalg.norm(noise) / snr
    out *= rng.uniform(0.01, 1.0, size=(n, 1))
    return out.reshape(n, *shape).astype(np.float32), labels


def plant_model(model, *, seed: int = 0, noise_share: float = 0.1, snr: float = 2.0, scale: float = 0.1) -> dict[str, np.ndarray]:
    """Overwrite every depthwise kernel of ``model`` in place with a planted population.

    Returns ``{module_path: labels (out_channels,)}``. ``scale`` sets the weight magnitude (trained
    depthwise weights are of order 0.1).
    """
    import torch

    from dwk.extract import iter_depthwise_convs

    rng = np.random.default_rng(seed)
    labels: dict[str, np.ndarray] = {}
    with torch.no_grad():
        for path, conv in iter_depthwise_convs(model):
            out_ch, _, kh, kw = conv.weight.shape
            kernels, lab = planted_population(out_ch, (kh, kw), noise_share=noise_share, snr=snr, seed=rng)
            conv.weight.copy_(torch.from_numpy(kernels * scale).reshape(out_ch, 1, kh, kw))
            labels[path] = lab
    if not labels:
        raise ValueError("model has no depthwise convolutions to plant")
    return labels

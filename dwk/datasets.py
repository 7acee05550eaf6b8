"""A small generated image-classification set (ImageFolder layout) that needs no download.

The initialisation experiment (docs/init-experiment.md) trains a classifier on an ImageFolder; this
module makes one that runs everywhere, on the CPU in seconds: 10 classes of procedural textures and
shapes whose identity is their spatial structure (orientation, periodicity, shape), not their colour:

- ``grating-000/045/090/135``: sinusoidal gratings at four orientations (+/- 8 degrees);
- ``checkerboard``, ``dots`` (a grid of small discs), ``cross`` (a plus sign), ``ring``, ``blob``
  (a Gaussian blob), ``noise`` (a smooth random field).

Every image draws its own phase, period, position, size, colours, contrast and pixel noise. Images
are seeded per (seed, split, class): the i-th image of a class is the same whatever ``per_class``.
Layout: ``OUT/train/<class>/<i>.png``, ``OUT/val/<class>/<i>.png`` and ``OUT/dataset.json`` (the
parameters). The folder is written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import json
import logging
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from dwk.errors import ConfigError

logger = logging.getLogger(__name__)

CLASSES: tuple[str, ...] = ("grating-000", "grating-045", "grating-090", "grating-135", "checkerboard", "dots",
                            "cross", "ring", "blob", "noise")
VERSION = 1  # bump when the images change for the same parameters
MANIFEST = "dataset.json"


@dataclass(frozen=True)
class DatasetSpec:
    """The parameters of a generated set (what ``dataset.json`` records)."""

    classes: int = 10
    per_class: int = 40
    val_per_class: int = 10
    size: int = 32
    seed: int = 0
    version: int = VERSION

    def check(self) -> None:
        if not 2 <= self.classes <= len(CLASSES):
            raise ConfigError(f"classes={self.classes}: choose 2 to {len(CLASSES)} (the generator has {list(CLASSES)})")
        if self.per_class < 1 or self.val_per_class < 1:
            raise ConfigError("per_class and val_per_class must be at least 1")
        if self.size < 16:
            raise ConfigError(f"size={self.size}: images must be at least 16 pixels wide")


# ----------------------------------------------------------------------------- rendering
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    return x - (size - 1) / 2, y - (size - 1) / 2


def _structure(name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """The class's grey-level structure in [0, 1], (size, size)."""
    x, y = _grid(size)
    period = rng.uniform(size / 8, size / 3.5)
    phase = rng.uniform(0, 2 * np.pi)
    cx, cy = rng.uniform(-size / 6, size / 6, size=2)
    if name.startswith("grating-"):
        t = np.deg2rad(float(name.split("-")[1]) + rng.uniform(-8, 8))
        # stripes run along angle t: intensity varies across it
        u = -x * np.sin(t) + y * np.cos(t)
        return 0.5 + 0.5 * np.sin(2 * np.pi * u / period + phase)
    if name == "checkerboard":
        t = np.deg2rad(rng.uniform(-10, 10))
        u, v = x * np.cos(t) + y * np.sin(t), -x * np.sin(t) + y * np.cos(t)
        ph = rng.uniform(0, 2 * np.pi, size=2)
        return (np.sin(2 * np.pi * u / period + ph[0]) * np.sin(2 * np.pi * v / period + ph[1]) > 0).astype(float)
    if name == "dots":
        ph = rng.uniform(0, period, size=2)
        du = (x + ph[0]) % period - period / 2
        dv = (y + ph[1]) % period - period / 2
        r = rng.uniform(0.18, 0.3) * period
        return (du**2 + dv**2 <= r**2).astype(float)
    if name == "cross":
        arm, half = rng.uniform(0.25, 0.4) * size, rng.uniform(0.05, 0.09) * size
        dx, dy = np.abs(x - cx), np.abs(y - cy)
        return (((dx <= half) & (dy <= arm)) | ((dy <= half) & (dx <= arm))).astype(float)
    if name == "ring":
        r0, w = rng.uniform(0.18, 0.32) * size, rng.uniform(0.04, 0.08) * size
        return (np.abs(np.hypot(x - cx, y - cy) - r0) <= w).astype(float)
    if name == "blob":
        s = rng.uniform(0.08, 0.18) * size
        return np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * s**2))
    if name == "noise":
        from scipy.ndimage import gaussian_filter

        f = gaussian_filter(rng.standard_normal((size, size)), rng.uniform(1.0, 2.0) * size / 32, mode="wrap")
        return (f - f.min()) / (np.ptp(f) + 1e-12)
    raise ValueError(f"unknown class {name!r}; the generator has {list(CLASSES)}")


def render(name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One RGB image (size, size, 3) uint8 of class ``name``: structure, random colours, contrast, noise."""
    s = _structure(name, size, rng)[..., None]
    bg, fg = rng.uniform(0, 1, size=3), rng.uniform(0, 1, size=3)
    while np.abs(fg - bg).sum() < 0.6:  # keep the structure visible
        fg = rng.uniform(0, 1, size=3)
    contrast = rng.uniform(0.6, 1.0)
    img = bg + contrast * s * (fg - bg) + rng.normal(0, rng.uniform(0.02, 0.08), size=(size, size, 3))
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


# ----------------------------------------------------------------------------- writing
def _read_manifest(out: Path) -> dict | None:
    try:
        return json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def make_dataset(out: str | Path, *, classes: int = 10, per_class: int = 40, val_per_class: int | None = None,
                 size: int = 32, seed: int = 0, force: bool = False) -> Path:
    """Write a generated ImageFolder at ``out`` (``train/`` and ``val/``); returns ``out``.

    ``val_per_class`` defaults to a quarter of ``per_class`` (at least 1). When ``out`` already holds
    a set made with the same parameters, nothing is written. A non-empty ``out`` that holds
    something else is refused unless ``force`` (then it is replaced).
    """
    spec = DatasetSpec(classes=classes, per_class=per_class,
                       val_per_class=max(1, per_class // 4) if val_per_class is None else val_per_class,
                       size=size, seed=seed)
    spec.check()
    out = Path(out).expanduser().resolve()
    if _read_manifest(out) == asdict(spec):
        logger.info("%s already holds this generated set; nothing to do", out)
        return out
    if out.exists() and any(out.iterdir()) and not force:
        held = _read_manifest(out)
        what = f"a generated set with other parameters ({held})" if held else "something else"
        raise ConfigError(f"{out} holds {what}: choose an empty or new folder, or remove this one "
                          "(`dwk make-dataset --force` replaces it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    from PIL import Image

    try:
        for split_i, (split, n) in enumerate((("train", spec.per_class), ("val", spec.val_per_class))):
            for c, name in enumerate(CLASSES[:spec.classes]):
                folder = tmp / split / name
                folder.mkdir(parents=True)
                rng = np.random.default_rng([spec.seed, split_i, c])
                for i in range(n):
                    Image.fromarray(render(name, spec.size, rng)).save(folder / f"{i:05d}.png")
        (tmp / MANIFEST).write_text(json.dumps(asdict(spec), indent=1) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("wrote %d train and %d val images of %d classes (%dx%d) to %s", spec.per_class * spec.classes,
                spec.val_per_class * spec.classes, spec.classes, spec.size, spec.size, out)
    return out

"""Difference-of-Gaussians patterns and the reference bank that names clusters (METHOD 2.5).

Coordinates: x grows along columns, y along rows, both centred on the kernel's middle, with a
sub-pixel centre offset (ox, oy). Every pattern returned here is L2-normalised (sign kept).

- Gaussian ``G(s) = exp(-(x^2 + y^2) / (2 s^2))``
- DoG ``D = G(s_c)/s_c^2 - G(s_s)/s_s^2``, ``s_s = r s_c``; on-center ``+D``, off-center ``-D``
- first derivative along angle t: ``D1_t = cos t dD/dx + sin t dD/dy`` (t and t+180 are the two signs)
- second derivative along t: ``D2_t = d^2 D / du^2`` with ``u = x cos t + y sin t``
The derivatives are analytic: ``dG/du = -u/s^2 G`` and ``d^2G/du^2 = (u^2/s^4 - 1/s^2) G``.
"""
from __future__ import annotations

import functools
import itertools
import logging
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

FAMILIES = ("dog", "d1", "d2", "gauss", "point")


def _grid(shape: tuple[int, int], offset: tuple[float, float] = (0.0, 0.0)) -> tuple[np.ndarray, np.ndarray]:
    kh, kw = shape
    y, x = np.mgrid[0:kh, 0:kw].astype(np.float64)
    return x - (kw - 1) / 2 - offset[0], y - (kh - 1) / 2 - offset[1]


def _unit(p: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(p)
    return p / n if n > 0 else p


def pattern(
    family: str,
    shape: tuple[int, int],
    *,
    sigma: float = 1.0,
    ratio: float = 2.0,
    angle: float = 0.0,
    sign: int = 1,
    offset: tuple[float, float] = (0.0, 0.0),
) -> np.ndarray:
    """One unit-norm reference pattern. ``angle`` in degrees; ``sign`` is +1 (on) or -1 (off)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown pattern family {family!r}; choose one of {FAMILIES}")
    x, y = _grid(shape, offset)
    if family == "point":
        p = np.zeros(shape)
        p[shape[0] // 2, shape[1] // 2] = 1.0
        return sign * p
    t = np.deg2rad(angle)
    u = x * np.cos(t) + y * np.sin(t)
    r2 = x**2 + y**2
    sc, ss = sigma, sigma * ratio
    gc, gs = np.exp(-r2 / (2 * sc**2)), np.exp(-r2 / (2 * ss**2))
    if family == "gauss":
        p = gc
    elif family == "dog":
        p = gc / sc**2 - gs / ss**2
    elif family == "d1":
        p = -u / sc**4 * gc + u / ss**4 * gs
    else:  # d2
        p = (u**2 / sc**4 - 1 / sc**2) * gc / sc**2 - (u**2 / ss**4 - 1 / ss**2) * gs / ss**2
    return sign * _unit(p)


@dataclass(frozen=True)
class Reference:
    family: str
    sign: int
    angle: float
    sigma: float
    ratio: float

    @property
    def name(self) -> str:
        """Human name: ``dog-on``, ``d1-045``, ``d2-090-off``, ``gauss-on``, ``point-off``."""
        if self.family == "d1":  # t and t+180 are the two signs: the angle carries the sign
            return f"d1-{int(round(self.angle)) % 360:03d}"
        s = "on" if self.sign > 0 else "off"
        if self.family == "d2":
            return f"d2-{int(round(self.angle)) % 180:03d}-{s}"
        return f"{self.family}-{s}"


@functools.lru_cache(maxsize=32)  # naming runs many times per shape while clusters settle
def reference_bank(
    shape: tuple[int, int],
    sigmas: tuple[float, ...] | None = None,
    ratios: tuple[float, ...] = (1.2, 1.6, 2.0, 3.0, 4.0),
) -> tuple[tuple[Reference, ...], np.ndarray]:
    """All references for a kernel shape over a parameter grid: (descriptions, patterns (R, kh*kw)).

    First derivatives at 8 orientations (45 degree steps, the angle carries the sign), second
    derivatives at 4 orientations and both signs, DoG, Gaussian blob and point, both signs.
    """
    k = max(shape)
    if sigmas is None:
        sigmas = tuple(np.round(np.linspace(0.3, 0.3 + 0.25 * k, 8), 3))
    refs: list[Reference] = []
    for s, r in itertools.product(sigmas, ratios):
        for sign in (1, -1):
            refs.append(Reference("dog", sign, 0.0, s, r))
            for a in (0, 45, 90, 135):
                refs.append(Reference("d2", sign, float(a), s, r))
        for a in range(0, 360, 45):
            refs.append(Reference("d1", 1, float(a), s, r))
    for s in sigmas:
        for sign in (1, -1):
            refs.append(Reference("gauss", sign, 0.0, s, 1.0))
    for sign in (1, -1):
        refs.append(Reference("point", sign, 0.0, 0.0, 1.0))
    pats = np.stack(
        [pattern(r.family, shape, sigma=r.sigma or 1.0, ratio=r.ratio, angle=r.angle, sign=r.sign).ravel() for r in refs]
    )
    # A DoG whose surround is wider than the kernel degenerates to a blob: keep only distinct patterns.
    keep = np.isfinite(pats).all(1) & (np.linalg.norm(pats, axis=1) > 0.5)
    pats = pats[keep]
    pats.setflags(write=False)  # cached and shared between callers
    return tuple(r for r, k_ in zip(refs, keep) if k_), pats


def name_prototypes(prototypes: np.ndarray, shape: tuple[int, int], name_cos: float = 0.8) -> list[dict]:
    """Name each unit-norm prototype (K, kh*kw) after its best-matching reference.

    Returns one dict per prototype: ``name`` ("unnamed-N" when the best cosine is below
    ``name_cos``), ``family``, ``sign``, ``angle``, ``sigma``, ``ratio``, ``cos``.
    """
    refs, pats = reference_bank(shape)
    cos = prototypes @ pats.T  # (K, R)
    out, n_unnamed = [], 0
    for i in range(len(prototypes)):
        j = int(np.argmax(cos[i]))
        ref, c = refs[j], float(cos[i, j])
        if c >= name_cos:
            name = ref.name
        else:
            name = f"unnamed-{n_unnamed}"
            n_unnamed += 1
        out.append(dict(name=name, family=ref.family, sign=ref.sign, angle=float(ref.angle),
                        sigma=float(ref.sigma), ratio=float(ref.ratio), cos=round(c, 4)))
    return out


def fit_reference(prototype: np.ndarray, shape: tuple[int, int], start: dict) -> dict:
    """Least-squares fit of the continuous parameters of a prototype's reference family.

    ``start`` is the best bank reference (``name_prototypes`` output). Fits centre width ``sigma``,
    surround ratio ``ratio`` (DoG and derivatives), orientation ``angle`` (derivatives), the sub-pixel
    centre ``offset`` and an amplitude, by ``scipy.optimize.least_squares`` within the bank's ranges.
    Returns the fitted parameters, the surround width, the residual norm (the prototype is unit-norm,
    so it is relative) and the fitted cosine. The point pattern has nothing to fit.
    """
    from scipy.optimize import least_squares

    fam, sign = start["family"], start["sign"]
    y = prototype.reshape(shape).astype(np.float64)
    if fam == "point":
        p = pattern("point", shape, sign=sign)
        c = float((p * y).sum())
        return dict(family=fam, sign=sign, cos=round(c, 4), residual=round(float(np.linalg.norm(y - c * p)), 4))
    k = max(shape)
    fit_ratio, fit_angle = fam != "gauss", fam in ("d1", "d2")

    def model(v):
        sigma, ratio, angle, ox, oy, amp = v
        return amp * pattern(fam, shape, sigma=sigma, ratio=ratio if fit_ratio else 1.0, angle=angle, sign=sign,
                             offset=(ox, oy))

    x0 = [min(max(start["sigma"], 0.2), 0.6 * k), min(max(start["ratio"], 1.2), 4.0), start["angle"], 0.0, 0.0, 1.0]
    lo = [0.15, 1.2, start["angle"] - 90 if fit_angle else start["angle"] - 1e-6, -1.0, -1.0, 0.0]
    hi = [0.6 * k, 4.0, start["angle"] + 90 if fit_angle else start["angle"] + 1e-6, 1.0, 1.0, 2.0]
    res = least_squares(lambda v: (model(v) - y).ravel(), x0, bounds=(lo, hi))
    sigma, ratio, angle, ox, oy, amp = res.x
    fitted = model(res.x)
    cos = float((fitted * y).sum() / (np.linalg.norm(fitted) * np.linalg.norm(y) + 1e-12))
    out = dict(family=fam, sign=sign, sigma=round(float(sigma), 3), offset=[round(float(ox), 3), round(float(oy), 3)],
               residual=round(float(np.linalg.norm(fitted - y)), 4), cos=round(cos, 4))
    if fit_ratio:
        out.update(ratio=round(float(ratio), 3), sigma_surround=round(float(sigma * ratio), 3))
    if fit_angle:
        out["angle"] = round(float(angle) % 360.0, 1)
    return out

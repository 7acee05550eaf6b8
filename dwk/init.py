"""Initialising depthwise kernels with structure: DoG patterns (the paper's experiment) and covariances.

Babaiee et al. initialise a share of ConvNeXt-Tiny's depthwise kernels with difference-of-Gaussians
patterns and report higher accuracy and more identifiable kernels after training (METHOD 1). Trockman
et al. ("Understanding the Covariance Structure of Convolutional Filters", ICLR 2023) draw depthwise
kernels from a multivariate Gaussian whose covariance is that of trained kernels: the peer baseline.

Both work in place on any torch model (timm or torchvision) with depthwise convolutions, found by
structure as dwk finds them for extraction (:func:`dwk.extract.iter_depthwise_convs`), and keep each
layer's scale: the initialised kernels get the mean square of the layer's weights as the model
built them (its **default initialisation**; call these right after building the model). "Variance"
here is that mean square (the default initialisations are zero-mean; DoG patterns are not).

Randomness comes from a NumPy generator seeded by ``seed`` only: torch's global RNG is never drawn
from, so the kernels that are not initialised here stay bit-identical to the default
initialisation of a model built with the same torch seed.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from dwk.dog import FAMILIES, pattern
from dwk.errors import ConfigError, NoDepthwiseError

logger = logging.getLogger(__name__)

# The families the paper's trained kernels show (METHOD 1): DoG on/off, first and second
# derivatives, Gaussian blobs. The point pattern (one centre tap) is in dwk.dog.FAMILIES too, opt-in.
DEFAULT_FAMILIES: tuple[str, ...] = ("dog", "d1", "d2", "gauss")
# Sampling ranges, chosen so that >= 95% of the patterns of 3x3, 5x5 and 7x7 kernels are within a
# cosine of 0.95 of a reference of dwk's bank (dwk.dog.reference_bank), while widths, orientations
# and centres still vary from kernel to kernel (measured: 94.8% / 96.7% / 98.4% at 3x3 / 5x5 / 7x7
# with gamma 2). Narrower centres (sigma < 0.5 px) alias on the pixel grid: a sub-pixel shift of a
# first derivative that narrow is no longer a derivative pattern.
SIGMA_MIN = 0.5
OFFSET_PX = 0.15
ANGLE_JITTER_DEG = 5.0


# ----------------------------------------------------------------------------- layers and their scale
def depthwise_layers(model) -> list[tuple[str, object]]:
    """``(module_path, conv)`` for every depthwise conv of ``model``; ``NoDepthwiseError`` when there is none."""
    from dwk.extract import iter_depthwise_convs

    convs = list(iter_depthwise_convs(model))
    if not convs:
        raise NoDepthwiseError(
            f"{type(model).__name__} has no depthwise convolution (a 2-D conv with groups == in_channels > 1 "
            "and a kernel larger than 1x1): structured initialisation applies to depthwise-separable CNNs "
            "such as ConvNeXt, EfficientNet or MobileNet")
    return convs


def default_mean_square(conv) -> float:
    """The mean square of a conv's weights as they are now (its default initialisation when just built).

    A layer initialised to zero has no scale to keep: torch's own ``nn.Conv2d`` default
    (Kaiming-uniform with a = sqrt(5), variance 1 / (3 fan_in)) is used instead, with a warning.
    """
    w = conv.weight.detach()
    ms = float(w.double().pow(2).mean())
    if ms > 0 and np.isfinite(ms):
        return ms
    fan_in = int(w.shape[1] * w.shape[2] * w.shape[3])
    logger.warning("depthwise conv %s has all-zero weights: scaled to nn.Conv2d's default variance 1/(3*%d)",
                   tuple(w.shape), fan_in)
    return 1.0 / (3.0 * fan_in)


def _check_share(share: float) -> float:
    if not 0.0 <= float(share) <= 1.0:
        raise ConfigError(f"share {share!r} must lie in [0, 1]: the fraction of each layer's kernels to initialise")
    return float(share)


def _choose_channels(n_out: int, share: float, rng: np.random.Generator) -> np.ndarray:
    """``round(share * n_out)`` distinct output channels, sorted."""
    k = int(round(share * n_out))
    return np.sort(rng.choice(n_out, size=k, replace=False)) if k else np.zeros(0, np.int64)


def _write_channels(conv, channels: np.ndarray, kernels: np.ndarray) -> None:
    """Overwrite output channels ``channels`` of a depthwise conv with ``kernels`` (k, kh, kw), in place."""
    import torch

    if not len(channels):
        return
    w = conv.weight
    with torch.no_grad():
        idx = torch.as_tensor(channels, dtype=torch.long, device=w.device)
        w[idx] = torch.as_tensor(kernels, dtype=w.dtype, device=w.device).reshape(len(channels), *w.shape[1:])


# ----------------------------------------------------------------------------- DoG patterns
def _gamma_of(gamma: float | tuple[float, float], rng: np.random.Generator) -> float:
    if isinstance(gamma, (tuple, list)):
        lo, hi = gamma
        return float(rng.uniform(lo, hi))
    return float(gamma)


def _check_gamma(gamma: float | tuple[float, float]) -> None:
    values = list(gamma) if isinstance(gamma, (tuple, list)) else [gamma]
    if len(values) not in (1, 2) or any(not float(v) > 1.0 for v in values) or sorted(values) != values:
        raise ConfigError(f"gamma {gamma!r} must be a surround/centre width ratio > 1 (e.g. 2.0), or a range "
                          "(lo, hi) with 1 < lo <= hi to sample from")


def _check_families(families: Sequence[str]) -> tuple[str, ...]:
    fams = tuple(families)
    unknown = [f for f in fams if f not in FAMILIES]
    if not fams or unknown:
        raise ConfigError(f"families {list(fams)!r}: choose one or more of {list(FAMILIES)} (dwk.dog.FAMILIES)")
    return fams


def sample_patterns(
    n: int,
    shape: tuple[int, int],
    rng: np.random.Generator,
    *,
    families: Sequence[str] = DEFAULT_FAMILIES,
    gamma: float | tuple[float, float] = 2.0,
    offset_px: float = OFFSET_PX,
    angle_jitter: float = ANGLE_JITTER_DEG,
) -> tuple[np.ndarray, list[str]]:
    """``n`` unit-norm patterns of dwk's reference families: ((n, kh, kw) float64, family of each).

    Per pattern: a family drawn uniformly from ``families``; a sign (on/off) for DoG, second
    derivatives and blobs; the orientation of a derivative at one of the bank's (45 degree steps,
    t and t+180 being the two signs of a first derivative) with a jitter of +/- ``angle_jitter``;
    a centre width ``sigma`` ~ U[0.5, 0.3 + 0.25 k] (the bank's upper width, k the larger side); the
    surround/centre ratio ``gamma`` (a number, or a range to sample from); a centre offset of
    U(+/- ``offset_px``) per axis.
    """
    fams = _check_families(families)
    k = max(shape)
    sigma_hi = max(SIGMA_MIN, 0.3 + 0.25 * k)
    out = np.empty((n, *shape), np.float64)
    names: list[str] = []
    for i in range(n):
        fam = fams[int(rng.integers(len(fams)))]
        sigma = float(rng.uniform(SIGMA_MIN, sigma_hi))
        ratio = _gamma_of(gamma, rng)
        jitter = float(rng.uniform(-angle_jitter, angle_jitter))
        sign = int(rng.choice((-1, 1)))
        if fam == "d1":  # the angle carries the sign
            angle, sign = 45.0 * int(rng.integers(8)) + jitter, 1
        elif fam == "d2":
            angle = 45.0 * int(rng.integers(4)) + jitter
        else:
            angle = 0.0
        offset = (float(rng.uniform(-offset_px, offset_px)), float(rng.uniform(-offset_px, offset_px)))
        p = pattern(fam, shape, sigma=sigma, ratio=ratio, angle=angle, sign=sign, offset=offset)
        if not np.isfinite(p).all() or np.linalg.norm(p) < 0.5:  # cannot happen for sigma >= 0.5; kept safe
            p = pattern("gauss", shape, sigma=sigma, sign=sign)
            fam = "gauss"
        out[i] = p
        names.append(fam)
    return out, names


def dog_init_(
    model,
    share: float = 0.5,
    gamma: float | tuple[float, float] = 2.0,
    families: Sequence[str] = DEFAULT_FAMILIES,
    seed: int = 0,
    *,
    offset_px: float = OFFSET_PX,
    angle_jitter: float = ANGLE_JITTER_DEG,
) -> dict[str, np.ndarray]:
    """Put DoG-family patterns into ``share`` of every depthwise layer's kernels, in place.

    In each depthwise layer, ``round(share * out_channels)`` output channels (drawn with ``seed``)
    get a pattern from :func:`sample_patterns` (``gamma`` is the surround/centre width ratio, the
    paper's knob), scaled to the L2 norm ``sqrt(kh * kw * m)`` where ``m`` is the mean square of the
    layer's default initialisation: the layer keeps its default variance. The other kernels, the
    biases and every other parameter are left as they are.

    Returns ``{module_path: sorted indices of the DoG-initialised output channels}``.
    Raises ``NoDepthwiseError`` for a model without depthwise convs, ``ConfigError`` for a share
    outside [0, 1], an unknown family or a gamma that is not > 1.
    """
    share = _check_share(share)
    _check_gamma(gamma)
    fams = _check_families(families)
    rng = np.random.default_rng(seed)
    chosen: dict[str, np.ndarray] = {}
    n_kernels = 0
    for path, conv in depthwise_layers(model):
        n_out, _, kh, kw = conv.weight.shape
        n_kernels += int(n_out)
        channels = _choose_channels(n_out, share, rng)
        pats, _ = sample_patterns(len(channels), (kh, kw), rng, families=fams, gamma=gamma, offset_px=offset_px,
                                  angle_jitter=angle_jitter)
        scale = np.sqrt(kh * kw * default_mean_square(conv))
        _write_channels(conv, channels, pats * scale)
        chosen[path] = channels
    logger.info("DoG initialisation: %d of %d depthwise kernels in %d layers (share %.2f, gamma %s, families %s)",
                sum(len(c) for c in chosen.values()), n_kernels, len(chosen), share, gamma, list(fams))
    return chosen


# ----------------------------------------------------------------------------- covariance (Trockman et al.)
@dataclass(frozen=True)
class KernelCovariance:
    """The covariance of one group of trained depthwise kernels, flattened row-major (d = kh * kw).

    Per layer: ``module`` and ``depth`` (the layer's relative depth among the source model's
    depthwise layers, 0..1) are set; per shape (all layers of a shape pooled) both are None.
    """

    shape: tuple[int, int]
    cov: np.ndarray  # (d, d)
    n: int  # kernels it was estimated from
    depth: float | None = None
    module: str | None = None


def _shape_of(key: str) -> tuple[int, int]:
    kh, kw = key.split("x")
    return int(kh), int(kw)


def estimate_covariance(store, ckpt_id: str, *, per: str = "layer", min_kernels: int = 2) -> list[KernelCovariance]:
    """The covariance of a stored checkpoint's depthwise kernels, per layer or per kernel shape.

    ``store`` is a :class:`dwk.store.KernelStore` (or its path) holding ``ckpt_id`` (``dwk extract``
    puts it there). The kernels are read verified, as stored (not normalised), and centred per tap
    across kernels (``np.cov``); all-zero (dead) kernels are left out. Layers with fewer than
    ``min_kernels`` live kernels are skipped. The regular-conv comparison set is never used.
    """
    from dwk.store import KernelStore

    if per not in ("layer", "shape"):
        raise ConfigError(f"per={per!r}: estimate covariances per 'layer' or per 'shape'")
    if not isinstance(store, KernelStore):
        store = KernelStore(store, create=False)
    rec = store.checkpoint(ckpt_id)
    if rec is None or not rec.complete:
        raise ConfigError(f"store {store.path} has no complete checkpoint {ckpt_id!r}: extract it first "
                          f"(`dwk extract --config CONFIG --store {store.path}`)")
    layers = {int(layer["layer_index"]): layer for layer in rec.layers if layer.get("kind", "depthwise") == "depthwise"}
    out: list[KernelCovariance] = []
    for key in sorted(s for s in rec.shapes if s[0].isdigit()):  # "7x7"; not "regular-7x7"
        shape = _shape_of(key)
        x = np.asarray(store.kernels(ckpt_id, key)[:], np.float64).reshape(-1, shape[0] * shape[1])
        layer_of = store.kernel_index(ckpt_id, key)["layer"]
        live = np.abs(x).max(axis=1) > 0
        groups = [(None, live)] if per == "shape" else [
            (li, live & (layer_of == li)) for li in sorted(set(layer_of.tolist()))]
        for li, mask in groups:
            n = int(mask.sum())
            if n < min_kernels:
                logger.info("%s %s layer %s: %d live kernels, too few for a covariance; skipped", ckpt_id, key, li, n)
                continue
            meta = layers.get(li) if li is not None else None
            out.append(KernelCovariance(shape=shape, cov=np.cov(x[mask], rowvar=False), n=n,
                                        depth=None if meta is None else float(meta["depth"]),
                                        module=None if meta is None else meta["module"]))
    if not out:
        raise ConfigError(f"checkpoint {ckpt_id!r} in {store.path} has no depthwise kernels to estimate a covariance from")
    return out


def _as_covariances(covariances) -> list[KernelCovariance]:
    """Accept a list of ``KernelCovariance`` or a mapping ``{"7x7": (49, 49) array}`` (per shape)."""
    if isinstance(covariances, Mapping):
        out = []
        for key, cov in covariances.items():
            shape = _shape_of(key) if isinstance(key, str) else tuple(key)
            out.append(KernelCovariance(shape=shape, cov=np.asarray(cov, np.float64), n=0))
        return out
    return list(covariances)


def _pick(covs: list[KernelCovariance], shape: tuple[int, int], depth: float) -> KernelCovariance | None:
    """The covariance of this shape whose source layer is nearest in relative depth (per-shape ones: any)."""
    same = [c for c in covs if tuple(c.shape) == tuple(shape)]
    if not same:
        return None
    return min(same, key=lambda c: abs((c.depth if c.depth is not None else depth) - depth))


def covariance_init_(model, covariances, seed: int = 0, *, share: float = 1.0) -> dict[str, np.ndarray]:
    """Draw depthwise kernels from trained-kernel covariances (Trockman et al.), in place.

    Each depthwise layer of ``model`` (relative depth t among its depthwise layers) takes the
    covariance of its kernel shape whose source layer is nearest to t (a per-shape covariance fits
    every layer of its shape), rescaled so that its trace is ``kh * kw * m``, ``m`` the mean square of
    the layer's default initialisation; ``round(share * out_channels)`` kernels (all by default) are
    drawn from ``N(0, cov)`` with ``seed``. ``covariances`` is what :func:`estimate_covariance`
    returns, or ``{"7x7": (49, 49) array}``. Returns ``{module_path: initialised output channels}``.
    Raises ``ConfigError`` when a layer's kernel shape has no covariance.
    """
    share = _check_share(share)
    covs = _as_covariances(covariances)
    convs = depthwise_layers(model)
    rng = np.random.default_rng(seed)
    n = len(convs)
    chosen: dict[str, np.ndarray] = {}
    for i, (path, conv) in enumerate(convs):
        n_out, _, kh, kw = conv.weight.shape
        depth = i / (n - 1) if n > 1 else 0.0
        c = _pick(covs, (kh, kw), depth)
        if c is None:
            have = sorted({f"{s[0]}x{s[1]}" for s in (cv.shape for cv in covs)})
            raise ConfigError(f"layer {path} has {kh}x{kw} kernels but the covariances are for {have}: estimate "
                              f"them from a checkpoint with {kh}x{kw} depthwise kernels")
        cov = np.asarray(c.cov, np.float64)
        if cov.shape != (kh * kw, kh * kw):
            raise ConfigError(f"covariance for {kh}x{kw} kernels must be ({kh * kw}, {kh * kw}), got {cov.shape}")
        trace = float(np.trace(cov))
        if not trace > 0:
            raise ConfigError(f"the {kh}x{kw} covariance for layer {path} has trace {trace}: the source kernels are "
                              "all zero or constant")
        cov = cov * (kh * kw * default_mean_square(conv) / trace)
        channels = _choose_channels(n_out, share, rng)
        draws = rng.multivariate_normal(np.zeros(kh * kw), cov, size=len(channels), method="eigh")
        _write_channels(conv, channels, draws.reshape(len(channels), kh, kw))
        chosen[path] = channels
    logger.info("covariance initialisation: %d depthwise kernels in %d layers from %d covariances",
                sum(len(c) for c in chosen.values()), len(chosen), len(covs))
    return chosen

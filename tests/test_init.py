"""dwk.init: DoG and covariance initialisation of depthwise kernels (issue 13).

What the feature promises, checked against things it does not compute itself: dwk's reference bank
names the DoG-initialised kernels (and not the default ones), each layer keeps the variance of the
architecture's documented default initialisation, and every other weight stays bit-identical.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dwk._random import torch_seeded
from dwk.dog import reference_bank
from dwk.errors import ConfigError, NoDepthwiseError
from dwk.init import covariance_init_, depthwise_layers, dog_init_, estimate_covariance

NAMED_COS = 0.95  # "named at a high cosine" by dwk's reference bank


class DepthwiseNet(nn.Module):
    """Depthwise convs of several kernel sizes with torch's own default initialisation."""

    def __init__(self, sizes=(3, 5, 7), channels=64):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 1)
        self.dw = nn.ModuleList(nn.Conv2d(channels, channels, k, padding=k // 2, groups=channels) for k in sizes)

    def forward(self, x):
        x = self.stem(x)
        for conv in self.dw:
            x = conv(x)
        return x


def build(name: str, seed: int = 0) -> nn.Module:
    with torch_seeded(seed):
        if name == "mobilenet_v2":
            import torchvision

            return torchvision.models.mobilenet_v2(weights=None)
        if name.startswith("dwnet"):
            return DepthwiseNet(channels=int(name.split("-")[1]) if "-" in name else 64)
        import timm

        return timm.create_model(name, pretrained=False)


def best_bank_cosine(weight: torch.Tensor) -> np.ndarray:
    """Each kernel's best cosine to a reference of dwk's bank for its shape."""
    w = weight.detach().double().numpy()
    out_ch, _, kh, kw = w.shape
    x = w.reshape(out_ch, kh * kw)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    _, pats = reference_bank((kh, kw))
    return (x @ pats.T).max(axis=1)


def expected_default_ms(name: str, conv: nn.Conv2d) -> float:
    """The documented default initialisation's variance of each architecture's depthwise weights."""
    out_ch, _, kh, kw = conv.weight.shape
    if name in ("test_convnext", "convnext_atto"):
        return 0.02**2  # timm ConvNeXt: trunc_normal_(std=.02)
    if name == "mobilenet_v2":
        return 2.0 / (out_ch * kh * kw)  # torchvision: kaiming_normal_(mode="fan_out")
    return 1.0 / (3.0 * kh * kw)  # nn.Conv2d: kaiming_uniform_(a=sqrt(5)), fan_in = kh * kw


@pytest.mark.parametrize("name", ["test_convnext", "convnext_atto", "mobilenet_v2", "dwnet"])
@pytest.mark.parametrize("share", [0.25, 0.5])
def test_dog_init_names_share_of_every_layer(name, share):
    model = build(name)
    chosen = dog_init_(model, share=share, seed=1)
    convs = depthwise_layers(model)
    assert set(chosen) == {p for p, _ in convs}
    for path, conv in convs:
        n = conv.weight.shape[0]
        cos = best_bank_cosine(conv.weight)
        mask = np.zeros(n, bool)
        mask[chosen[path]] = True
        assert mask.sum() == round(share * n)
        # the bank names about `share` of the layer's kernels at a high cosine ...
        assert abs((cos >= NAMED_COS).mean() - share) <= 0.1, (path, (cos >= NAMED_COS).mean())
        # ... and they are the DoG-initialised ones, while the default kernels mostly are not named
        assert (cos[mask] >= NAMED_COS).mean() >= 0.85, (path, np.sort(cos[mask])[:5])
        assert (cos[~mask] >= NAMED_COS).mean() <= 0.05, path


@pytest.mark.parametrize("name", ["test_convnext", "mobilenet_v2", "dwnet"])
def test_dog_init_keeps_each_layers_default_variance(name):
    default, model = build(name), build(name)
    chosen = dog_init_(model, share=1.0, seed=0)
    defaults = dict(depthwise_layers(default))
    for path, conv in depthwise_layers(model):
        assert len(chosen[path]) == conv.weight.shape[0]
        ms = float(conv.weight.detach().double().pow(2).mean())
        expected = expected_default_ms(name, conv)
        # A unit-norm or un-squared scale misses by a factor 5 to 2,500.
        assert 0.75 <= ms / expected <= 1.33, (path, ms, expected)
        assert ms == pytest.approx(float(defaults[path].weight.detach().double().pow(2).mean()), rel=0.02)
        # every DoG kernel has the norm of an average default kernel, not a unit norm
        norms = conv.weight.detach().flatten(1).norm(dim=1)
        assert torch.allclose(norms, norms.mean().expand_as(norms), rtol=1e-4)


def test_dog_init_half_share_keeps_layer_variance():
    model = build("convnext_atto")
    dog_init_(model, share=0.5, seed=0)
    for path, conv in depthwise_layers(model):
        assert 0.8 <= float(conv.weight.detach().double().pow(2).mean()) / 0.02**2 <= 1.25, path


@pytest.mark.parametrize("name", ["test_convnext", "mobilenet_v2"])
def test_other_kernels_and_parameters_stay_bit_identical(name):
    default, model = build(name, seed=3), build(name, seed=3)
    chosen = dog_init_(model, share=0.5, seed=7)
    dw = {f"{p}.weight" for p, _ in depthwise_layers(model)}
    ref = default.state_dict()
    changed_any = False
    for key, value in model.state_dict().items():
        if key not in dw:
            assert torch.equal(value, ref[key]), key
            continue
        rest = np.setdiff1d(np.arange(value.shape[0]), chosen[key.removesuffix(".weight")])
        assert torch.equal(value[rest], ref[key][rest]), key
        changed_any |= not torch.equal(value, ref[key])
    assert changed_any


def test_same_seed_same_kernels_other_seed_others():
    a, b, c = build("test_convnext"), build("test_convnext"), build("test_convnext")
    ca, cb, cc = dog_init_(a, seed=5), dog_init_(b, seed=5), dog_init_(c, seed=6)
    assert all(np.array_equal(ca[k], cb[k]) for k in ca)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert any(not np.array_equal(ca[k], cc[k]) for k in ca)


def test_share_zero_changes_nothing_and_share_one_names_all():
    default, zero, one = build("dwnet"), build("dwnet"), build("dwnet")
    assert all(len(c) == 0 for c in dog_init_(zero, share=0.0).values())
    assert all(torch.equal(x, y) for x, y in zip(zero.state_dict().values(), default.state_dict().values()))
    dog_init_(one, share=1.0)
    for path, conv in depthwise_layers(one):
        assert (best_bank_cosine(conv.weight) >= NAMED_COS).mean() >= 0.9, path


@pytest.mark.parametrize("k", [3, 5, 7])
def test_kernel_sizes(k):
    model = build("dwnet-256")
    chosen = dog_init_(model, share=0.5, seed=k)
    conv = dict(depthwise_layers(model))[f"dw.{[3, 5, 7].index(k)}"]
    assert tuple(conv.weight.shape[-2:]) == (k, k)
    cos = best_bank_cosine(conv.weight)
    mask = np.zeros(256, bool)
    mask[chosen[f"dw.{[3, 5, 7].index(k)}"]] = True
    assert (cos[mask] >= NAMED_COS).mean() >= 0.9
    assert (cos[~mask] >= NAMED_COS).mean() <= 0.03


def test_families_are_the_requested_ones():
    from dwk.dog import name_prototypes

    model = build("dwnet-256")
    chosen = dog_init_(model, share=1.0, families=["d1"], seed=0)
    conv = dict(depthwise_layers(model))["dw.2"]  # 7x7
    x = conv.weight.detach().double().flatten(1).numpy()
    names = name_prototypes(x / np.linalg.norm(x, axis=1, keepdims=True), (7, 7), name_cos=0.9)
    assert len(chosen["dw.2"]) == 256
    assert np.mean([n["family"] == "d1" for n in names]) >= 0.95


def test_errors():
    with pytest.raises(NoDepthwiseError):
        dog_init_(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 1, groups=8)))
    with pytest.raises(NoDepthwiseError):
        covariance_init_(build("test_resnet"), {"3x3": np.eye(9)})
    with pytest.raises(ConfigError, match="share"):
        dog_init_(build("dwnet"), share=1.5)
    with pytest.raises(ConfigError, match="families"):
        dog_init_(build("dwnet"), families=["sobel"])
    with pytest.raises(ConfigError, match="gamma"):
        dog_init_(build("dwnet"), gamma=0.5)
    with pytest.raises(ConfigError, match="5x5"):  # no covariance for a layer's kernel shape
        covariance_init_(build("dwnet"), {"3x3": np.eye(9), "7x7": np.eye(49)})


# ----------------------------------------------------------------------------- covariance
def _smooth_covariance(k: int, length: float) -> np.ndarray:
    """A covariance with spatial correlation: cov[i, j] = exp(-|p_i - p_j|^2 / (2 length^2))."""
    y, x = np.mgrid[0:k, 0:k]
    p = np.stack([y.ravel(), x.ravel()], 1).astype(float)
    d2 = ((p[:, None] - p[None]) ** 2).sum(-1)
    return np.exp(-d2 / (2 * length**2))


def test_covariance_init_draws_from_the_covariance_at_default_scale():
    model = build("dwnet-2048")
    default = build("dwnet-2048")
    covs = {f"{k}x{k}": _smooth_covariance(k, 1.5) for k in (3, 5, 7)}
    chosen = covariance_init_(model, covs, seed=0)
    for (path, conv), k in zip(depthwise_layers(model), (3, 5, 7)):
        assert len(chosen[path]) == 2048
        x = conv.weight.detach().double().flatten(1).numpy()
        target = covs[f"{k}x{k}"] * (1.0 / (3 * k * k)) / 1.0  # trace k*k -> mean square of the default
        emp = x.T @ x / len(x)
        assert np.linalg.norm(emp - target) / np.linalg.norm(target) < 0.15, path
        ms = float((x**2).mean())
        assert ms == pytest.approx(float(dict(depthwise_layers(default))[path].weight.detach().double().pow(2).mean()), rel=0.1)
        # neighbouring taps correlate as in the covariance; default kernels' taps do not
        centre = (k * k) // 2
        assert np.corrcoef(x[:, centre], x[:, centre + 1])[0, 1] > 0.6


def test_covariance_init_share_keeps_the_rest():
    model, default = build("dwnet"), build("dwnet")
    chosen = covariance_init_(model, {f"{k}x{k}": np.eye(k * k) for k in (3, 5, 7)}, seed=0, share=0.25)
    for (path, conv), (_, ref) in zip(depthwise_layers(model), depthwise_layers(default)):
        rest = np.setdiff1d(np.arange(64), chosen[path])
        assert len(chosen[path]) == 16
        assert torch.equal(conv.weight[rest], ref.weight[rest])


def test_estimate_covariance_from_a_store_per_layer_and_shape(tmp_path):
    from dwk.extract import EXTRACTOR_VERSION, extract_model
    from dwk.planted import plant_model
    from dwk.store import KernelStore

    src = build("test_convnext", seed=0)
    plant_model(src, seed=0, noise_share=0.0)
    ex = extract_model(src, trace_norms=False)
    store = KernelStore(tmp_path / "store.zarr")
    store.write_checkpoint("planted", source="test", fingerprint="x", extractor_version=EXTRACTOR_VERSION,
                           extracted=ex, chunk_kernels=64)
    per_layer = estimate_covariance(store, "planted", per="layer")
    assert [c.module for c in per_layer] == [p for p, _ in depthwise_layers(src)]
    assert per_layer[0].depth == 0.0 and per_layer[-1].depth == 1.0
    for c, (path, conv) in zip(per_layer, depthwise_layers(src)):
        w = conv.weight.detach().double().flatten(1).numpy()
        assert c.n == len(w)
        np.testing.assert_allclose(c.cov, np.cov(w, rowvar=False), rtol=1e-4, atol=1e-9)
    (pooled,) = estimate_covariance(tmp_path / "store.zarr", "planted", per="shape")
    assert pooled.shape == (7, 7) and pooled.depth is None and pooled.n == sum(c.n for c in per_layer)

    # each layer of a model of another depth takes the source layer nearest in relative depth
    target = build("test_convnext", seed=1)
    covariance_init_(target, per_layer, seed=0)
    for path, conv in depthwise_layers(target):
        assert 0.75 <= float(conv.weight.detach().double().pow(2).mean()) / 0.02**2 <= 1.33, path

    with pytest.raises(ConfigError, match="extract it first"):
        estimate_covariance(store, "missing")

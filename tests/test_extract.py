import numpy as np
import pytest
import timm
import torch
from torch import nn

from dwk.extract import NoDepthwiseError, extract_model, is_depthwise, iter_depthwise_convs


def _dw_modules(model):
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1 and m.kernel_size != (1, 1)]


@pytest.mark.parametrize("arch, shapes", [("test_convnext", {"7x7"}), ("test_efficientnet", {"3x3"})])
def test_finds_every_depthwise_kernel_with_its_values(arch, shapes):
    model = timm.create_model(arch, pretrained=False)
    ex = extract_model(model)
    expected = _dw_modules(model)
    assert set(ex.kernels) == shapes
    assert ex.n_kernels == sum(m.out_channels for _, m in expected) > 0
    assert [l.module for l in ex.layers] == [n for n, _ in expected]
    # values: each layer's block of the flat array equals that module's weight
    for layer, (name, m) in zip(ex.layers, expected):
        sel = ex.layer[layer.shape] == layer.layer_index
        np.testing.assert_array_equal(ex.kernels[layer.shape][sel], m.weight.detach().numpy()[:, 0])
        np.testing.assert_array_equal(ex.channel[layer.shape][sel], np.arange(m.out_channels))
        assert layer.in_channels == m.in_channels and tuple(layer.stride) == tuple(m.stride)
    assert ex.layers[0].depth == 0.0 and ex.layers[-1].depth == 1.0


def test_resnet_has_no_depthwise_kernels():
    with pytest.raises(NoDepthwiseError, match="no depthwise convolution"):
        extract_model(timm.create_model("test_resnet", pretrained=False))


def test_structure_not_names_multiplier_and_exclusions():
    model = nn.Sequential()
    model.add_module("regular", nn.Conv2d(4, 4, 3))                   # not depthwise
    model.add_module("pointwise_dw", nn.Conv2d(4, 4, 1, groups=4))    # 1x1: excluded
    model.add_module("x", nn.Conv2d(4, 8, 5, groups=4))               # multiplier 2, named arbitrarily
    model.add_module("band", nn.Conv2d(8, 8, (1, 11), groups=8))      # non-square
    assert [n for n, _ in iter_depthwise_convs(model)] == ["x", "band"]
    assert not is_depthwise(model.regular)
    ex = extract_model(model)
    assert {k: len(v) for k, v in ex.kernels.items()} == {"5x5": 8, "1x11": 8}
    assert ex.layers[0].multiplier == 2
    np.testing.assert_array_equal(ex.kernels["5x5"], model.x.weight.detach().numpy()[:, 0])


def test_planted_labels_follow_kernels():
    from dwk.planted import plant_model

    model = timm.create_model("test_convnext", pretrained=False)
    labels = plant_model(model, seed=3)
    ex = extract_model(model, labels=labels)
    assert len(ex.labels["7x7"]) == ex.n_kernels
    assert set(np.unique(ex.labels["7x7"])) <= set(range(-1, 14))
    with torch.no_grad():
        first = next(iter(labels))
        assert np.array_equal(ex.labels["7x7"][: len(labels[first])], labels[first])


def test_regular_comparison_set_sampled_and_kept_apart():
    from dwk.extract import REGULAR_PREFIX, extract_regular, with_regular

    model = nn.Sequential()
    model.add_module("stem", nn.Conv2d(3, 8, 3))          # regular 3x3: 24 kernels
    model.add_module("dw", nn.Conv2d(8, 8, 3, groups=8))  # depthwise 3x3
    model.add_module("big", nn.Conv2d(8, 40, 3))          # regular 3x3: 320 kernels, sampled
    model.add_module("pw", nn.Conv2d(40, 4, 1))           # 1x1: excluded
    reg = extract_regular(model, max_per_layer=100, seed=0)
    assert [l.module for l in reg.layers] == ["stem", "big"] and {l.kind for l in reg.layers} == {"regular"}
    assert len(reg.kernels["regular-3x3"]) == 24 + 100
    big = reg.layer["regular-3x3"] == 1
    flat = model.big.weight.detach().numpy().reshape(320, 3, 3)
    np.testing.assert_array_equal(reg.kernels["regular-3x3"][big], flat[reg.channel["regular-3x3"][big]])
    ex = with_regular(extract_model(model), reg)
    assert ex.n_kernels == 8  # depthwise only
    assert set(ex.kernels) == {"3x3", REGULAR_PREFIX + "3x3"}
    assert [l.layer_index for l in ex.layers] == [0, 1, 2] and ex.layers[1].kind == "regular"
    assert set(np.unique(ex.layer[REGULAR_PREFIX + "3x3"])) == {1, 2}

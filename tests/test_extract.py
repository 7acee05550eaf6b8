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

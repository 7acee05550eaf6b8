"""Architectures that need care: mixed kernels, re-parameterisation, non-square and large kernels,
channel multipliers, and the per-layer record of whether a normalization layer follows."""
import copy

import numpy as np
import pytest
import timm
import torch
from timm.layers import LayerNorm2d, MixedConv2d
from timm.models.byobnet import MobileOneBlock
from torch import nn

from dwk.extract import extract_model, is_reparameterizable


def _randomize_bn(model, seed=0):
    """Non-trivial batch-norm statistics, so that fusing them into convs changes the kernels."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


def test_mixed_conv_parts_are_layers_of_one_mixed_layer():
    torch.manual_seed(0)
    mixed = MixedConv2d(13, 13, kernel_size=[3, 5, 7], depthwise=True)
    model = nn.Sequential(nn.Conv2d(3, 13, 1), mixed, nn.BatchNorm2d(13), nn.ReLU())
    ex = extract_model(model)
    parts = list(mixed.values())
    assert [l.module for l in ex.layers] == ["1.0", "1.1", "1.2"]
    assert {k: len(v) for k, v in ex.kernels.items()} == {"3x3": 5, "5x5": 4, "7x7": 4}  # timm's split: 5, 4, 4
    assert [l.part_of for l in ex.layers] == ["1", "1", "1"]
    assert [l.channel_offset for l in ex.layers] == [0, 5, 9]
    assert all(l.norm_after is True for l in ex.layers)  # the BatchNorm takes the concatenated output
    for layer, conv in zip(ex.layers, parts):
        np.testing.assert_array_equal(ex.kernels[layer.shape], conv.weight.detach().numpy()[:, 0])


def test_mixnet_has_several_kernel_sizes_in_one_layer():
    model = timm.create_model("mixnet_s", pretrained=False)
    ex = extract_model(model)
    mixed = [n for n, m in model.named_modules() if isinstance(m, MixedConv2d) and n.endswith("conv_dw")]
    assert mixed and {l.part_of for l in ex.layers if l.part_of} == set(mixed)
    first = [l for l in ex.layers if l.part_of == mixed[0]]
    assert len({l.shape for l in first}) == len(first) > 1  # one shape per part
    assert ex.n_kernels == sum(m.out_channels for _, m in model.named_modules()
                               if isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1 and m.kernel_size != (1, 1))


def _rep_model():
    torch.manual_seed(1)
    blocks = nn.Sequential(MobileOneBlock(8, 8, 3, group_size=1, num_conv_branches=2),
                           MobileOneBlock(8, 8, 5, group_size=1, num_conv_branches=1), nn.Conv2d(8, 4, 1))
    return _randomize_bn(blocks).eval()


def test_reparameterized_model_yields_the_fused_kernels():
    model = _rep_model()
    reference = copy.deepcopy(model)
    x = torch.randn(2, 8, 16, 16)
    expected = reference(x)
    unfused = extract_model(copy.deepcopy(model), reparameterize=False)
    assert not unfused.reparameterized and len(unfused.layers) == 3  # two 3x3 branches + one 5x5 branch
    assert all(l.norm_after for l in unfused.layers)  # each branch conv feeds its BatchNorm

    assert is_reparameterizable(model)
    ex = extract_model(model, reparameterize=True)  # fuses in place
    assert ex.reparameterized
    assert [l.module for l in ex.layers] == ["0.reparam_conv", "1.reparam_conv"]
    assert {k: len(v) for k, v in ex.kernels.items()} == {"3x3": 8, "5x5": 8}
    np.testing.assert_array_equal(ex.kernels["3x3"], model[0].reparam_conv.weight.detach().numpy()[:, 0])
    np.testing.assert_array_equal(ex.kernels["5x5"], model[1].reparam_conv.weight.detach().numpy()[:, 0])
    assert all(l.norm_after is False for l in ex.layers)  # the norms are folded into the kernels
    # the extracted kernels are the ones the deployed network computes with
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-4)
    assert not np.allclose(ex.kernels["3x3"], unfused.kernels["3x3"][:8])


class _Bands(nn.Module):
    """Non-square (1x11, 11x1) and large (31x31) depthwise kernels, one with a channel multiplier."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 1)
        self.row = nn.Conv2d(16, 16, (1, 11), padding=(0, 5), groups=16)
        self.bn = nn.BatchNorm2d(16)
        self.col = nn.Conv2d(16, 16, (11, 1), padding=(5, 0), groups=16)
        self.act = nn.GELU()
        self.big = nn.Conv2d(16, 32, 31, padding=15, groups=16, bias=False)  # multiplier 2
        self.drop = nn.Dropout(0.1)
        self.norm = LayerNorm2d(32)

    def forward(self, x):
        x = self.bn(self.row(self.stem(x)))
        x = self.act(self.col(x))
        return self.norm(self.drop(self.big(x)))


def test_non_square_large_kernels_multiplier_and_norm_after():
    torch.manual_seed(2)
    model = _Bands()
    ex = extract_model(model)
    assert [l.module for l in ex.layers] == ["row", "col", "big"]
    assert {k: len(v) for k, v in ex.kernels.items()} == {"1x11": 16, "11x1": 16, "31x31": 32}
    for layer, conv in zip(ex.layers, (model.row, model.col, model.big)):
        np.testing.assert_array_equal(ex.kernels[layer.shape], conv.weight.detach().numpy()[:, 0])
        assert layer.param == f"{layer.module}.weight"
    assert [l.norm_after for l in ex.layers] == [True, False, True]  # Dropout is skipped, GELU is not a norm
    assert [l.multiplier for l in ex.layers] == [1, 1, 2]
    assert ex.layers[0].padding == "0x5" and ex.layers[2].out_channels == 32 and ex.layers[2].in_channels == 16


def test_timm_large_kernels_and_convnext_norm_after():
    ex = extract_model(timm.create_model("test_convnext", kernel_sizes=13, pretrained=False))
    assert set(ex.kernels) == {"13x13"} and ex.n_kernels == 408
    assert all(l.norm_after is True for l in ex.layers)  # conv_dw -> permute -> LayerNorm


def test_norm_after_is_unknown_when_the_model_cannot_run():
    class NeedsTwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.dw = nn.Conv2d(4, 4, 3, groups=4)

        def forward(self, x, y):
            return self.dw(x) + y

    ex = extract_model(NeedsTwoInputs())
    assert ex.layers[0].norm_after is None and ex.n_kernels == 4


@pytest.mark.parametrize("arch", ["repghostnet_050"])
def test_timm_reparameterizable_arch(arch):
    model = _randomize_bn(timm.create_model(arch, pretrained=False)).eval()
    x = torch.randn(1, 3, 64, 64)
    expected = model(x)
    n_before = len(extract_model(copy.deepcopy(model), trace_norms=False).layers)
    ex = extract_model(model, reparameterize=True)
    assert ex.reparameterized and len(ex.layers) <= n_before
    torch.testing.assert_close(model(x), expected, atol=1e-4, rtol=1e-3)

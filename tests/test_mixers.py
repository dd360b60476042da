"""Mixers: each preset computes what its paper defines, and every preset works as a module
(forward/backward, dtypes, torch.compile, torch.jit.trace, gradients, state_dict)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tokenmix.mixers import Mixer, create_mixer, list_mixers, register_mixer
from tokenmix.ops import Window

torch.manual_seed(0)


# ---------------------------------------------------------------- independent references


class OfficialInvolution(nn.Module):
    """The official RedNet involution (mmcls naive form), rewritten here independently with
    the same parameter layout: conv1 = 1x1 conv (no bias) + BN + ReLU, conv2 = 1x1 conv
    (bias), kernel from the avg-pooled input, applied with nn.Unfold."""

    def __init__(self, channels, kernel_size, stride, group_channels=16, reduction=4):
        super().__init__()
        self.k, self.s, self.c = kernel_size, stride, channels
        self.gc = group_channels
        self.g = channels // group_channels
        self.conv1 = nn.Sequential(nn.Conv2d(channels, channels // reduction, 1, bias=False),
                                   nn.BatchNorm2d(channels // reduction), nn.ReLU())
        self.conv2 = nn.Conv2d(channels // reduction, kernel_size ** 2 * self.g, 1)
        self.avgpool = nn.AvgPool2d(stride, stride) if stride > 1 else nn.Identity()
        self.unfold = nn.Unfold(kernel_size, 1, (kernel_size - 1) // 2, stride)

    def forward(self, x):
        weight = self.conv2(self.conv1(self.avgpool(x)))
        b, _, h, w = weight.shape
        weight = weight.view(b, self.g, self.k ** 2, h, w).unsqueeze(2)
        cols = self.unfold(x).view(b, self.g, self.gc, self.k ** 2, h, w)
        return (weight * cols).sum(3).view(b, self.c, h, w)


def _load_official(mixer: Mixer, ref: OfficialInvolution) -> None:
    g = mixer.generator
    with torch.no_grad():
        ref.conv1[0].weight.copy_(g.reduce.weight)
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(ref.conv1[1], name).copy_(getattr(g.norm, name))
        ref.conv2.weight.copy_(g.span.weight)
        ref.conv2.bias.copy_(g.span.bias)


def _randomise_bn(m: nn.Module) -> None:
    for bn in m.modules():
        if isinstance(bn, nn.BatchNorm2d):
            with torch.no_grad():
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.5, 0.5)
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 1.5)


# ------------------------------------------------------------------ paper equivalences


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("bias", [False, True])
def test_dwconv_equals_depthwise_conv2d(stride, bias):
    dim, K = 6, 5
    m = create_mixer("dwconv", dim, kernel_size=K, stride=stride, bias=bias, dtype=torch.float64)
    ref = nn.Conv2d(dim, dim, K, stride, K // 2, groups=dim, bias=bias, dtype=torch.float64)
    with torch.no_grad():
        ref.weight.copy_(m.generator.weight.view(dim, 1, K, K))
        if bias:
            m.bias.normal_()
            ref.bias.copy_(m.bias)
    x = torch.randn(2, dim, 9, 8, dtype=torch.float64)
    torch.testing.assert_close(m(x), ref(x), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("K", [3, 7])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("train", [False, True])
def test_involution_equals_official(K, stride, train):
    dim = 32
    m = create_mixer("involution", dim, kernel_size=K, stride=stride, dtype=torch.float64)
    ref = OfficialInvolution(dim, K, stride).double()
    _randomise_bn(m)
    _load_official(m, ref)
    m.train(train)
    ref.train(train)
    x = torch.randn(2, dim, 10, 12, dtype=torch.float64)
    torch.testing.assert_close(m(x), ref(x), atol=1e-12, rtol=1e-10)
    # same parameters, same count
    assert sum(p.numel() for p in m.parameters()) == sum(p.numel() for p in ref.parameters())
    assert sorted(m.state_dict()) == sorted([
        "generator.reduce.weight", "generator.norm.weight", "generator.norm.bias",
        "generator.norm.running_mean", "generator.norm.running_var", "generator.norm.num_batches_tracked",
        "generator.span.weight", "generator.span.bias"])


def test_involution_odd_size_stride2_pools_partial_windows():
    """ceil_mode pooling: for odd sizes the last row/column of kernels comes from the
    average of the pixels the last 2x2 window covers (PyTorch divides by the in-image count)."""
    dim = 16
    m = create_mixer("involution", dim, kernel_size=3, stride=2, dtype=torch.float64).eval()
    x = torch.randn(1, dim, 7, 5, dtype=torch.float64)
    pooled = m.generator.pool(x)
    assert pooled.shape[-2:] == (4, 3)
    torch.testing.assert_close(pooled[..., 3, 2], x[..., 6, 4])
    torch.testing.assert_close(pooled[..., 3, 0], x[..., 6, 0:2].mean(-1))
    torch.testing.assert_close(pooled[..., 0, 0], x[..., 0:2, 0:2].mean((-1, -2)))
    assert m(x).shape == (1, dim, 4, 3)


# ------------------------------------------------------------------- per-preset contract


@pytest.mark.parametrize("name", list_mixers())
@pytest.mark.parametrize("stride", [1, 2])
def test_preset_shapes(name, stride):
    for H, W in ((7, 9), (8, 8), (5, 6)):
        m = create_mixer(name, 32, kernel_size=3, stride=stride)
        y = m(torch.randn(2, 32, H, W))
        assert y.shape == (2, 32, math.ceil(H / stride), math.ceil(W / stride))


@pytest.mark.parametrize("name", list_mixers())
def test_preset_builds_at_dim256_k7(name):
    m = create_mixer(name, 256, kernel_size=7, device="meta")
    assert isinstance(m, nn.Module)


def test_unknown_mixer():
    with pytest.raises(ValueError, match="known: .*involution"):
        create_mixer("nope", 16)

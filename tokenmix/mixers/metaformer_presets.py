"""Token mixers of the MetaFormer baselines as presets: PoolFormer's pooling (a static kernel
on the shared op) and ConvFormer's inverted separable convolution."""

from __future__ import annotations

import torch
from torch import nn

from tokenmix.ops import Window

from .._args import check_int
from ..kernel_gen.base import check_odd_kernel
from ..kernel_gen.pool import PoolKernel
from .layers import PointwiseLinear, StarReLU
from .mixer import Mixer
from .registry import create_mixer, register_mixer


@register_mixer("pooling")
def pooling(dim: int, *, kernel_size=3, stride: int = 1, dilation: int = 1, subtract_input: bool = True,
            device=None, dtype=None) -> Mixer:
    """PoolFormer's token mixer through ``aggregate``: a ``pool`` generator (average over the
    in-image taps, ``count_include_pad=False``, minus the centre tap). At stride 1 it equals
    ``nn.AvgPool2d(K, 1, K//2, count_include_pad=False)(x) - x``; no parameters. (PoolFormer
    uses K = 3; ``create_mixer`` passes its own default K = 7 unless told.)"""
    check_odd_kernel(kernel_size, "the pooled window needs a centre tap")
    window = Window(kernel_size, stride=stride, dilation=dilation)
    gen = PoolKernel(dim, kernel_size, stride=stride, subtract_input=subtract_input)
    return Mixer(dim, gen, window, device=device, dtype=dtype)


class SepConv(nn.Module):
    """Inverted separable convolution (MobileNetV2), ConvFormer's token mixer: ``pwconv1``
    (1x1, dim -> expansion*dim) -> StarReLU -> depthwise K x K ``dwconv`` (the ``dwconv``
    preset: a static kernel on the shared op; the stride sits here) -> ``pwconv2`` (1x1 back).
    The 1x1 layers keep ``nn.Linear``'s weight layout, as the official ConvFormer.

    Shapes: ``x: (B, dim, H, W) -> (B, dim, ceil(H/stride), ceil(W/stride))``.
    """

    def __init__(self, dim: int, kernel_size=7, stride: int = 1, expansion: float = 2.0, bias: bool = False,
                 dilation: int = 1, device=None, dtype=None):
        super().__init__()
        self.dim = check_int("dim", dim)
        if isinstance(expansion, bool) or not isinstance(expansion, (int, float)) or expansion <= 0:
            raise ValueError(f"expansion must be a positive number, got expansion={expansion!r}")
        med = int(expansion * dim)
        if med < 1:
            raise ValueError(f"int(expansion * dim) must be >= 1, got expansion={expansion!r}, dim={dim}")
        fk = dict(device=device, dtype=dtype)
        self.pwconv1 = PointwiseLinear(dim, med, bias=bias, **fk)
        self.act = StarReLU(**fk)
        self.dwconv = create_mixer("dwconv", med, kernel_size=kernel_size, stride=stride, dilation=dilation,
                                   bias=bias, **fk)
        self.pwconv2 = PointwiseLinear(med, dim, bias=bias, **fk)

    def reset_parameters(self) -> None:
        """Each layer's own default initialisation."""
        for m in (self.pwconv1, self.act, self.dwconv, self.pwconv2):
            m.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, dim, H, W) -> (B, dim, Ho, Wo)."""
        return self.pwconv2(self.dwconv(self.act(self.pwconv1(x))))

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


@register_mixer("sepconv")
def sepconv(dim: int, *, kernel_size=7, stride: int = 1, expansion: float = 2.0, bias: bool = False,
            dilation: int = 1, device=None, dtype=None) -> SepConv:
    """ConvFormer's inverted separable convolution (:class:`SepConv`; official: K = 7,
    expansion 2, no biases)."""
    return SepConv(dim, kernel_size, stride, expansion, bias, dilation, device=device, dtype=dtype)


__all__ = ["pooling", "sepconv", "SepConv"]

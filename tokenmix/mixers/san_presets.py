"""SAN's self-attention (Zhao, Jia, Koltun, CVPR 2020) as mixer presets: ``san_pairwise`` and
``san_patchwise``, dim -> dim versions of the SAN models' SAM (``tokenmix.models.san``)."""

from __future__ import annotations

from typing import Optional

from torch import nn

from .._args import check_int
from ..kernel_gen.base import check_odd_kernel
from ..kernel_gen.san import PairwiseKernel, PatchwiseKernel
from ..ops.window import Window
from .mixer import Mixer
from .registry import register_mixer


def _san(kind, dim, kernel_size, stride, share_planes, rel_channels, dilation, border, device, dtype, **gen_kw):
    check_odd_kernel(kernel_size, "output size ceil(H/stride) needs a centre tap")
    share_planes = check_int("share_planes", share_planes)
    if dim % share_planes:
        raise ValueError(f"dim={dim} is not divisible by share_planes={share_planes}")
    if rel_channels is None:
        rel_channels = max(1, dim // 16)
    if border not in ("zero", "reflect"):
        raise ValueError(f"border={border!r} must be 'zero' or 'reflect'")
    fk = dict(device=device, dtype=dtype)
    window = Window(kernel_size, stride=stride, dilation=dilation, border=border)
    gen = kind(dim, kernel_size, stride=stride, groups=dim // share_planes, rel_channels=rel_channels, **gen_kw, **fk)
    return Mixer(dim, gen, window, value=nn.Conv2d(dim, dim, 1, **fk), **fk)


@register_mixer("san_pairwise")
def san_pairwise(dim: int, *, kernel_size=7, stride: int = 1, share_planes: int = 8,
                 rel_channels: Optional[int] = None, dilation: int = 1, border: str = "zero",
                 device=None, dtype=None) -> Mixer:
    """SAN pairwise attention: ``pairwise`` generator (relation width ``rel_channels``,
    default max(1, dim // 16); G = dim / share_planes weight channels, each serving
    ``share_planes`` contiguous value channels), value a 1x1 conv with bias. Without the two
    biases that cancel (``cancelling_bias=False``). ``border``: "zero" (default: every input
    size works) or SAN's "reflect" (each side must exceed the padding)."""
    return _san(PairwiseKernel, dim, kernel_size, stride, share_planes, rel_channels, dilation, border,
                device, dtype, cancelling_bias=False)


@register_mixer("san_patchwise")
def san_patchwise(dim: int, *, kernel_size=7, stride: int = 1, share_planes: int = 8,
                  rel_channels: Optional[int] = None, dilation: int = 1, border: str = "zero",
                  device=None, dtype=None) -> Mixer:
    """SAN patchwise attention: ``patchwise`` generator, otherwise as ``san_pairwise``."""
    return _san(PatchwiseKernel, dim, kernel_size, stride, share_planes, rel_channels, dilation, border,
                device, dtype)

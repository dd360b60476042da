"""Mixers whose window is built per call from the input size: global attention (a clamp
window as large as the image), the attention-augmented convolution of AA-ResNet, and axial
attention (a clamp window as long as the image's column, then its row).

The relative tables of these mixers are sized by a ``span`` fixed at construction (the
feature-map side the model is built for); each call builds the window with
:func:`~tokenmix.kernel_gen.relative_attention.span_window`: along an attended axis of length
L it has ``min(span, L)`` taps and the clamp border, so an axis up to ``span`` long is
attended whole and a longer one in a sliding window of ``span`` taps.

Memory: the composed path generates a kernel of one weight per (head, tap, output pixel): a
global window on an H x W map holds ``B * heads * (H*W)**2`` weights (8 heads at 28 x 28: 4.9
M, 19.7 MB in float32 per image; at 14 x 14: 0.31 M, 1.2 MB), an axial one
``B * heads * L * H * W`` per axis (8 heads at 56 x 56: 1.4 M, 5.6 MB per image and axis), and
autograd keeps it for the backward. :class:`GlobalAttention` (and so
:class:`AttentionAugmentedConv`) runs fused by default instead
(:func:`tokenmix.ops.local_attention`, the relative logits as its per-pixel row and column
biases): it keeps q, k, v, the biases (``B * heads * (H + W) * H * W`` values), the output and
one log-sum-exp per (pixel, head), never the kernel. Measured with
``benchmarks/aa_attention.py`` (aa_resnet50, batch 2, 224 x 224, float32), autograd keeps per
attention layer 6.9 MiB fused against 41.7 MiB composed at 28 x 28, 1.75 against 3.74 MiB at
14 x 14 and 1.06 against 1.16 MiB at 7 x 7 (the layer's input and projections included).
Axial attention runs the composed path (its key and value positional terms do not fit the
fused op).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .._args import check_int, check_pair
from ..kernel_gen.axial import AxialKernel
from ..kernel_gen.bottleneck import stride_pool
from ..kernel_gen.relative_attention import RelativeAttentionKernel, span_window
from ..ops.functional import aggregate, autocast_dtype


def _aggregate(v: torch.Tensor, w: torch.Tensor, window) -> torch.Tensor:
    if w.dtype != v.dtype and autocast_dtype(v.device) is None:
        w = w.to(v.dtype)  # under autocast, aggregate casts both to the autocast dtype itself
    return aggregate(v, w, window)


class GlobalAttention(nn.Module):
    """Multi-head self-attention with 2-D relative logits over a clamp window as large as the
    image (AA-ResNet's attention): ``proj(aggregate(value(x), kernel_gen(x, window), window))``
    with ``window = span_window(span, H, W)`` (:meth:`window_for`). The generator is
    ``kernel_gen`` (not ``generator``: there is no one window to apply it with).

    Args:
        dim: C, input channels.
        value_channels: dv, the output channels (default C), divisible by heads.
        key_channels: dk (default C).
        heads: Nh.
        span: the longest side attended whole (relative tables of 2*span - 1 rows per axis).
        qkv_bias: bias in the q, k and v projections; the output projection has one.
        proj: the 1x1 output projection dv -> dv (AA's W_O).
        fused: run the attention as :func:`tokenmix.ops.local_attention` (the default), whose
            scores are never stored, with the relative logits as its per-pixel row and column
            biases (``kernel_gen.fused_attention``); ``fused=False`` generates the kernel and
            aggregates it (the composed path). Same parameters and ``state_dict`` either way.

    Shapes: ``x: (B, C, H, W) -> (B, dv, H, W)``.
    """

    def __init__(self, dim: int, *, value_channels: Optional[int] = None, key_channels: Optional[int] = None,
                 heads: int = 8, span=16, qkv_bias: bool = False, proj: bool = True, fused: bool = True,
                 device=None, dtype=None):
        super().__init__()
        fk = dict(device=device, dtype=dtype)
        self.dim = check_int("dim", dim)
        dv = dim if value_channels is None else check_int("value_channels", value_channels)
        if dv % heads:
            raise ValueError(f"value_channels={dv} is not divisible by heads={heads}")
        self.value_channels = dv
        self.fused = bool(fused)
        self.span = check_pair("span", span, 1)
        self.kernel_gen = RelativeAttentionKernel(dim, self.span, heads=heads, key_channels=key_channels,
                                                 qkv_bias=qkv_bias, **fk)
        self.value = nn.Conv2d(dim, dv, 1, bias=qkv_bias, **fk)
        self.proj = nn.Conv2d(dv, dv, 1, **fk) if proj else nn.Identity()

    def window_for(self, height: int, width: int):
        """The clamp window of an (height, width) input (global when both sides <= span)."""
        return span_window(self.span, height, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, dv, H, W)."""
        if x.dim() != 4 or x.shape[1] != self.dim:
            raise ValueError(f"{type(self).__name__} expects x of shape (B, {self.dim}, H, W), got {tuple(x.shape)}")
        win = self.window_for(x.shape[2], x.shape[3])
        if self.fused:
            q, k = self.kernel_gen.query_key(x, win)
            return self.proj(self.kernel_gen.fused_attention(q, k, self.value(x), win))
        w = self.kernel_gen(x, win)
        return self.proj(_aggregate(self.value(x), w, win))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, value_channels={self.value_channels}, span={self.span}"
                + ("" if self.fused else ", fused=False"))


class AttentionAugmentedConv(nn.Module):
    """Attention-augmented convolution (Bello et al., ICCV 2019): a K x K convolution to
    C_out - dv channels concatenated with :class:`GlobalAttention` to dv channels.

    With stride s the attention reads the input average-pooled by s (ceil mode), so that both
    branches have ceil(H/s) x ceil(W/s) pixels; the clamp window needs stride 1.

    Args:
        dim: C (input and output channels).
        kernel_size, stride, dilation: of the convolution.
        value_channels, key_channels: dv and dk of the attention.
        heads, span, fused: of the attention (:class:`GlobalAttention`).

    Shapes: ``x: (B, C, H, W) -> (B, C, ceil(H/s), ceil(W/s))``; output channels
    ``[0, C - dv)`` are the convolution's, ``[C - dv, C)`` the attention's.
    """

    def __init__(self, dim: int, *, kernel_size=3, stride: int = 1, dilation: int = 1, value_channels: int,
                 key_channels: int, heads: int = 8, span=16, fused: bool = True, device=None, dtype=None):
        super().__init__()
        fk = dict(device=device, dtype=dtype)
        self.dim = check_int("dim", dim)
        if not 0 < value_channels < dim:
            raise ValueError(f"value_channels={value_channels} must be in [1, dim={dim})")
        ks = check_pair("kernel_size", kernel_size, 1)
        pad = (dilation * (ks[0] // 2), dilation * (ks[1] // 2))
        self.conv = nn.Conv2d(dim, dim - value_channels, ks, stride, pad, dilation=dilation, bias=False, **fk)
        self.pool = stride_pool(stride)
        self.attention = GlobalAttention(dim, value_channels=value_channels, key_channels=key_channels, heads=heads,
                                         span=span, qkv_bias=True, fused=fused, **fk)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, ceil(H/s), ceil(W/s))."""
        return torch.cat([self.conv(x), self.attention(self.pool(x))], dim=1)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class AxialAttention(nn.Module):
    """Axial attention (Axial-DeepLab, Wang et al., ECCV 2020): attention along each column
    (window ``(min(S, H), 1)``), then along each row (``(1, min(S, W))``), clamp border, both
    with the paper's relative terms on queries, keys and values (:class:`AxialKernel`), then
    an average pool by the stride (ceil mode), as the official ``AxialBlock``'s
    ``hight_block``/``width_block``.

    Each axis: ``qkv = bn_qkv(conv1x1(x))`` split per group into q, k (d/2 channels) and v (d);
    ``w = softmax_t(bn(q.k) + bn(q.r_q) + bn(k.r_k))``;
    ``out = bn_out_v(aggregate(v, w)) + bn_out_e(sum_t w * r_v)``.

    Args:
        dim: C.
        heads: groups (the official ``groups``), dividing C with an even group width.
        span: S, the axis length at the *input* of each axis block; the relative tables have
            2*S - 1 rows (the official ``kernel_size``).
        stride: average-pool after the width block.
        dilation: of the windows (1 in the official model).

    Shapes: ``x: (B, C, H, W) -> (B, C, ceil(H/s), ceil(W/s))``.
    """

    def __init__(self, dim: int, *, heads: int = 8, span=56, stride: int = 1, dilation: int = 1,
                 device=None, dtype=None):
        super().__init__()
        fk = dict(device=device, dtype=dtype)
        self.dim = check_int("dim", dim)
        self.span = check_pair("span", span, 1)
        self.dilation = check_int("dilation", dilation)
        self.height = AxialKernel(dim, self.span[0], axis="height", heads=heads, **fk)
        self.width = AxialKernel(dim, self.span[1], axis="width", heads=heads, **fk)
        self.pool = stride_pool(check_int("stride", stride))

    def _axis(self, gen: AxialKernel, x: torch.Tensor, axes: str) -> torch.Tensor:
        H, W = x.shape[2], x.shape[3]
        span = (gen.span, 1) if axes == "h" else (1, gen.span)
        win = span_window(span, H, W, self.dilation, axes)
        q, k, v = gen.split_qkv(x)
        w = gen.attention(q, k, win, H, W)
        return gen.output(_aggregate(v, w, win), gen.value_embedding(w, win, H, W))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, ceil(H/s), ceil(W/s))."""
        if x.dim() != 4 or x.shape[1] != self.dim:
            raise ValueError(f"{type(self).__name__} expects x of shape (B, {self.dim}, H, W), got {tuple(x.shape)}")
        return self.pool(self._axis(self.width, self._axis(self.height, x, "h"), "w"))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, span={self.span}, dilation={self.dilation}"


__all__ = ["GlobalAttention", "AttentionAugmentedConv", "AxialAttention"]

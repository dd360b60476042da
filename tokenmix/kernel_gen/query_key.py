"""``query_key``: local self-attention weights, ``softmax_t(q.k_t / sqrt(d) + b_t)``."""

from __future__ import annotations

import torch
from torch import nn

from ..ops.functional import correlate
from ._position import masked_softmax, offset_index, strided_queries
from .._args import check_int
from .base import KernelGenerator, resolve_groups
from .registry import register_kernel_gen


@register_kernel_gen("query_key")
class QueryKeyKernel(KernelGenerator):
    """Local self-attention as a kernel generator (heads = groups).

    ``w[b,h,t,i,j] = softmax_t(q[b,h,:,i,j] . k[b,h,:,src_t(i,j)] / sqrt(d) + bias[h, dy_t, dx_t])``
    with q, k 1x1 projections of x, d = C / heads, and (``rel_pos``) a learned bias per head
    and *true* relative offset (dy, dx) (``Window.relative_offset``: right near the border of
    a clamp window too), a (heads, 2Kh-1, 2Kw-1) table. Out-of-image taps of a zero-border
    window are -inf before the softmax. With stride s, queries are computed at the strided
    positions ``x[..., ::s, ::s]`` (the output pixels' centres); keys at every pixel.

    Args:
        channels: C.
        kernel_size: K.
        stride: s, the stride of the windows it serves (queries at the strided positions).
        heads: number of heads (= groups G), dividing C.
        qkv_bias: bias in the q and k projections.
        rel_pos: learn the relative position bias.

    Shapes: ``forward(x: (B, C, H, W), window) -> (B, heads, K*K, Ho, Wo)``.
    """

    def __init__(self, channels: int, kernel_size=7, *, stride: int = 1, heads: int = 8, qkv_bias: bool = False,
                 rel_pos: bool = True, device=None, dtype=None):
        super().__init__()
        heads = check_int("heads", heads)
        G = resolve_groups(channels, heads, None, what="heads")
        self._setup(channels, G, kernel_size, stride)
        self.heads = heads
        self.head_dim = channels // heads
        self.scale = self.head_dim ** -0.5
        fk = dict(device=device, dtype=dtype)
        self.query = nn.Conv2d(channels, channels, 1, bias=qkv_bias, **fk)
        self.key = nn.Conv2d(channels, channels, 1, bias=qkv_bias, **fk)
        Kh, Kw = self.kernel_size
        if rel_pos:
            self.rel_pos = nn.Parameter(torch.empty(heads, 2 * Kh - 1, 2 * Kw - 1, **fk))
        else:
            self.register_parameter("rel_pos", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyTorch defaults for q, k; relative bias ~ N(0, 0.02) truncated at 2 std."""
        self.query.reset_parameters()
        self.key.reset_parameters()
        if self.rel_pos is not None:
            nn.init.trunc_normal_(self.rel_pos, std=0.02)

    def position_bias(self, window, height: int, width: int, device=None) -> torch.Tensor:
        """(1, heads, K*K, Ho|1, Wo|1) bias ``rel_pos[h, dy_t(i)+Kh-1, dx_t(j)+Kw-1]``."""
        ri, ci = offset_index(window, height, width, device=device)
        b = self.rel_pos[:, ri[:, None, :, None], ci[None, :, None, :]]  # (heads, Kh, Kw, Ho|1, Wo|1)
        return b.reshape(1, self.heads, window.taps, b.shape[-2], b.shape[-1])

    def logits(self, x: torch.Tensor, window) -> torch.Tensor:
        """Pre-softmax scores (B, heads, K*K, Ho, Wo); out-of-image taps are 0 (not yet masked)."""
        self.check_window(x, window)
        q = self.query(strided_queries(x, window)) * self.scale
        s = correlate(q, self.key(x), window, self.heads)
        if self.rel_pos is not None:
            s = s + self.position_bias(window, x.shape[2], x.shape[3], device=x.device)
        return s

    def forward(self, x: torch.Tensor, window) -> torch.Tensor:
        return masked_softmax(self.logits(x, window), window, x.shape[2], x.shape[3])

    def extra_repr(self) -> str:
        return super().extra_repr() + f", heads={self.heads}, rel_pos={self.rel_pos is not None}"

"""``query_key``: local self-attention weights, ``softmax_t(q.k_t / sqrt(d) + b_t)``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.functional import correlate, local_attention
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
        fused_qkv: one ``qkv = nn.Linear(C, 3C)`` projection applied as a 1x1 conv (NATTEN's
            layout: output channels [0, C) are q, [C, 2C) k, [2C, 3C) v, head h at channels
            h*d .. h*d+d-1 of each) instead of ``query``/``key``; the generator uses its q and k
            rows, and :meth:`split_qkv` gives a mixer all three from one projection.

    Shapes: ``forward(x: (B, C, H, W), window) -> (B, heads, K*K, Ho, Wo)``.
    """

    def __init__(self, channels: int, kernel_size=7, *, stride: int = 1, heads: int = 8, qkv_bias: bool = False,
                 rel_pos: bool = True, fused_qkv: bool = False, device=None, dtype=None):
        super().__init__()
        heads = check_int("heads", heads)
        G = resolve_groups(channels, heads, None, what="heads")
        self._setup(channels, G, kernel_size, stride)
        self.heads = heads
        self.head_dim = channels // heads
        self.scale = self.head_dim ** -0.5
        fk = dict(device=device, dtype=dtype)
        self.fused_qkv = bool(fused_qkv)
        if self.fused_qkv:
            self.qkv = nn.Linear(channels, 3 * channels, bias=qkv_bias, **fk)
        else:
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
        for m in (self.qkv,) if self.fused_qkv else (self.query, self.key):
            m.reset_parameters()
        if self.rel_pos is not None:
            nn.init.trunc_normal_(self.rel_pos, std=0.02)

    def position_bias(self, window, height: int, width: int, device=None) -> torch.Tensor:
        """(1, heads, K*K, Ho|1, Wo|1) bias ``rel_pos[h, dy_t(i)+Kh-1, dx_t(j)+Kw-1]``."""
        ri, ci = offset_index(window, height, width, device=device)
        b = self.rel_pos[:, ri[:, None, :, None], ci[None, :, None, :]]  # (heads, Kh, Kw, Ho|1, Wo|1)
        return b.reshape(1, self.heads, window.taps, b.shape[-2], b.shape[-1])

    def split_qkv(self, x: torch.Tensor, rows: int = 3):
        """Fused projection only: x (B, C, H, W) -> (q, k[, v]), each (B, C, H, W), from the
        first ``rows`` thirds of ``qkv`` (2: q and k only)."""
        if not self.fused_qkv:
            raise ValueError("split_qkv needs a generator built with fused_qkv=True")
        n = rows * self.channels
        bias = None if self.qkv.bias is None else self.qkv.bias[:n]
        return F.conv2d(x, self.qkv.weight[:n, :, None, None], bias).chunk(rows, dim=1)

    def scores(self, q: torch.Tensor, k: torch.Tensor, window, height: int, width: int) -> torch.Tensor:
        """Pre-softmax scores (B, heads, K*K, Ho, Wo) of projected queries ``q: (B, C, Ho, Wo)``
        (at the output pixels) against keys ``k: (B, C, H, W)``: ``q.k / sqrt(d)`` plus the
        relative position bias; out-of-image taps are 0 (not yet masked)."""
        s = correlate(q * self.scale, k, window, self.heads)
        if self.rel_pos is not None:
            s = s + self.position_bias(window, height, width, device=k.device)
        return s

    def attention(self, q: torch.Tensor, k: torch.Tensor, window, height: int, width: int) -> torch.Tensor:
        """The kernel (B, heads, K*K, Ho, Wo) from projected q and k (see :meth:`scores`)."""
        return masked_softmax(self.scores(q, k, window, height, width), window, height, width)

    def query_key(self, x: torch.Tensor, window):
        """Projected queries at the output pixels and keys: ``(q (B, C, Ho, Wo), k (B, C, H, W))``."""
        self.check_window(x, window)
        if self.fused_qkv:
            q, k = self.split_qkv(x, rows=2)
            return strided_queries(q, window), k
        return self.query(strided_queries(x, window)), self.key(x)

    def logits(self, x: torch.Tensor, window) -> torch.Tensor:
        """Pre-softmax scores (B, heads, K*K, Ho, Wo); out-of-image taps are 0 (not yet masked)."""
        q, k = self.query_key(x, window)
        return self.scores(q, k, window, x.shape[2], x.shape[3])

    def fused_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window) -> torch.Tensor:
        """The fused form (``docs/design.md``, "Fused forms"): ``aggregate(v, attention(q, k))``
        by :func:`tokenmix.ops.local_attention`, which never stores the kernel. q: (B, C, Ho, Wo)
        at the output pixels, k, v: (B, C, H, W) -> (B, C, Ho, Wo)."""
        rel = self.rel_pos
        if rel is not None and rel.dtype != q.dtype:
            rel = rel.to(q.dtype)
        if v.dtype != q.dtype:
            v = v.to(q.dtype)
        return local_attention(q, k, v, window, self.heads, scale=self.scale, rel_pos=rel)

    def forward(self, x: torch.Tensor, window) -> torch.Tensor:
        return masked_softmax(self.logits(x, window), window, x.shape[2], x.shape[3])

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", heads={self.heads}, rel_pos={self.rel_pos is not None}"
                + (", fused_qkv=True" if self.fused_qkv else ""))

"""``axial``: the attention weights of one axis of axial attention (Wang et al.,
"Axial-DeepLab", ECCV 2020), with the official ``AxialAttention``'s parameter layout."""

from __future__ import annotations

import torch
from torch import nn

from ..ops.functional import correlate
from ..ops.window import Window
from .._args import check_int
from .base import KernelGenerator
from .registry import register_kernel_gen

AXES = ("height", "width")


@register_kernel_gen("axial")
class AxialKernel(KernelGenerator):
    """One axis of axial attention: a window of K taps along ``axis`` (``(K, 1)`` for the
    height, ``(1, K)`` for the width; with the clamp border and K = the axis length every
    pixel attends its whole column / row).

    Parameters (the official layout, one set per axis): ``qkv`` 1x1 conv C -> 2C (no bias),
    ``bn_qkv`` over its 2C channels, ``bn_similarity`` over 3G channels, ``bn_output`` over 2C
    channels, ``relative`` (2d, 2S - 1) shared by the G groups (d = C / G; rows [0, d/2) are
    the query terms, [d/2, d) the key terms, [d, 2d) the value terms).

    Per group g, with q, k of d/2 channels and v of d (channels ``g*2d + [0, d/2)``,
    ``[d/2, d)``, ``[d, 2d)`` of ``bn_qkv(qkv(x))``), a query at position i, a tap t reading
    position j = src_t(i) along the axis, offset ``o = (j - i) / dilation``:

    ``w[g,t,i] = softmax_t( bn_qk(q_i . k_j) + bn_qr(q_i . r_q[-o]) + bn_kr(k_j . r_k[o]) )``,
    ``r_x[o] = relative[x rows, o + S - 1]``; no 1/sqrt(d) scaling (as the official code).

    :meth:`value_embedding` gives the value term ``sum_t w[g,t,i] * r_v[-o]`` and
    :meth:`output` ``bn_out(aggregate(v, w)) + bn_out(value term)`` (``bn_output``'s channel
    ``2c`` normalises the first, ``2c + 1`` the second, as the official interleaving).

    Args:
        channels: C.
        kernel_size: S, the span: the longest window (and axis) the relative table covers.
        axis: ``"height"`` or ``"width"``.
        heads: G (the official ``groups``), with C / G even.

    Shapes: ``forward(x: (B, C, H, W), window) -> (B, G, K, H, W)``.
    """

    def __init__(self, channels: int, kernel_size: int = 56, *, axis: str = "height", stride: int = 1,
                 heads: int = 8, device=None, dtype=None):
        super().__init__()
        if axis not in AXES:
            raise ValueError(f"axis must be one of {AXES}, got {axis!r}")
        heads = check_int("heads", heads)
        S = check_int("kernel_size", kernel_size)
        if channels % heads or (channels // heads) % 2:
            raise ValueError(f"axial attention splits each of heads={heads} groups into q, k (d/2) and v (d): "
                             f"channels={channels} / heads must be an even integer")
        if check_int("stride", stride) != 1:
            raise ValueError(f"the axial generator serves stride-1 windows (the mixer pools), got stride={stride}")
        self._setup(channels, heads, (S, 1) if axis == "height" else (1, S), 1)
        self.axis, self.span, self.heads, self.group_channels = axis, S, heads, channels // heads
        fk = dict(device=device, dtype=dtype)
        self.qkv = nn.Conv2d(channels, 2 * channels, 1, bias=False, **fk)
        self.bn_qkv = nn.BatchNorm2d(2 * channels, **fk)
        self.bn_similarity = nn.BatchNorm2d(3 * heads, **fk)
        self.bn_output = nn.BatchNorm2d(2 * channels, **fk)
        self.relative = nn.Parameter(torch.empty(2 * self.group_channels, 2 * S - 1, **fk))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """As the official code: qkv ~ N(0, 1/C), relative ~ N(0, 1/d), BN weight 1 / bias 0."""
        nn.init.normal_(self.qkv.weight, 0.0, self.channels ** -0.5)
        nn.init.normal_(self.relative, 0.0, self.group_channels ** -0.5)
        for bn in (self.bn_qkv, self.bn_similarity, self.bn_output):
            bn.reset_parameters()

    def check_window(self, x, window: Window) -> None:
        if not isinstance(window, Window):
            raise TypeError(f"window must be a tokenmix.ops.Window, got {type(window).__name__}")
        a = 0 if self.axis == "height" else 1
        if window.kernel_size[1 - a] != 1 or window.kernel_size[a] > self.span or window.stride != (1, 1):
            raise ValueError(f"the {self.axis} axial generator (span {self.span}) serves stride-1 windows of at most "
                             f"{self.span} taps along the {self.axis}, 1 across; got {window}")
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"{type(self).__name__} expects x of shape (B, {self.channels}, H, W), "
                             f"got {tuple(x.shape)}")

    def split_qkv(self, x: torch.Tensor):
        """x (B, C, H, W) -> q, k (B, C/2, H, W) and v (B, C, H, W), group-major channels."""
        B, _, H, W = x.shape
        G, d = self.heads, self.group_channels
        qkv = self.bn_qkv(self.qkv(x)).view(B, G, 2 * d, H, W)
        q, k, v = qkv.split([d // 2, d // 2, d], dim=2)
        return q.reshape(B, G * (d // 2), H, W), k.reshape(B, G * (d // 2), H, W), v.reshape(B, G * d, H, W)

    def _tables(self, window: Window, height: int, width: int, device):
        """Along the axis: source positions (K, L) and table columns of -o and +o (K, L)."""
        a = 0 if self.axis == "height" else 1
        src = window.source_index(height, width, device)[a]
        off = window.relative_offset(height, width, device)[a]
        o = torch.div(off, window.dilation[a], rounding_mode="floor")
        return src, (self.span - 1) - o, (self.span - 1) + o

    def attention(self, q: torch.Tensor, k: torch.Tensor, window: Window, height: int, width: int) -> torch.Tensor:
        """Softmax weights (B, G, K, H, W) from q and k of :meth:`split_qkv`."""
        B = q.shape[0]
        G, d2 = self.heads, self.group_channels // 2
        K = window.taps
        src, neg, pos = self._tables(window, height, width, q.device)
        qk = correlate(q, k, window, G)  # (B, G, K, H, W)
        q5, k5 = q.view(B, G, d2, height, width), k.view(B, G, d2, height, width)
        eq = self.relative[:d2][:, neg]           # (d/2, K, L)
        ek = self.relative[d2:2 * d2][:, pos]     # (d/2, K, L)
        if self.axis == "height":
            qr = torch.einsum("bgciw,cti->bgtiw", q5, eq)
            ks = k5.index_select(3, src.reshape(-1)).view(B, G, d2, K, height, width)
            kr = torch.einsum("bgctiw,cti->bgtiw", ks, ek)
        else:
            qr = torch.einsum("bgchj,ctj->bgthj", q5, eq)
            ks = k5.index_select(4, src.reshape(-1)).view(B, G, d2, height, K, width)
            kr = torch.einsum("bgchtj,ctj->bgthj", ks, ek)
        s = torch.cat([qk, qr, kr], dim=1).view(B, 3 * G, K, height * width)
        s = self.bn_similarity(s).view(B, 3, G, K, height, width).sum(1)
        return torch.softmax(s, dim=2)

    def value_embedding(self, w: torch.Tensor, window: Window, height: int, width: int) -> torch.Tensor:
        """The value term ``sum_t w[b,g,t,i] * r_v[-o_t(i)]``: (B, C, H, W)."""
        B = w.shape[0]
        _, neg, _ = self._tables(window, height, width, w.device)
        ev = self.relative[self.group_channels:][:, neg]  # (d, K, L)
        eq = "bgtiw,cti->bgciw" if self.axis == "height" else "bgthj,ctj->bgchj"
        return torch.einsum(eq, w, ev).reshape(B, self.channels, height, width)

    def output(self, sv: torch.Tensor, sve: torch.Tensor) -> torch.Tensor:
        """``bn_output`` on the interleaved (aggregate, value term) pairs, summed: (B, C, H, W)."""
        B, C, H, W = sv.shape
        y = self.bn_output(torch.stack([sv, sve.to(sv.dtype)], dim=2).view(B, 2 * C, H, W))
        return y.view(B, C, 2, H, W).sum(2)

    def forward(self, x: torch.Tensor, window: Window) -> torch.Tensor:
        self.check_window(x, window)
        q, k, _ = self.split_qkv(x)
        return self.attention(q, k, window, x.shape[2], x.shape[3])

    def extra_repr(self) -> str:
        return f"channels={self.channels}, axis={self.axis!r}, span={self.span}, heads={self.heads}"

"""``relative_attention``: multi-head attention weights with 2-D relative logits (Bello et al.,
"Attention Augmented Convolutional Networks", ICCV 2019), over any window; with a clamp
window as large as the image it is global self-attention."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from ..ops.functional import correlate, local_attention
from ..ops.window import Window
from .._args import check_int, check_pair
from ._position import masked_softmax, strided_queries
from .base import KernelGenerator
from .registry import register_kernel_gen


def span_window(span: Tuple[int, int], height: int, width: int, dilation=1, axes: str = "hw") -> Window:
    """The clamp window that attends as much of an (height, width) input as ``span`` allows:
    along each attended axis (``axes``: "h", "w" or "hw") ``K = min(span, L // d)`` taps with
    dilation d (d = 1 on an axis shorter than d), so with ``span >= L`` and d = 1 the window
    is the whole axis; an axis not attended has K = 1."""
    dil = check_pair("dilation", dilation, 1)
    height, width = int(height), int(width)  # a traced or symbolic size becomes a constant: one window per size
    ks, ds = [], []
    for a, L in enumerate((height, width)):
        if "hw"[a] not in axes:
            ks.append(1)
            ds.append(1)
            continue
        d = dil[a] if L >= dil[a] else 1
        ks.append(max(1, min(span[a], L // d)))
        ds.append(d)
    return Window(tuple(ks), dilation=tuple(ds), border="clamp")


def relative_index(window: Window, height: int, width: int, span: Tuple[int, int], sign: int = 1,
                   device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Table rows of each tap's true offset ``(rows (Kh, Ho|1), cols (Kw, Wo|1))`` for tables of
    ``2*span - 1`` entries: ``sign * offset / dilation + span - 1``. ValueError when an offset
    falls outside the table."""
    dy, dx = window.relative_offset(height, width, device=device)
    if window.border == "zero":
        dy, dx = dy[:, :1], dx[:, :1]
    out = []
    for a, (off, d, S) in enumerate(zip((dy, dx), window.dilation, span)):
        if window.border == "zero" and window.padding[a] % d:
            raise ValueError(f"relative logits need padding a multiple of the dilation; got {window}")
        idx = sign * torch.div(off, d, rounding_mode="floor") + (S - 1)
        if off.numel() and (window.kernel_size[a] - 1 > S - 1 or window.padding[a] > d * (S - 1)):
            raise ValueError(f"{window} reaches offsets beyond the relative tables of span {tuple(span)}")
        out.append(idx)
    return out[0], out[1]


@register_kernel_gen("relative_attention")
class RelativeAttentionKernel(KernelGenerator):
    """Multi-head attention weights with 2-D relative logits (AA-ResNet's attention).

    ``w[b,h,t,i,j] = softmax_t( (q[b,h,:,i,j] . k[b,h,:,src_t] + q[b,h,:,i,j] . (rel_h[dy_t] + rel_w[dx_t])) / sqrt(dkh) )``

    q, k: 1x1 projections C -> ``key_channels`` (dk), split into ``heads`` heads of dkh = dk /
    heads; ``rel_h`` (2*Sh - 1, dkh) and ``rel_w`` (2*Sw - 1, dkh) are shared by the heads and
    indexed by the tap's true offset / dilation (``Window.relative_offset``). ``kernel_size``
    is the span S: the windows it serves have at most S taps per axis; a clamp window of S >=
    the image side is global attention (see :func:`span_window`). Queries at the strided
    positions; out-of-image taps of a zero-border window masked.

    Args:
        channels: C.
        kernel_size: the span (Sh, Sw) of the relative tables.
        stride: s, the stride of the windows it serves.
        heads: Nh.
        key_channels: dk (default C), divisible by heads.
        qkv_bias: bias in the q and k projections.

    Shapes: ``forward(x: (B, C, H, W), window) -> (B, heads, Kh*Kw, Ho, Wo)``.
    """

    def __init__(self, channels: int, kernel_size=16, *, stride: int = 1, heads: int = 8,
                 key_channels: Optional[int] = None, qkv_bias: bool = False, device=None, dtype=None):
        super().__init__()
        heads = check_int("heads", heads)
        dk = channels if key_channels is None else check_int("key_channels", key_channels)
        if dk % heads:
            raise ValueError(f"key_channels={dk} is not divisible by heads={heads}")
        self._setup(channels, heads, kernel_size, stride)
        self.heads, self.key_channels, self.key_head_dim = heads, dk, dk // heads
        fk = dict(device=device, dtype=dtype)
        self.query = nn.Conv2d(channels, dk, 1, bias=qkv_bias, **fk)
        self.key = nn.Conv2d(channels, dk, 1, bias=qkv_bias, **fk)
        Sh, Sw = self.kernel_size
        self.rel_h = nn.Parameter(torch.empty(2 * Sh - 1, self.key_head_dim, **fk))
        self.rel_w = nn.Parameter(torch.empty(2 * Sw - 1, self.key_head_dim, **fk))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyTorch defaults for q, k; relative embeddings ~ N(0, 1/dkh)."""
        self.query.reset_parameters()
        self.key.reset_parameters()
        nn.init.normal_(self.rel_h, std=self.key_head_dim ** -0.5)
        nn.init.normal_(self.rel_w, std=self.key_head_dim ** -0.5)

    def check_kernel_size(self, window: Window) -> None:
        """Any window of at most ``span`` taps per axis (the relative tables' reach)."""
        if any(k > s for k, s in zip(window.kernel_size, self.kernel_size)):
            raise ValueError(f"{type(self).__name__} has relative tables for span={self.kernel_size}, "
                             f"got a window with kernel_size={window.kernel_size}")

    def relative_logits(self, q: torch.Tensor, window: Window, height: int, width: int):
        """The decomposed relative logits of scaled queries q (B, dk, Ho, Wo):
        ``(row (B, heads, Kh, Ho, Wo), col (B, heads, Kw, Ho, Wo))`` with ``row[b,h,a,i,j] =
        q[b,h,:,i,j] . rel_h[dy_a(i)]`` and ``col[b,h,b',i,j] = q[b,h,:,i,j] . rel_w[dx_b'(j)]``;
        tap (a, b') of the window gets ``row[a] + col[b']``."""
        B, _, Ho, Wo = q.shape
        ri, ci = relative_index(window, height, width, self.kernel_size, device=q.device)  # (Kh, Ho|1), (Kw, Wo|1)
        eh = self.rel_h[ri]  # (Kh, Ho|1, dkh)
        ew = self.rel_w[ci]  # (Kw, Wo|1, dkh)
        qh = q.reshape(B, self.heads, self.key_head_dim, Ho, Wo)
        if eh.shape[1] == 1:  # zero border: the same offsets for every pixel
            return (torch.einsum("bhcij,uc->bhuij", qh, eh[:, 0]), torch.einsum("bhcij,vc->bhvij", qh, ew[:, 0]))
        return torch.einsum("bhcij,uic->bhuij", qh, eh), torch.einsum("bhcij,vjc->bhvij", qh, ew)

    def scores(self, q: torch.Tensor, k: torch.Tensor, window: Window, height: int, width: int) -> torch.Tensor:
        """Pre-softmax scores (B, heads, K*K, Ho, Wo) of projected q (B, dk, Ho, Wo) and k
        (B, dk, H, W); out-of-image taps not yet masked."""
        q = q * self.key_head_dim ** -0.5
        s = correlate(q, k, window, self.heads)
        B, _, Ho, Wo = q.shape
        lh, lw = self.relative_logits(q, window, height, width)
        rel = (lh[:, :, :, None] + lw[:, :, None]).reshape(B, self.heads, window.taps, Ho, Wo)
        return s + rel

    def query_key(self, x: torch.Tensor, window: Window):
        """Projected queries at the output pixels and keys: ``(q (B, dk, Ho, Wo), k (B, dk, H, W))``."""
        self.check_window(x, window)
        return self.query(strided_queries(x, window)), self.key(x)

    def logits(self, x: torch.Tensor, window: Window) -> torch.Tensor:
        q, k = self.query_key(x, window)
        return self.scores(q, k, window, x.shape[2], x.shape[3])

    def fused_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: Window) -> torch.Tensor:
        """The fused form (``docs/design.md``, "Fused forms"): ``aggregate(v, softmax(scores))``
        by :func:`tokenmix.ops.local_attention`, which never stores the kernel; the relative
        logits enter as its per-pixel ``row_bias``/``col_bias`` (:meth:`relative_logits`).
        q: (B, dk, Ho, Wo) at the output pixels, k: (B, dk, H, W), v: (B, dv, H, W), dv
        divisible by heads -> (B, dv, Ho, Wo)."""
        q = q * self.key_head_dim ** -0.5
        row, col = self.relative_logits(q, window, k.shape[2], k.shape[3])
        if v.dtype != q.dtype:
            v = v.to(q.dtype)
        row, col = row.to(q.dtype), col.to(q.dtype)
        return local_attention(q, k, v, window, self.heads, scale=1.0, row_bias=row, col_bias=col)

    def forward(self, x: torch.Tensor, window: Window) -> torch.Tensor:
        return masked_softmax(self.logits(x, window), window, x.shape[2], x.shape[3])

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, heads={self.heads}, key_channels={self.key_channels}, "
                f"span={self.kernel_size}, stride={self.stride}")

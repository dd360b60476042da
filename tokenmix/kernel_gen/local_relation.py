"""``local_relation``: the local relation layer's aggregation weights (Hu, Zhang, Xie, Lin,
"Local Relation Networks for Image Recognition", ICCV 2019)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..ops.functional import correlate
from ._position import masked_softmax, strided_queries
from .._args import check_int
from .base import KernelGenerator, resolve_groups
from .registry import register_kernel_gen


@register_kernel_gen("local_relation")
class LocalRelationKernel(KernelGenerator):
    """Local relation weights: appearance composability plus a geometry prior, softmax over
    the window.

    ``w[b,g,t,i,j] = softmax_t( q[b,g,i,j] * k[b,g,src_t(i,j)] + geo[g, dy_t, dx_t] )``

    - **Channel sharing**: one aggregation weight per group of m channels (the paper's m,
      ``group_channels``, default 8), G = C / m.
    - **Key and query maps**: 1x1 convs C -> G (no bias), one scalar key and query per group
      and pixel; the appearance term is their product (the paper's composability
      ``q . k``). Queries at the strided positions ``x[..., ::s, ::s]``; keys at every pixel.
    - **Geometry prior**: a small MLP on the tap's relative position ``(dy, dx)`` (the true
      offset from the output pixel in input pixels, ``Window.relative_offset``):
      1x1 conv 2 -> ``geometry_hidden`` (default G/2, at least 1), ReLU, 1x1 conv -> G.
      For a zero-border window it is one (G, K*K) table shared by every pixel; for a clamp
      window it follows the offsets near the edges.
    - Out-of-image taps of a zero-border window are -inf before the softmax.

    Args:
        channels: C.
        kernel_size: K (the paper's 7).
        stride: s, the stride of the windows it serves.
        group_channels: m, channels per aggregation group (default 8); or ``groups`` (G).
        geometry_hidden: hidden width of the geometry MLP (default max(1, G // 2)).

    Shapes: ``forward(x: (B, C, H, W), window) -> (B, G, K*K, Ho, Wo)``.
    """

    def __init__(self, channels: int, kernel_size=7, *, stride: int = 1, groups: Optional[int] = None,
                 group_channels: Optional[int] = None, geometry_hidden: Optional[int] = None,
                 device=None, dtype=None):
        super().__init__()
        if groups is None and group_channels is None:
            group_channels = 8
        G = resolve_groups(channels, groups, group_channels)
        self._setup(channels, G, kernel_size, stride)
        hidden = max(1, G // 2) if geometry_hidden is None else check_int("geometry_hidden", geometry_hidden)
        self.geometry_hidden = hidden
        fk = dict(device=device, dtype=dtype)
        self.query = nn.Conv2d(channels, G, 1, bias=False, **fk)
        self.key = nn.Conv2d(channels, G, 1, bias=False, **fk)
        self.geometry = nn.Sequential(nn.Conv2d(2, hidden, 1, **fk), nn.ReLU(), nn.Conv2d(hidden, G, 1, **fk))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyTorch defaults of every conv."""
        for m in (self.query, self.key, self.geometry[0], self.geometry[2]):
            m.reset_parameters()

    def geometry_prior(self, window, height: int, width: int, dtype=None, device=None) -> torch.Tensor:
        """The geometry term ``(1, G, K*K, Ho|1, Wo|1)`` from the taps' true offsets (input
        pixels): the same for every pixel of a zero-border window."""
        dy, dx = window.relative_offset(height, width, device=device)  # (Kh, Ho), (Kw, Wo)
        if window.border == "zero":
            dy, dx = dy[:, :1], dx[:, :1]
        Kh, Ho = dy.shape
        Kw, Wo = dx.shape
        shape = (Kh, Kw, Ho, Wo)
        pos = torch.stack([dy[:, None, :, None].expand(shape), dx[None, :, None, :].expand(shape)])  # (2, Kh, Kw, Ho, Wo)
        pos = pos.to(dtype=self.geometry[0].weight.dtype if dtype is None else dtype)
        g = self.geometry(pos.reshape(1, 2, Kh * Kw, Ho * Wo))  # (1, G, K*K, Ho*Wo)
        return g.reshape(1, self.groups, Kh * Kw, Ho, Wo)

    def logits(self, x: torch.Tensor, window) -> torch.Tensor:
        """Pre-softmax scores (B, G, K*K, Ho, Wo); out-of-image taps not yet masked."""
        self.check_window(x, window)
        q = self.query(strided_queries(x, window))
        k = self.key(x)
        a = correlate(q, k, window, self.groups)
        return a + self.geometry_prior(window, x.shape[2], x.shape[3], dtype=a.dtype, device=x.device)

    def forward(self, x: torch.Tensor, window) -> torch.Tensor:
        return masked_softmax(self.logits(x, window), window, x.shape[2], x.shape[3])

    def extra_repr(self) -> str:
        return super().extra_repr() + f", geometry_hidden={self.geometry_hidden}"

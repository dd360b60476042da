"""``positional``: positional-only attention of stand-alone self-attention,
``softmax_t(q . r_t)`` with learned relative embeddings r and no keys."""

from __future__ import annotations

import torch
from torch import nn

from ._position import masked_softmax, offset_index, strided_queries
from .._args import check_int
from .base import KernelGenerator, resolve_groups
from .registry import register_kernel_gen


@register_kernel_gen("positional")
class PositionalKernel(KernelGenerator):
    """Positional-only local attention (Ramachandran et al., 2019, the "positional" ablation).

    ``w[b,h,t,i,j] = softmax_t(q[b,h,:,i,j] . r_h[dy_t, dx_t])``, ``r_h[dy, dx] =
    concat(row_h[dy] (d/2), col_h[dx] (d/2))``, d = C / heads (even), one row and one column
    table per head indexed by the true offset / dilation (2K-1 entries each). No scaling (as
    the paper writes it). Queries at the strided positions, out-of-image taps masked.

    Args:
        channels: C.
        kernel_size: K.
        stride: s, the stride of the windows it serves (queries at the strided positions).
        heads: heads (= groups), dividing C with an even head dim.
        qkv_bias: bias in the q projection.

    Shapes: ``forward(x: (B, C, H, W), window) -> (B, heads, K*K, Ho, Wo)``.
    """

    def __init__(self, channels: int, kernel_size=7, *, stride: int = 1, heads: int = 8, qkv_bias: bool = False,
                 device=None, dtype=None):
        super().__init__()
        heads = check_int("heads", heads)
        G = resolve_groups(channels, heads, None, what="heads")
        self._setup(channels, G, kernel_size, stride)
        self.heads = heads
        self.head_dim = d = channels // heads
        if d % 2:
            raise ValueError(f"positional attention splits the head dim into row and column halves: "
                             f"channels={channels} / heads={heads} = {d} must be even")
        fk = dict(device=device, dtype=dtype)
        Kh, Kw = self.kernel_size
        self.query = nn.Conv2d(channels, channels, 1, bias=qkv_bias, **fk)
        self.rel_rows = nn.Parameter(torch.empty(heads, d // 2, 2 * Kh - 1, **fk))
        self.rel_cols = nn.Parameter(torch.empty(heads, d // 2, 2 * Kw - 1, **fk))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyTorch default for q; embeddings ~ N(0, 1/d) so that q . r is O(1)."""
        self.query.reset_parameters()
        nn.init.normal_(self.rel_rows, std=self.head_dim ** -0.5)
        nn.init.normal_(self.rel_cols, std=self.head_dim ** -0.5)

    def logits(self, x: torch.Tensor, window) -> torch.Tensor:
        """Pre-softmax scores ``q . r_t``: (B, heads, K*K, Ho, Wo)."""
        self.check_window(x, window)
        q = self.query(strided_queries(x, window))
        B, _, Ho, Wo = q.shape
        h, d2 = self.heads, self.head_dim // 2
        q = q.view(B, h, 2, d2, Ho, Wo)
        # scores against every table entry, then pick each tap's true offset
        qr = torch.einsum("bhcij,hcn->bhnij", q[:, :, 0], self.rel_rows)  # (B, h, 2Kh-1, Ho, Wo)
        qc = torch.einsum("bhcij,hcn->bhnij", q[:, :, 1], self.rel_cols)  # (B, h, 2Kw-1, Ho, Wo)
        ri, ci = offset_index(window, x.shape[2], x.shape[3], device=x.device)  # (Kh, Ho|1), (Kw, Wo|1)
        Kh, Kw = window.kernel_size
        lr = torch.gather(qr, 2, ri.view(1, 1, Kh, -1, 1).expand(B, h, Kh, Ho, Wo))
        lc = torch.gather(qc, 2, ci.view(1, 1, Kw, 1, -1).expand(B, h, Kw, Ho, Wo))
        return (lr[:, :, :, None] + lc[:, :, None]).reshape(B, h, Kh * Kw, Ho, Wo)

    def forward(self, x: torch.Tensor, window) -> torch.Tensor:
        return masked_softmax(self.logits(x, window), window, x.shape[2], x.shape[3])

    def extra_repr(self) -> str:
        return super().extra_repr() + f", heads={self.heads}"

"""``patch``: involution whose kernel at (i, j) is generated from a P x P neighborhood."""

from __future__ import annotations

from typing import Optional

from torch import nn

from .._args import check_int
from .bottleneck import BottleneckKernel
from .registry import register_kernel_gen


@register_kernel_gen("patch")
class PatchKernel(BottleneckKernel):
    """Patch-conditioned involution kernel: ``bottleneck`` with the reduce conv widened to
    P x P (padding P//2): pool by the stride -> P x P conv C -> C/r (no bias) -> BN -> ReLU ->
    1x1 conv -> G*K*K. With stride s the P x P patch is taken on the pooled grid. P = 1 is
    exactly ``bottleneck`` (same submodule names and shapes, so state dicts load across).

    Args: as :class:`BottleneckKernel`, plus ``patch_size`` P (odd, default 3).

    Shapes: ``forward(x: (B, C, H, W), window) -> (B, G, K*K, ceil(H/s), ceil(W/s))``.
    """

    def __init__(self, channels: int, kernel_size=7, *, stride: int = 1, patch_size: int = 3,
                 groups: Optional[int] = None, group_channels: Optional[int] = None, reduction: int = 4,
                 device=None, dtype=None):
        super().__init__(channels, kernel_size, stride=stride, groups=groups, group_channels=group_channels,
                         reduction=reduction, device=device, dtype=dtype)
        P = check_int("patch_size", patch_size)
        if P % 2 == 0:
            raise ValueError(f"patch_size must be odd (a patch centred on the pixel), got patch_size={patch_size}")
        self.patch_size = P
        if P > 1:
            hidden = self.reduce.out_channels
            self.reduce = nn.Conv2d(channels, hidden, P, padding=P // 2, bias=False, device=device, dtype=dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", patch_size={self.patch_size}"

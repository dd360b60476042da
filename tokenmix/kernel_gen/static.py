"""``static``: learned (G, K*K) weights shared by every pixel (convolution-like)."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .base import KernelGenerator, resolve_groups
from .registry import register_kernel_gen


@register_kernel_gen("static")
class StaticKernel(KernelGenerator):
    """Spatially-agnostic kernel: one learned K*K filter per group.

    With ``groups = channels`` (the default) ``aggregate(x, w, window)`` is a depthwise
    convolution with ``nn.Conv2d(C, C, K, groups=C)`` weights ``weight.view(C, 1, Kh, Kw)``.

    Args:
        channels: C.
        kernel_size: K (int or (Kh, Kw)).
        stride: s, the stride of the windows it serves.
        groups: G (default C: depthwise); or ``group_channels`` = C / G.

    Shapes: ``forward(x: (B, C, H, W), window) -> (1, G, K*K, 1, 1)``.
    """

    def __init__(self, channels: int, kernel_size=7, *, stride: int = 1, groups: Optional[int] = None,
                 group_channels: Optional[int] = None, device=None, dtype=None):
        super().__init__()
        if groups is None and group_channels is None:
            groups = channels
        G = resolve_groups(channels, groups, group_channels)
        self._setup(channels, G, kernel_size, stride)
        Kh, Kw = self.kernel_size
        self.weight = nn.Parameter(torch.empty(G, Kh * Kw, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Conv2d``'s default for a depthwise filter: U(-1/sqrt(K*K), 1/sqrt(K*K))."""
        bound = 1.0 / math.sqrt(self.weight.shape[1])
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x: torch.Tensor, window) -> torch.Tensor:
        self.check_window(x, window)
        return self.weight.view(1, self.groups, -1, 1, 1)

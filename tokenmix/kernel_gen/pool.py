"""``pool``: PoolFormer's token mixer as a static kernel, average over the in-image taps minus
the centre tap."""

from __future__ import annotations

import torch

from .base import KernelGenerator, check_odd_kernel
from .registry import register_kernel_gen


@register_kernel_gen("pool")
class PoolKernel(KernelGenerator):
    """Average pooling over the taps that fall inside the image (``count_include_pad=False``),
    optionally minus the input (PoolFormer, Yu et al. 2022): no parameters, one kernel shared by
    every channel (G = 1) and every image, which varies only near the border where fewer taps
    are inside::

        w[t, i, j] = valid[t, i, j] / n_valid[i, j] - (t == centre)

    so that ``aggregate(x, w, window)`` is ``nn.AvgPool2d(K, s, K//2, count_include_pad=False)(x)
    - x[..., ::s, ::s]``, PoolFormer's ``pool(x) - x`` at stride 1.

    Args:
        channels: C (only checked against the input).
        kernel_size: K (odd).
        stride: s, the stride of the windows it serves.
        subtract_input: subtract the centre tap (PoolFormer); False gives plain average pooling.

    Shapes: ``forward(x: (B, C, H, W), window) -> (1, 1, K*K, Ho, Wo)``.
    """

    def __init__(self, channels: int, kernel_size=3, *, stride: int = 1, subtract_input: bool = True,
                 device=None, dtype=None):
        super().__init__()
        check_odd_kernel(kernel_size, "the pooled window needs a centre tap")
        self._setup(channels, 1, kernel_size, stride)
        self.subtract_input = bool(subtract_input)

    def reset_parameters(self) -> None:
        """Nothing to initialise (no parameters)."""

    def forward(self, x: torch.Tensor, window) -> torch.Tensor:
        self.check_window(x, window)
        if any(p != d * (k // 2) for p, d, k in zip(window.padding, window.dilation, window.kernel_size)):
            raise ValueError(f"the pool kernel's centre tap is the output pixel only with the default padding; "
                             f"got {window}")
        valid = window.valid_mask(x.shape[2], x.shape[3], device=x.device).to(x.dtype)  # (K*K, Ho, Wo)
        w = valid / valid.sum(0, keepdim=True)
        if self.subtract_input:
            taps = torch.arange(window.taps, device=x.device)
            w = w - (taps == window.taps // 2).to(w.dtype).view(-1, 1, 1)  # the centre tap reads x itself
        return w.unsqueeze(0).unsqueeze(0)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", subtract_input={self.subtract_input}"

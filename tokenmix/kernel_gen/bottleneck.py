"""``bottleneck``: the involution kernel generator (Li et al., CVPR 2021, official RedNet).

avg-pool by the stride (kernel branch only) -> 1x1 conv C -> C/r (no bias) -> BN -> ReLU ->
1x1 conv C/r -> G*K*K (with bias); span output channel ``g*K*K + t`` is tap t of group g.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .._args import check_int
from .base import KernelGenerator, resolve_groups
from .registry import register_kernel_gen


class CeilAvgPool2d(nn.Module):
    """``nn.AvgPool2d(s, s, ceil_mode=True)``; inside ``torch.export`` (and so an ONNX export)
    the same values, bitwise, computed in a form that keeps the height and width symbolic
    (:meth:`export_form`).

    x: (B, C, H, W) -> (B, C, ceil(H/s), ceil(W/s)).
    """

    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_exporting():
            return self.export_form(x)
        return F.avg_pool2d(x, self.stride, self.stride, ceil_mode=True)

    def export_form(self, x: torch.Tensor) -> torch.Tensor:
        """Zero-pad the bottom/right by s - 1, sum each s x s window, divide by the number of
        in-image pixels it covers. (The pooling op's ceil mode drops a last window that would
        start outside the input, a condition export cannot decide for a symbolic size; with
        stride = kernel no window starts outside. The padding s - 1 makes the output size
        ``(H - 1) // s + 1``, the form of the aggregation's output size, so export can match
        the two.) Not the eager form: autograd would keep the padded copy for the backward."""
        s = self.stride
        H, W = x.shape[-2:]
        total = F.avg_pool2d(F.pad(x, (0, s - 1, 0, s - 1)), s, s, divisor_override=1)
        Ho, Wo = total.shape[-2:]
        rows = (H - s * torch.arange(Ho, device=x.device, dtype=x.dtype)).clamp(max=s)  # pixels per window row
        cols = (W - s * torch.arange(Wo, device=x.device, dtype=x.dtype)).clamp(max=s)
        return total / (rows[:, None] * cols[None, :])

    def extra_repr(self) -> str:
        return f"stride={self.stride}"


def stride_pool(stride: int) -> nn.Module:
    """:class:`CeilAvgPool2d` (``nn.AvgPool2d(s, s, ceil_mode=True)``) for s > 1, else
    ``nn.Identity``.

    Ceil mode gives ceil(H/s) rows, the aggregation's output size, also for odd H (the last,
    partial window averages the pixels it covers); for H divisible by s it is the official
    ``nn.AvgPool2d(s, s)`` exactly."""
    return CeilAvgPool2d(stride) if stride > 1 else nn.Identity()


@register_kernel_gen("bottleneck")
class BottleneckKernel(KernelGenerator):
    """Involution's kernel generator, official semantics; no normalisation of the kernel.

    Submodules (names fixed: checkpoints map onto them): ``pool``, ``reduce``, ``norm``,
    ``act``, ``span``.

    Args:
        channels: C.
        kernel_size: K.
        stride: s; the kernel branch is average-pooled by s so one kernel per output pixel.
        group_channels: channels per group (default 16), G = C / group_channels; or ``groups``.
        reduction: r, the bottleneck width is C // r (default 4).

    Shapes: ``forward(x: (B, C, H, W), window) -> (B, G, K*K, ceil(H/s), ceil(W/s))``.
    """

    def __init__(self, channels: int, kernel_size=7, *, stride: int = 1, groups: Optional[int] = None,
                 group_channels: Optional[int] = None, reduction: int = 4, device=None, dtype=None):
        super().__init__()
        if groups is None and group_channels is None:
            group_channels = 16
        G = resolve_groups(channels, groups, group_channels)
        self._setup(channels, G, kernel_size, stride)
        self.reduction = check_int("reduction", reduction)
        hidden = channels // self.reduction
        if hidden < 1:
            raise ValueError(f"channels // reduction must be >= 1, got channels={channels}, reduction={reduction}")
        fk = dict(device=device, dtype=dtype)
        self.pool = stride_pool(self.stride)
        self.reduce = nn.Conv2d(channels, hidden, 1, bias=False, **fk)
        self.norm = nn.BatchNorm2d(hidden, **fk)
        self.act = nn.ReLU(inplace=False)
        self.span = nn.Conv2d(hidden, G * self.kernel_size[0] * self.kernel_size[1], 1, bias=True, **fk)

    def reset_parameters(self) -> None:
        """PyTorch defaults of the convs; BN weight 1, bias 0, running stats reset."""
        self.reduce.reset_parameters()
        self.norm.reset_parameters()
        self.span.reset_parameters()

    def _check_size(self, Ho: int, Wo: int, window, input_hw) -> None:
        expect = window.output_size(*input_hw)
        if (Ho, Wo) != tuple(expect):
            raise ValueError(f"{type(self).__name__}: kernel branch gives {(Ho, Wo)} pixels but the window "
                             f"{window} gives output {expect} for input {tuple(input_hw)}; build the generator "
                             f"with the window's stride (stride={self.stride})")

    def span_kernel(self, h: torch.Tensor, window, input_hw) -> torch.Tensor:
        """(B, hidden, Ho', Wo') features -> kernel (B, G, K*K, Ho, Wo), checking the size."""
        w = self.span(self.act(self.norm(h)))
        B, _, Ho, Wo = w.shape
        self._check_size(Ho, Wo, window, input_hw)
        return w.view(B, self.groups, window.taps, Ho, Wo)

    def forward(self, x: torch.Tensor, window) -> torch.Tensor:
        self.check_window(x, window)
        return self.span_kernel(self.reduce(self.pool(x)), window, x.shape[2:])

    def linear_form(self, x: torch.Tensor, window):
        """The fused form (``docs/design.md``, "Fused generators"): ``(h, weight, bias)`` with
        ``forward(x, window) == (weight @ h + bias).view(B, G, K*K, Ho, Wo)``: h (B, C/r, Ho, Wo)
        the features before ``span``, weight (G*K*K, C/r) and bias (G*K*K,) span's parameters
        (views, so gradients reach them). None when ``span`` is not a plain 1x1 convolution."""
        span = self.span
        if (type(span) is not nn.Conv2d or span.kernel_size != (1, 1) or span.groups != 1
                or span.stride != (1, 1) or span.padding != (0, 0) or span.dilation != (1, 1)
                or span._forward_hooks or span._forward_pre_hooks):
            return None
        self.check_window(x, window)
        h = self.act(self.norm(self.reduce(self.pool(x))))
        self._check_size(h.shape[2], h.shape[3], window, x.shape[2:])
        return h, span.weight.view(span.out_channels, span.in_channels), span.bias

    def extra_repr(self) -> str:
        return super().extra_repr() + f", reduction={self.reduction}"

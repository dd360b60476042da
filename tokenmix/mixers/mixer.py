"""``Mixer``: a kernel generator + the shared aggregation op (+ value and output projections)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .._args import check_int
from ..ops.functional import aggregate, aggregate_linear, autocast_dtype
from ..ops.window import Window


def _reset(m: nn.Module) -> None:
    """Call ``m.reset_parameters()`` if it has one, else recurse into the children."""
    if hasattr(m, "reset_parameters"):
        m.reset_parameters()
    else:
        for c in m.children():
            _reset(c)


class Mixer(nn.Module):
    """Spatial token mixer ``y = proj(aggregate(value(x), generator(x, window), window) + bias)``.

    Args:
        dim: C, channels of the input and of the output.
        generator: a kernel generator (``tokenmix.kernel_gen``): ``forward(x, window)`` returns
            ``w: (B|1, G, K*K, Ho|1, Wo|1)`` with G dividing C.
        window: the :class:`~tokenmix.ops.Window` geometry (kernel size, stride, dilation, border).
        value: module applied to x before aggregation, (B, C, H, W) -> (B, C, H, W); default
            ``nn.Identity`` (involution, depthwise conv); the v projection of attention.
        proj: module applied after aggregation, (B, C, Ho, Wo) -> (B, C', Ho, Wo); default identity.
        bias: add a learned per-channel bias after aggregation (default False).
        fused: use the generator's fused form where it offers one (a ``linear_form(x, window)``
            method returning ``(h, weight, bias)``: the kernel is ``weight @ h + bias``, and
            :func:`~tokenmix.ops.aggregate_linear` runs without storing it); False always runs
            the composed path ``aggregate(value(x), generator(x))``.
            Both paths have the same parameters and ``state_dict``.

    Shapes: ``x: (B, C, H, W) -> (B, C, Ho, Wo)``, ``(Ho, Wo) = window.output_size(H, W)``.
    """

    def __init__(self, dim: int, generator: nn.Module, window: Window, value: Optional[nn.Module] = None,
                 proj: Optional[nn.Module] = None, *, bias: bool = False, fused: bool = True,
                 device=None, dtype=None):
        super().__init__()
        self.fused = bool(fused)
        self.dim = check_int("dim", dim)
        if not isinstance(generator, nn.Module):
            raise TypeError(f"generator must be an nn.Module, got {type(generator).__name__}")
        if not isinstance(window, Window):
            raise TypeError(f"window must be a tokenmix.ops.Window, got {type(window).__name__}: {window!r}")
        self.generator = generator
        self.window = window
        self.value = nn.Identity() if value is None else value
        self.proj = nn.Identity() if proj is None else proj
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.dim, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    def reset_parameters(self) -> None:
        """Re-initialise generator, value and proj (each with its own ``reset_parameters``); bias 0."""
        for m in (self.generator, self.value, self.proj):
            _reset(m)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        """The generated kernel ``w: (B|1, G, K*K, Ho|1, Wo|1)`` for ``x: (B, C, H, W)``."""
        return self.generator(x, self.window)

    def linear_form(self, x: torch.Tensor):
        """``(h, weight, bias)`` of the generator's fused form (its ``linear_form(x, window)``,
        ``docs/design.md``, "Fused generators") when ``self.fused`` and the generator offers
        one, else None (the composed path)."""
        if not self.fused:
            return None
        form = getattr(self.generator, "linear_form", None)
        return form(x, self.window) if callable(form) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, Ho, Wo)."""
        if x.dim() != 4 or x.shape[1] != self.dim:
            raise ValueError(f"{type(self).__name__} expects x of shape (B, {self.dim}, H, W), got {tuple(x.shape)}")
        form = self.linear_form(x)
        if form is not None:  # the kernel is a linear map of features: never stored
            h, weight, bias = form
            v = self.value(x)
            if autocast_dtype(v.device) is None:  # under autocast, aggregate_linear casts to its dtype
                h, weight = h.to(v.dtype), weight.to(v.dtype)
                bias = None if bias is None else bias.to(v.dtype)
            y = aggregate_linear(v, h, weight, bias, self.window)
        else:
            w = self.generator(x, self.window)
            v = self.value(x)
            if w.dtype != v.dtype and autocast_dtype(v.device) is None:
                w = w.to(v.dtype)  # under autocast, aggregate casts both to the autocast dtype itself
            y = aggregate(v, w, self.window)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype).view(1, -1, 1, 1)
        return self.proj(y)

    def extra_repr(self) -> str:
        win = self.window
        s = (f"dim={self.dim}, kernel_size={win.kernel_size}, stride={win.stride}, "
             f"dilation={win.dilation}, border={win.border!r}")
        G = getattr(self.generator, "groups", None)
        if G is not None:
            s += f", groups={G}"
        return s + f", bias={self.bias is not None}"

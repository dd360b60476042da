"""``AttentionMixer``: the mixer of the attention presets, a :class:`Mixer` that also runs a
fused qkv projection (one matmul for q, k and v, NATTEN's layout) and, optionally, NATTEN's
(< 0.20) zero padding of inputs smaller than the window."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from tokenmix.ops import Window, aggregate

from .mixer import Mixer


class AttentionMixer(Mixer):
    """Local attention ``y = proj(aggregate(v, softmax(q.k / sqrt(d) + b), window))``.

    With a ``query_key`` generator built with ``fused_qkv=True``, q, k and v come from the
    generator's one ``qkv`` projection (``value`` must then be None); otherwise from the
    generator's q/k projections and ``value``, exactly as :class:`Mixer`.

    With ``fused=True`` (the default) and a generator that offers a fused attention form
    (``query_key(x, window)`` and ``fused_attention(q, k, v, window)``, as ``query_key`` does),
    the output is ``generator.fused_attention(q, k, v, window)``: the fused op
    :func:`tokenmix.ops.local_attention`, which never stores the scores or the kernel, not in
    the forward nor for the backward. ``fused=False`` runs the composed path. Both have the same
    parameters; :meth:`kernel` returns the full kernel either way.

    ``pad_to_window`` (clamp border only): an input smaller than ``K * dilation`` along an axis
    is zero-padded at the bottom/right to that size before the projections and the output is
    cropped back, as NATTEN's ``NeighborhoodAttention2D`` did before 0.20 (the padded pixels are
    keys and values of the projections of 0, i.e. their biases). Without it such an input is a
    ValueError, as for every clamp window.

    Shapes: ``x: (B, C, H, W) -> (B, C, Ho, Wo)``, ``(Ho, Wo) = window.output_size(H, W)``.
    """

    def __init__(self, dim: int, generator: nn.Module, window: Window, value: Optional[nn.Module] = None,
                 proj: Optional[nn.Module] = None, *, pad_to_window: bool = False, bias: bool = False,
                 fused: bool = True, device=None, dtype=None):
        super().__init__(dim, generator, window, value, proj, bias=bias, fused=fused, device=device, dtype=dtype)
        self.fused_qkv = bool(getattr(generator, "fused_qkv", False))
        if self.fused_qkv and value is not None:
            raise ValueError("a generator with fused_qkv=True computes v itself; pass value=None")
        if pad_to_window and window.border != "clamp":
            raise ValueError(f"pad_to_window=True is for the clamp border (neighborhood attention), got {window}")
        self.pad_to_window = bool(pad_to_window)

    def _padding(self, height: int, width: int):
        if not self.pad_to_window:
            return 0, 0
        (kh, kw), (dh, dw) = self.window.kernel_size, self.window.dilation
        return max(0, kh * dh - height), max(0, kw * dw - width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, Ho, Wo)."""
        if x.dim() != 4 or x.shape[1] != self.dim:
            raise ValueError(f"{type(self).__name__} expects x of shape (B, {self.dim}, H, W), got {tuple(x.shape)}")
        H, W = x.shape[2], x.shape[3]
        ph, pw = self._padding(H, W)
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        fused = self.fused and callable(getattr(self.generator, "fused_attention", None))
        if self.fused_qkv:
            q, k, v = self.generator.split_qkv(x)
            sh, sw = self.window.stride
            q = q[:, :, ::sh, ::sw]
        elif fused:
            (q, k), v = self.generator.query_key(x, self.window), self.value(x)
        if fused:
            y = self.generator.fused_attention(q, k, v, self.window)
        else:
            if self.fused_qkv:
                w = self.generator.attention(q, k, self.window, x.shape[2], x.shape[3])
            else:
                w, v = self.generator(x, self.window), self.value(x)
            if w.dtype != v.dtype and not torch.is_autocast_enabled(v.device.type):
                w = w.to(v.dtype)  # under autocast, aggregate casts both to the autocast dtype itself
            y = aggregate(v, w, self.window)
        if ph or pw:
            y = y[:, :, :H, :W]
        if self.bias is not None:
            y = y + self.bias.to(y.dtype).view(1, -1, 1, 1)
        return self.proj(y)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", fused_qkv=True" if self.fused_qkv else "") + \
            (", pad_to_window=True" if self.pad_to_window else "")


__all__ = ["AttentionMixer"]

"""Relative-position index maps shared by the attention generators."""

from __future__ import annotations

from typing import Tuple

import torch

from ..ops.window import Window


def check_relative_window(window: Window) -> None:
    """The offset tables have 2K-1 entries per axis, indexed by the true offset / dilation;
    ValueError for a zero-border padding that makes offsets fall outside or between entries."""
    window.check_relative_offsets("relative positions need")


def offset_index(window: Window, height: int, width: int, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Table indices of the true offsets: ``(rows (Kh, Ho|1), cols (Kw, Wo|1))`` in
    ``[0, 2K-2]``, ``index = offset / dilation + K - 1``. For the zero border every output
    pixel has the same offsets, so the spatial dim is 1."""
    check_relative_window(window)
    dy, dx = window.relative_offset(height, width, device=device)
    (Kh, Kw), (dh, dw) = window.kernel_size, window.dilation
    if window.border == "zero":
        dy, dx = dy[:, :1], dx[:, :1]
    return torch.div(dy, dh, rounding_mode="floor") + (Kh - 1), torch.div(dx, dw, rounding_mode="floor") + (Kw - 1)


def masked_softmax(logits: torch.Tensor, window: Window, height: int, width: int) -> torch.Tensor:
    """Softmax over the taps (dim 2) of ``logits: (B, G, K*K, Ho, Wo)``, with out-of-image
    taps of a zero-border window set to -inf first (they take no probability mass)."""
    if window.border == "zero" and any(window.padding):
        valid = window.valid_mask(height, width, device=logits.device)
        logits = logits.masked_fill(~valid, float("-inf"))
    return torch.softmax(logits, dim=2)


def strided_queries(x: torch.Tensor, window: Window) -> torch.Tensor:
    """x: (B, C, H, W) -> x at the window's output centres ``x[..., ::sh, ::sw]``: (B, C, Ho, Wo).
    Output i of the window is centred on input ``i*s`` (default padding), so queries are
    computed at the strided positions (subsampling; no pooling)."""
    sh, sw = window.stride
    q = x[:, :, ::sh, ::sw] if (sh, sw) != (1, 1) else x
    Ho, Wo = window.output_size(x.shape[2], x.shape[3])
    if q.shape[2:] != (Ho, Wo):
        raise ValueError(f"queries at the strided positions have size {tuple(q.shape[2:])} but {window} "
                         f"gives output {(Ho, Wo)} for input {tuple(x.shape[2:])}; use the default padding")
    return q

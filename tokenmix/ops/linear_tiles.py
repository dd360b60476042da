"""``aggregate_linear`` composed of a backend's three primitives, one image at a time: the
generated kernel ``w = weight @ h + bias`` exists for one image only (the default of
:class:`~tokenmix.ops.Backend`, so every backend runs the fused op; the reference backend's
is the float64 oracle of the tests).

Weights of taps that no output pixel reads inside the image (zero border: a tap row or column
that falls outside the image for every output pixel) are never read: their rows of ``weight``
and ``bias`` are replaced by 0 before use, so a NaN or inf there cannot reach the output or a
gradient.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from .window import Window


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for an input dtype (float32 for the 16-bit floats)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def read_taps(window: Window, H: int, W: int, device=None) -> Optional[Tensor]:
    """(K*K,) bool: the taps some output pixel reads inside an H x W image; None when all are."""
    rows, cols = window.source_index(H, W, device=device)
    used = (rows >= 0).any(1)[:, None] & (cols >= 0).any(1)[None, :]
    used = used.reshape(-1)
    return None if bool(used.all()) else used


def masked_parameters(weight: Tensor, bias: Optional[Tensor], window: Window, H: int,
                      W: int) -> Tuple[Tensor, Optional[Tensor]]:
    """weight (G*K*K, M) and bias (G*K*K,) with the rows of never-read taps set to 0."""
    used = read_taps(window, H, W, weight.device)
    if used is None:
        return weight, bias
    used = used.repeat(weight.shape[0] // window.taps)
    weight = torch.where(used[:, None], weight, torch.zeros((), dtype=weight.dtype, device=weight.device))
    if bias is not None:
        bias = torch.where(used, bias, torch.zeros((), dtype=bias.dtype, device=bias.device))
    return weight, bias


def image_kernel(h: Tensor, weight: Tensor, bias: Optional[Tensor], window: Window) -> Tensor:
    """The kernel of one image: h (1, M, Ho, Wo) -> w (1, G, K*K, Ho, Wo) = weight @ h + bias."""
    _, M, Ho, Wo = h.shape
    w = weight @ h.reshape(M, Ho * Wo)
    if bias is not None:
        w = w + bias[:, None]
    return w.reshape(1, weight.shape[0] // window.taps, window.taps, Ho, Wo)


def forward(backend, x: Tensor, h: Tensor, weight: Tensor, bias: Optional[Tensor], window: Window) -> Tensor:
    """y (B, C, Ho, Wo) = aggregate(x, weight @ h + bias), image by image, through ``backend``."""
    H, W = x.shape[2:]
    weight, bias = masked_parameters(weight, bias, window, H, W)
    cd = compute_dtype(x.dtype)
    wc, bc = weight.to(cd), None if bias is None else bias.to(cd)
    ys = [backend.aggregate(x[b:b + 1], image_kernel(h[b:b + 1].to(cd), wc, bc, window).to(x.dtype), window)
          for b in range(x.shape[0])]
    return torch.cat(ys, 0)


def backward(backend, grad_y: Tensor, x: Tensor, h: Tensor, weight: Tensor, bias: Optional[Tensor],
             window: Window, output_mask: Sequence[bool]):
    """(dx, dh, dweight, dbias), None where ``output_mask`` (x, h, weight, bias) is False or
    the bias is absent; the kernel recomputed image by image."""
    B, C, H, W = x.shape
    M, Ho, Wo = h.shape[1:]
    rows = weight.shape[0]
    G = rows // window.taps
    need_x, need_h, need_weight, need_bias = (bool(m) for m in output_mask)
    need_bias = need_bias and bias is not None
    weight, bias = masked_parameters(weight, bias, window, H, W)
    cd = compute_dtype(x.dtype)
    wc, bc = weight.to(cd), None if bias is None else bias.to(cd)
    dx = torch.empty_like(x) if need_x else None
    dh = torch.empty(B, M, Ho, Wo, dtype=cd, device=x.device) if need_h else None
    dweight = torch.zeros(rows, M, dtype=cd, device=x.device) if need_weight else None
    dbias = torch.zeros(rows, dtype=cd, device=x.device) if need_bias else None
    for b in range(B):
        gy, xb, hb = grad_y[b:b + 1], x[b:b + 1], h[b:b + 1].to(cd)
        if need_x:
            w = image_kernel(hb, wc, bc, window).to(x.dtype)
            dx[b:b + 1] = backend.aggregate_transpose(gy, w, window, (H, W))
        if need_h or need_weight or need_bias:
            gw = backend.correlate(gy, xb, window, G).to(cd).reshape(rows, Ho * Wo)
            if need_h:
                dh[b] = (wc.t() @ gw).reshape(M, Ho, Wo)
            if need_weight:
                dweight += gw @ hb.reshape(M, Ho * Wo).t()
            if need_bias:
                dbias += gw.sum(1)
    return (dx, None if dh is None else dh.to(h.dtype), None if dweight is None else dweight.to(weight.dtype),
            None if dbias is None else dbias.to(bias.dtype))

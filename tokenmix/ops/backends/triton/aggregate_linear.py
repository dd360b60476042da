"""Triton kernel of the forward of ``aggregate_linear`` (``docs/design.md``, "The fused op
aggregate_linear"), then its launcher.

``y[b, c, i, j] = sum_t w[b, g(c), t, i, j] * x[b, c, src_t(i, j)]`` with
``w[b, g, t, i, j] = sum_m weight[g*K*K + t, m] * h[b, m, i, j] + bias[g*K*K + t]``

Each program generates the weights of its pixels tap by tap in registers and uses them at once:
the kernel is never written to memory. The backward runs the backend's primitives one image at
a time (:mod:`tokenmix.ops.linear_tiles`).

This module imports Triton at import time; it is only imported by the Triton backend once it
is used, never by ``import tokenmix``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import acc_dtype, channel_tile, check_plane, linear_pixel_tile
from .device import clamp_start, split_program, tile_channels, tile_pixels

_RUNTIME_INTS = (
    "C", "H", "W", "Ho", "Wo", "Cg", "G", "M", "n_cblk", "n_pblk", "sh", "sw", "dh", "dw", "ph", "pw",
)


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def aggregate_linear_kernel(
    x_ptr, h_ptr, wt_ptr, bias_ptr, y_ptr,
    C, H, W, Ho, Wo, Cg, G, M, n_cblk, n_pblk,
    sh, sw, dh, dw, ph, pw,
    KH: tl.constexpr, KW: tl.constexpr, CLAMP: tl.constexpr, ACC: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """One program computes a ``BLOCK_C x BLOCK_P`` tile of ``y`` (``BLOCK_C`` channels of one
    group g by ``BLOCK_P`` consecutive output pixels of image b; grid and program order as
    ``aggregate_kernel``). Per tap t it first generates the tap's weights of its pixels,
    ``sum_m weight[g*K*K + t, m] * h[b, m, p] (+ bias)``, over M in chunks of ``BLOCK_M``
    (``BLOCK_M x BLOCK_P`` feature loads, mostly cache hits after the first tap), sets them to 0
    where the tap falls outside the image (so a NaN or inf generated there is never used), then
    accumulates ``w * x`` as ``aggregate_kernel`` does. Offsets inside one plane are int32."""
    pblk, cblk, g, b = split_program(tl.program_id(0), n_pblk, n_cblk, G)
    offs_p, mask_p, i, j = tile_pixels(pblk, BLOCK_P, Ho, Wo)
    mask_c, bc = tile_channels(cblk, BLOCK_C, b, g, C, Cg)
    x_rows = (x_ptr + bc * H * W)[:, None]
    mask_c2 = mask_c[:, None]
    h_img = h_ptr + b * M * Ho * Wo
    offs_m = tl.arange(0, BLOCK_M)
    if CLAMP:
        h0 = clamp_start(i, H, KH, dh)
        w0 = clamp_start(j, W, KW, dw)
    else:
        h0 = i * sh - ph
        w0 = j * sw - pw
    row0 = g.to(tl.int64) * (KH * KW)  # weight row of tap 0 of group g
    acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=ACC)
    for u in range(KH):
        hs = h0 + u * dh
        if CLAMP:
            m_h = mask_p
        else:
            m_h = mask_p & (hs >= 0) & (hs < H)
        hs = hs * W
        for v in tl.static_range(KW):
            ws = w0 + v * dw
            if CLAMP:
                m = m_h
            else:
                m = m_h & (ws >= 0) & (ws < W)
            row = row0 + u * KW + v
            wv = tl.zeros([BLOCK_P], dtype=ACC)
            for m0 in range(0, M, BLOCK_M):
                mm = m0 + offs_m
                mask_m = mm < M
                wrow = tl.load(wt_ptr + row * M + mm, mask=mask_m, other=0.0).to(ACC)
                feats = tl.load(h_img + (mm * Ho * Wo)[:, None] + offs_p[None, :],
                                mask=mask_m[:, None] & mask_p[None, :], other=0.0).to(ACC)
                wv += tl.sum(wrow[:, None] * feats, axis=0)
            if HAS_BIAS:
                wv += tl.load(bias_ptr + row).to(ACC)
            wv = tl.where(m, wv, 0.0)
            xv = tl.load(x_rows + (hs + ws)[None, :], mask=mask_c2 & m[None, :], other=0.0).to(ACC)
            acc += wv[None, :] * xv

    y_offs = (bc * Ho * Wo)[:, None] + offs_p[None, :]
    tl.store(y_ptr + y_offs, acc.to(y_ptr.dtype.element_ty), mask=mask_c[:, None] & mask_p[None, :])


FEATURE_TILE = 8  # BLOCK_M: features summed per step of the weight generation


def linear_tiles(pixels: int, cg: int, dtype: torch.dtype):
    """(BLOCK_C, BLOCK_P) of the kernel: aggregate's channel tile, fewer pixels
    (:func:`~tokenmix.ops.backends.triton.common.linear_pixel_tile`)."""
    block_c = channel_tile(cg)
    return block_c, linear_pixel_tile(pixels, block_c, dtype)


def aggregate_linear(x: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, bias, window) -> torch.Tensor:
    """Launch :func:`aggregate_linear_kernel`. x: (B, C, H, W), h: (B, M, Ho, Wo), weight
    (G*K*K, M), bias (G*K*K,) or None, all contiguous and of one dtype -> y: (B, C, Ho, Wo)."""
    B, C, H, W = x.shape
    M = h.shape[1]
    Ho, Wo = window.output_size(H, W)
    check_plane(H, W, Ho, Wo)
    y = torch.empty(B, C, Ho, Wo, dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    G = weight.shape[0] // window.taps
    Cg = C // G
    block_c, block_p = linear_tiles(Ho * Wo, Cg, x.dtype)
    n_cblk, n_pblk = -(-Cg // block_c), -(-(Ho * Wo) // block_p)
    grid = (B * G * n_cblk * n_pblk,)
    (Kh, Kw), (sh, sw), (dh, dw), (ph, pw) = window.kernel_size, window.stride, window.dilation, window.padding
    aggregate_linear_kernel[grid](
        x, h, weight, bias if bias is not None else weight, y,
        C, H, W, Ho, Wo, Cg, G, M, n_cblk, n_pblk,
        sh, sw, dh, dw, ph, pw,
        KH=Kh, KW=Kw, CLAMP=window.border == "clamp", ACC=acc_dtype(x.dtype), HAS_BIAS=bias is not None,
        BLOCK_C=block_c, BLOCK_P=block_p, BLOCK_M=FEATURE_TILE, num_warps=4, enable_fp_fusion=True,
    )
    return y

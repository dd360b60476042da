"""Triton kernels of ``aggregate_linear`` (``docs/design.md``, "The fused op aggregate_linear"):
the forward, the two kernels of the backward, then their launchers.

``y[b, c, i, j] = sum_t w[b, g(c), t, i, j] * x[b, c, src_t(i, j)]`` with
``w[b, g, t, i, j] = sum_m weight[g*K*K + t, m] * h[b, m, i, j] + bias[g*K*K + t]``

The kernel ``w`` is never written to memory: each program generates the values it needs tap
by tap in registers and uses them at once, in the forward and in the backward, which
recomputes them. The backward runs two kernels:

- ``aggregate_linear_dx_kernel``: ``dx``, a gather over input pixels as
  ``aggregate_transpose_kernel``, generating the kernel value of each (tap, output pixel) that
  reads the input pixel;
- ``aggregate_linear_dlinear_kernel``: the kernel's gradient
  ``gk[g, t, p] = sum_{c in g} dy[c, p] * x[c, src_t(p)]`` (as ``correlate_kernel``), tile by
  tile in registers, and from it ``dh = weight^T gk``, ``dweight = gk h^T`` and
  ``dbias = sum_p gk`` with ``tl.dot``.

This module imports Triton at import time; it is only imported by the Triton backend once it
is used, never by ``import tokenmix``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import acc_dtype, channel_tile, check_plane, clamp_candidates, dlinear_tiles, launchable, linear_pixel_tile
from .device import (channel_pixel_tile, clamp_reader, clamp_readers, linear_tap_weights, tap_source, tile_pixels,
                     window_start, zero_reader)

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
    g, b, offs_p, mask_p, i, j, mask_c, bc = channel_pixel_tile(n_pblk, n_cblk, G, C, Cg, Ho, Wo, BLOCK_C, BLOCK_P)
    x_rows = (x_ptr + bc * H * W)[:, None]
    mask_c2 = mask_c[:, None]
    h_img = h_ptr + b * M * Ho * Wo
    h0 = window_start(i, H, KH, sh, dh, ph, CLAMP)
    w0 = window_start(j, W, KW, sw, dw, pw, CLAMP)
    row0 = g.to(tl.int64) * (KH * KW)  # weight row of tap 0 of group g
    acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=ACC)
    for u in range(KH):
        hs, m_h = tap_source(h0, u, dh, H, mask_p, CLAMP, False)
        hs = hs * W
        for v in tl.static_range(KW):
            ws, m = tap_source(w0, v, dw, W, m_h, CLAMP, False)
            row = row0 + u * KW + v
            wv = linear_tap_weights(wt_ptr + row * M, h_img, offs_p, mask_p, M, Ho * Wo, ACC, BLOCK_M, BLOCK_P)
            if HAS_BIAS:
                wv += tl.load(bias_ptr + row).to(ACC)
            wv = tl.where(m, wv, 0.0)
            xv = tl.load(x_rows + (hs + ws)[None, :], mask=mask_c2 & m[None, :], other=0.0).to(ACC)
            acc += wv[None, :] * xv

    y_offs = (bc * Ho * Wo)[:, None] + offs_p[None, :]
    tl.store(y_ptr + y_offs, acc.to(y_ptr.dtype.element_ty), mask=mask_c[:, None] & mask_p[None, :])


_DX_INTS = _RUNTIME_INTS + ("NC_H", "NC_W")


@triton.jit(do_not_specialize=_DX_INTS)
def aggregate_linear_dx_kernel(
    dy_ptr, h_ptr, wt_ptr, bias_ptr, dx_ptr,
    C, H, W, Ho, Wo, Cg, G, M, n_cblk, n_pblk,
    sh, sw, dh, dw, ph, pw, NC_H, NC_W,
    KH: tl.constexpr, KW: tl.constexpr, CLAMP: tl.constexpr, ACC: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """``dx[b, c, q] = sum over (t, p) with src_t(p) = q of w[b, g(c), t, p] * dy[b, c, p]``: one
    program computes a ``BLOCK_C x BLOCK_P`` tile of ``dx`` (``BLOCK_C`` channels of one group g
    by ``BLOCK_P`` consecutive *input* pixels of image b; grid and program order as
    ``aggregate_transpose_kernel`` with the pixels of the ``H*W`` plane).

    Work per program: for each (tap, output pixel) that reads its input pixels, found as in
    ``aggregate_transpose_kernel`` (zero border: one output per tap, the KW taps of a tap row
    unrolled; clamp border: ``NC_H x NC_W`` candidates, each with its own tap), it generates
    the kernel value ``sum_m weight[g*K*K + t, m] * h[b, m, p] (+ bias)`` over M in chunks of
    ``BLOCK_M`` (a ``BLOCK_M x BLOCK_P`` gather of h), sets it to 0 where no output reads the
    pixel, and accumulates ``w * dy`` (a ``BLOCK_C x BLOCK_P`` gather of dy). Each kernel value
    is generated once per channel block (so once when ``C/G <= BLOCK_C``). Accumulation in
    float32 (float64 for float64 inputs)."""
    g, b, offs_p, mask_p, hh, ww, mask_c, bc = channel_pixel_tile(n_pblk, n_cblk, G, C, Cg, H, W, BLOCK_C, BLOCK_P)
    y_rows = (dy_ptr + bc * Ho * Wo)[:, None]
    mask_c2 = mask_c[:, None]
    h_img = h_ptr + b * M * Ho * Wo
    row0 = g.to(tl.int64) * (KH * KW)
    acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=ACC)
    if CLAMP:
        rows = clamp_readers(hh, H, KH, dh)
        cols = clamp_readers(ww, W, KW, dw)
        for n in range(NC_H):
            i, u, ok_h = clamp_reader(n, rows, KH, dh, mask_p)
            for n2 in range(NC_W):
                j, v, ok = clamp_reader(n2, cols, KW, dw, ok_h)
                o = tl.where(ok, i * Wo + j, 0)
                row = row0 + tl.where(ok, u * KW + v, 0)          # (BLOCK_P,): a tap per pixel
                wv = linear_tap_weights((wt_ptr + row * M)[None, :], h_img, o, ok, M, Ho * Wo, ACC, BLOCK_M,
                                        BLOCK_P)
                if HAS_BIAS:
                    wv += tl.load(bias_ptr + row, mask=ok, other=0.0).to(ACC)
                wv = tl.where(ok, wv, 0.0)
                yv = tl.load(y_rows + o[None, :], mask=mask_c2 & ok[None, :], other=0.0).to(ACC)
                acc += wv[None, :] * yv
    else:
        for u in range(KH):
            i, ok_h = zero_reader(hh, ph, u, dh, sh, Ho, mask_p)
            for v in tl.static_range(KW):
                j, ok = zero_reader(ww, pw, v, dw, sw, Wo, ok_h)
                o = tl.where(ok, i * Wo + j, 0)
                row = row0 + u * KW + v
                wv = linear_tap_weights(wt_ptr + row * M, h_img, o, ok, M, Ho * Wo, ACC, BLOCK_M, BLOCK_P)
                if HAS_BIAS:
                    wv += tl.load(bias_ptr + row).to(ACC)
                wv = tl.where(ok, wv, 0.0)
                yv = tl.load(y_rows + o[None, :], mask=mask_c2 & ok[None, :], other=0.0).to(ACC)
                acc += wv[None, :] * yv

    x_offs = (bc * H * W)[:, None] + offs_p[None, :]
    tl.store(dx_ptr + x_offs, acc.to(dx_ptr.dtype.element_ty), mask=mask_c[:, None] & mask_p[None, :])


_DLINEAR_INTS = (
    "C", "H", "W", "Ho", "Wo", "Cg", "G", "M", "M1", "n_pblk", "n_blk", "blk_per_prog", "sh", "sw", "dh", "dw",
    "ph", "pw",
)


@triton.jit(do_not_specialize=_DLINEAR_INTS)
def aggregate_linear_dlinear_kernel(
    dy_ptr, x_ptr, h_ptr, wt_ptr, dh_acc_ptr, part_acc_ptr,
    C, H, W, Ho, Wo, Cg, G, M, M1, n_pblk, n_blk, blk_per_prog,
    sh, sw, dh, dw, ph, pw,
    KH: tl.constexpr, KW: tl.constexpr, CLAMP: tl.constexpr, ACC: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr, TF32: tl.constexpr,
):
    """The gradients of the kernel generator: ``dh``, and per-program partial sums of
    ``dweight`` and ``dbias``.

    Grid: 1-D, one program per chunk of ``blk_per_prog`` consecutive pixel blocks of the
    flattened ``(B, n_pblk)`` blocks (``BLOCK_P`` consecutive output pixels of one image each).

    Work per program, for each of its pixel blocks and each group g: the kernel's gradient
    ``gk`` of all ``K*K`` taps (``BLOCK_T``, at least 16) by ``BLOCK_P`` pixels, as
    ``correlate_kernel`` (a loop over the group's channels: one dy load and one gathered x tile
    each), 0 on taps outside the image; then per chunk of ``BLOCK_M`` features two ``tl.dot``:
    ``dh[b, m, p] += weight[g*K*K + t, m]^T gk`` (the weight rows of taps no pixel of the block
    reads are not loaded, so a NaN there never reaches dh) into ``dh_acc`` (float32, float64 for
    float64), and ``gk h^T`` into the program's own ``(G*K*K, M1)`` rows of ``part_acc``; with
    ``HAS_BIAS`` column ``M`` holds ``sum_p gk`` (h extended by a feature of ones). Both are
    read-modify-write by their only writer (a barrier after each group orders the reuse);
    the launcher sums the partials over programs with ``torch.sum``: no atomics.
    Dots: with ``TF32`` (16-bit inputs) ``gk`` is rounded to the input dtype (as the composed
    backward rounds ``correlate``'s output) and the dots take tf32 operands, which hold every
    16-bit value exactly, with float32 accumulation (tensor cores); float32 dots use ``tf32x3``
    (three tf32 products, near float32 accuracy; the exact float32 FMA dots spilled on sm_80),
    float64 dots float64."""
    PRECISION: tl.constexpr = "tf32" if TF32 else ("ieee" if ACC == tl.float64 else "tf32x3")
    pid = tl.program_id(0)
    t = tl.arange(0, BLOCK_T)
    mask_t = t < KH * KW
    u = t // KW
    v = t % KW
    offs_m = tl.arange(0, BLOCK_M)
    part = part_acc_ptr + pid.to(tl.int64) * G * (KH * KW) * M1
    plane = Ho * Wo
    blk0 = pid * blk_per_prog
    for blk in range(blk0, tl.minimum(blk0 + blk_per_prog, n_blk)):
        b = (blk // n_pblk).to(tl.int64)
        offs_p, mask_p, i, j = tile_pixels(blk % n_pblk, BLOCK_P, Ho, Wo)
        hs, ok_h = tap_source(window_start(i, H, KH, sh, dh, ph, CLAMP)[None, :], u[:, None], dh, H,
                              mask_t[:, None] & mask_p[None, :], CLAMP, False)
        ws, valid = tap_source(window_start(j, W, KW, sw, dw, pw, CLAMP)[None, :], v[:, None], dw, W, ok_h,
                               CLAMP, False)
        x_offs = tl.where(valid, hs * W + ws, 0)          # (BLOCK_T, BLOCK_P) int32, inside one plane
        tap_read = tl.max(valid.to(tl.int32), axis=1) > 0  # (BLOCK_T,) taps some pixel of the block reads
        h_img = h_ptr + b * M * plane
        dh_img = dh_acc_ptr + b * M * plane
        for g in range(G):
            first = b * C + g * Cg                        # int64 index of the group's first channel
            dy_c = dy_ptr + first * plane
            x_c = x_ptr + first * H * W
            gk = tl.zeros([BLOCK_T, BLOCK_P], dtype=ACC)
            for c in range(Cg):
                dyv = tl.load(dy_c + offs_p, mask=mask_p, other=0.0).to(ACC)
                xv = tl.load(x_c + x_offs, mask=valid, other=0.0).to(ACC)
                gk += dyv[None, :] * xv
                dy_c += plane
                x_c += H * W
            gk = tl.where(valid, gk, 0.0)
            if TF32:  # rounded to the input dtype, then exact in tf32
                gk = gk.to(dy_ptr.dtype.element_ty).to(ACC)
            rows = g * (KH * KW) + t
            for m0 in range(0, M1, BLOCK_M):
                mm = m0 + offs_m
                in_m = mm < M
                feats = tl.load(h_img + (mm * plane)[None, :] + offs_p[:, None],
                                mask=mask_p[:, None] & in_m[None, :], other=0.0).to(ACC)  # (BLOCK_P, BLOCK_M)
                if HAS_BIAS:
                    feats = tl.where(mask_p[:, None] & (mm == M)[None, :], 1.0, feats)
                pp = part + rows[:, None] * M1 + mm[None, :]
                pm = mask_t[:, None] & (mm < M1)[None, :]
                d = tl.dot(gk, feats, input_precision=PRECISION, out_dtype=ACC)
                tl.store(pp, tl.load(pp, mask=pm, other=0.0) + d, mask=pm)
                wt = tl.load(wt_ptr + rows[None, :] * M + mm[:, None], mask=in_m[:, None] & tap_read[None, :],
                             other=0.0).to(ACC)                                      # (BLOCK_M, BLOCK_T)
                dp = dh_img + (mm * plane)[:, None] + offs_p[None, :]
                dm = in_m[:, None] & mask_p[None, :]
                d = tl.dot(wt, gk, input_precision=PRECISION, out_dtype=ACC)
                tl.store(dp, tl.load(dp, mask=dm, other=0.0) + d, mask=dm)
            tl.debug_barrier()  # the next group's loads of dh_acc follow this group's stores


FEATURE_TILE = 8  # BLOCK_M: features summed per step of the weight generation


def linear_tiles(pixels: int, cg: int, dtype: torch.dtype, clamp_dx: bool = False):
    """(BLOCK_C, BLOCK_P) of the forward and dx kernels: aggregate's channel tile, fewer pixels
    (:func:`~tokenmix.ops.backends.triton.common.linear_pixel_tile`)."""
    block_c = channel_tile(cg)
    return block_c, linear_pixel_tile(pixels, block_c, dtype, clamp_dx)

DOT_FEATURE_TILE = 16  # BLOCK_M of the dlinear kernel: features per tl.dot (its smallest dimension)


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


# Programs of the dlinear kernel at most: about two per SM of an H100 or A100 at its register
# use (one wave); each owns a (G*K*K, M+1) partial sum, so the partials take at most
# 256*G*K*K*(M+1) floats whatever the batch and image size (52 MB for G=16, K=7, M=64).
_PROGRAMS = 256


def aggregate_linear_backward(grad_y: torch.Tensor, x: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, bias,
                              window, output_mask):
    """Launch :func:`aggregate_linear_dx_kernel` (for dx) and
    :func:`aggregate_linear_dlinear_kernel` (for dh, dweight, dbias) as ``output_mask`` (x, h,
    weight, bias) asks. grad_y: (B, C, Ho, Wo), x: (B, C, H, W), h: (B, M, Ho, Wo), weight:
    (G*K*K, M), bias: (G*K*K,) or None, all contiguous and of one dtype -> (dx, dh, dweight,
    dbias), None where not asked for or the bias is absent. The dweight/dbias partial sums of
    the dlinear programs are added here with ``torch.sum`` (deterministic)."""
    B, C, H, W = x.shape
    M = h.shape[1]
    Ho, Wo = window.output_size(H, W)
    check_plane(H, W, Ho, Wo)
    KK = window.taps
    G = weight.shape[0] // KK
    Cg = C // G
    need_x, need_h, need_weight, need_bias = (bool(m) for m in output_mask)
    need_bias = need_bias and bias is not None
    (Kh, Kw), (sh, sw), (dh, dw), (ph, pw) = window.kernel_size, window.stride, window.dilation, window.padding
    geometry = (sh, sw, dh, dw, ph, pw)
    clamp = window.border == "clamp"
    acc = acc_dtype(x.dtype)
    dx = dh_out = dweight = dbias = None
    if need_x:
        dx = torch.empty_like(x)
        if dx.numel():
            block_c, block_p = linear_tiles(H * W, Cg, x.dtype, clamp)
            n_cblk, n_pblk = -(-Cg // block_c), -(-(H * W) // block_p)
            nc_h = clamp_candidates(H, Kh, dh) if clamp else 0
            nc_w = clamp_candidates(W, Kw, dw) if clamp else 0
            aggregate_linear_dx_kernel[(launchable(B * G * n_cblk * n_pblk),)](
                grad_y, h, weight, bias if bias is not None else weight, dx,
                C, H, W, Ho, Wo, Cg, G, M, n_cblk, n_pblk, *geometry, nc_h, nc_w,
                KH=Kh, KW=Kw, CLAMP=clamp, ACC=acc, HAS_BIAS=bias is not None,
                BLOCK_C=block_c, BLOCK_P=block_p, BLOCK_M=FEATURE_TILE, num_warps=4, enable_fp_fusion=True,
            )
    if need_h or need_weight or need_bias:
        acc_t = torch.float64 if x.dtype == torch.float64 else torch.float32
        block_t, block_p = dlinear_tiles(Ho * Wo, KK)
        n_pblk = -(-(Ho * Wo) // block_p)
        n_blk = B * n_pblk
        programs = max(1, min(n_blk, _PROGRAMS))
        per_prog = -(-n_blk // programs)
        programs = max(1, -(-n_blk // per_prog)) if n_blk else 1
        M1 = M + int(need_bias)
        dh_acc = torch.zeros(B, M, Ho, Wo, dtype=acc_t, device=x.device)
        part = torch.zeros(programs, G * KK, M1, dtype=acc_t, device=x.device)
        if n_blk and Cg and G:
            aggregate_linear_dlinear_kernel[(launchable(programs),)](
                grad_y, x, h, weight, dh_acc, part,
                C, H, W, Ho, Wo, Cg, G, M, M1, n_pblk, n_blk, per_prog, *geometry,
                KH=Kh, KW=Kw, CLAMP=clamp, ACC=acc, HAS_BIAS=need_bias,
                BLOCK_T=block_t, BLOCK_P=block_p, BLOCK_M=DOT_FEATURE_TILE,
                TF32=x.dtype in (torch.float16, torch.bfloat16), num_warps=4, enable_fp_fusion=True,
            )
        part = part.sum(0)
        dh_out = dh_acc.to(h.dtype) if need_h else None
        dweight = part[:, :M].to(weight.dtype) if need_weight else None
        dbias = part[:, M].to(bias.dtype) if need_bias else None
    return dx, dh_out, dweight, dbias

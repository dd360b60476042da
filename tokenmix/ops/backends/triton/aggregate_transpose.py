"""Triton kernel of ``aggregate_transpose`` (``docs/design.md``, "The op"), then its launcher.

The adjoint of ``aggregate`` in x, computed as a gather so that it is deterministic:
``x[b, c, h, w] = sum over (t, i, j) with src_t(i, j) = (h, w) of w[b, g(c), t, i, j] * y[b, c, i, j]``.

This module imports Triton at import time; it is only imported by
the Triton backend (:mod:`tokenmix.ops.backends.triton`) once it is used, never by ``import tokenmix``.
"""

from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from .common import acc_dtype, channel_pixel_grid, check_plane, clamp_candidates, weight_strides
from .device import clamp_reader, clamp_readers, reflect_index, split_program, tile_channels, tile_pixels, zero_reader


# Every integer argument is a plain runtime value (no specialisation on ==1 or %16), so one
# compiled variant per (K, border, dtype, tiles) serves every shape and geometry (pointers keep
# Triton's 16-byte alignment specialisation).
_RUNTIME_INTS = (
    "C", "H", "W", "Ho", "Wo", "Cg", "G", "n_cblk", "n_pblk", "w_sb", "w_sg", "w_st", "w_sp", "sh",
    "sw", "dh", "dw", "ph", "pw", "NC_H", "NC_W",
)


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def aggregate_transpose_kernel(
    y_ptr, w_ptr, x_ptr,
    C, H, W, Ho, Wo, Cg, G, n_cblk, n_pblk,
    w_sb, w_sg, w_st, w_sp,
    sh, sw, dh, dw, ph, pw, NC_H, NC_W,
    KH: tl.constexpr, KW: tl.constexpr, CLAMP: tl.constexpr, ACC: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, REFLECT: tl.constexpr,
):
    """One program computes a ``BLOCK_C x BLOCK_P`` tile of the result ``x``: ``BLOCK_C``
    channels of one group ``g`` times ``BLOCK_P`` consecutive *input* pixels of the flattened
    ``H*W`` plane of image ``b``, and sums everything that reads those pixels (a gather: every
    output element has one writer, no atomics).

    Grid: 1-D, ``B * G * n_cblk * n_pblk`` programs, ``n_cblk = cdiv(C/G, BLOCK_C)``,
    ``n_pblk = cdiv(H*W, BLOCK_P)``; program id = ``((b*G + g)*n_cblk + cblk)*n_pblk + pblk``.

    Work per program:
    - zero border: for each tap ``(u, v)`` (a loop over rows u, the KW taps of a row
      unrolled) the only output that can read input row
      ``h`` is ``i = (h + p - u*d) / s``, valid when the division is exact and ``0 <= i < Ho``
      (same for columns); one ``BLOCK_P`` weight gather, one ``BLOCK_C x BLOCK_P`` gather of
      ``y``, one FMA per element.
    - reflect border: as the zero border, for each of the (at most three) raw positions per
      axis that reflect to the pixel (``h``, ``-h``, ``2(H-1) - h``): 9 candidates per tap.
    - clamp border (stride 1): along an axis, the outputs whose window covers input ``h`` have
      ``i' = i // d`` in a contiguous range ``[lo, hi]`` of the sub-grid ``r = h mod d``, each
      through the single tap ``u = h // d - start'(i')``. The program loops ``NC_H x NC_W``
      candidates (the largest range length for this geometry, runtime arguments computed by
      the launcher), masked per pixel, with the same loads and FMA per candidate.
    Accumulation in float32 (float64 for float64 inputs); int64 image/plane offsets.
    """
    pblk, cblk, g, b = split_program(tl.program_id(0), n_pblk, n_cblk, G)

    offs_p, mask_p, h, w = tile_pixels(pblk, BLOCK_P, H, W)
    mask_c, bc = tile_channels(cblk, BLOCK_C, b, g, C, Cg)  # bc: (BLOCK_C,) int64 image-channel index
    y_rows = y_ptr + bc * Ho * Wo                 # (BLOCK_C,) plane pointers of y
    w_base = w_ptr + (b * w_sb + g.to(tl.int64) * w_sg)

    y_rows = y_rows[:, None]                      # hoisted broadcasts (fewer ops per tap)
    mask_c2 = mask_c[:, None]
    acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=ACC)
    if CLAMP:
        # per axis: sub-grid r, position h' in it, sub-grid length L_r, candidate range [lo, hi]
        rows = clamp_readers(h, H, KH, dh)
        cols = clamp_readers(w, W, KW, dw)
        for n in range(NC_H):
            i, u, ok_h = clamp_reader(n, rows, KH, dh, mask_p)
            for m in range(NC_W):
                j, v, ok = clamp_reader(m, cols, KW, dw, ok_h)
                o = tl.where(ok, i * Wo + j, 0)                      # output pixel (Wo = W)
                t = tl.where(ok, u * KW + v, 0)
                wv = tl.load(w_base + t.to(tl.int64) * w_st + o * w_sp, mask=ok, other=0.0).to(ACC)
                yv = tl.load(y_rows + o[None, :], mask=mask_c2 & ok[None, :], other=0.0).to(ACC)
                acc += wv[None, :] * yv
    elif REFLECT:
        # the raw positions that reflect to h: h itself, -h (h > 0) and 2(H-1) - h (h < H-1);
        # each is read by at most one output per tap, found as on the zero border. The taps are
        # loops (unrolling the 3 x 3 candidates of every tap spills registers), the candidates
        # of a tap unroll
        for u in range(KH):
            # the row candidates, as on the zero border
            i0, ok0 = zero_reader(h, ph, u, dh, sh, Ho, mask_p)
            i1, ok1 = zero_reader(-h, ph, u, dh, sh, Ho, mask_p & (h > 0))
            i2, ok2 = zero_reader(2 * (H - 1) - h, ph, u, dh, sh, Ho, mask_p & (h < H - 1))
            for v in range(KW):
                for c in tl.static_range(3):
                    rw = tl.where(c == 0, w, tl.where(c == 1, -w, 2 * (W - 1) - w))
                    ok_w = mask_p & ((c == 0) | ((c == 1) & (w > 0)) | ((c == 2) & (w < W - 1)))
                    j, ok_w = zero_reader(rw, pw, v, dw, sw, Wo, ok_w)
                    for a in tl.static_range(3):
                        i = i0 if a == 0 else (i1 if a == 1 else i2)
                        ok = ok_w & (ok0 if a == 0 else (ok1 if a == 1 else ok2))
                        o = tl.where(ok, i * Wo + j, 0)
                        wv = tl.load(w_base + (u * KW + v) * w_st + o * w_sp, mask=ok, other=0.0).to(ACC)
                        yv = tl.load(y_rows + o[None, :], mask=mask_c2 & ok[None, :], other=0.0).to(ACC)
                        acc += wv[None, :] * yv
    else:
        w_tap = w_base
        for u in range(KH):  # a loop; the KW taps of a row unroll
            i, ok_h = zero_reader(h, ph, u, dh, sh, Ho, mask_p)  # the output row i reading h
            for v in tl.static_range(KW):
                j, ok = zero_reader(w, pw, v, dw, sw, Wo, ok_h)
                o = tl.where(ok, i * Wo + j, 0)
                wv = tl.load(w_tap + o * w_sp, mask=ok, other=0.0).to(ACC)
                yv = tl.load(y_rows + o[None, :], mask=mask_c2 & ok[None, :], other=0.0).to(ACC)
                acc += wv[None, :] * yv
                w_tap += w_st

    x_offs = (bc * H * W)[:, None] + offs_p[None, :]
    tl.store(x_ptr + x_offs, acc.to(x_ptr.dtype.element_ty), mask=mask_c[:, None] & mask_p[None, :])


def aggregate_transpose(y: torch.Tensor, w: torch.Tensor, window, input_size: Tuple[int, int]) -> torch.Tensor:
    """Launch :func:`aggregate_transpose_kernel`. y: (B, C, Ho, Wo), w: (B|1, G, K*K, Ho|1, Wo|1),
    both contiguous, input_size (H, W) -> x: (B, C, H, W) in y's dtype."""
    B, C, Ho, Wo = y.shape
    H, W = input_size
    G = w.shape[1]
    Cg = C // G
    check_plane(H, W, Ho, Wo)
    x = torch.empty(B, C, H, W, dtype=y.dtype, device=y.device)
    if x.numel() == 0:
        return x
    BLOCK_C, BLOCK_P, n_cblk, n_pblk, grid = channel_pixel_grid(B, G, Cg, H * W, y.dtype)
    (Kh, Kw), (sh, sw), (dh, dw), (ph, pw) = window.kernel_size, window.stride, window.dilation, window.padding
    clamp = window.border == "clamp"
    nc_h = clamp_candidates(H, Kh, dh) if clamp else 0
    nc_w = clamp_candidates(W, Kw, dw) if clamp else 0
    aggregate_transpose_kernel[grid](
        y, w, x,
        C, H, W, Ho, Wo, Cg, G, n_cblk, n_pblk,
        *weight_strides(w),
        sh, sw, dh, dw, ph, pw, nc_h, nc_w,
        KH=Kh, KW=Kw, CLAMP=clamp, ACC=acc_dtype(y.dtype),
        BLOCK_C=BLOCK_C, BLOCK_P=BLOCK_P, REFLECT=window.border == "reflect", num_warps=4, enable_fp_fusion=True,
    )
    return x

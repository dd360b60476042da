"""Triton kernel of ``aggregate`` (``docs/design.md``, "The op"), then its launcher.

``y[b, c, i, j] = sum_t w[b, g(c), t, i, j] * x[b, c, src_t(i, j)]``

This module imports Triton at import time; it is only imported by
the Triton backend (:mod:`tokenmix.ops.backends.triton`) once it is used, never by ``import tokenmix``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import acc_dtype, channel_pixel_grid, check_plane, weight_strides
from .device import split_program, tap_source, tile_channels, tile_pixels, window_start


# Every integer argument is a plain runtime value (no specialisation on ==1 or %16), so one
# compiled variant per (K, border, dtype, tiles) serves every shape and geometry (pointers keep
# Triton's 16-byte alignment specialisation).
_RUNTIME_INTS = (
    "C", "H", "W", "Ho", "Wo", "Cg", "G", "n_cblk", "n_pblk", "w_sb", "w_sg", "w_st", "w_sp", "sh",
    "sw", "dh", "dw", "ph", "pw",
)


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def aggregate_kernel(
    x_ptr, w_ptr, y_ptr,
    C, H, W, Ho, Wo, Cg, G, n_cblk, n_pblk,
    w_sb, w_sg, w_st, w_sp,
    sh, sw, dh, dw, ph, pw,
    KH: tl.constexpr, KW: tl.constexpr, CLAMP: tl.constexpr, ACC: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, REFLECT: tl.constexpr,
):
    """One program computes a ``BLOCK_C x BLOCK_P`` tile of ``y``: ``BLOCK_C`` channels of one
    group ``g`` (so every weight value it loads is reused by ``BLOCK_C`` channels) times
    ``BLOCK_P`` consecutive output pixels of the flattened ``Ho*Wo`` plane of one image ``b``.

    Grid: 1-D, ``B * G * n_cblk * n_pblk`` programs with ``n_cblk = cdiv(C/G, BLOCK_C)`` and
    ``n_pblk = cdiv(Ho*Wo, BLOCK_P)``; program id = ``((b*G + g)*n_cblk + cblk)*n_pblk + pblk``
    (pixel tiles vary fastest).

    Work per program: for each of the ``KH*KW`` taps (a loop over the KH rows, the KW taps
    of a row unrolled), one ``BLOCK_P`` weight load and one ``BLOCK_C x BLOCK_P`` gathered input
    load, one FMA per element into a float32 (float64 for float64 inputs) accumulator; one
    store of the tile. Reads: ``KH*KW*(BLOCK_P + BLOCK_C*BLOCK_P)`` elements (mostly cache
    hits: neighbouring taps overlap), writes ``BLOCK_C*BLOCK_P``.

    The weight is addressed by strides ``(w_sb, w_sg, w_st, w_sp)``: ``w_sb = 0`` broadcasts it
    over the batch, ``w_sp = 0`` over space. Image/plane offsets are int64; offsets inside one
    ``H*W`` plane are int32 (the launcher checks a plane has < 2**31 elements).
    """
    pblk, cblk, g, b = split_program(tl.program_id(0), n_pblk, n_cblk, G)

    offs_p, mask_p, i, j = tile_pixels(pblk, BLOCK_P, Ho, Wo)
    mask_c, bc = tile_channels(cblk, BLOCK_C, b, g, C, Cg)  # bc: (BLOCK_C,) int64 image-channel index
    x_rows = x_ptr + bc * H * W                   # (BLOCK_C,) plane pointers
    w_tap = w_ptr + (b * w_sb + g.to(tl.int64) * w_sg)

    # the windows' starts (clamp: per axis, sub-grid r = i mod d, start' clamped into the sub-grid)
    h0 = window_start(i, H, KH, sh, dh, ph, CLAMP)
    w0 = window_start(j, W, KW, sw, dw, pw, CLAMP)

    x_rows = x_rows[:, None]                      # hoisted broadcasts (fewer ops per tap)
    mask_c2 = mask_c[:, None]
    w_pix = w_tap + offs_p * w_sp                 # (BLOCK_P,) weight pointers of tap 0
    acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=ACC)
    for u in range(KH):  # a loop (not unrolled: keeps K=7 compiles short); the KW taps unroll
        hs, m_h = tap_source(h0, u, dh, H, mask_p, CLAMP, REFLECT)
        hs = hs * W
        for v in tl.static_range(KW):
            ws, m = tap_source(w0, v, dw, W, m_h, CLAMP, REFLECT)
            # masked like the input: a tap outside the image never reads its weight
            wv = tl.load(w_pix, mask=m, other=0.0).to(ACC)
            xv = tl.load(x_rows + (hs + ws)[None, :], mask=mask_c2 & m[None, :], other=0.0).to(ACC)
            acc += wv[None, :] * xv
            w_pix += w_st

    y_offs = (bc * Ho * Wo)[:, None] + offs_p[None, :]
    tl.store(y_ptr + y_offs, acc.to(y_ptr.dtype.element_ty), mask=mask_c[:, None] & mask_p[None, :])


def aggregate(x: torch.Tensor, w: torch.Tensor, window) -> torch.Tensor:
    """Launch :func:`aggregate_kernel`. x: (B, C, H, W), w: (B|1, G, K*K, Ho|1, Wo|1), both
    contiguous -> y: (B, C, Ho, Wo) in x's dtype."""
    B, C, H, W = x.shape
    Ho, Wo = window.output_size(H, W)
    check_plane(H, W, Ho, Wo)
    y = torch.empty(B, C, Ho, Wo, dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    G = w.shape[1]
    Cg = C // G
    BLOCK_C, BLOCK_P, n_cblk, n_pblk, grid = channel_pixel_grid(B, G, Cg, Ho * Wo, x.dtype)
    (Kh, Kw), (sh, sw), (dh, dw), (ph, pw) = window.kernel_size, window.stride, window.dilation, window.padding
    aggregate_kernel[grid](
        x, w, y,
        C, H, W, Ho, Wo, Cg, G, n_cblk, n_pblk,
        *weight_strides(w),
        sh, sw, dh, dw, ph, pw,
        KH=Kh, KW=Kw, CLAMP=window.border == "clamp", ACC=acc_dtype(x.dtype),
        BLOCK_C=BLOCK_C, BLOCK_P=BLOCK_P, REFLECT=window.border == "reflect", num_warps=4, enable_fp_fusion=True,
    )
    return y

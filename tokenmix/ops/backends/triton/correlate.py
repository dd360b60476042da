"""Triton kernel of ``correlate`` (``docs/design.md``, "The op"), then its launcher.

``out[b, g, t, i, j] = sum_{c in g} q[b, c, i, j] * k[b, c, src_t(i, j)]`` (0 on invalid taps),
optionally summed over the batch and/or space (the gradient of a broadcast weight).

This module imports Triton at import time; it is only imported by
the Triton backend (:mod:`tokenmix.ops.backends.triton`) once it is used, never by ``import tokenmix``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import acc_dtype, launchable, score_tiles
from .device import score_tile, tap_pixel_tile

_FILL = 2048  # programs to aim for when summing over the batch (~16 per SM on an H100)


# Every integer argument is a plain runtime value (no specialisation on ==1 or %16), so one
# compiled variant per (K, border, dtype, tiles) serves every shape and geometry (pointers keep
# Triton's 16-byte alignment specialisation).
_RUNTIME_INTS = (
    "B", "C", "H", "W", "Ho", "Wo", "Cg", "G", "n_pblk", "b_per_prog", "sh", "sw", "dh", "dw",
    "ph", "pw",
)


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def correlate_kernel(
    q_ptr, k_ptr, out_ptr,
    B, C, H, W, Ho, Wo, Cg, G, n_pblk, b_per_prog,
    sh, sw, dh, dw, ph, pw,
    KH: tl.constexpr, KW: tl.constexpr, CLAMP: tl.constexpr, SUM_SPACE: tl.constexpr,
    ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, REFLECT: tl.constexpr,
):
    """One program owns a ``BLOCK_T x BLOCK_P`` tile of the output: all ``KH*KW`` taps
    (``BLOCK_T`` = next power of two) of ``BLOCK_P`` consecutive output pixels of the
    flattened ``Ho*Wo`` plane, for one group ``g`` and one batch chunk ``bo``.

    Grid: 1-D, ``Bo * G * n_pblk`` programs, ``n_pblk = cdiv(Ho*Wo, BLOCK_P)``; ``Bo = B`` chunks
    of one image, or, when summing over the batch, ``Bo = cdiv(B, b_per_prog)`` chunks of
    ``b_per_prog`` images (the launcher picks enough chunks to fill the GPU and sums their
    partial results); program id = ``(bo*G + g)*n_pblk + pblk``.

    Work per program: it loops over the images ``bo*b_per_prog ... min(B, +b_per_prog)`` and
    the ``C/G`` channels of the group; per
    channel it loads ``BLOCK_P`` query values and gathers a ``BLOCK_T x BLOCK_P`` key tile (the
    gather offsets and masks are computed once, before the loops) and does one FMA per element
    into a float32 (float64) accumulator. Without ``SUM_SPACE`` it stores the tile to
    ``out (Bo, G, KK, Ho, Wo)``; with ``SUM_SPACE`` it reduces the tile over its pixels and
    stores ``BLOCK_T`` partial sums to ``out (Bo, G, KK, n_pblk)``. The launcher sums partials
    over the last dim / the chunks with ``torch.sum``. No atomics: every output element has
    exactly one writer.
    """
    pblk, g, bo, offs_p, mask_p, i, j, t, hs, ws, valid, k_offs = tap_pixel_tile(
        n_pblk, G, H, W, Ho, Wo, sh, sw, dh, dw, ph, pw, KH, KW, CLAMP, REFLECT, BLOCK_T, BLOCK_P)
    mask_t = t < KH * KW                          # k_offs: (BLOCK_T, BLOCK_P) int32, inside one plane

    acc = tl.zeros([BLOCK_T, BLOCK_P], dtype=ACC)
    b0 = bo * b_per_prog
    n_b = (tl.minimum(b0 + b_per_prog, B) - b0).to(tl.int32)   # images of this chunk
    for bb in range(n_b):
        plane = (b0 + bb) * C + g * Cg            # int64 index of the group's first channel
        acc = score_tile(acc, q_ptr + plane * Ho * Wo, k_ptr + plane * H * W, offs_p, mask_p, k_offs, valid,
                         Cg, Ho * Wo, H * W, ACC)

    if not CLAMP and not REFLECT:
        acc = tl.where(valid, acc, 0.0)           # out-of-image taps: exactly 0, whatever q holds
    row = (bo.to(tl.int64) * G + g) * (KH * KW) + t   # (BLOCK_T,) int64 row of out
    if SUM_SPACE:
        part = tl.sum(acc, axis=1)
        tl.store(out_ptr + row * n_pblk + pblk, part.to(out_ptr.dtype.element_ty), mask=mask_t)
    else:
        out_offs = (row * Ho * Wo)[:, None] + offs_p[None, :]
        tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=mask_t[:, None] & mask_p[None, :])


def correlate(q: torch.Tensor, k: torch.Tensor, window, groups: int, sum_batch: bool = False,
              sum_space: bool = False) -> torch.Tensor:
    """Launch :func:`correlate_kernel`. q: (B, C, Ho, Wo), k: (B, C, H, W), both contiguous ->
    (1|B, G, K*K, 1|Ho, 1|Wo) in q's dtype (``sum_batch``/``sum_space`` sum those dims).

    With ``sum_space`` the kernel writes per-tile partial sums, with ``sum_batch`` per-chunk
    partial sums (float32, float64 for float64 inputs), and this launcher adds them with
    ``torch.sum`` (deterministic: fixed shapes, no atomics)."""
    B, C, Ho, Wo = q.shape
    H, W = k.shape[-2:]
    G = groups
    KK = window.taps
    BLOCK_T, BLOCK_P, n_pblk = score_tiles(q, k, window)
    if sum_batch:  # chunks of b_per_prog images, enough of them for ~_FILL programs
        n_chunks = min(B, max(1, triton.cdiv(_FILL, max(1, G * n_pblk))))
        b_per_prog = triton.cdiv(B, n_chunks) if B else 1
        Bo = triton.cdiv(B, b_per_prog)
    else:
        Bo, b_per_prog = B, 1
    Bout = 1 if sum_batch else B
    if B * C == 0 or Bo * G == 0:  # nothing to read (a sum over an empty batch is 0)
        return torch.zeros(Bout, G, KK, 1 if sum_space else Ho, 1 if sum_space else Wo, dtype=q.dtype,
                           device=q.device)
    partial = sum_space or (sum_batch and Bo > 1)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    if sum_space:
        out = torch.empty(Bo, G, KK, n_pblk, dtype=acc, device=q.device)
    else:
        out = torch.empty(Bo, G, KK, Ho, Wo, dtype=acc if partial else q.dtype, device=q.device)
    grid = (launchable(Bo * G * n_pblk),)
    (Kh, Kw), (sh, sw), (dh, dw), (ph, pw) = window.kernel_size, window.stride, window.dilation, window.padding
    correlate_kernel[grid](
        q, k, out,
        B, C, H, W, Ho, Wo, C // G, G, n_pblk, b_per_prog,
        sh, sw, dh, dw, ph, pw,
        KH=Kh, KW=Kw, CLAMP=window.border == "clamp", SUM_SPACE=sum_space, ACC=acc_dtype(q.dtype),
        REFLECT=window.border == "reflect", BLOCK_T=BLOCK_T, BLOCK_P=BLOCK_P, num_warps=4, enable_fp_fusion=True,
    )
    if sum_space:
        out = out.sum(-1).reshape(Bo, G, KK, 1, 1)
    if sum_batch and Bo > 1:
        out = out.sum(0, keepdim=True)
    return out.to(q.dtype)

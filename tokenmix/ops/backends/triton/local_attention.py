"""Triton kernel of the forward of ``local_attention`` (``docs/design.md``, "Fused forms"), then
its launcher.

``out[b, c, i, j] = sum_t p_t v[b, c, src_t(i, j)]`` with ``p = softmax_t(scale * q.k_t +
rel_pos[h, offset_t])`` over the taps inside the image, and ``lse[b, h, i, j]`` the log-sum-exp
of the scores. The scores never leave the program. The backward of the Triton backend is the
reference composition (:meth:`TritonBackend.local_attention_backward`).

This module imports Triton at import time; it is only imported by the Triton backend once it is
used, never by ``import tokenmix``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import acc_dtype, launchable, score_tiles
from .device import rel_index, score_tile, tap_pixel_tile

_RUNTIME_INTS = ("B", "C", "H", "W", "Ho", "Wo", "Cg", "G", "n_pblk", "sh", "sw", "dh", "dw", "ph", "pw")


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def local_attention_kernel(
    q_ptr, k_ptr, v_ptr, rel_ptr, out_ptr, lse_ptr,
    B, C, H, W, Ho, Wo, Cg, G, n_pblk,
    sh, sw, dh, dw, ph, pw, scale,
    KH: tl.constexpr, KW: tl.constexpr, CLAMP: tl.constexpr, HAS_REL: tl.constexpr,
    ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """One program owns all ``KH*KW`` taps (``BLOCK_T`` = next power of two) of ``BLOCK_P``
    consecutive output pixels of the flattened ``Ho*Wo`` plane, for one head ``g`` of one image.

    Grid: 1-D, ``B * G * n_pblk`` programs, ``n_pblk = cdiv(Ho*Wo, BLOCK_P)``; program id =
    ``(b*G + g)*n_pblk + pblk``.

    Work per program: the gather offsets and masks of the ``BLOCK_T x BLOCK_P`` key tile are
    computed once; a loop over the head's ``C/G`` channels accumulates the scores (one FMA per
    element, float32 or float64); the scale, the relative position bias (gathered from the
    head's table) and the mask (-inf outside the image) are applied, the softmax over the taps
    is taken in registers and the log-sum-exp stored (``lse (B, G, Ho, Wo)``); a second loop
    over the channels gathers the value tile and stores ``sum_t p_t v_t`` per channel. No
    atomics: every output element has exactly one writer.
    """
    _, g, b, offs_p, mask_p, i, j, t, hs, ws, valid, k_offs = tap_pixel_tile(
        n_pblk, G, H, W, Ho, Wo, sh, sw, dh, dw, ph, pw, KH, KW, CLAMP, False, BLOCK_T, BLOCK_P)

    plane = b * C + g * Cg                        # int64 index of the head's first channel
    s = score_tile(tl.zeros([BLOCK_T, BLOCK_P], dtype=ACC), q_ptr + plane * Ho * Wo, k_ptr + plane * H * W,
                   offs_p, mask_p, k_offs, valid, Cg, Ho * Wo, H * W, ACC) * scale
    if HAS_REL:  # table index of the true offset (divided by the dilation)
        r_offs = tl.where(valid, rel_index(hs, ws, i[None, :], j[None, :], sh, sw, dh, dw, KH, KW), 0)
        s += tl.load(rel_ptr + g * ((2 * KH - 1) * (2 * KW - 1)) + r_offs, mask=valid, other=0.0).to(ACC)
    s = tl.where(valid, s, float("-inf"))
    m = tl.max(s, axis=0)                          # (BLOCK_P,)
    empty = m == float("-inf")                     # every tap outside the image
    m0 = tl.where(empty, 0.0, m)
    p = tl.where(valid, tl.exp(s - m0[None, :]), 0.0)
    total = tl.sum(p, axis=0)
    inv = tl.where(empty, 0.0, 1.0 / tl.where(empty, 1.0, total))
    lse = tl.where(empty, float("-inf"), m0 + tl.log(tl.where(empty, 1.0, total)))
    tl.store(lse_ptr + (b * G + g) * Ho * Wo + offs_p, lse.to(lse_ptr.dtype.element_ty), mask=mask_p)
    p = p * inv[None, :]

    v_c = v_ptr + plane * H * W
    o_c = out_ptr + plane * Ho * Wo
    for c in range(Cg):
        vv = tl.load(v_c + k_offs, mask=valid, other=0.0).to(ACC)
        o = tl.sum(p * vv, axis=0)
        tl.store(o_c + offs_p, o.to(out_ptr.dtype.element_ty), mask=mask_p)
        v_c += H * W
        o_c += Ho * Wo


def local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_pos, heads: int, scale: float, window):
    """Launch :func:`local_attention_kernel`. q: (B, C, Ho, Wo), k, v: (B, C, H, W), rel_pos:
    (heads, 2Kh-1, 2Kw-1) or None, all contiguous -> (out (B, C, Ho, Wo) in q's dtype,
    lse (B, heads, Ho, Wo) float32, float64 for float64 inputs)."""
    B, C, Ho, Wo = q.shape
    H, W = k.shape[-2:]
    G = heads
    BLOCK_T, BLOCK_P, n_pblk = score_tiles(q, k, window)
    stats = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.empty_like(q)
    lse = torch.empty(B, G, Ho, Wo, dtype=stats, device=q.device)
    if B * C * Ho * Wo == 0:
        return out, lse
    (Kh, Kw), (sh, sw), (dh, dw), (ph, pw) = window.kernel_size, window.stride, window.dilation, window.padding
    grid = (launchable(B * G * n_pblk),)
    local_attention_kernel[grid](
        q, k, v, q if rel_pos is None else rel_pos, out, lse,
        B, C, H, W, Ho, Wo, C // G, G, n_pblk,
        sh, sw, dh, dw, ph, pw, float(scale),
        KH=Kh, KW=Kw, CLAMP=window.border == "clamp", HAS_REL=rel_pos is not None, ACC=acc_dtype(q.dtype),
        BLOCK_T=BLOCK_T, BLOCK_P=BLOCK_P, num_warps=4, enable_fp_fusion=True,
    )
    return out, lse

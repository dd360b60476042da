"""Triton kernels of the backward of ``local_attention`` (``docs/design.md``, "Fused forms"),
then their launcher.

From the saved q, k, v, rel_pos, out and log-sum-exp, flash-attention style: the scores are
recomputed tile by tile and never stored. With ``P = exp(S - lse)``, ``dP_t = dout . v_t``,
``D = sum_c dout * out`` and ``dS = P (dP - D)``:

- :func:`local_attention_backward_query_kernel` (a program per output-pixel tile) computes
  ``D`` (stored, one value per pixel and head), ``dq = scale sum_t dS_t k_t`` and per-program
  partial sums of ``dS`` per relative position table entry;
- :func:`local_attention_backward_kv_kernel` (a program per input-pixel tile) gathers, for
  each input pixel, the (output pixel, tap) pairs that read it and recomputes their ``S``,
  ``P`` and ``dS`` (the key and value are the program's own pixel), accumulating
  ``dk = scale sum dS q`` and ``dv = sum P dout``.

The launcher adds the partial sums of ``drel_pos`` with ``torch.sum`` (and places the zero
border's per-tap sums in the table). No atomics: every
result is bitwise reproducible. The head width of q and k (``Ck``) and that of v (``Cv``) are
separate arguments of both kernels.

This module imports Triton at import time; it is only imported by the Triton backend once it
is used, never by ``import tokenmix``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (acc_dtype, attention_kv_tiles, attention_query_pixel_tile, check_plane, clamp_candidates,
                     launchable, tap_tile)
from .device import (clamp_reader, clamp_readers, clamp_start, rel_index, score_tile, split_program, tap_pixel_tile,
                     tile_pixels, zero_reader)

# Every integer argument is a plain runtime value: one compiled variant per (K, border, dtype,
# table or not, tiles) serves every shape and geometry.
_QUERY_INTS = ("CK", "CV", "H", "W", "Ho", "Wo", "Ck", "Cv", "G", "n_pblk", "sh", "sw", "dh", "dw", "ph", "pw")
_KV_INTS = _QUERY_INTS + ("n_cblk", "NC_H", "NC_W")


@triton.jit(do_not_specialize=_QUERY_INTS)
def local_attention_backward_query_kernel(
    q_ptr, k_ptr, v_ptr, rel_ptr, out_ptr, lse_ptr, dout_ptr, dq_ptr, delta_ptr, drel_ptr,
    CK, CV, H, W, Ho, Wo, Ck, Cv, G, n_pblk,
    sh, sw, dh, dw, ph, pw, scale,
    KH: tl.constexpr, KW: tl.constexpr, CLAMP: tl.constexpr, HAS_REL: tl.constexpr,
    ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """One program owns all ``KH*KW`` taps (``BLOCK_T`` = next power of two) of ``BLOCK_P``
    consecutive output pixels of the flattened ``Ho*Wo`` plane, for one head ``g`` of one image
    (q, k: ``CK`` channels, ``Ck`` per head; v, out, dout: ``CV``, ``Cv`` per head).

    Grid: 1-D, ``B * G * n_pblk`` programs, ``n_pblk = cdiv(Ho*Wo, BLOCK_P)``; program id =
    ``(b*G + g)*n_pblk + pblk``.

    Work per program: the key-tile offsets and masks once (as the forward); the scores by a
    loop over the ``Ck`` channels of q and k, plus the bias, and ``P = exp(S - lse)`` (0 on
    out-of-image taps); a loop over the ``Cv`` channels of dout, out and the gathered value
    tile gives ``dP`` and ``D`` (stored, ``delta (B, G, Ho, Wo)``); ``dS = P (dP - D)``; a loop
    over the ``Ck`` channels gathers the key tile again and stores ``dq = scale sum_t dS k``.
    With a table: ``dS`` summed over the program's pixels into its row of partial sums. Zero
    border: the entry of a tap is the same for every pixel, so a sum per tap, ``drel (B, G,
    n_pblk, KH*KW)``; clamp border: a pixel's entries shift near the edges, so ``dS`` is
    gathered in registers into a ``BLOCK_E x BLOCK_P`` table-shaped tile first, ``drel (B, G,
    n_pblk, (2KH-1)(2KW-1))``.
    Float32 (float64) accumulation; every output element has exactly one writer.
    """
    _, g, b, offs_p, mask_p, i, j, t, hs, ws, valid, k_offs = tap_pixel_tile(
        n_pblk, G, H, W, Ho, Wo, sh, sw, dh, dw, ph, pw, KH, KW, CLAMP, False, BLOCK_T, BLOCK_P)

    qk = b * CK + g * Ck                          # int64 index of the head's first q/k channel
    vo = b * CV + g * Cv                          # ... and v/out/dout channel
    s = score_tile(tl.zeros([BLOCK_T, BLOCK_P], dtype=ACC), q_ptr + qk * Ho * Wo, k_ptr + qk * H * W,
                   offs_p, mask_p, k_offs, valid, Ck, Ho * Wo, H * W, ACC) * scale
    NE: tl.constexpr = (2 * KH - 1) * (2 * KW - 1)
    if HAS_REL:
        r_offs = tl.where(valid, rel_index(hs, ws, i[None, :], j[None, :], sh, sw, dh, dw, KH, KW), 0)
        s += tl.load(rel_ptr + g * NE + r_offs, mask=valid, other=0.0).to(ACC)
    stat = (b * G + g) * Ho * Wo + offs_p         # (BLOCK_P,) int64 index into lse / delta
    lse = tl.load(lse_ptr + stat, mask=mask_p, other=0.0).to(ACC)
    lse = tl.where(lse == float("-inf"), 0.0, lse)  # a pixel with every tap outside: P = 0
    p = tl.where(valid, tl.exp(s - lse[None, :]), 0.0)

    dp = tl.zeros([BLOCK_T, BLOCK_P], dtype=ACC)
    delta = tl.zeros([BLOCK_P], dtype=ACC)
    go_c = dout_ptr + vo * Ho * Wo
    o_c = out_ptr + vo * Ho * Wo
    v_c = v_ptr + vo * H * W
    for c in range(Cv):
        go = tl.load(go_c + offs_p, mask=mask_p, other=0.0).to(ACC)
        delta += go * tl.load(o_c + offs_p, mask=mask_p, other=0.0).to(ACC)
        dp += go[None, :] * tl.load(v_c + k_offs, mask=valid, other=0.0).to(ACC)
        go_c += Ho * Wo
        o_c += Ho * Wo
        v_c += H * W
    tl.store(delta_ptr + stat, delta.to(delta_ptr.dtype.element_ty), mask=mask_p)
    ds = p * (dp - delta[None, :])                # 0 wherever P is

    k_c = k_ptr + qk * H * W
    dq_c = dq_ptr + qk * Ho * Wo
    for c in range(Ck):
        kv = tl.load(k_c + k_offs, mask=valid, other=0.0).to(ACC)
        tl.store(dq_c + offs_p, (tl.sum(ds * kv, axis=0) * scale).to(dq_ptr.dtype.element_ty), mask=mask_p)
        k_c += H * W
        dq_c += Ho * Wo

    if HAS_REL:
        if CLAMP:  # table entry (u + a_p, v + b_p) for tap (u, v): (a_p, b_p) the pixel's shift
            row = drel_ptr + tl.program_id(0).to(tl.int64) * NE
            a0 = (clamp_start(i, H, KH, dh) - i) // dh + (KH - 1)   # table row of tap row 0
            b0 = (clamp_start(j, W, KW, dw) - j) // dw + (KW - 1)
            e = tl.arange(0, BLOCK_E)
            ue = (e // (2 * KW - 1))[:, None] - a0[None, :]         # (BLOCK_E, BLOCK_P) tap row
            ve = (e % (2 * KW - 1))[:, None] - b0[None, :]
            ok = (e < NE)[:, None] & mask_p[None, :] & (ue >= 0) & (ue < KH) & (ve >= 0) & (ve < KW)
            part = tl.where(ok, tl.gather(ds, tl.where(ok, ue * KW + ve, 0), 0), 0.0)
            tl.store(row + e, tl.sum(part, axis=1).to(drel_ptr.dtype.element_ty), mask=e < NE)
        else:  # one table entry per tap, the same for every pixel: the launcher places the taps
            row = drel_ptr + tl.program_id(0).to(tl.int64) * (KH * KW)
            tl.store(row + t, tl.sum(ds, axis=1).to(drel_ptr.dtype.element_ty), mask=t < KH * KW)


@triton.jit
def _kv_candidate(dk_acc, dv_acc, o, ok, e, q_c, k_c, v_c, dout_c, rel_h, lse_h, delta_h, offs_p, mask_p,
                  c_own, Ck, Cv, HW, HoWo, scale, HAS_REL: tl.constexpr, ACC: tl.constexpr):
    """Add one (output pixel ``o``, tap) candidate per input pixel of the tile (``ok``: it
    exists; ``e``: its table entry) to the ``dk`` and ``dv`` accumulators of the program's
    channel block ``c_own``: the score ``q[o] . k[own]`` and ``dP = dout[o] . v[own]`` by loops
    over the head's channels, then ``P``, ``dS`` and the updates."""
    s = tl.zeros([offs_p.shape[0]], dtype=ACC)
    dp = tl.zeros([offs_p.shape[0]], dtype=ACC)
    qc, kc, gc, vc = q_c, k_c, dout_c, v_c
    for c in range(Ck):
        s += tl.load(qc + o, mask=ok, other=0.0).to(ACC) * tl.load(kc + offs_p, mask=mask_p, other=0.0).to(ACC)
        qc += HoWo
        kc += HW
    for c in range(Cv):
        dp += tl.load(gc + o, mask=ok, other=0.0).to(ACC) * tl.load(vc + offs_p, mask=mask_p, other=0.0).to(ACC)
        gc += HoWo
        vc += HW
    s = s * scale
    if HAS_REL:
        s += tl.load(rel_h + e, mask=ok, other=0.0).to(ACC)
    lse = tl.load(lse_h + o, mask=ok, other=0.0).to(ACC)
    p = tl.where(ok, tl.exp(s - lse), 0.0)
    ds = p * (dp - tl.load(delta_h + o, mask=ok, other=0.0).to(ACC)) * scale
    c = c_own[:, None]
    qv = tl.load(q_c + c * HoWo + o[None, :], mask=(c < Ck) & ok[None, :], other=0.0).to(ACC)
    gv = tl.load(dout_c + c * HoWo + o[None, :], mask=(c < Cv) & ok[None, :], other=0.0).to(ACC)
    return dk_acc + ds[None, :] * qv, dv_acc + p[None, :] * gv


@triton.jit(do_not_specialize=_KV_INTS)
def local_attention_backward_kv_kernel(
    q_ptr, k_ptr, v_ptr, rel_ptr, lse_ptr, dout_ptr, delta_ptr, dk_ptr, dv_ptr,
    CK, CV, H, W, Ho, Wo, Ck, Cv, G, n_cblk, n_pblk,
    sh, sw, dh, dw, ph, pw, NC_H, NC_W, scale,
    KH: tl.constexpr, KW: tl.constexpr, CLAMP: tl.constexpr, HAS_REL: tl.constexpr,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """One program computes ``dk`` and ``dv`` for ``BLOCK_C`` channels (block ``cblk`` of the
    head's ``Ck`` key and ``Cv`` value channels) of ``BLOCK_P`` consecutive *input* pixels of
    the flattened ``H*W`` plane, for one head ``g`` of one image: a gather over the (output
    pixel, tap) pairs that read each pixel, as ``aggregate_transpose`` enumerates them.

    Grid: 1-D, ``B * G * n_cblk * n_pblk`` programs, ``n_cblk = cdiv(max(Ck, Cv), BLOCK_C)``,
    ``n_pblk = cdiv(H*W, BLOCK_P)``; program id = ``((b*G + g)*n_cblk + cblk)*n_pblk + pblk``.

    Work per program and candidate (zero border: the ``KH*KW`` taps, each read by at most one
    output pixel; clamp border: the ``NC_H x NC_W`` candidate outputs, each through one tap):
    the score, ``P = exp(S - lse)`` and ``dP`` recomputed by loops over the head's channels
    (q and dout gathered at the candidate output, k and v at the own pixel), ``dS = P (dP - D)``
    with ``D`` from the query kernel, then one FMA per element of the ``BLOCK_C x BLOCK_P``
    accumulators ``dk += scale dS q`` and ``dv += P dout``. With more channels than
    ``BLOCK_C`` the scores are recomputed per channel block. Float32
    (float64) accumulation; every output element has exactly one writer.
    """
    pblk, cblk, g, b = split_program(tl.program_id(0), n_pblk, n_cblk, G)
    offs_p, mask_p, h, w = tile_pixels(pblk, BLOCK_P, H, W)
    c_own = (cblk * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    qk = b * CK + g * Ck
    vo = b * CV + g * Cv
    q_c = q_ptr + qk * Ho * Wo
    k_c = k_ptr + qk * H * W
    v_c = v_ptr + vo * H * W
    dout_c = dout_ptr + vo * Ho * Wo
    rel_h = rel_ptr + g * ((2 * KH - 1) * (2 * KW - 1))
    lse_h = lse_ptr + (b * G + g) * Ho * Wo
    delta_h = delta_ptr + (b * G + g) * Ho * Wo
    dk_acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=ACC)
    dv_acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=ACC)
    if CLAMP:
        rows = clamp_readers(h, H, KH, dh)
        cols = clamp_readers(w, W, KW, dw)
        for n in range(NC_H):
            i, _, ok_h = clamp_reader(n, rows, KH, dh, mask_p)
            for m in range(NC_W):
                j, _, ok = clamp_reader(m, cols, KW, dw, ok_h)
                o = tl.where(ok, i * Wo + j, 0)
                e = tl.where(ok, rel_index(h, w, i, j, sh, sw, dh, dw, KH, KW), 0)
                dk_acc, dv_acc = _kv_candidate(dk_acc, dv_acc, o, ok, e, q_c, k_c, v_c, dout_c, rel_h, lse_h,
                                               delta_h, offs_p, mask_p, c_own, Ck, Cv, H * W, Ho * Wo, scale,
                                               HAS_REL, ACC)
    else:
        for u in range(KH):  # a loop; the KW taps of a row unroll (a loop over them spilled on sm_80)
            i, ok_h = zero_reader(h, ph, u, dh, sh, Ho, mask_p)
            for v in tl.static_range(KW):
                j, ok = zero_reader(w, pw, v, dw, sw, Wo, ok_h)
                o = tl.where(ok, i * Wo + j, 0)
                e = tl.where(ok, rel_index(h, w, i, j, sh, sw, dh, dw, KH, KW), 0)
                dk_acc, dv_acc = _kv_candidate(dk_acc, dv_acc, o, ok, e, q_c, k_c, v_c, dout_c, rel_h, lse_h,
                                               delta_h, offs_p, mask_p, c_own, Ck, Cv, H * W, Ho * Wo, scale,
                                               HAS_REL, ACC)
    c = c_own[:, None]
    tl.store(dk_ptr + (qk + c) * H * W + offs_p[None, :], dk_acc.to(dk_ptr.dtype.element_ty),
             mask=(c < Ck) & mask_p[None, :])
    tl.store(dv_ptr + (vo + c) * H * W + offs_p[None, :], dv_acc.to(dv_ptr.dtype.element_ty),
             mask=(c < Cv) & mask_p[None, :])


def local_attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_pos,
                             out: torch.Tensor, lse: torch.Tensor, heads: int, scale: float, window):
    """Launch the two backward kernels. grad_out, out: (B, Cv*heads, Ho, Wo); q: (B, Ck*heads,
    Ho, Wo); k: (B, Ck*heads, H, W); v: (B, Cv*heads, H, W); rel_pos: (heads, 2Kh-1, 2Kw-1) or
    None; lse: (B, heads, Ho, Wo); all contiguous -> (dq, dk, dv, drel_pos) in the inputs'
    dtypes (drel_pos of shape (0,) without rel_pos)."""
    B, CK, Ho, Wo = q.shape
    CV = v.shape[1]
    H, W = k.shape[-2:]
    G = heads
    Ck, Cv = CK // G, CV // G
    check_plane(H, W, Ho, Wo)
    (Kh, Kw), (sh, sw), (dh, dw), (ph, pw) = window.kernel_size, window.stride, window.dilation, window.padding
    NE = (2 * Kh - 1) * (2 * Kw - 1)
    clamp = window.border == "clamp"
    stats = torch.float64 if q.dtype == torch.float64 else torch.float32
    drel_empty = q.new_zeros(0) if rel_pos is None else torch.zeros_like(rel_pos)
    if B * G * Ho * Wo == 0 or CK + CV == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), drel_empty
    ACC = acc_dtype(q.dtype)

    BLOCK_T = tap_tile(window.taps)
    BLOCK_P = attention_query_pixel_tile(Ho * Wo, BLOCK_T, q.dtype)
    n_pblk = triton.cdiv(Ho * Wo, BLOCK_P)
    dq = torch.empty_like(q)
    delta = torch.empty(B, G, Ho, Wo, dtype=stats, device=q.device)
    if rel_pos is None:
        drel = delta  # never read
    else:  # per program: a sum per table entry (clamp border) or per tap (zero border)
        drel = torch.empty(B, G, n_pblk, NE if clamp else Kh * Kw, dtype=stats, device=q.device)
    local_attention_backward_query_kernel[(launchable(B * G * n_pblk),)](
        q, k, v, q if rel_pos is None else rel_pos, out, lse, grad_out, dq, delta, drel,
        CK, CV, H, W, Ho, Wo, Ck, Cv, G, n_pblk,
        sh, sw, dh, dw, ph, pw, float(scale),
        KH=Kh, KW=Kw, CLAMP=clamp, HAS_REL=rel_pos is not None, ACC=ACC,
        BLOCK_T=BLOCK_T, BLOCK_P=BLOCK_P, BLOCK_E=triton.next_power_of_2(NE), num_warps=4, enable_fp_fusion=True,
    )

    BLOCK_C, BLOCK_P = attention_kv_tiles(max(Ck, Cv), H * W, q.dtype)
    n_cblk = triton.cdiv(max(Ck, Cv), BLOCK_C)
    n_pblk = triton.cdiv(H * W, BLOCK_P)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    local_attention_backward_kv_kernel[(launchable(B * G * n_cblk * n_pblk),)](
        q, k, v, q if rel_pos is None else rel_pos, lse, grad_out, delta, dk, dv,
        CK, CV, H, W, Ho, Wo, Ck, Cv, G, n_cblk, n_pblk,
        sh, sw, dh, dw, ph, pw,
        clamp_candidates(H, Kh, dh) if clamp else 0, clamp_candidates(W, Kw, dw) if clamp else 0, float(scale),
        KH=Kh, KW=Kw, CLAMP=clamp, HAS_REL=rel_pos is not None, ACC=ACC,
        BLOCK_C=BLOCK_C, BLOCK_P=BLOCK_P, num_warps=4, enable_fp_fusion=True,
    )
    if rel_pos is None:
        return dq, dk, dv, drel_empty
    drel = drel.sum((0, 2))
    if not clamp:  # tap (u, v) -> entry (u - ph/dh + Kh-1, v - pw/dw + Kw-1): injective, the rest 0
        rows = torch.arange(Kh, device=q.device) - ph // dh + (Kh - 1)
        cols = torch.arange(Kw, device=q.device) - pw // dw + (Kw - 1)
        table = drel.new_zeros(G, 2 * Kh - 1, 2 * Kw - 1)
        table[:, rows[:, None], cols[None, :]] = drel.view(G, Kh, Kw)
        drel = table
    return dq, dk, dv, drel.reshape(rel_pos.shape).to(rel_pos.dtype)

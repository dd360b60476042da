"""Device helpers shared by the Triton kernels (inlined into each kernel at compile time).

Imported only by the kernel modules, which are imported only when the Triton backend runs.
"""

import triton
import triton.language as tl


@triton.jit
def clamp_start(i, L, K: tl.constexpr, d):
    """First source pixel of the clamp-border window of output ``i`` along an axis of length
    ``L`` (``docs/design.md``, "The window"): on the sub-grid ``r = i mod d`` of length
    ``ceil((L - r) / d)``, ``start' = clamp(i // d - K // 2, 0, L_r - K)``; tap ``u`` then reads
    ``start + u*d``."""
    r = i % d
    Lr = (L - r + d - 1) // d
    return r + d * tl.minimum(tl.maximum(i // d - K // 2, 0), Lr - K)


@triton.jit
def reflect_index(i, L):
    """The reflect border's source of raw index ``i`` along an axis of length ``L``, as
    ``F.pad(mode="reflect")``: -1 -> 1, L -> L - 2 (one reflection suffices: the padding is
    below L)."""
    i = tl.where(i < 0, -i, i)
    return tl.where(i >= L, 2 * (L - 1) - i, i)


@triton.jit
def split_program(pid, n_pblk, n_cblk, G):
    """Program id -> (pixel block, channel block, group, batch as int64); pixel blocks vary
    fastest so neighbouring programs share input rows."""
    pblk = pid % n_pblk
    rest = pid // n_pblk
    cblk = rest % n_cblk
    rest = rest // n_cblk
    return pblk, cblk, rest % G, (rest // G).to(tl.int64)


@triton.jit
def tile_pixels(pblk, BLOCK_P: tl.constexpr, rows, cols):
    """Pixel block ``pblk`` of a ``rows x cols`` plane: (flat offsets, in-plane mask, row,
    column), each of shape (BLOCK_P,)."""
    offs = pblk * BLOCK_P + tl.arange(0, BLOCK_P)
    return offs, offs < rows * cols, offs // cols, offs % cols


@triton.jit
def tile_channels(cblk, BLOCK_C: tl.constexpr, b, g, C, Cg):
    """Channel block ``cblk`` of group ``g`` of image ``b`` (int64): (in-group mask, image-channel
    index ``b*C + g*Cg + c``), each of shape (BLOCK_C,)."""
    cl = cblk * BLOCK_C + tl.arange(0, BLOCK_C)
    return cl < Cg, b * C + g * Cg + cl


@triton.jit
def window_start(i, L, K: tl.constexpr, s, d, p, CLAMP: tl.constexpr):
    """Raw source index of tap 0 of output ``i`` along an axis of length ``L``: the clamp
    border's window start (:func:`clamp_start`), else ``i*s - p``."""
    if CLAMP:
        start = clamp_start(i, L, K, d)
    else:
        start = i * s - p
    return start


@triton.jit
def tap_source(start, k, d, L, mask, CLAMP: tl.constexpr, REFLECT: tl.constexpr):
    """Source index along an axis of length ``L`` of tap ``k`` of the windows starting at
    ``start``, and ``mask`` narrowed to the positions inside the image (zero border; the
    clamp window is always inside, the reflect border folds the index back in)."""
    src = start + k * d
    if CLAMP:
        ok = mask
    elif REFLECT:
        src = reflect_index(src, L)
        ok = mask
    else:
        ok = mask & (src >= 0) & (src < L)
    return src, ok


@triton.jit
def zero_reader(h, p, k, d, s, Lo, mask):
    """Zero border, along an axis: the only output ``i`` that reads input position ``h``
    through tap ``k`` is ``(h + p - k*d) / s``, valid when the division is exact and
    ``0 <= i < Lo``. Returns ``(i, valid)`` (``i`` is 0 where invalid)."""
    n = h + p - k * d
    ok = mask & (n >= 0)
    n = tl.where(ok, n, 0)
    i = n // s
    return i, ok & (i * s == n) & (i < Lo)


@triton.jit
def clamp_readers(h, L, K: tl.constexpr, d):
    """Clamp border, along an axis of length ``L``: the outputs whose window covers input
    position ``h`` are ``i = r + d*i'`` for ``i'`` in ``[lo, hi]`` on the sub-grid ``r = h mod d``
    (length ``Lr``). Returns the tuple ``(r, h // d, Lr, lo, hi)`` for :func:`clamp_reader`."""
    r = h % d
    hp = h // d
    Lr = (L - r + d - 1) // d
    lo = tl.where(hp - K + 1 <= 0, 0, hp - K + 1 + K // 2)
    hi = tl.where(hp >= Lr - K, Lr - 1, hp + K // 2)
    return r, hp, Lr, lo, hi


@triton.jit
def clamp_reader(n, readers, K: tl.constexpr, d, mask):
    """The ``n``-th output of a :func:`clamp_readers` range: ``(i, the tap it reads h through,
    valid)``."""
    r, hp, Lr, lo, hi = readers
    ip = lo + n
    u = hp - tl.minimum(tl.maximum(ip - K // 2, 0), Lr - K)
    return r + d * ip, u, mask & (ip <= hi)


@triton.jit
def linear_tap_weights(w_row, h_img, pix, ok, M, plane, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_P: tl.constexpr):
    """Generated kernel values ``sum_m weight[row, m] * h[m, pix]`` of ``BLOCK_P`` pixels (no
    bias), over the ``M`` features in chunks of ``BLOCK_M``: ``w_row`` points at the weight row
    (a scalar pointer: one row for every pixel; a ``(1, BLOCK_P)`` block: one row per pixel),
    ``h_img`` at the image's features (``M`` planes of ``plane`` elements), ``pix`` the
    ``(BLOCK_P,)`` pixel offsets inside a plane, read where ``ok``."""
    offs_m = tl.arange(0, BLOCK_M)
    wv = tl.zeros([BLOCK_P], dtype=ACC)
    for m0 in range(0, M, BLOCK_M):
        mm = m0 + offs_m
        mask_m = mm < M
        wrow = tl.load(w_row + mm[:, None], mask=mask_m[:, None], other=0.0).to(ACC)
        feats = tl.load(h_img + (mm * plane)[:, None] + pix[None, :], mask=mask_m[:, None] & ok[None, :],
                        other=0.0).to(ACC)
        wv += tl.sum(wrow * feats, axis=0)
    return wv


@triton.jit
def channel_pixel_tile(n_pblk, n_cblk, G, C, Cg, rows, cols, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """The tile of a program of a channel-by-pixel grid (:func:`split_program`): group g, image b
    (int64), then the ``BLOCK_P`` pixels of a ``rows x cols`` plane (:func:`tile_pixels`: flat
    offsets, mask, row, column) and the ``BLOCK_C`` channels (:func:`tile_channels`: mask,
    image-channel index)."""
    pblk, cblk, g, b = split_program(tl.program_id(0), n_pblk, n_cblk, G)
    offs_p, mask_p, r, c = tile_pixels(pblk, BLOCK_P, rows, cols)
    mask_c, bc = tile_channels(cblk, BLOCK_C, b, g, C, Cg)
    return g, b, offs_p, mask_p, r, c, mask_c, bc


@triton.jit
def window_sources(i, j, mask_p, t, H, W, sh, sw, dh, dw, ph, pw,
                   KH: tl.constexpr, KW: tl.constexpr, CLAMP: tl.constexpr, REFLECT: tl.constexpr):
    """Source pixels of taps ``t`` (BLOCK_T,) of the output pixels ``(i, j)`` (BLOCK_P,):
    ``(hs, ws, valid)``, each ``(BLOCK_T, BLOCK_P)``; ``valid`` is False for padding taps
    (``t >= KH*KW``), padding pixels (``~mask_p``) and, on the zero border, taps outside the
    image (their ``hs``/``ws`` are then out of range)."""
    u = t // KW
    v = t % KW
    h0 = window_start(i, H, KH, sh, dh, ph, CLAMP)
    w0 = window_start(j, W, KW, sw, dw, pw, CLAMP)
    hs, ok = tap_source(h0[None, :], u[:, None], dh, H, (t < KH * KW)[:, None] & mask_p[None, :], CLAMP, REFLECT)
    ws, valid = tap_source(w0[None, :], v[:, None], dw, W, ok, CLAMP, REFLECT)
    return hs, ws, valid


@triton.jit
def score_tile(acc, q_c, k_c, offs_p, mask_p, k_offs, valid, Cg, q_plane, k_plane, ACC: tl.constexpr):
    """``acc + sum_c q[c, p] * k[c, k_offs[t, p]]`` over ``Cg`` channels, ``q_c``/``k_c`` the
    first channel's planes, ``q_plane``/``k_plane`` the elements per channel: the
    ``(BLOCK_T, BLOCK_P)`` key tile gathered per channel, one FMA per element."""
    for c in range(Cg):
        qv = tl.load(q_c + offs_p, mask=mask_p, other=0.0).to(ACC)
        kv = tl.load(k_c + k_offs, mask=valid, other=0.0).to(ACC)
        acc += qv[None, :] * kv
        q_c += q_plane
        k_c += k_plane
    return acc


@triton.jit
def rel_index(hs, ws, i, j, sh, sw, dh, dw, KH: tl.constexpr, KW: tl.constexpr):
    """Flat index ``row * (2KW-1) + col`` into a ``(2KH-1, 2KW-1)`` relative position table of
    the true offset from output ``(i, j)`` (centred on input ``(i*sh, j*sw)``) to source
    ``(hs, ws)``, divided by the dilation (exact: the offsets are multiples of it when a table
    is given)."""
    return ((hs - i * sh) // dh + (KH - 1)) * (2 * KW - 1) + (ws - j * sw) // dw + (KW - 1)


@triton.jit
def tap_pixel_tile(n_pblk, G, H, W, Ho, Wo, sh, sw, dh, dw, ph, pw, KH: tl.constexpr, KW: tl.constexpr,
                   CLAMP: tl.constexpr, REFLECT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr):
    """The tile of a program of a tap-by-pixel grid (all taps of ``BLOCK_P`` output pixels;
    :func:`split_program` without channel blocks): pixel block, group ``g``, image or batch
    chunk ``b`` (int64), the pixels (:func:`tile_pixels`), the taps ``t`` (BLOCK_T,), their
    sources and validity (:func:`window_sources`) and the in-plane source offsets (0 where
    invalid)."""
    pblk, _, g, b = split_program(tl.program_id(0), n_pblk, 1, G)
    offs_p, mask_p, i, j = tile_pixels(pblk, BLOCK_P, Ho, Wo)
    t = tl.arange(0, BLOCK_T)
    hs, ws, valid = window_sources(i, j, mask_p, t, H, W, sh, sw, dh, dw, ph, pw, KH, KW, CLAMP, REFLECT)
    return pblk, g, b, offs_p, mask_p, i, j, t, hs, ws, valid, tl.where(valid, hs * W + ws, 0)

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

"""Launcher helpers shared by the Triton kernel modules: accumulator dtype, tile sizes, grid
limits and weight strides. Plain Python (Triton is imported only inside :func:`acc_dtype`), so
the backend class and the kernels both import it and neither imports the other."""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Tuple

import torch

_INT32_MAX = 2**31 - 1
KERNELS = {  # primitive -> (module, jit kernel name, launcher name)
    "aggregate": ("tokenmix.ops.backends.triton.aggregate", "aggregate_kernel", "aggregate"),
    "correlate": ("tokenmix.ops.backends.triton.correlate", "correlate_kernel", "correlate"),
    "aggregate_transpose": ("tokenmix.ops.backends.triton.aggregate_transpose", "aggregate_transpose_kernel",
                            "aggregate_transpose"),
    "local_attention": ("tokenmix.ops.backends.triton.local_attention", "local_attention_kernel",
                        "local_attention"),
    "aggregate_linear": ("tokenmix.ops.backends.triton.aggregate_linear", "aggregate_linear_kernel",
                         "aggregate_linear"),
    # the backward's two kernels (one launcher)
    "aggregate_linear_backward": ("tokenmix.ops.backends.triton.aggregate_linear", "aggregate_linear_dx_kernel",
                                  "aggregate_linear_backward"),
    "aggregate_linear_dlinear": ("tokenmix.ops.backends.triton.aggregate_linear",
                                 "aggregate_linear_dlinear_kernel", "aggregate_linear_backward"),
    # the backward of local_attention: two kernels, one launcher
    "local_attention_backward": ("tokenmix.ops.backends.triton.local_attention_backward",
                                 "local_attention_backward_query_kernel", "local_attention_backward"),
    "local_attention_backward_kv": ("tokenmix.ops.backends.triton.local_attention_backward",
                                    "local_attention_backward_kv_kernel", "local_attention_backward"),
}
_BIG = 1 << 20  # a plane large enough that the tile heuristics pick their largest tiles


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def acc_dtype(dtype: torch.dtype):
    """Triton accumulator dtype for an input dtype: float64 for float64, else float32."""
    import triton.language as tl

    return tl.float64 if dtype == torch.float64 else tl.float32


def channel_tile(channels_per_group: int) -> int:
    """BLOCK_C of aggregate/aggregate_transpose: the channels of one group that share each
    weight load (power of two, at most 16)."""
    return min(_next_pow2(channels_per_group), 16)


def pixel_tile(pixels: int, block_c: int, dtype: torch.dtype) -> int:
    """BLOCK_P of aggregate/aggregate_transpose: about 1024 accumulators per program (512 for
    float64), between 64 and 256 pixels, and no larger than the plane needs. (512-pixel
    tiles spilled: bf16 aggregate on sm_80, fp64 clamp aggregate on sm_90.)"""
    budget = 512 if dtype == torch.float64 else 1024
    p = max(64, min(256, budget // block_c))
    return min(p, max(16, _next_pow2(pixels)))


def channel_pixel_grid(B: int, G: int, Cg: int, pixels: int, dtype: torch.dtype):
    """Tiles and grid of aggregate/aggregate_transpose, whose programs own ``BLOCK_C``
    channels of one group by ``BLOCK_P`` pixels (the kernels undo it with ``split_program``).
    Returns ``(BLOCK_C, BLOCK_P, n_cblk, n_pblk, grid)``."""
    block_c = channel_tile(Cg)
    block_p = pixel_tile(pixels, block_c, dtype)
    n_cblk = -(-Cg // block_c)
    n_pblk = -(-pixels // block_p)
    return block_c, block_p, n_cblk, n_pblk, (launchable(B * G * n_cblk * n_pblk),)


def linear_pixel_tile(pixels: int, block_c: int, dtype: torch.dtype, clamp_dx: bool = False) -> int:
    """BLOCK_P of aggregate_linear: about 512 accumulators per program (256 for float64),
    16..128 pixels (the weights generated per tap and the feature chunks share the registers;
    1024 accumulators spilled on sm_80 and sm_90). The clamp border's dx kernel (``clamp_dx``),
    whose taps differ per pixel, takes at most 32 pixels with 8 or more channels (8 x 64 spilled
    on sm_80; so did 16 x 16)."""
    budget = 256 if dtype == torch.float64 else 512
    p = max(16, min(128, budget // block_c))
    if clamp_dx and block_c >= 8:
        p = min(p, 32)
    return min(p, max(16, _next_pow2(pixels)))


def tap_tile(taps: int) -> int:
    """BLOCK_T of correlate: all K*K taps of a pixel in one program (next power of two)."""
    return _next_pow2(taps)


def correlate_pixel_tile(pixels: int, block_t: int, dtype: torch.dtype) -> int:
    """BLOCK_P of correlate: about 2048 accumulators (1024 for float64), 16..256 pixels."""
    budget = 1024 if dtype == torch.float64 else 2048
    p = max(16, min(256, budget // block_t))
    return min(p, max(16, _next_pow2(pixels)))


def score_tiles(q: torch.Tensor, k: torch.Tensor, window) -> Tuple[int, int, int]:
    """(BLOCK_T, BLOCK_P, pixel blocks) of the kernels whose program holds every tap of a
    block of output pixels (correlate, local_attention's forward), for q (B, C, Ho, Wo) and
    k (B, C, H, W); refuses planes too large for int32 offsets (:func:`check_plane`)."""
    (Ho, Wo), (H, W) = q.shape[-2:], k.shape[-2:]
    check_plane(H, W, Ho, Wo)
    block_t = tap_tile(window.taps)
    block_p = correlate_pixel_tile(Ho * Wo, block_t, q.dtype)
    return block_t, block_p, -(-(Ho * Wo) // block_p)


def dlinear_tiles(pixels: int, taps: int) -> Tuple[int, int]:
    """(BLOCK_T, BLOCK_P) of aggregate_linear's dlinear kernel: all taps (at least 16, a
    ``tl.dot`` dimension) by at most 1024 pixel-taps and 16..32 pixels (64 x 32 spilled on
    sm_80 in float32, and 16 x 64 in bfloat16)."""
    block_t = max(16, tap_tile(taps))
    p = max(16, min(32, 1024 // block_t))
    return block_t, min(p, max(16, _next_pow2(pixels)))


def attention_query_pixel_tile(pixels: int, block_t: int, dtype: torch.dtype) -> int:
    """BLOCK_P of the query kernel of local_attention's backward: about 1024 elements per
    ``BLOCK_T x BLOCK_P`` tile (512 for float64; the scores and dP tiles live together), 16..128
    pixels."""
    budget = 512 if dtype == torch.float64 else 1024
    p = max(16, min(128, budget // block_t))
    return min(p, max(16, _next_pow2(pixels)))


def attention_kv_tiles(head_width: int, pixels: int, dtype: torch.dtype) -> Tuple[int, int]:
    """(BLOCK_C, BLOCK_P) of the key/value kernel of local_attention's backward: the head's
    widest channel count rounded up to a power of two, at most 32 (a wider head takes several
    channel blocks, each recomputing the scores); about 512 elements per ``BLOCK_C x BLOCK_P``
    accumulator (128 for float64; dk and dv live together; 256 spilled on sm_80), 16..128
    pixels."""
    block_c = min(_next_pow2(head_width), 32)
    budget = 128 if dtype == torch.float64 else 512
    p = max(16, min(128, budget // block_c))
    return block_c, min(p, max(16, _next_pow2(pixels)))


def weight_strides(w: torch.Tensor) -> Tuple[int, int, int, int]:
    """(batch, group, tap, pixel) element strides of a contiguous (B|1, G, KK, Ho|1, Wo|1)
    weight; a broadcast dim gets stride 0 (never expanded in memory)."""
    sb = 0 if w.shape[0] == 1 else w.stride(0)
    sp = 0 if (w.shape[3] == 1 and w.shape[4] == 1) else 1
    return sb, w.stride(1), w.stride(2), sp


def check_plane(*sizes: int) -> None:
    """Offsets inside one (H, W) or (Ho, Wo) plane are int32: refuse planes of >= 2**31 elements
    (a pair of sizes per plane: ``check_plane(H, W, Ho, Wo)``)."""
    for a, b in zip(sizes[::2], sizes[1::2]):
        if a * b > _INT32_MAX:
            raise ValueError(f"triton backend: one spatial plane of {a}x{b} = {a * b} elements exceeds 2**31 - 1")


def launchable(programs: int) -> int:
    if programs > _INT32_MAX:
        raise ValueError(f"triton backend: {programs} programs exceed the 1-D grid limit 2**31 - 1; "
                         f"use a smaller batch")
    return programs


@lru_cache(maxsize=256)
def clamp_candidates(length: int, k: int, d: int) -> int:
    """Largest number of (output, tap) pairs that read one input position along an axis of the
    clamp border (at most 2K-1; K in the interior). The transpose kernel loops this many
    candidates per axis."""
    best = 0
    for h in range(length):
        r, hp = h % d, h // d
        lr = -(-(length - r) // d)
        lo = 0 if hp - k + 1 <= 0 else hp - k + 1 + k // 2
        hi = lr - 1 if hp >= lr - k else hp + k // 2
        best = max(best, hi - lo + 1)
    return best



def tile_configs(op: str, dtype: torch.dtype, taps: int, border: str = "zero"):
    """Every tile configuration the launcher of ``op`` picks for large planes (smaller planes
    only shrink BLOCK_P) on ``border``: a list of constexpr dicts."""
    if op == "correlate":
        bt = tap_tile(taps)
        return [dict(BLOCK_T=bt, BLOCK_P=correlate_pixel_tile(_BIG, bt, dtype), SUM_SPACE=s) for s in (False, True)]
    if op == "local_attention":
        bt = tap_tile(taps)
        return [dict(BLOCK_T=bt, BLOCK_P=correlate_pixel_tile(_BIG, bt, dtype), HAS_REL=r) for r in (False, True)]
    if op in ("aggregate_linear", "aggregate_linear_backward"):
        clamp_dx = op == "aggregate_linear_backward" and border == "clamp"
        return [dict(BLOCK_C=c, BLOCK_P=linear_pixel_tile(_BIG, c, dtype, clamp_dx), BLOCK_M=8, HAS_BIAS=True)
                for c in (1, 2, 4, 8, 16)]
    if op == "local_attention_backward":
        bt, k = tap_tile(taps), math.isqrt(taps)  # a square kernel: the table has (2K-1)**2 entries
        return [dict(BLOCK_T=bt, BLOCK_P=attention_query_pixel_tile(_BIG, bt, dtype),
                     BLOCK_E=_next_pow2((2 * k - 1) ** 2), HAS_REL=r) for r in (False, True)]
    if op == "local_attention_backward_kv":
        return [dict(zip(("BLOCK_C", "BLOCK_P"), attention_kv_tiles(c, _BIG, dtype)), HAS_REL=r)
                for c in (8, 32) for r in (False, True)]
    if op == "aggregate_linear_dlinear":
        bt, bp = dlinear_tiles(_BIG, taps)
        return [dict(BLOCK_T=bt, BLOCK_P=bp, BLOCK_M=16, HAS_BIAS=b,
                     TF32=dtype in (torch.float16, torch.bfloat16)) for b in (False, True)]
    if op not in KERNELS:
        raise ValueError(f"op must be one of {list(KERNELS)}, got {op!r}")
    return [dict(BLOCK_C=c, BLOCK_P=pixel_tile(_BIG, c, dtype)) for c in (1, 2, 4, 8, 16)]

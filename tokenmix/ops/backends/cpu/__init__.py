"""Native CPU backend: C++ kernels (``csrc/``) in the native library (:mod:`tokenmix.ops.native`),
built the first time the backend is asked whether it is available (never at import), with
``-O3 -march=native -fopenmp`` and ``at::parallel_for``. When the build fails (no compiler, no
ninja) :meth:`CpuBackend.unavailable_reason` returns the reason and the dispatcher falls back to
the reference backend with one warning.

Geometry is not re-derived in C++: the per-axis source tables of
:meth:`Window.source_index` (the same ones the reference uses) are passed in, together with
a description of where the column map is affine (``col = j*s + off[v]``), which is where the
vectorised loops run; the rest (clamp-border edges) goes through a scalar loop over the
tables. ``aggregate_transpose`` is a gather over per-axis inverse maps (CSR tables: for every
input row, the (tap, output row) pairs that read it), so it is deterministic; at stride 1 with
a zero border it runs as an aggregate of y over the mirrored window (the C++ side inverts the
tables), with each weight taken at the output pixel its tap reads. Planes whose
output rows fill few vectors (with a group's channels in whole vectors) run channels-last
kernels that index the same source tables directly; their transpose scatters into bands of
input rows that each task owns, in a fixed order, so it is deterministic too. The involution
case (float32, 8 or 16 channels per group, per-pixel weights, zero border, K = 3, 5, 7 at
stride 1 or 2) runs affine channels-last kernels that need no column table at all. No result
depends on the thread count.

Memory: each kernel allocates its result and a per-thread scratch of a few input rows (at most
a few hundred KiB per thread, independent of the batch). correlate of per-pixel weights, which
runs last in aggregate's backward, borrows that scratch from its own result's last planes and
computes them afterwards without scratch, so a forward + backward of aggregate peaks at exactly
y, gx and gw (``benchmarks/ops.py`` counts it through the allocator).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from ... import native
from .. import Backend
from ...window import Window

# ----------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class _Plan:
    rows: torch.Tensor      # (Kh, Ho) int64, -1 = out of image
    cols: torch.Tensor      # (Kw, Wo) int64
    coff: torch.Tensor      # (Kw,) int64: col = j*s + coff[v] where affine
    stride: int             # column stride s
    fa: int                 # output columns [fa, fb) where every tap is affine
    fb: int
    pad_ok: bool            # zero border: reads past the image are zero padding
    ca: int                 # input columns [ca, cb) whose every reader is affine or out of range
    cb: int
    rptr: torch.Tensor      # (H+1,) CSR over input rows
    rpair: torch.Tensor     # (n, 2): (u, i) with rows[u, i] = h
    cptr: torch.Tensor      # (W+1,) CSR over input columns (clamp border only, else empty)
    cpair: torch.Tensor     # (m, 3): (v, j, affine) with cols[v, j] = col


def _longest_run(mask: torch.Tensor) -> Tuple[int, int]:
    best, start, bs, be = 0, None, 0, 0
    for idx, ok in enumerate(mask.tolist() + [False]):
        if ok and start is None:
            start = idx
        elif not ok and start is not None:
            if idx - start > best:
                best, bs, be = idx - start, start, idx
            start = None
    return bs, be


def _csr(index: torch.Tensor, length: int, extra: Optional[torch.Tensor] = None):
    """For a (K, Lo) source map: ptr (length+1,) and pairs (n, 2|3) = (tap, out[, extra]) sorted
    by source."""
    K, Lo = index.shape
    tap = torch.arange(K).repeat_interleave(Lo)
    out = torch.arange(Lo).repeat(K)
    src = index.reshape(-1)
    keep = src >= 0
    cols = [tap[keep], out[keep]] + ([extra.reshape(-1)[keep].long()] if extra is not None else [])
    src = src[keep]
    order = torch.argsort(src * (K * Lo) + cols[0] * Lo + cols[1])
    pairs = torch.stack([c[order] for c in cols], 1).contiguous()
    counts = torch.bincount(src, minlength=length)
    ptr = torch.zeros(length + 1, dtype=torch.int64)
    ptr[1:] = torch.cumsum(counts, 0)
    return ptr, pairs


@functools.lru_cache(maxsize=256)
def _plan(window: Window, H: int, W: int) -> _Plan:
    rows, cols = window.source_index(H, W)
    rows, cols = rows.contiguous(), cols.contiguous()
    Kw, Wo = cols.shape
    K, s, d, p = window.kernel_size[1], window.stride[1], window.dilation[1], window.padding[1]
    v = torch.arange(Kw)
    j = torch.arange(Wo)
    if window.border == "zero":
        coff = v * d - p
        affine = cols >= 0
        fa, fb, pad_ok, ca, cb = 0, Wo, True, 0, W
        cptr, cpair = torch.zeros(W + 1, dtype=torch.int64), torch.zeros(0, 3, dtype=torch.int64)
    else:  # clamp: stride 1, affine away from the edges
        coff = d * (v - K // 2)
        affine = cols == (j[None, :] * s + coff[:, None])
        fa, fb = _longest_run(affine.all(0))
        # input column col is "fast" when for every tap the reader j = col - coff[v] is
        # either not an output column or reads col affinely
        colv = torch.arange(W)[None, :] - coff[:, None]  # (Kw, W)
        inside = (colv >= 0) & (colv < Wo)
        aff_at = torch.zeros_like(inside)
        aff_at[inside] = affine.gather(1, colv.clamp(0, Wo - 1))[inside]
        ca, cb = _longest_run((~inside | aff_at).all(0))
        pad_ok = False
        cptr, cpair = _csr(cols, W, affine)
    rptr, rpair = _csr(rows, H)
    return _Plan(rows, cols, coff.contiguous(), s, fa, fb, pad_ok, ca, cb, rptr, rpair, cptr, cpair)


# ------------------------------------------------------------------------------ backend
class CpuBackend(Backend):
    """C++ kernels for CPU tensors: float32/float64, and float16/bfloat16 computed in float32.

    Tolerances are against the float64 reference. float32 results differ from the reference
    only by summation order (fused multiply-adds, register-blocked over taps and channels).
    """

    name = "cpu"
    devices = frozenset({"cpu"})
    dtypes = frozenset({torch.float32, torch.float64, torch.bfloat16, torch.float16})
    fwd_tol = {torch.float64: (1e-12, 1e-10), torch.float32: (1e-5, 1e-5),
               torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-3, 2e-3)}
    bwd_tol = fwd_tol

    def unavailable_reason(self) -> Optional[str]:
        native.load()
        return native.error()

    @staticmethod
    def _ext():
        if not native.load():
            raise RuntimeError(f"tokenmix cpu backend unavailable: {native.error()}")
        return torch.ops.tokenmix_cpu

    def aggregate(self, x, w, window):
        pl = _plan(window, x.shape[2], x.shape[3])
        return self._ext().aggregate(x.contiguous(), w.contiguous(), pl.rows, pl.cols, pl.coff, pl.stride,
                                     pl.fa, pl.fb, pl.pad_ok)

    def correlate(self, q, k, window, groups, sum_batch=False, sum_space=False):
        pl = _plan(window, k.shape[2], k.shape[3])
        return self._ext().correlate(q.contiguous(), k.contiguous(), pl.rows, pl.cols, pl.coff, pl.stride,
                                     pl.fa, pl.fb, pl.pad_ok, int(groups), bool(sum_batch), bool(sum_space))

    def aggregate_transpose(self, y, w, window, input_size):
        H, W = int(input_size[0]), int(input_size[1])
        pl = _plan(window, H, W)
        return self._ext().aggregate_transpose(y.contiguous(), w.contiguous(), pl.rows, pl.cols, pl.coff,
                                               pl.stride, pl.pad_ok, pl.ca, pl.cb, pl.rptr, pl.rpair, pl.cptr,
                                               pl.cpair, H, W)

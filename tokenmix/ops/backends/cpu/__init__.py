"""Native CPU backend: C++ kernels (``csrc/``) in the native library (:mod:`tokenmix.ops.native`),
registered as the CPU kernels of the ``tokenmix::`` ops, so a call on CPU tensors goes from the
op to the kernel without entering Python. The library is built the first time the backend is
asked whether it is available (never at import), with ``-O3 -march=native -fopenmp`` and
``at::parallel_for``. When the build fails (no compiler, no ninja)
:meth:`CpuBackend.unavailable_reason` returns the reason and the dispatcher falls back to the
reference backend with one warning.

The kernels derive the geometry in C++ (``csrc/plan.cpp``: the per-axis source tables of
:meth:`Window.source_index`, where the column map is affine, and the inverse tables of the
transpose), cached per window and input size. ``docs/cpu-backend.md`` describes the kernels.

Memory: each kernel allocates its result and a per-thread scratch of a few input rows (at most
a few hundred KiB per thread, independent of the batch). correlate of per-pixel weights, which
runs last in aggregate's backward, borrows that scratch from its own result's last planes and
computes them afterwards without scratch, so a forward + backward of aggregate peaks at exactly
y, gx and gw (``benchmarks/ops.py`` counts it through the allocator).
"""

from __future__ import annotations

from typing import Optional

import torch

from ... import native
from .. import BORDERS, FLOATING, SUMMATION_ORDER_TOL, Backend


# ------------------------------------------------------------------------------ backend
class CpuBackend(Backend):
    """C++ kernels for CPU tensors: float32/float64, and float16/bfloat16 computed in float32.

    Tolerances are against the float64 reference. float32 results differ from the reference
    only by summation order (fused multiply-adds, register-blocked over taps and channels).
    """

    name = "cpu"
    devices = frozenset({"cpu"})
    dtypes = FLOATING
    borders = BORDERS
    fwd_tol = bwd_tol = SUMMATION_ORDER_TOL

    def unavailable_reason(self) -> Optional[str]:
        native.load()
        return native.error()

    @staticmethod
    def _require():
        if not native.load():
            raise RuntimeError(f"tokenmix cpu backend unavailable: {native.error()}")

    # The ops' CPU kernels, below autograd (the tests and benchmarks call a backend directly).
    def aggregate(self, x, w, window):
        self._require()
        with torch.no_grad():
            return torch.ops.tokenmix.aggregate(x, w, *window.as_args(), "cpu")

    def correlate(self, q, k, window, groups, sum_batch=False, sum_space=False):
        self._require()
        with torch.no_grad():
            return torch.ops.tokenmix.correlate(q, k, *window.as_args(), int(groups), bool(sum_batch),
                                                bool(sum_space), "cpu")

    def aggregate_transpose(self, y, w, window, input_size):
        self._require()
        with torch.no_grad():
            return torch.ops.tokenmix.aggregate_transpose(y, w, *window.as_args(),
                                                          [int(input_size[0]), int(input_size[1])], "cpu")

    def local_attention(self, q, k, v, rel_pos, heads, scale, window, row_bias=None, col_bias=None):
        self._require()
        with torch.no_grad():
            return torch.ops.tokenmix.local_attention(q, k, v, rel_pos, int(heads), float(scale), *window.as_args(),
                                                      "cpu", row_bias, col_bias)

    def local_attention_backward(self, grad_out, q, k, v, rel_pos, out, lse, heads, scale, window, row_bias=None,
                                 col_bias=None):
        self._require()
        with torch.no_grad():
            return torch.ops.tokenmix.local_attention_backward(grad_out, q, k, v, rel_pos, out, lse, int(heads),
                                                               float(scale), *window.as_args(), "cpu", row_bias,
                                                               col_bias)

    def aggregate_linear(self, x, h, weight, bias, window):
        self._require()
        with torch.no_grad():
            return torch.ops.tokenmix.aggregate_linear(x, h, weight, bias, *window.as_args(), "cpu")

    def aggregate_linear_backward(self, grad_y, x, h, weight, bias, window, output_mask):
        self._require()
        with torch.no_grad():
            grads = torch.ops.tokenmix.aggregate_linear_backward(grad_y, x, h, weight, bias, *window.as_args(),
                                                                 list(output_mask), "cpu")
        keep = (*output_mask[:3], output_mask[3] and bias is not None)
        return tuple(g if k else None for g, k in zip(grads, keep))

"""The three primitives and the fused ``aggregate_linear`` (with its backward) as operators of the ``tokenmix::`` namespace.

Each op is defined once, here, with ``torch.library``:

- its schema (geometry as flat int lists ``kernel_size, stride, dilation, padding``, each
  ``[h, w]``, and ``border``; ``backend`` forces a backend by name, None dispatches);
- one device kernel for every device (``CompositeExplicitAutograd``): check the arguments,
  pick a backend with :func:`tokenmix.ops.backends.select_backend`, run it;
- a fake (meta) kernel that returns the output's shape, so
  ``torch.compile(fullgraph=True)`` and ``torch.export`` see one node per call;
- a FLOP formula for ``torch.utils.flop_counter`` (fvcore's is in :mod:`tokenmix.analysis.flops`).

The autograd kernel, for every device, is C++ (``csrc/autograd.cpp``, in the native library of
:mod:`tokenmix.ops.native`): it holds the only copy of the backward formulas and calls these ops
again for the gradients.
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from . import checks
from .backends import select_backend
from .flops import (aggregate_macs, aggregate_transpose_macs, correlate_macs, local_attention_backward_macs,
                    local_attention_macs)
from .flops import aggregate_linear_backward_macs, aggregate_linear_macs, aggregate_macs, aggregate_transpose_macs, \
    correlate_macs
from .window import Window

_GEOMETRY = "int[] kernel_size, int[] stride, int[] dilation, int[] padding, str border"
SCHEMAS = {
    "aggregate": f"aggregate(Tensor x, Tensor w, {_GEOMETRY}, str? backend) -> Tensor",
    "correlate": f"correlate(Tensor q, Tensor k, {_GEOMETRY}, int groups, bool sum_batch, bool sum_space, "
                 f"str? backend) -> Tensor",
    "aggregate_transpose": f"aggregate_transpose(Tensor y, Tensor w, {_GEOMETRY}, SymInt[] input_size, "
                           f"str? backend) -> Tensor",
    # fused local attention: (out, lse), lse the log-sum-exp of the scores per (pixel, head); the
    # per-pixel tap biases come last, with defaults
    "local_attention": f"local_attention(Tensor q, Tensor k, Tensor v, Tensor? rel_pos, int heads, float scale, "
                       f"{_GEOMETRY}, str? backend, Tensor? row_bias=None, Tensor? col_bias=None) -> (Tensor, Tensor)",
    # its gradients (dq, dk, dv, drel_pos, drow_bias, dcol_bias; shape (0,) for an absent bias)
    "local_attention_backward": f"local_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, "
                                f"Tensor? rel_pos, Tensor out, Tensor lse, int heads, float scale, {_GEOMETRY}, "
                                f"str? backend, Tensor? row_bias=None, Tensor? col_bias=None) "
                                f"-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    "aggregate_linear": f"aggregate_linear(Tensor x, Tensor h, Tensor weight, Tensor? bias, {_GEOMETRY}, "
                        f"str? backend) -> Tensor",
    "aggregate_linear_backward": f"aggregate_linear_backward(Tensor grad_y, Tensor x, Tensor h, Tensor weight, "
                                 f"Tensor? bias, {_GEOMETRY}, bool[4] output_mask, str? backend) "
                                 f"-> (Tensor, Tensor, Tensor, Tensor)",
}

_lib = torch.library.Library("tokenmix", "DEF")
for _schema in SCHEMAS.values():
    _lib.define(_schema)


# ----------------------------------------------------------------------------- kernels


def _aggregate(x: Tensor, w: Tensor, kernel_size: List[int], stride: List[int], dilation: List[int],
               padding: List[int], border: str, backend: Optional[str]) -> Tensor:
    window = Window.from_args(kernel_size, stride, dilation, padding, border)
    checks.check_aggregate(x, w, window)
    x, w = x.contiguous(), w.contiguous()
    return select_backend("aggregate", (x, w), window, backend).aggregate(x, w, window)


def _correlate(q: Tensor, k: Tensor, kernel_size: List[int], stride: List[int], dilation: List[int],
               padding: List[int], border: str, groups: int, sum_batch: bool, sum_space: bool,
               backend: Optional[str]) -> Tensor:
    window = Window.from_args(kernel_size, stride, dilation, padding, border)
    checks.check_correlate(q, k, window, groups)
    q, k = q.contiguous(), k.contiguous()
    return select_backend("correlate", (q, k), window, backend).correlate(q, k, window, groups, sum_batch, sum_space)


def _aggregate_transpose(y: Tensor, w: Tensor, kernel_size: List[int], stride: List[int], dilation: List[int],
                         padding: List[int], border: str, input_size: List[int], backend: Optional[str]) -> Tensor:
    window = Window.from_args(kernel_size, stride, dilation, padding, border)
    size = checks.check_aggregate_transpose(y, w, window, tuple(input_size))
    y, w = y.contiguous(), w.contiguous()
    return select_backend("aggregate_transpose", (y, w), window, backend).aggregate_transpose(y, w, window, size)


def _contiguous(*tensors):
    return [None if t is None else t.contiguous() for t in tensors]


def _local_attention(q: Tensor, k: Tensor, v: Tensor, rel_pos: Optional[Tensor], heads: int, scale: float,
                     kernel_size: List[int], stride: List[int], dilation: List[int], padding: List[int], border: str,
                     backend: Optional[str], row_bias: Optional[Tensor] = None, col_bias: Optional[Tensor] = None):
    window = Window.from_args(kernel_size, stride, dilation, padding, border)
    checks.check_local_attention(q, k, v, window, heads, rel_pos, row_bias, col_bias)
    q, k, v, rel_pos, row_bias, col_bias = _contiguous(q, k, v, rel_pos, row_bias, col_bias)
    return select_backend("local_attention", (q, k, v), window, backend).local_attention(
        q, k, v, rel_pos, heads, scale, window, row_bias=row_bias, col_bias=col_bias)


def _local_attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, rel_pos: Optional[Tensor],
                              out: Tensor, lse: Tensor, heads: int, scale: float, kernel_size: List[int],
                              stride: List[int], dilation: List[int], padding: List[int], border: str,
                              backend: Optional[str], row_bias: Optional[Tensor] = None,
                              col_bias: Optional[Tensor] = None):
    window = Window.from_args(kernel_size, stride, dilation, padding, border)
    checks.check_local_attention(q, k, v, window, heads, rel_pos, row_bias, col_bias)
    t = _contiguous(grad_out, q, k, v, rel_pos, out, lse, row_bias, col_bias)
    grads = select_backend("local_attention_backward", (q, k, v), window, backend).local_attention_backward(
        *t[:7], heads, scale, window, row_bias=t[7], col_bias=t[8])
    # the gradient of an absent tensor is an empty tensor
    return tuple(g if g is not None else q.new_empty(0) for g in grads)


def _aggregate_linear(x: Tensor, h: Tensor, weight: Tensor, bias: Optional[Tensor], kernel_size: List[int],
                      stride: List[int], dilation: List[int], padding: List[int], border: str,
                      backend: Optional[str]) -> Tensor:
    window = Window.from_args(kernel_size, stride, dilation, padding, border)
    checks.check_aggregate_linear(x, h, weight, bias, window)
    x, h = x.contiguous(), h.contiguous()
    return select_backend("aggregate_linear", (x, h), window, backend).aggregate_linear(x, h, weight, bias, window)


def _aggregate_linear_backward(grad_y: Tensor, x: Tensor, h: Tensor, weight: Tensor, bias: Optional[Tensor],
                               kernel_size: List[int], stride: List[int], dilation: List[int], padding: List[int],
                               border: str, output_mask: List[bool], backend: Optional[str]):
    window = Window.from_args(kernel_size, stride, dilation, padding, border)
    checks.check_aggregate_linear(x, h, weight, bias, window, grad_y)
    grad_y, x, h = grad_y.contiguous(), x.contiguous(), h.contiguous()
    be = select_backend("aggregate_linear_backward", (x, h), window, backend)
    grads = be.aggregate_linear_backward(grad_y, x, h, weight, bias, window, tuple(bool(m) for m in output_mask))
    # a gradient left out by the mask (or of an absent bias) is an empty tensor
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


KERNELS = {"aggregate": _aggregate, "correlate": _correlate, "aggregate_transpose": _aggregate_transpose,
           "local_attention": _local_attention, "local_attention_backward": _local_attention_backward,
           "aggregate_linear": _aggregate_linear, "aggregate_linear_backward": _aggregate_linear_backward}
for _name, _kernel in KERNELS.items():
    _lib.impl(_name, _kernel, "CompositeExplicitAutograd")


# ------------------------------------------------------------------------ fake kernels


@torch.library.register_fake("tokenmix::aggregate", lib=_lib)
def _(x, w, kernel_size, stride, dilation, padding, border, backend):
    Ho, Wo = Window.from_args(kernel_size, stride, dilation, padding, border).output_size(x.shape[2], x.shape[3])
    return x.new_empty(x.shape[0], x.shape[1], Ho, Wo)


@torch.library.register_fake("tokenmix::correlate", lib=_lib)
def _(q, k, kernel_size, stride, dilation, padding, border, groups, sum_batch, sum_space, backend):
    B, _, Ho, Wo = q.shape
    taps = kernel_size[0] * kernel_size[1]
    return q.new_empty(1 if sum_batch else B, groups, taps, 1 if sum_space else Ho, 1 if sum_space else Wo)


@torch.library.register_fake("tokenmix::aggregate_transpose", lib=_lib)
def _(y, w, kernel_size, stride, dilation, padding, border, input_size, backend):
    return y.new_empty(y.shape[0], y.shape[1], input_size[0], input_size[1])


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of local_attention's log-sum-exp: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("tokenmix::local_attention", lib=_lib)
def _(q, k, v, rel_pos, heads, scale, kernel_size, stride, dilation, padding, border, backend, row_bias=None,
      col_bias=None):
    B, C, Ho, Wo = q.shape
    return q.new_empty(B, v.shape[1], Ho, Wo), q.new_empty(B, heads, Ho, Wo, dtype=_stats_dtype(q.dtype))


@torch.library.register_fake("tokenmix::local_attention_backward", lib=_lib)
def _(grad_out, q, k, v, rel_pos, out, lse, heads, scale, kernel_size, stride, dilation, padding, border, backend,
      row_bias=None, col_bias=None):
    def grad(t):  # contiguous, as every backend returns it
        return q.new_empty(0) if t is None else t.new_empty(t.shape)

    return grad(q), grad(k), grad(v), grad(rel_pos), grad(row_bias), grad(col_bias)


@torch.library.register_fake("tokenmix::aggregate_linear", lib=_lib)
def _(x, h, weight, bias, kernel_size, stride, dilation, padding, border, backend):
    Ho, Wo = Window.from_args(kernel_size, stride, dilation, padding, border).output_size(x.shape[2], x.shape[3])
    return x.new_empty(x.shape[0], x.shape[1], Ho, Wo)


@torch.library.register_fake("tokenmix::aggregate_linear_backward", lib=_lib)
def _(grad_y, x, h, weight, bias, kernel_size, stride, dilation, padding, border, output_mask, backend):
    def grad(t, keep):
        return t.new_empty(t.shape) if keep and t is not None else x.new_empty(0)

    return (grad(x, output_mask[0]), grad(h, output_mask[1]), grad(weight, output_mask[2]),
            grad(bias, output_mask[3]))


# ------------------------------------------------------------------------------- flops
# torch's FlopCounterMode counts 2 flops per multiply-add.


@register_flop_formula(torch.ops.tokenmix.aggregate)
def _aggregate_flop(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * aggregate_macs(x_shape, w_shape, out_shape)


@register_flop_formula(torch.ops.tokenmix.correlate)
def _correlate_flop(q_shape, k_shape, kernel_size, *args, out_shape=None, **kwargs) -> int:
    return 2 * correlate_macs(q_shape, kernel_size[0] * kernel_size[1])


@register_flop_formula(torch.ops.tokenmix.aggregate_transpose)
def _aggregate_transpose_flop(y_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * aggregate_transpose_macs(y_shape, w_shape)


@register_flop_formula(torch.ops.tokenmix.local_attention)
def _local_attention_flop(q_shape, k_shape, v_shape, rel_pos_shape, heads, scale, kernel_size, *args,
                          out_shape=None, **kwargs) -> int:
    return 2 * local_attention_macs(q_shape, kernel_size[0] * kernel_size[1], v_shape)


@register_flop_formula(torch.ops.tokenmix.local_attention_backward)
def _local_attention_backward_flop(grad_out_shape, q_shape, k_shape, v_shape, rel_pos_shape, out_shape_, lse_shape,
                                   heads, scale, kernel_size, *args, out_shape=None, **kwargs) -> int:
    return 2 * local_attention_backward_macs(q_shape, kernel_size[0] * kernel_size[1], v_shape)


@register_flop_formula(torch.ops.tokenmix.aggregate_linear)
def _aggregate_linear_flop(x_shape, h_shape, weight_shape, bias_shape, kernel_size, *args, out_shape=None,
                           **kwargs) -> int:
    return 2 * aggregate_linear_macs(x_shape, h_shape, weight_shape, kernel_size[0] * kernel_size[1])


@register_flop_formula(torch.ops.tokenmix.aggregate_linear_backward)
def _aggregate_linear_backward_flop(grad_y_shape, x_shape, h_shape, weight_shape, bias_shape, kernel_size, stride,
                                    dilation, padding, border, output_mask, *args, out_shape=None, **kwargs) -> int:
    return 2 * aggregate_linear_backward_macs(x_shape, h_shape, weight_shape, kernel_size[0] * kernel_size[1],
                                              output_mask)

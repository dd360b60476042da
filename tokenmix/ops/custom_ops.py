"""The three primitives as ``torch.library`` custom ops in the ``tokenmix::`` namespace.

Each op has a fake (meta) implementation, an autograd formula written with the other two
ops (DESIGN.md 2.2) and a FLOP formula, so ``torch.compile(fullgraph=True)``,
``torch.export`` and fvcore tracing see one named node. The device implementation picks a
backend with :func:`tokenmix.ops.registry.select_backend`.

Geometry travels as flat int lists: ``kernel_size, stride, dilation, padding`` (each
[h, w]) and ``border`` ("zero" | "clamp").

The op bodies are the plain functions ``*_impl`` (checks, backend dispatch, kernel call), and
the autograd formulas take the ops they call as an argument, so that :mod:`.eager` can run the
same implementation and the same formulas without the dispatcher round trips when nothing
observes them.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from . import checks
from .flops import aggregate_macs, aggregate_transpose_macs, correlate_macs
from .backends import select_backend
from .window import Window

# ----------------------------------------------------------------------------- aggregate


def aggregate_impl(x: Tensor, w: Tensor, kernel_size: List[int], stride: List[int], dilation: List[int],
                   padding: List[int], border: str, backend: Optional[str]) -> Tensor:
    window = Window.from_args(kernel_size, stride, dilation, padding, border)
    checks.check_aggregate(x, w, window)
    return run_aggregate(x, w, window, backend)


def run_aggregate(x: Tensor, w: Tensor, window: Window, backend: Optional[str]) -> Tensor:
    """The op body after the checks."""
    x, w = x.contiguous(), w.contiguous()
    return select_backend("aggregate", (x, w), window, backend).aggregate(x, w, window)


@torch.library.custom_op("tokenmix::aggregate", mutates_args=())
def aggregate_op(x: Tensor, w: Tensor, kernel_size: List[int], stride: List[int], dilation: List[int],
                 padding: List[int], border: str, backend: Optional[str]) -> Tensor:
    return aggregate_impl(x, w, kernel_size, stride, dilation, padding, border, backend)


@aggregate_op.register_fake
def _(x, w, kernel_size, stride, dilation, padding, border, backend):
    window = Window.from_args(kernel_size, stride, dilation, padding, border)
    Ho, Wo = window.output_size(x.shape[2], x.shape[3])
    return x.new_empty(x.shape[0], x.shape[1], Ho, Wo)


# ----------------------------------------------------------------------------- correlate


def correlate_impl(q: Tensor, k: Tensor, kernel_size: List[int], stride: List[int], dilation: List[int],
                   padding: List[int], border: str, groups: int, sum_batch: bool, sum_space: bool,
                   backend: Optional[str]) -> Tensor:
    window = Window.from_args(kernel_size, stride, dilation, padding, border)
    checks.check_correlate(q, k, window, groups)
    return run_correlate(q, k, window, groups, sum_batch, sum_space, backend)


def run_correlate(q: Tensor, k: Tensor, window: Window, groups: int, sum_batch: bool, sum_space: bool,
                  backend: Optional[str]) -> Tensor:
    """The op body after the checks."""
    q, k = q.contiguous(), k.contiguous()
    b = select_backend("correlate", (q, k), window, backend)
    return b.correlate(q, k, window, groups, sum_batch, sum_space)


@torch.library.custom_op("tokenmix::correlate", mutates_args=())
def correlate_op(q: Tensor, k: Tensor, kernel_size: List[int], stride: List[int], dilation: List[int],
                 padding: List[int], border: str, groups: int, sum_batch: bool, sum_space: bool,
                 backend: Optional[str]) -> Tensor:
    return correlate_impl(q, k, kernel_size, stride, dilation, padding, border, groups, sum_batch, sum_space,
                          backend)


@correlate_op.register_fake
def _(q, k, kernel_size, stride, dilation, padding, border, groups, sum_batch, sum_space, backend):
    B, _, Ho, Wo = q.shape
    kk = kernel_size[0] * kernel_size[1]
    return q.new_empty(1 if sum_batch else B, groups, kk, 1 if sum_space else Ho, 1 if sum_space else Wo)


# ------------------------------------------------------------------- aggregate_transpose


def aggregate_transpose_impl(y: Tensor, w: Tensor, kernel_size: List[int], stride: List[int],
                             dilation: List[int], padding: List[int], border: str, input_size: List[int],
                             backend: Optional[str]) -> Tensor:
    window = Window.from_args(kernel_size, stride, dilation, padding, border)
    H, W = checks.check_aggregate_transpose(y, w, window, tuple(input_size))
    return run_aggregate_transpose(y, w, window, (H, W), backend)


def run_aggregate_transpose(y: Tensor, w: Tensor, window: Window, input_size: Tuple[int, int],
                            backend: Optional[str]) -> Tensor:
    """The op body after the checks."""
    y, w = y.contiguous(), w.contiguous()
    b = select_backend("aggregate_transpose", (y, w), window, backend)
    return b.aggregate_transpose(y, w, window, input_size)


@torch.library.custom_op("tokenmix::aggregate_transpose", mutates_args=())
def aggregate_transpose_op(y: Tensor, w: Tensor, kernel_size: List[int], stride: List[int],
                           dilation: List[int], padding: List[int], border: str, input_size: List[int],
                           backend: Optional[str]) -> Tensor:
    return aggregate_transpose_impl(y, w, kernel_size, stride, dilation, padding, border, input_size, backend)


@aggregate_transpose_op.register_fake
def _(y, w, kernel_size, stride, dilation, padding, border, input_size, backend):
    return y.new_empty(y.shape[0], y.shape[1], input_size[0], input_size[1])


# ------------------------------------------------------------------------------ autograd
# d aggregate/dx = aggregate_transpose, d aggregate/dw = correlate (summed over broadcast
# dims), d correlate/dq = aggregate(k, g), d correlate/dk = aggregate_transpose(q, g),
# d aggregate_transpose/dy = aggregate(g, w), d aggregate_transpose/dw = correlate(y, g).
# The backward functions call the three ops through `ops` (default: the custom ops, so a
# backward is itself differentiable, traceable and counted); :mod:`.eager` passes IMPLS.


class _Impls:
    """The op bodies under the ops' names (what :mod:`.eager` calls instead of the ops)."""
    aggregate = staticmethod(aggregate_impl)
    correlate = staticmethod(correlate_impl)
    aggregate_transpose = staticmethod(aggregate_transpose_impl)


IMPLS = _Impls()


def _geometry(inputs, n_tensors=2):
    return inputs[n_tensors:n_tensors + 5]


def _broadcast_flags(w: Tensor):
    return w.shape[0] == 1, (w.shape[3] == 1 and w.shape[4] == 1)


def _setup_aggregate(ctx, inputs, output):
    x, w = inputs[:2]
    ctx.save_for_backward(x, w)
    ctx.geometry = _geometry(inputs)
    ctx.backend = inputs[7]


def _backward_aggregate(ctx, gy, ops=None):
    ops = torch.ops.tokenmix if ops is None else ops
    x, w = ctx.saved_tensors
    g, be = ctx.geometry, ctx.backend
    gx = gw = None
    # gx first: the kernel that runs second, while y, gx and gw are all alive, would add its
    # scratch to the peak; the CPU correlate of per-pixel weights lends its scratch from its
    # own output's last planes (csrc/aggregate_cpu.cpp: lent_planes), so it goes second
    if ctx.needs_input_grad[0]:
        gx = ops.aggregate_transpose(gy, w, *g, list(x.shape[2:]), be)
    if ctx.needs_input_grad[1]:
        sb, ss = _broadcast_flags(w)
        gw = ops.correlate(gy, x, *g, w.shape[1], sb, ss, be)
    return gx, gw, None, None, None, None, None, None


def _setup_correlate(ctx, inputs, output):
    q, k = inputs[:2]
    ctx.save_for_backward(q, k)
    ctx.geometry = _geometry(inputs)
    ctx.backend = inputs[10]


def _backward_correlate(ctx, go, ops=None):
    ops = torch.ops.tokenmix if ops is None else ops
    q, k = ctx.saved_tensors
    g, be = ctx.geometry, ctx.backend
    gq = gk = None
    if ctx.needs_input_grad[0]:
        gq = ops.aggregate(k, go, *g, be)
    if ctx.needs_input_grad[1]:
        gk = ops.aggregate_transpose(q, go, *g, list(k.shape[2:]), be)
    return (gq, gk) + (None,) * 9


def _setup_transpose(ctx, inputs, output):
    y, w = inputs[:2]
    ctx.save_for_backward(y, w)
    ctx.geometry = _geometry(inputs)
    ctx.backend = inputs[8]


def _backward_transpose(ctx, gz, ops=None):
    ops = torch.ops.tokenmix if ops is None else ops
    y, w = ctx.saved_tensors
    g, be = ctx.geometry, ctx.backend
    gy = gw = None
    if ctx.needs_input_grad[0]:
        gy = ops.aggregate(gz, w, *g, be)
    if ctx.needs_input_grad[1]:
        sb, ss = _broadcast_flags(w)
        gw = ops.correlate(y, gz, *g, w.shape[1], sb, ss, be)
    return (gy, gw) + (None,) * 7


aggregate_op.register_autograd(_backward_aggregate, setup_context=_setup_aggregate)
correlate_op.register_autograd(_backward_correlate, setup_context=_setup_correlate)
aggregate_transpose_op.register_autograd(_backward_transpose, setup_context=_setup_transpose)

# --------------------------------------------------------------------------------- flops
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

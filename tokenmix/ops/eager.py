"""Eager fast path of the three ops: the same implementation and autograd formulas as the
custom ops of :mod:`.custom_ops`, run without the dispatcher round trips when nothing observes
the call.

A ``torch.library.custom_op`` call costs about 50 us of Python dispatch on top of its body, and
a forward + backward of ``aggregate`` makes three of them (about 0.4 ms in all), which is more
than the kernels take on a small input. When no tracer, compiler, dispatch or function mode,
functorch transform or tensor subclass is there to see the call (:func:`observed`), the public
functions call the op bodies (``*_impl``) through a plain :class:`torch.autograd.Function`
whose context set-up and ``backward`` are the custom ops' own (set up inside ``forward``: a
separate ``setup_context`` sends ``apply`` through functorch's slower path); the backward then calls the op
bodies too, unless it must itself be differentiable (``create_graph=True``) or observed, in
which case it calls the custom ops. Anything that traces or counts (``torch.compile``,
``torch.export``, ``torch.jit.trace``/fvcore, ``FlopCounterMode``, ``make_fx``, fake tensors)
therefore still sees one ``tokenmix::`` node per call.
"""

from __future__ import annotations

import torch

from . import custom_ops

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def observed(*tensors: torch.Tensor) -> bool:
    """Whether anything besides eager autograd may need to see the op call itself."""
    return (torch.jit.is_tracing() or torch.compiler.is_compiling()
            or torch._C._len_torch_dispatch_stack() > 0 or torch._C._is_torch_function_mode_enabled()
            or torch._C._are_functorch_transforms_active()
            or any(type(t) not in _PLAIN or torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors))


def _backward_ops(*tensors: torch.Tensor):
    """The ops a backward calls: the bodies, or the custom ops when the backward is recorded
    (create_graph) or observed."""
    return torch.ops.tokenmix if torch.is_grad_enabled() or observed(*tensors) else custom_ops.IMPLS


class Aggregate(torch.autograd.Function):
    """``tokenmix::aggregate`` without the dispatcher; arguments as the op's."""

    @staticmethod
    def forward(ctx, *inputs):
        out = custom_ops.aggregate_impl(*inputs)
        custom_ops._setup_aggregate(ctx, inputs, out)
        return out

    @staticmethod
    def backward(ctx, gy):
        return custom_ops._backward_aggregate(ctx, gy, ops=_backward_ops(gy))


class Correlate(torch.autograd.Function):
    """``tokenmix::correlate`` without the dispatcher; arguments as the op's."""

    @staticmethod
    def forward(ctx, *inputs):
        out = custom_ops.correlate_impl(*inputs)
        custom_ops._setup_correlate(ctx, inputs, out)
        return out

    @staticmethod
    def backward(ctx, go):
        return custom_ops._backward_correlate(ctx, go, ops=_backward_ops(go))


class AggregateTranspose(torch.autograd.Function):
    """``tokenmix::aggregate_transpose`` without the dispatcher; arguments as the op's."""

    @staticmethod
    def forward(ctx, *inputs):
        out = custom_ops.aggregate_transpose_impl(*inputs)
        custom_ops._setup_transpose(ctx, inputs, out)
        return out

    @staticmethod
    def backward(ctx, gz):
        return custom_ops._backward_transpose(ctx, gz, ops=_backward_ops(gz))

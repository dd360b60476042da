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
which case it calls the custom ops. A backend may instead provide its own autograd node
(:attr:`Backend.autograd`): the cpu backend's is C++ (``csrc/autograd_cpu.cpp``), the same
formulas with the same rule for the backward, so a forward + backward on the CPU runs no Python
between its kernels (measured: forward + backward 4% faster on average over the RedNet stages,
11% on the smallest, 30% on a tiny input). Anything that traces or counts (``torch.compile``,
``torch.export``, ``torch.jit.trace``/fvcore, ``FlopCounterMode``, ``make_fx``, fake tensors)
therefore still sees one ``tokenmix::`` node per call.
"""

from __future__ import annotations

import torch

from . import custom_ops
from .backends import select_backend

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


def _function(name: str, op: str, setup, backward) -> type:
    """A ``torch.autograd.Function`` running the body of ``tokenmix::<op>`` (arguments as the
    op's), with the custom op's context set-up and backward formula."""
    impl = getattr(custom_ops.IMPLS, op)

    def forward(ctx, *inputs):
        out = impl(*inputs)
        setup(ctx, inputs, out)
        return out

    def backward_(ctx, grad):
        return backward(ctx, grad, ops=_backward_ops(grad))

    return type(name, (torch.autograd.Function,),
                {"__doc__": f"``tokenmix::{op}`` without the dispatcher; arguments as the op's.",
                 "forward": staticmethod(forward), "backward": staticmethod(backward_)})


Aggregate = _function("Aggregate", "aggregate", custom_ops._setup_aggregate, custom_ops._backward_aggregate)
Correlate = _function("Correlate", "correlate", custom_ops._setup_correlate, custom_ops._backward_correlate)
AggregateTranspose = _function("AggregateTranspose", "aggregate_transpose", custom_ops._setup_transpose,
                               custom_ops._backward_transpose)

# by op name
FUNCTIONS = {"aggregate": Aggregate, "correlate": Correlate, "aggregate_transpose": AggregateTranspose}


def differentiable(op: str, tensors, args, window, groups: int, input_size, backend):
    """``op`` on inputs that need a gradient, unobserved: the selected backend's own autograd
    node when it has one, else :data:`FUNCTIONS` [op] on the op's arguments ``args``.
    ``groups`` / ``input_size``: G and the input-side (H, W) of the call (as for
    :attr:`Backend.autograd`)."""
    chosen = select_backend(op, tensors, window, backend)
    if chosen.autograd is not None:
        return chosen.autograd(op, *tensors, window, groups, input_size, backend)
    return FUNCTIONS[op].apply(*args)

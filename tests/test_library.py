"""The one route of every call (tokenmix/ops/library.py, ops/csrc/autograd.cpp): the public
functions call the ``tokenmix::`` ops, whose autograd kernel is the native library's C++
Function, whose backward calls the ops again. Every observer (tracing, export, FLOP counting,
compile) therefore sees one ``tokenmix::`` node per call, forward and backward."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tokenmix.ops import Window, aggregate, aggregate_transpose, correlate, library

WINDOWS = [Window(3, stride=2), Window((3, 5), dilation=(2, 1)), Window(3, border="clamp")]
FUNCTIONS = {"aggregate": "Aggregate", "correlate": "Correlate",
             "aggregate_transpose": "AggregateTranspose"}


def _inputs(window, dtype=torch.float64, wshape="full"):
    g = torch.Generator().manual_seed(0)
    B, C, G, H, W = 2, 6, 3, 9, 8
    Ho, Wo = window.output_size(H, W)
    x = torch.randn(B, C, H, W, dtype=dtype, generator=g)
    w_shape = {"full": (B, G, window.taps, Ho, Wo), "static": (1, G, window.taps, 1, 1)}[wshape]
    w = torch.randn(*w_shape, dtype=dtype, generator=g)
    y = torch.randn(B, C, Ho, Wo, dtype=dtype, generator=g)
    return x, w, y, G, (H, W)


def _cases(window, x, w, y, G, size):
    """(name, public call, the same call through torch.ops.tokenmix, its inputs)."""
    args = window.as_args()
    return [
        ("aggregate", lambda a, b: aggregate(a, b, window),
         lambda a, b: torch.ops.tokenmix.aggregate(a, b, *args, None), (x, w)),
        ("correlate", lambda a, b: correlate(a, b, window, G),
         lambda a, b: torch.ops.tokenmix.correlate(a, b, *args, G, False, False, None), (y, x)),
        ("aggregate_transpose", lambda a, b: aggregate_transpose(a, b, window, size),
         lambda a, b: torch.ops.tokenmix.aggregate_transpose(a, b, *args, list(size), None), (y, w)),
    ]


def _assert_node(name, out):
    assert out.grad_fn.name() == f"torch::autograd::CppNode<tokenmix::OpFunction<tokenmix::{FUNCTIONS[name]}> >", \
        out.grad_fn.name()


def test_the_ops_are_defined_once():
    for name, schema in library.SCHEMAS.items():
        op = getattr(torch.ops.tokenmix, name).default
        assert str(op._schema) == f"tokenmix::{schema}"


@pytest.mark.parametrize("wshape", ["full", "static"])
@pytest.mark.parametrize("window", WINDOWS, ids=str)
def test_public_functions_are_the_ops(window, wshape):
    """Forward and both gradients of a public call are bit-identical to a direct op call, and
    the node that autograd records is the C++ Function of the op."""
    x, w, y, G, size = _inputs(window, wshape=wshape)
    for name, public, op, (a, b) in _cases(window, x, w, y, G, size):
        if name == "correlate" and wshape == "static":
            continue
        with torch.no_grad():
            assert torch.equal(public(a, b), op(a, b)), name
        a1, b1 = a.clone().requires_grad_(), b.clone().requires_grad_()
        a2, b2 = a.clone().requires_grad_(), b.clone().requires_grad_()
        out1, out2 = public(a1, b1), op(a2, b2)
        _assert_node(name, out1)
        _assert_node(name, out2)
        gout = torch.randn_like(out1)
        out1.backward(gout)
        out2.backward(gout)
        assert torch.equal(out1, out2), name
        assert torch.equal(a1.grad, a2.grad), name
        assert torch.equal(b1.grad, b2.grad), name


@pytest.mark.parametrize("which", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_input_needing_a_gradient_and_non_contiguous_inputs(which, dtype):
    """One input needing a gradient (the other gets none), non-contiguous inputs and the
    expanded (stride 0) gradient of a sum: the gradient equals that of contiguous copies."""
    window = Window((3, 5), stride=2, dilation=(1, 2))
    x, w, y, G, size = _inputs(window, dtype=dtype)
    xt = x.transpose(2, 3).contiguous().transpose(2, 3)  # same values, column-major storage
    wt = w.transpose(3, 4).contiguous().transpose(3, 4)
    yt = y.transpose(2, 3).contiguous().transpose(2, 3)
    strided = _cases(window, xt, wt, yt, G, size)
    for (name, public, _, (a, b)), (_, _, _, (c, d)) in zip(strided, _cases(window, x, w, y, G, size)):
        ins1, ins2 = [a.clone(memory_format=torch.preserve_format), b.clone(memory_format=torch.preserve_format)], [c, d]
        ins2 = [t.clone() for t in ins2]
        assert not ins1[0].is_contiguous() and ins2[0].is_contiguous()
        ins1[which].requires_grad_(), ins2[which].requires_grad_()
        out1, out2 = public(*ins1), public(*ins2)
        out1.sum().backward()
        out2.sum().backward()
        assert torch.equal(out1, out2), name
        assert torch.equal(ins1[which].grad, ins2[which].grad), name
        assert ins1[1 - which].grad is None, name


def test_backward_calls_the_ops():
    """The backward of aggregate is aggregate_transpose and correlate, each a tokenmix:: op call
    (so profilers, modes and compilers see it), recorded or not."""
    window = Window(3, stride=2)
    x, w, y, G, size = _inputs(window, dtype=torch.float32)

    def op_calls(create_graph):
        a, b = x.clone().requires_grad_(), w.clone().requires_grad_()
        out = aggregate(a, b, window)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            torch.autograd.grad(out, (a, b), torch.ones_like(out), create_graph=create_graph)
        return sorted({e.name for e in prof.events() if e.name.startswith("tokenmix::")})

    assert op_calls(False) == ["tokenmix::aggregate_transpose", "tokenmix::correlate"]
    assert op_calls(True) == ["tokenmix::aggregate_transpose", "tokenmix::correlate"]


def test_double_backward():
    """create_graph=True: the backward's op calls are themselves differentiable."""
    window = Window(3, stride=2)
    x, w, y, G, size = _inputs(window)
    x.requires_grad_(), w.requires_grad_(), y.requires_grad_()
    check = dict(fast_mode=True)
    assert torch.autograd.gradgradcheck(lambda a, b: aggregate(a, b, window), (x, w), **check)
    assert torch.autograd.gradgradcheck(lambda a, b: correlate(a, b, window, G), (y, x), **check)
    assert torch.autograd.gradgradcheck(lambda a, b: aggregate_transpose(a, b, window, size), (y, w), **check)


def test_flop_counter_sees_forward_and_backward():
    window = Window(3, stride=2)
    x, w, y, G, size = _inputs(window, dtype=torch.float32)
    x.requires_grad_(), w.requires_grad_()
    macs = x.shape[0] * x.shape[1] * window.taps * y.shape[2] * y.shape[3]
    with FlopCounterMode(display=False) as fc:
        out = aggregate(x, w, window)
    assert fc.get_total_flops() == 2 * macs
    with FlopCounterMode(display=False) as fc:
        out.backward(torch.ones_like(out))
    counts = {str(k).split(".")[-1]: v for k, v in fc.get_flop_counts()["Global"].items()}
    assert counts == {"aggregate_transpose": 2 * macs, "correlate": 2 * macs}, counts


def test_tracing_sees_the_op():
    window = Window(3)
    x, w, y, G, size = _inputs(window, dtype=torch.float32)
    traced = torch.jit.trace(lambda a, b: aggregate(a, b, window), (x, w), check_trace=False)
    assert "tokenmix::aggregate" in str(traced.graph)
    assert torch.equal(traced(x, w), aggregate(x, w, window))


def test_export_sees_the_op():
    window = Window(3)
    x, w, y, G, size = _inputs(window, dtype=torch.float32)

    class M(torch.nn.Module):
        def forward(self, a, b):
            return aggregate(a, b, window)

    ep = torch.export.export(M(), (x, w))
    assert "tokenmix.aggregate" in str(ep.graph)
    assert torch.equal(ep.module()(x, w), aggregate(x, w, window))


def test_vmap_over_a_batch_of_calls():
    """functorch's vmap runs the ops (no batching rule: torch loops over the vmapped dim)."""
    window = Window(3, stride=2)
    x, w, y, G, size = _inputs(window)
    xs, ws = torch.stack([x, 2 * x]), torch.stack([w, w.flip(0)])
    got = torch.func.vmap(lambda a, b: aggregate(a, b, window))(xs, ws)
    for i in range(2):
        assert torch.equal(got[i], aggregate(xs[i], ws[i], window))


def test_direct_op_calls_check_their_arguments():
    """A direct op call with inconsistent shapes is an error, never a crash or an out-of-bounds
    read."""
    window = Window(3)
    x, w, y, G, size = _inputs(window, dtype=torch.float32)
    with pytest.raises(Exception, match="w"):
        torch.ops.tokenmix.aggregate(x, w[:, :, :4], *window.as_args(), None)
    with pytest.raises(Exception, match="groups|divisible"):
        torch.ops.tokenmix.correlate(y, x, *window.as_args(), 4, False, False, None)

"""The eager fast path (tokenmix/ops/eager.py): the public functions skip the custom-op
dispatcher when nothing observes the call. It must compute exactly what the ops compute,
forward and backward, keep double backward working, and step aside for every observer
(tracing, FLOP counting, dispatch modes), which must still see one tokenmix:: node per call."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tokenmix.ops import Window, aggregate, aggregate_transpose, correlate, eager

WINDOWS = [Window(3, stride=2), Window((3, 5), dilation=(2, 1)), Window(3, border="clamp")]


def _inputs(window, dtype=torch.float64, wshape="full"):
    g = torch.Generator().manual_seed(0)
    B, C, G, H, W = 2, 6, 3, 9, 8
    Ho, Wo = window.output_size(H, W)
    x = torch.randn(B, C, H, W, dtype=dtype, generator=g)
    w_shape = {"full": (B, G, window.taps, Ho, Wo), "static": (1, G, window.taps, 1, 1)}[wshape]
    w = torch.randn(*w_shape, dtype=dtype, generator=g)
    y = torch.randn(B, C, Ho, Wo, dtype=dtype, generator=g)
    return x, w, y, G, (H, W)


def _cases(window, x, w, y, G, size, backend=None):
    """(name, public call, the same call through torch.ops.tokenmix, its inputs)."""
    args = window.as_args()
    return [
        ("aggregate", lambda a, b: aggregate(a, b, window, backend=backend),
         lambda a, b: torch.ops.tokenmix.aggregate(a, b, *args, backend), (x, w)),
        ("correlate", lambda a, b: correlate(a, b, window, G, backend=backend),
         lambda a, b: torch.ops.tokenmix.correlate(a, b, *args, G, False, False, backend), (y, x)),
        ("aggregate_transpose", lambda a, b: aggregate_transpose(a, b, window, size, backend=backend),
         lambda a, b: torch.ops.tokenmix.aggregate_transpose(a, b, *args, list(size), backend), (y, w)),
    ]


# the eager path's autograd node: the cpu backend's C++ node, else (reference) the Python Function
NODE_NAMES = {"aggregate": "AggregateBackward", "correlate": "CorrelateBackward",
              "aggregate_transpose": "AggregateTransposeBackward"}


def _assert_eager_node(name, out, backend):
    node = out.grad_fn
    if backend == "cpu":
        assert node.name().startswith("torch::autograd::CppNode<tokenmix_cpu::"), node.name()
        assert node.name().endswith(f"::{NODE_NAMES[name]}>"), node.name()
    else:
        assert type(node) is eager.FUNCTIONS[name]._backward_cls, f"{name}: {type(node).__name__}"


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("wshape", ["full", "static"])
@pytest.mark.parametrize("window", WINDOWS, ids=str)
def test_eager_path_equals_the_ops(window, wshape, backend):
    """Same kernels, same formulas: forward and both gradients bit-identical to the op path,
    and the eager path is the one taken (its own autograd node)."""
    x, w, y, G, size = _inputs(window, wshape=wshape)
    for name, public, op, (a, b) in _cases(window, x, w, y, G, size, backend):
        if name == "correlate" and wshape == "static":
            continue
        with torch.no_grad():
            assert torch.equal(public(a, b), op(a, b)), name
        a1, b1 = a.clone().requires_grad_(), b.clone().requires_grad_()
        a2, b2 = a.clone().requires_grad_(), b.clone().requires_grad_()
        out1, out2 = public(a1, b1), op(a2, b2)
        _assert_eager_node(name, out1, backend)
        assert "tokenmix" in type(out2.grad_fn).__name__
        gout = torch.randn_like(out1)
        out1.backward(gout)
        out2.backward(gout)
        assert torch.equal(out1, out2), name
        assert torch.equal(a1.grad, a2.grad), name
        assert torch.equal(b1.grad, b2.grad), name


@pytest.mark.parametrize("which", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_node_one_input_and_non_contiguous(which, dtype):
    """The C++ node with one input needing a gradient (the other gets none), non-contiguous
    inputs and the expanded (stride 0) gradient of a sum: the op path's results, bit for bit."""
    window = Window((3, 5), stride=2, dilation=(1, 2))
    x, w, y, G, size = _inputs(window, dtype=dtype)
    x = x.transpose(2, 3).contiguous().transpose(2, 3)  # same values, column-major storage
    w = w.transpose(3, 4).contiguous().transpose(3, 4)
    for name, public, op, (a, b) in _cases(window, x, w, y, G, size):
        ins1 = [a.clone(memory_format=torch.preserve_format), b.clone(memory_format=torch.preserve_format)]
        ins2 = [t.clone(memory_format=torch.preserve_format) for t in ins1]
        ins1[which].requires_grad_(), ins2[which].requires_grad_()
        out1, out2 = public(*ins1), op(*ins2)
        _assert_eager_node(name, out1, "cpu")
        out1.sum().backward()
        out2.sum().backward()
        assert torch.equal(ins1[which].grad, ins2[which].grad), name
        assert ins1[1 - which].grad is None, name


def test_cpu_node_backward_calls_the_kernels_unless_recorded():
    """An unobserved backward of the C++ node runs the kernels directly (no tokenmix:: op
    call); with create_graph=True it calls the differentiable custom ops."""
    window = Window(3, stride=2)
    x, w, y, G, size = _inputs(window, dtype=torch.float32)

    def op_calls(create_graph):
        a, b = x.clone().requires_grad_(), w.clone().requires_grad_()
        out = aggregate(a, b, window)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            torch.autograd.grad(out, (a, b), torch.ones_like(out), create_graph=create_graph)
        return sorted({e.name for e in prof.events() if e.name.startswith("tokenmix::")})

    assert op_calls(False) == []
    assert op_calls(True) == ["tokenmix::aggregate_transpose", "tokenmix::correlate"]


def test_double_backward_through_the_eager_path():
    """create_graph=True: the eager backward calls the (differentiable) ops."""
    window = Window(3, stride=2)
    x, w, y, G, size = _inputs(window)
    x.requires_grad_(), w.requires_grad_(), y.requires_grad_()
    check = dict(fast_mode=True)
    assert torch.autograd.gradgradcheck(lambda a, b: aggregate(a, b, window), (x, w), **check)
    assert torch.autograd.gradgradcheck(lambda a, b: correlate(a, b, window, G), (y, x), **check)
    assert torch.autograd.gradgradcheck(lambda a, b: aggregate_transpose(a, b, window, size), (y, w), **check)


def test_flop_counter_sees_forward_and_backward():
    """A FlopCounterMode around the forward sees the op; one around only the backward of an
    eager forward still sees the two backward ops."""
    window = Window(3, stride=2)
    x, w, y, G, size = _inputs(window, dtype=torch.float32)
    x.requires_grad_(), w.requires_grad_()
    macs = x.shape[0] * x.shape[1] * window.taps * y.shape[2] * y.shape[3]
    with FlopCounterMode(display=False) as fc:
        out = aggregate(x, w, window)
    assert fc.get_total_flops() == 2 * macs
    assert "tokenmix" in type(out.grad_fn).__name__
    out = aggregate(x, w, window)  # eager: the cpu backend's C++ node
    _assert_eager_node("aggregate", out, "cpu")
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


def test_observed():
    t = torch.randn(2)
    assert not eager.observed(t, torch.nn.Parameter(t.clone()))
    with FlopCounterMode(display=False):
        assert eager.observed(t)
    with torch.device("cpu"):  # a torch function mode
        assert eager.observed(t)
    seen = []
    torch.func.vmap(lambda a: seen.append(eager.observed(a)) or a)(torch.randn(3, 2))
    assert seen == [True]


def test_export_sees_the_op():
    window = Window(3)
    x, w, y, G, size = _inputs(window, dtype=torch.float32)

    class M(torch.nn.Module):
        def forward(self, a, b):
            return aggregate(a, b, window)

    ep = torch.export.export(M(), (x, w))
    assert "tokenmix.aggregate" in str(ep.graph)
    assert torch.equal(ep.module()(x, w), aggregate(x, w, window))

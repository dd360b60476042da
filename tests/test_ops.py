"""The op suite: every CPU backend against the independent float64 brute force, gradcheck,
adjoint identities, opcheck, torch.compile, broadcasting, low precision, NaN locality.

The Triton backend runs the same checks under TRITON_INTERPRET=1 in tests/test_triton.py.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from oracle import (WEIGHT_MODES, brute_aggregate, brute_aggregate_transpose, brute_correlate,
                    check_nonfinite_ops, geometries, random_weight)
from tokenmix.ops import Window, aggregate, aggregate_transpose, correlate, get_backend

BACKENDS = ["reference", "cpu"]


def _geom_args(window):
    return window.as_args()


@pytest.mark.parametrize("backend", BACKENDS)
@given(geo=geometries(), mode=st.sampled_from(WEIGHT_MODES), seed=st.integers(0, 2**16))
def test_aggregate_matches_brute_force(backend, geo, mode, seed):
    window, B, C, G, H, W = geo
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, dtype=torch.float64, generator=g)
    Ho, Wo = window.output_size(H, W)
    w = random_weight(B, G, window, Ho, Wo, mode, gen=g)
    y = aggregate(x, w, window, backend=backend)
    torch.testing.assert_close(y, brute_aggregate(x, w, window), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
@given(geo=geometries(), seed=st.integers(0, 2**16), sums=st.sampled_from([(False, False), (True, False),
                                                                              (False, True), (True, True)]))
def test_correlate_matches_brute_force(backend, geo, seed, sums):
    window, B, C, G, H, W = geo
    g = torch.Generator().manual_seed(seed)
    Ho, Wo = window.output_size(H, W)
    q = torch.randn(B, C, Ho, Wo, dtype=torch.float64, generator=g)
    k = torch.randn(B, C, H, W, dtype=torch.float64, generator=g)
    expected = brute_correlate(q, k, window, G)
    if sums == (False, False):
        out = correlate(q, k, window, G, backend=backend)
    else:  # the reduced forms used for the gradient of a broadcast weight
        out = get_backend(backend).correlate(q, k, window, G, sums[0], sums[1])
        if sums[0]:
            expected = expected.sum(0, keepdim=True)
        if sums[1]:
            expected = expected.sum((3, 4), keepdim=True)
    torch.testing.assert_close(out, expected, atol=1e-11, rtol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
@given(geo=geometries(), mode=st.sampled_from(WEIGHT_MODES), seed=st.integers(0, 2**16))
def test_aggregate_transpose_matches_brute_force(backend, geo, mode, seed):
    window, B, C, G, H, W = geo
    g = torch.Generator().manual_seed(seed)
    Ho, Wo = window.output_size(H, W)
    y = torch.randn(B, C, Ho, Wo, dtype=torch.float64, generator=g)
    w = random_weight(B, G, window, Ho, Wo, mode, gen=g)
    x = aggregate_transpose(y, w, window, (H, W), backend=backend)
    torch.testing.assert_close(x, brute_aggregate_transpose(y, w, window, (H, W)), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
@given(geo=geometries(), seed=st.integers(0, 2**16))
def test_adjoint_identities(backend, geo, seed):
    """<aggregate(x, w), y> = <x, aggregate_transpose(y, w)> = <w, correlate(y, x)>."""
    window, B, C, G, H, W = geo
    g = torch.Generator().manual_seed(seed)
    Ho, Wo = window.output_size(H, W)
    x = torch.randn(B, C, H, W, dtype=torch.float64, generator=g)
    y = torch.randn(B, C, Ho, Wo, dtype=torch.float64, generator=g)
    w = torch.randn(B, G, window.taps, Ho, Wo, dtype=torch.float64, generator=g)
    a = (aggregate(x, w, window, backend=backend) * y).sum()
    b = (x * aggregate_transpose(y, w, window, (H, W), backend=backend)).sum()
    c = (w * correlate(y, x, window, G, backend=backend)).sum()
    scale = 1 + a.abs().item()
    assert abs(a.item() - b.item()) <= 1e-10 * scale
    assert abs(a.item() - c.item()) <= 1e-10 * scale


@given(geo=geometries(borders=("reflect",)), mode=st.sampled_from(WEIGHT_MODES), seed=st.integers(0, 2**16))
def test_reflect_border_matches_brute_force_and_adjoints(geo, mode, seed):
    """The reflect border (every CPU backend): the three primitives against the brute force,
    whose source index reflects as ``F.pad(mode="reflect")``, and the adjoint identities."""
    window, B, C, G, H, W = geo
    g = torch.Generator().manual_seed(seed)
    Ho, Wo = window.output_size(H, W)
    x = torch.randn(B, C, H, W, dtype=torch.float64, generator=g)
    y = torch.randn(B, C, Ho, Wo, dtype=torch.float64, generator=g)
    w = random_weight(B, G, window, Ho, Wo, mode, gen=g)
    tol = dict(atol=1e-11, rtol=1e-10)
    torch.testing.assert_close(aggregate(x, w, window), brute_aggregate(x, w, window), **tol)
    torch.testing.assert_close(aggregate_transpose(y, w, window, (H, W)),
                               brute_aggregate_transpose(y, w, window, (H, W)), **tol)
    torch.testing.assert_close(correlate(y, x, window, G), brute_correlate(y, x, window, G), **tol)
    a = (aggregate(x, w, window) * y).sum()
    b = (x * aggregate_transpose(y, w, window, (H, W))).sum()
    assert abs(a.item() - b.item()) <= 1e-10 * (1 + a.abs().item())


def test_reflect_border_gradcheck_and_refusals():
    window = Window(3, stride=2, dilation=2, border="reflect")
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 2, 9, *window.output_size(7, 6), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: aggregate(x, w, window), (x, w))
    with pytest.raises(ValueError, match="padding < input height: padding 2 >= 2"):
        aggregate(torch.randn(1, 4, 2, 9), torch.randn(1, 1, 9, 1, 1), window)


# --------------------------------------------------------------------------- gradients

GRAD_CASES = [
    # (window, B, C, G, H, W, weight mode): H != W with stride 2 is where a well-known
    # involution port gets the input gradient wrong.
    (Window(3, stride=2), 2, 6, 3, 7, 10, "full"),
    (Window(5, stride=2, dilation=2), 1, 4, 2, 11, 8, "full"),
    (Window((3, 2), stride=(2, 1), padding=(1, 0)), 2, 3, 3, 6, 9, "batch1"),
    (Window(3, stride=2), 2, 4, 4, 9, 6, "both1"),
    (Window(3, border="clamp", dilation=2), 2, 4, 2, 7, 9, "full"),
    (Window(4, border="clamp"), 1, 4, 2, 5, 6, "space1"),
    (Window(3, stride=2, border="reflect"), 2, 4, 2, 7, 6, "full"),
    (Window((5, 3), dilation=(1, 2), padding=(2, 3), border="reflect"), 1, 6, 3, 6, 5, "batch1"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda c: f"{c[0]}-{c[-1]}")
def test_gradcheck_all_inputs(backend, case):
    window, B, C, G, H, W, mode = case
    Ho, Wo = window.output_size(H, W)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, C, H, W, dtype=torch.float64, generator=g, requires_grad=True)
    w = random_weight(B, G, window, Ho, Wo, mode, gen=g).requires_grad_()
    q = torch.randn(B, C, Ho, Wo, dtype=torch.float64, generator=g, requires_grad=True)
    # fast_mode checks random projections of the Jacobian: as strict for a wrong index,
    # without one backend call per input element.
    check = dict(fast_mode=True)
    assert torch.autograd.gradcheck(lambda x, w: aggregate(x, w, window, backend=backend), (x, w), **check)
    assert torch.autograd.gradcheck(lambda q, k: correlate(q, k, window, G, backend=backend), (q, x), **check)
    assert torch.autograd.gradcheck(
        lambda y, w: aggregate_transpose(y, w, window, (H, W), backend=backend), (q, w), **check)


def test_gradgradcheck_reference():
    window = Window(3, stride=2)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 7, 6, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(1, 2, 9, 4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x, w: aggregate(x, w, window, backend="reference"), (x, w),
                                        fast_mode=True)


def test_opcheck():
    """The op on CPU tensors runs the native CPU kernels (backend None or "cpu"; the other
    backends are reached on CPU tensors through the public functions only)."""
    backend = None
    g = torch.Generator().manual_seed(0)
    for window in (Window(3, stride=2), Window(3, border="clamp")):
        H, W = 7, 6
        Ho, Wo = window.output_size(H, W)
        x = torch.randn(2, 4, H, W, generator=g, requires_grad=True)
        w = torch.randn(2, 2, 9, Ho, Wo, generator=g, requires_grad=True)
        y = torch.randn(2, 4, Ho, Wo, generator=g, requires_grad=True)
        wb = torch.randn(1, 2, 9, 1, 1, generator=g, requires_grad=True)
        geo = _geom_args(window)
        torch.library.opcheck(torch.ops.tokenmix.aggregate.default, (x, w, *geo, backend))
        torch.library.opcheck(torch.ops.tokenmix.aggregate.default, (x, wb, *geo, backend))
        torch.library.opcheck(torch.ops.tokenmix.correlate.default, (y, x, *geo, 2, False, False, backend))
        torch.library.opcheck(torch.ops.tokenmix.correlate.default, (y, x, *geo, 2, True, True, backend))
        torch.library.opcheck(torch.ops.tokenmix.aggregate_transpose.default, (y, w, *geo, [H, W], backend))


def test_torch_compile_fullgraph():
    window = Window(3, stride=2)

    def f(x, w):
        y = aggregate(x, w, window)
        s = correlate(y, x, window, 2)
        return aggregate_transpose(y, s, window, (x.shape[2], x.shape[3])).sum(), y

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 9, 8, generator=g, requires_grad=True)
    w = torch.randn(2, 2, 9, 5, 4, generator=g, requires_grad=True)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    (l1, y1), (l2, y2) = f(x, w), compiled(x, w)
    torch.testing.assert_close(y1, y2)
    torch.testing.assert_close(l1, l2)
    g1 = torch.autograd.grad(l1, (x, w))
    g2 = torch.autograd.grad(l2, (x, w))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def test_torch_compile_inductor():
    window = Window(3)
    f = torch.compile(lambda x, w: aggregate(x, w, window).relu(), fullgraph=True)
    x, w = torch.randn(1, 4, 6, 5), torch.randn(1, 4, 9, 6, 5)
    torch.testing.assert_close(f(x, w), aggregate(x, w, window).relu())


# ------------------------------------------------------------------------ semantics


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("stride,dilation,H,W", [(1, 1, 9, 7), (2, 1, 11, 6), (2, 2, 13, 10), (3, 1, 8, 8)])
def test_broadcast_weight_is_depthwise_conv(backend, stride, dilation, H, W):
    C, K = 6, 3
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, C, H, W, dtype=torch.float64, generator=g)
    kernel = torch.randn(C, 1, K, K, dtype=torch.float64, generator=g)
    window = Window(K, stride=stride, dilation=dilation)
    y = aggregate(x, kernel.reshape(1, C, K * K, 1, 1), window, backend=backend)
    expected = F.conv2d(x, kernel, stride=stride, dilation=dilation, padding=window.padding, groups=C)
    torch.testing.assert_close(y, expected, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_close_to_float32(backend, dtype):
    b = get_backend(backend)
    if dtype not in b.dtypes:
        pytest.fail(f"backend {backend} must support {dtype}") if dtype == torch.bfloat16 else None
        return
    atol, rtol = b.fwd_tol[dtype]
    window = Window(7, stride=2)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 13, 11, generator=g).to(dtype)
    w = (torch.randn(2, 2, 49, 7, 6, generator=g) / 7).to(dtype)
    y = aggregate(x, w, window, backend=backend)
    assert y.dtype == dtype
    ref = aggregate(x.float(), w.float(), window, backend="reference")
    torch.testing.assert_close(y.float(), ref, atol=atol, rtol=rtol)
    q = torch.randn(2, 8, 7, 6, generator=g).to(dtype)
    s = correlate(q, x, window, 2, backend=backend)
    torch.testing.assert_close(s.float(), correlate(q.float(), x.float(), window, 2, backend="reference"),
                               atol=4 * atol, rtol=rtol)
    t = aggregate_transpose(q, w, window, (13, 11), backend=backend)
    torch.testing.assert_close(t.float(), aggregate_transpose(q.float(), w.float(), window, (13, 11),
                                                              backend="reference"), atol=atol, rtol=rtol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("H,W", [(7, 7), (9, 5), (1, 3), (15, 14)])
def test_odd_sizes_with_stride_two(backend, H, W):
    window = Window(7, stride=2)
    Ho, Wo = window.output_size(H, W)
    assert (Ho, Wo) == (-(-H // 2), -(-W // 2))
    x = torch.randn(1, 4, H, W, dtype=torch.float64)
    w = torch.randn(1, 1, 49, Ho, Wo, dtype=torch.float64)
    torch.testing.assert_close(aggregate(x, w, window, backend=backend), brute_aggregate(x, w, window))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window", [Window(3), Window(3, stride=2, dilation=2), Window(5, border="clamp")],
                         ids=str)
def test_nan_propagates_only_to_windows_that_read_it(backend, window):
    H, W = 11, 9
    x = torch.randn(1, 2, H, W, dtype=torch.float64)
    x[0, 1, 4, 6] = float("nan")
    Ho, Wo = window.output_size(H, W)
    w = torch.randn(1, 1, window.taps, Ho, Wo, dtype=torch.float64)
    y = aggregate(x, w, window, backend=backend)
    # which outputs read (4, 6)? from an indicator image
    ind = torch.zeros(1, 1, H, W, dtype=torch.float64)
    ind[0, 0, 4, 6] = 1
    reads = brute_aggregate(ind, torch.ones(1, 1, window.taps, 1, 1, dtype=torch.float64), window)[0, 0] > 0
    assert reads.any()
    assert torch.isnan(y[0, 1]).eq(reads).all()
    assert not torch.isnan(y[0, 0]).any()


@st.composite
def nonfinite_problems(draw):
    """(window, B, C, G, H, W, weight mode, dtype): the drawn geometries with 1 to 16 channels
    per group, so the CPU backend's channels-last and affine kernels (8 or 16 channels per
    group, rows under a vector) run too."""
    window, B, _, _, H, W = draw(geometries(max_kernel=7, max_size=11))
    G = draw(st.sampled_from([1, 2]))
    C = G * draw(st.sampled_from([1, 3, 8, 16]))
    return (window, draw(st.integers(1, 2)), C, G, H, W, draw(st.sampled_from(WEIGHT_MODES)),
            draw(st.sampled_from([torch.float32, torch.float64])))


def _autograd_backward(backend, window, G, size):
    """backward(op, a, b, gout) of check_nonfinite_ops: autograd through the public op."""
    fns = {"aggregate": lambda a, b: aggregate(a, b, window, backend=backend),
           "correlate": lambda a, b: correlate(a, b, window, G, backend=backend),
           "aggregate_transpose": lambda a, b: aggregate_transpose(a, b, window, size, backend=backend)}

    def forward(op, a, b):
        return fns[op](a, b)

    def backward(op, a, b, gout):
        a, b = a.detach().requires_grad_(), b.detach().requires_grad_()
        return torch.autograd.grad(fns[op](a, b), (a, b), gout)
    return forward, backward


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=25, deadline=None)
@given(problem=nonfinite_problems(), seed=st.integers(0, 2**16))
def test_nonfinite_inputs_and_out_of_image_weights(backend, problem, seed):
    """One rule on every backend: a tap outside the image contributes nothing. NaN/+-inf in
    the weights at such taps never reach an output or a gradient, correlate and the weight
    gradients are exactly 0 there whatever q holds, and NaN/+-inf anywhere in the activations
    reach only the outputs that read them through an in-image tap; everything else equals the
    result with the non-finite entries replaced by 0."""
    window, B, C, G, H, W, mode, dtype = problem
    forward, backward = _autograd_backward(backend, window, G, (H, W))
    tol = get_backend(backend).bwd_tol[dtype]
    check_nonfinite_ops(forward, backward, window, B, C, G, H, W, mode, dtype,
                        torch.Generator().manual_seed(seed), tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("H,W", [(6, 6), (6, 40), (7, 7), (14, 14), (56, 23)])
def test_out_of_image_weights_never_read(backend, H, W):
    """Weights that are all NaN or inf at the taps outside the image leave every output finite
    (the probe of the rule on the kernels' shapes: narrow and wide rows, K = 3 and 7, strides
    1 and 2, 16 channels per group)."""
    for K, stride in ((3, 1), (7, 1), (7, 2)):
        window = Window(K, stride=stride)
        Ho, Wo = window.output_size(H, W)
        outside = ~window.valid_mask(H, W)
        for dtype in (torch.float32, torch.float64):
            x = torch.randn(2, 32, H, W, dtype=dtype)
            for bad in (float("nan"), float("inf"), float("-inf")):
                w = torch.randn(2, 2, K * K, Ho, Wo, dtype=dtype)
                w[:, :, outside] = bad
                y = aggregate(x, w, window, backend=backend)
                assert bool(y.isfinite().all()), (K, stride, dtype, bad, int((~y.isfinite()).sum()))
                q = torch.full((2, 32, Ho, Wo), bad, dtype=dtype)
                o = correlate(q, x, window, 2, backend=backend)
                assert bool((o[:, :, outside] == 0).all()), (K, stride, dtype, bad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    window = Window(3, stride=2, dilation=2)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 11, 6, dtype=torch.float64, generator=g).transpose(2, 3)  # (2, 9, 6, 11)
    Ho, Wo = window.output_size(6, 11)
    w = torch.randn(2, 3, Wo, Ho, 9, dtype=torch.float64, generator=g).permute(0, 1, 4, 3, 2)
    assert not x.is_contiguous() and not w.is_contiguous()
    torch.testing.assert_close(aggregate(x, w, window, backend=backend), brute_aggregate(x, w, window))
    y = torch.randn(2, 9, Wo, Ho, dtype=torch.float64, generator=g).transpose(2, 3)
    torch.testing.assert_close(aggregate_transpose(y, w, window, (6, 11), backend=backend),
                               brute_aggregate_transpose(y, w, window, (6, 11)))
    torch.testing.assert_close(correlate(y, x, window, 3, backend=backend), brute_correlate(y, x, window, 3))


def test_backends_agree_with_reference_on_rednet_like_shape():
    """A larger shape than the hypothesis draws: every CPU backend agrees with the reference."""
    window = Window(7, stride=2)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, 23, 19, generator=g)
    Ho, Wo = window.output_size(23, 19)
    w = torch.randn(2, 4, 49, Ho, Wo, generator=g)
    ref = aggregate(x.double(), w.double(), window, backend="reference")
    for name in BACKENDS:
        atol, rtol = get_backend(name).fwd_tol[torch.float32]
        torch.testing.assert_close(aggregate(x, w, window, backend=name).double(), ref, atol=atol, rtol=rtol)


def test_default_dispatch_uses_cpu_backend_for_cpu_tensors():
    from tokenmix.ops import select_backend
    x, w = torch.randn(1, 2, 5, 5), torch.randn(1, 1, 9, 5, 5)
    assert select_backend("aggregate", (x, w), Window(3)).name == "cpu"


def test_autocast_casts_both_inputs_to_the_autocast_dtype():
    """A float32 value and a bfloat16 kernel (what a conv-made kernel is under CPU autocast)
    meet in bfloat16, for all three primitives, matching the float32 reference."""
    window = Window(3, stride=2)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 9, 8, generator=g)
    w = torch.randn(2, 2, 9, 5, 4, generator=g)
    q = torch.randn(2, 4, 5, 4, generator=g)
    atol, rtol = get_backend("reference").fwd_tol[torch.bfloat16]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = aggregate(x, w.bfloat16(), window)
        s = correlate(q.bfloat16(), x, window, 2)
        t = aggregate_transpose(q, w.bfloat16(), window, (9, 8))
    assert y.dtype == s.dtype == t.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), aggregate(x, w, window), atol=atol, rtol=rtol)
    torch.testing.assert_close(s.float(), correlate(q, x, window, 2), atol=4 * atol, rtol=rtol)
    torch.testing.assert_close(t.float(), aggregate_transpose(q, w, window, (9, 8)), atol=atol, rtol=rtol)
    with pytest.raises(TypeError, match="one dtype"):  # outside autocast, mixed dtypes stay an error
        aggregate(x, w.bfloat16(), window)


# Geometries that reach far past a 9 x 7 image: a stride of 2**24 and 2**31, a dilation of 2**20
# (with its default padding), padding of 2**20 on either axis. Their outputs are small.
FAR_WINDOWS = [
    "Window(3, stride=2**24)",
    "Window((1, 3), stride=2**31)",
    "Window(3, dilation=2**20)",
    "Window(3, dilation=(1, 2**20), padding=(1, 2**20))",
    "Window(3, stride=(2**20, 1), padding=(2**20, 1))",
    "Window(3, stride=(1, 2**20), padding=(1, 2**20))",
]

_FAR_SCRIPT = r"""
import sys
import torch
from oracle import brute_aggregate, brute_aggregate_transpose, brute_correlate
from tokenmix.ops import Window, aggregate, aggregate_transpose, correlate

backend, windows = sys.argv[1], sys.argv[2:]

def status(field):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(field + ":")) * 1024

def run(window, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    B, C, G, H, W = 2, 8, 4, 9, 7
    Ho, Wo = window.output_size(H, W)
    x = torch.randn(B, C, H, W, dtype=dtype, generator=g, requires_grad=True)
    w = torch.randn(B, G, window.taps, Ho, Wo, dtype=dtype, generator=g, requires_grad=True)
    y = torch.randn(B, C, Ho, Wo, dtype=dtype, generator=g, requires_grad=True)
    out = [aggregate(x, w, window, backend=backend), correlate(y, x, window, G, backend=backend),
           aggregate_transpose(y, w, window, (H, W), backend=backend)]
    grads = torch.autograd.grad(sum(o.sum() for o in out), (x, w, y))
    if dtype == torch.float64:
        want = [brute_aggregate(x.detach(), w.detach(), window), brute_correlate(y.detach(), x.detach(), window, G),
                brute_aggregate_transpose(y.detach(), w.detach(), window, (H, W))]
        for o, r in zip(out, want):
            torch.testing.assert_close(o.detach(), r, atol=1e-10, rtol=1e-10)
    return grads

run(Window(3))  # imports, the native library, the first calls' allocations
base = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the present size
    f.write("5")
for text in windows:
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        run(eval(text), dtype)
print("PEAK_RISE", status("VmHWM") - base)
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_far_reaching_geometry_memory_is_bounded(backend):
    """Strides, dilations and padding far beyond the image cost memory of the order of the
    tensors, not of the geometry: a child process runs the three primitives and their gradients
    (through autograd) on them, correct against the brute force, and its peak resident memory
    rises by less than 200 MB over the baseline after importing torch and tokenmix."""
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([tests, os.path.dirname(tests)]))
    out = subprocess.run([sys.executable, "-c", _FAR_SCRIPT, backend, *FAR_WINDOWS], capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rise = int(out.stdout.split("PEAK_RISE")[1].split()[0])
    assert rise < 200 * 2**20, f"peak resident memory rose by {rise / 2**20:.0f} MB"

"""The fused op aggregate_linear: every CPU backend against the composed float64 forms (the
independent brute force for the output, autograd through the reference primitives for every
gradient), gradcheck, opcheck, NaN in never-read weight rows, tiling, errors, tracing and
FLOP counts."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from oracle import brute_aggregate, geometries
from tokenmix.ops import Window, aggregate, aggregate_linear, get_backend

BACKENDS = ["reference", "cpu"]


def _inputs(window, B, C, G, H, W, M, bias=True, dtype=torch.float64, seed=0, noncontiguous=False):
    g = torch.Generator().manual_seed(seed)
    Ho, Wo = window.output_size(H, W)
    rows = G * window.taps

    def make(*shape):
        if noncontiguous:  # every other element of a wider last dimension
            return torch.randn(*shape[:-1], 2 * shape[-1], dtype=torch.float64, generator=g)[..., ::2].to(dtype)
        return torch.randn(*shape, dtype=torch.float64, generator=g).to(dtype)

    x, h, weight = make(B, C, H, W), make(B, M, Ho, Wo), make(rows, M)
    b = make(rows) if bias else None
    return x, h, weight, b


def composed_kernel(h, weight, bias, window):
    B, M, Ho, Wo = h.shape
    w = torch.einsum("rm,bmij->brij", weight, h)
    if bias is not None:
        w = w + bias.view(1, -1, 1, 1)
    return w.reshape(B, weight.shape[0] // window.taps, window.taps, Ho, Wo)


def composed(x, h, weight, bias, window):
    """The composed float64 oracle: the kernel materialised, then the reference aggregate."""
    return aggregate(x, composed_kernel(h, weight, bias, window), window, backend="reference")


def _grads(fn, tensors, gy):
    tensors = [t.detach().clone().requires_grad_(True) if t is not None else None for t in tensors]
    y = fn(*tensors)
    live = [t for t in tensors if t is not None]
    return y, torch.autograd.grad(y, live, gy)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=20, deadline=None)
@given(geo=geometries(max_kernel=7, max_size=11), M=st.sampled_from([1, 3, 5, 9, 17]), bias=st.booleans(),
       noncontiguous=st.booleans(), seed=st.integers(0, 2**16))
def test_matches_composed_float64(backend, geo, M, bias, noncontiguous, seed):
    """Every border; the fused kernels take zero and clamp, a reflect window runs the reference."""
    window, B, C, G, H, W = geo
    if window.border == "reflect" and backend != "reference":
        with pytest.raises(ValueError, match="border 'reflect' of aggregate_linear not in"):
            aggregate_linear(*_inputs(window, B, C, G, H, W, M, bias, seed=seed), window, backend=backend)
        backend = None
    x, h, weight, b = _inputs(window, B, C, G, H, W, M, bias, seed=seed, noncontiguous=noncontiguous)
    gy = torch.randn(B, C, *window.output_size(H, W), dtype=torch.float64)
    y, grads = _grads(lambda *t: aggregate_linear(*t, window, backend=backend), (x, h, weight, b), gy)
    torch.testing.assert_close(y, brute_aggregate(x, composed_kernel(h, weight, b, window), window),
                               atol=1e-11, rtol=1e-10)
    _, expected = _grads(lambda *t: composed(*t, window), (x, h, weight, b), gy)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("mask", [(True, False, False, False), (False, True, False, False),
                                  (False, False, True, False), (False, False, False, True),
                                  (True, True, True, True)])
def test_backward_op_output_mask(mask):
    window = Window((3, 5), stride=(2, 1), dilation=(1, 2))
    x, h, weight, b = _inputs(window, 2, 6, 3, 9, 11, 5)
    gy = torch.randn(2, 6, *window.output_size(9, 11), dtype=torch.float64)
    grads = torch.ops.tokenmix.aggregate_linear_backward(gy, x, h, weight, b, *window.as_args(), list(mask), None)
    _, expected = _grads(lambda *t: composed(*t, window), (x, h, weight, b), gy)
    for keep, got, want in zip(mask, grads, expected):
        if keep:
            torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
        else:
            assert got.numel() == 0


@pytest.mark.parametrize("shape", [
    (2, 8, 40, 37, 3, 4),   # an image's kernel over the tile size (2 MiB): tiles of groups of one image
    (5, 2, 48, 48, 3, 1),   # about 0.9 MiB per image: tiles of one image, computed in its planes
    (7, 6, 5, 8, 4, 3),     # narrow planes: one tile of every image
    (7, 8, 10, 10, 3, 8),   # narrow planes, about 0.3 MiB per image: tiles of four and three images
])
def test_tiles(shape):
    B, C, H, W, M, G = shape
    window = Window(7)
    x, h, weight, b = _inputs(window, B, C, G, H, W, M)
    gy = torch.randn(B, C, H, W, dtype=torch.float64)
    y, grads = _grads(lambda *t: aggregate_linear(*t, window, backend="cpu"), (x, h, weight, b), gy)
    ye, expected = _grads(lambda *t: composed(*t, window), (x, h, weight, b), gy)
    torch.testing.assert_close(y, ye, atol=1e-10, rtol=1e-10)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("border", ["zero", "clamp"])
def test_low_precision(dtype, border):
    window = Window(3, dilation=2, border=border) if border == "clamp" else Window(5, stride=2)
    x, h, weight, b = _inputs(window, 2, 8, 2, 9, 10, 6)
    x64 = (x, h, weight, b)
    low = [t.to(dtype) for t in x64]
    gy = torch.randn(2, 8, *window.output_size(9, 10), dtype=torch.float64)
    y, grads = _grads(lambda *t: aggregate_linear(*t, window, backend="cpu"), low, gy.to(dtype))
    # the oracle on the inputs as rounded to dtype
    ye, expected = _grads(lambda *t: composed(*t, window), [t.double() for t in low], gy.to(dtype).double())
    atol, rtol = get_backend("cpu").fwd_tol[dtype]
    scale = 8 if dtype != torch.float32 else 1  # M*K*K-long sums of rounded products
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), ye, atol=atol * scale * 10, rtol=rtol * scale)
    for got, want in zip(grads, expected):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, atol=atol * scale * 40, rtol=rtol * scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck(backend, bias):
    window = Window((3, 2), stride=(1, 2), dilation=(2, 1))
    x, h, weight, b = _inputs(window, 2, 4, 2, 6, 5, 3, bias)
    tensors = [t.requires_grad_(True) for t in (x, h, weight, b) if t is not None]
    fn = (lambda x, h, w, b: aggregate_linear(x, h, w, b, window, backend=backend)) if bias else \
        (lambda x, h, w: aggregate_linear(x, h, w, None, window, backend=backend))
    assert torch.autograd.gradcheck(fn, tensors)
    if backend == "cpu" and bias:  # the native autograd kernel's create_graph formulas
        assert torch.autograd.gradgradcheck(fn, tensors)


def test_gradcheck_clamp():
    window = Window(3, dilation=(1, 2), border="clamp")
    x, h, weight, b = _inputs(window, 1, 4, 2, 5, 7, 3)
    tensors = [t.requires_grad_(True) for t in (x, h, weight, b)]
    assert torch.autograd.gradcheck(lambda *t: aggregate_linear(*t, window), tensors)


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck(bias):
    window = Window(3, stride=2)
    x, h, weight, b = _inputs(window, 2, 4, 2, 7, 6, 3, bias, dtype=torch.float32)
    args = (x.requires_grad_(), h.requires_grad_(), weight.requires_grad_(),
            b.requires_grad_() if b is not None else None, *window.as_args(), None)
    torch.library.opcheck(torch.ops.tokenmix.aggregate_linear.default, args)
    gy = torch.randn(2, 4, 4, 3)
    bargs = (gy, x.detach(), h.detach(), weight.detach(), b.detach() if b is not None else None, *window.as_args(),
             [True, True, True, bias], None)
    torch.library.opcheck(torch.ops.tokenmix.aggregate_linear_backward.default, bargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_never_read_tap_rows_does_not_leak(backend):
    # 3 x 3 image, K = 7, dilation 1, padding 3: tap rows 0 and 6 (and columns 0 and 6) fall
    # outside the image for every output pixel
    window = Window(7)
    x, h, weight, b = _inputs(window, 2, 4, 2, 3, 3, 5)
    unread = torch.ones(7, 7, dtype=torch.bool)
    unread[1:6, 1:6] = False
    unread = unread.flatten().repeat(2)
    weight_nan, b_nan = weight.clone(), b.clone()
    weight_nan[unread] = float("nan")
    b_nan[unread] = float("inf")
    weight_zero, b_zero = weight.masked_fill(unread[:, None], 0), b.masked_fill(unread, 0)
    gy = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    y, grads = _grads(lambda *t: aggregate_linear(*t, window, backend=backend), (x, h, weight_nan, b_nan), gy)
    ye, expected = _grads(lambda *t: composed(*t, window), (x, h, weight_zero, b_zero), gy)
    assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads)
    torch.testing.assert_close(y, ye, atol=1e-11, rtol=1e-10)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_autograd_saves_no_kernel():
    window = Window(7)
    x, h, weight, b = (t.float().requires_grad_() for t in _inputs(window, 2, 16, 1, 12, 12, 4))
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        aggregate_linear(x, h, weight, b, window)
    assert all(len(s) != 5 for s in saved), saved
    assert sorted(saved) == sorted([tuple(x.shape), tuple(h.shape), tuple(weight.shape), tuple(b.shape)])


def test_compile_export_and_flops():
    window = Window(3, stride=2)
    x, h, weight, b = (t.float() for t in _inputs(window, 2, 4, 2, 7, 6, 3))

    def f(x, h, weight, b):
        return aggregate_linear(x, h, weight, b, window)

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, h, weight, b), f(x, h, weight, b))

    class M(torch.nn.Module):
        def forward(self, x, h, weight, b):
            return f(x, h, weight, b)

    ep = torch.export.export(M(), (x, h, weight, b))
    assert any("aggregate_linear" in str(n.target) for n in ep.graph.nodes)
    torch.testing.assert_close(ep.module()(x, h, weight, b), f(x, h, weight, b))
    B, C, Ho, Wo, M_, KK, G = 2, 4, 4, 3, 3, 9, 2
    macs = B * Ho * Wo * (G * KK * M_ + C * KK)
    with FlopCounterMode(display=False) as fc:
        f(x, h, weight, b)
    assert fc.get_total_flops() == 2 * macs
    xg, hg, wg = (t.clone().requires_grad_() for t in (x, h, weight))
    with FlopCounterMode(display=False) as fc:
        aggregate_linear(xg, hg, wg, b, window).sum().backward()
    # forward + backward: x (recompute + transpose), correlate, h and weight products
    assert fc.get_total_flops() == 2 * (macs + (G * KK * M_ + C * KK) * B * Ho * Wo + C * KK * B * Ho * Wo
                                        + 2 * G * KK * M_ * B * Ho * Wo)


def test_fvcore_counts_linear_and_aggregation():
    pytest.importorskip("fvcore")
    from tokenmix.analysis.flops import count_flops

    window = Window(3, stride=2)
    x, h, weight, b = (t.float() for t in _inputs(window, 2, 4, 2, 7, 6, 3))

    class M(torch.nn.Module):
        def forward(self, x, h):
            return aggregate_linear(x, h, weight, b, window)

    total = count_flops(M(), x, h)
    total = getattr(total, "total", total)
    assert int(total) == 2 * 4 * 3 * (2 * 9 * 3 + 4 * 9)


@pytest.mark.parametrize("call, match", [
    (lambda x, h, w, b, win: aggregate_linear(x[0], h, w, b, win), r"x must be 4-D"),
    (lambda x, h, w, b, win: aggregate_linear(x, h[:, :, :2], w, b, win), r"h spatial size"),
    (lambda x, h, w, b, win: aggregate_linear(x, h[:1], w, b, win), r"h batch 1"),
    (lambda x, h, w, b, win: aggregate_linear(x, h, w[:, :2], b, win), r"weight.shape\[1\] must be h's channels M=3"),
    (lambda x, h, w, b, win: aggregate_linear(x, h, w[:5], b, win), r"weight.shape\[0\] must be G\*K\*K"),
    (lambda x, h, w, b, win: aggregate_linear(x, h, w, b[:4], win), r"bias must have shape"),
    (lambda x, h, w, b, win: aggregate_linear(x, h, w.float(), b, win), r"must have one dtype"),
    (lambda x, h, w, b, win: aggregate_linear(x, h, torch.cat([w, w, w]), None, win), r"not divisible by groups G=6"),
    (lambda x, h, w, b, win: aggregate_linear(x, h, w, b, (3, 3)), r"window must be a tokenmix.ops.Window"),
])
def test_errors(call, match):
    window = Window(3)
    x, h, weight, b = _inputs(window, 2, 4, 2, 5, 6, 3)
    with pytest.raises((ValueError, TypeError), match=match) as info:
        call(x, h, weight, b, window)
    assert "\n" not in str(info.value)


def test_direct_op_call_errors_name_the_argument():
    window = Window(3)
    x, h, weight, b = _inputs(window, 2, 4, 2, 5, 6, 3)
    with pytest.raises(ValueError, match=r"weight.shape\[0\] must be G\*K\*K"):
        torch.ops.tokenmix.aggregate_linear(x, h, weight[:5], b, *window.as_args(), None)


# ------------------------------------------------------------------------------ mixers


def _mixer_pair(preset, **kw):
    from tokenmix.mixers import create_mixer

    torch.manual_seed(0)
    fused = create_mixer(preset, **kw).double()
    composed_m = create_mixer(preset, fused=False, **kw).double()
    composed_m.load_state_dict(fused.state_dict())
    return fused, composed_m


@pytest.mark.parametrize("preset, kw, size", [
    ("involution", dict(dim=32, kernel_size=7), (9, 11)),
    ("involution", dict(dim=32, kernel_size=3, stride=2), (9, 8)),
    ("involution", dict(dim=48, kernel_size=5, dilation=2, groups=3), (12, 7)),
    ("patch_involution", dict(dim=32, kernel_size=3, patch_size=3), (8, 9)),
])
def test_mixer_fused_matches_composed(preset, kw, size):
    fused, composed_m = _mixer_pair(preset, **kw)
    probe = torch.randn(1, kw["dim"], *size, dtype=torch.float64)
    assert copy.deepcopy(fused).linear_form(probe) is not None  # (a copy: BN's running stats stay)
    assert composed_m.linear_form(probe) is None
    assert list(fused.state_dict()) == list(composed_m.state_dict())
    for training in (True, False):
        fused.train(training), composed_m.train(training)
        x = torch.randn(2, kw["dim"], *size, dtype=torch.float64)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = fused(xa), composed_m(xb)
        torch.testing.assert_close(ya, yb, atol=1e-10, rtol=1e-10)
        gy = torch.randn_like(ya)
        ga = torch.autograd.grad(ya, [xa, *fused.parameters()], gy)
        gb = torch.autograd.grad(yb, [xb, *composed_m.parameters()], gy)
        for a, b in zip(ga, gb):
            torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)
    # Mixer.kernel still returns the whole kernel
    torch.testing.assert_close(fused.kernel(x), composed_m.kernel(x))


def test_mixer_fused_saves_no_kernel():
    fused, composed_m = _mixer_pair("involution", dim=32, kernel_size=7)
    x = torch.randn(2, 32, 9, 9, dtype=torch.float64, requires_grad=True)

    def saved_ndims(m):
        dims = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: dims.append(t.dim()) or t, lambda t: t):
            m(x)
        return dims

    assert 5 not in saved_ndims(fused)
    assert 5 in saved_ndims(composed_m)


def test_user_generator_without_fused_form_runs_composed():
    from tokenmix.mixers import Mixer

    class Gen(torch.nn.Module):
        def forward(self, x, window):
            B, C, H, W = x.shape
            return x.mean(1, keepdim=True).unsqueeze(2).expand(B, 1, window.taps, H, W).contiguous()

    m = Mixer(8, Gen(), Window(3))
    x = torch.randn(2, 8, 6, 7)
    assert m.linear_form(x) is None
    torch.testing.assert_close(m(x), aggregate(x, m.kernel(x), Window(3)))


def test_fused_model_under_autocast_and_compile():
    fused, composed_m = _mixer_pair("involution", dim=32, kernel_size=7)
    fused, composed_m = fused.float().eval(), composed_m.float().eval()
    x = torch.randn(2, 32, 10, 9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ya, yb = fused(x), composed_m(x)
    assert ya.dtype == yb.dtype == torch.bfloat16
    torch.testing.assert_close(ya.float(), yb.float(), atol=0.1, rtol=0.05)
    compiled = torch.compile(fused, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), composed_m(x), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ triton

HAVE_TRITON = __import__("importlib.util").util.find_spec("triton") is not None
ROOT = __import__("os").path.dirname(__import__("os").path.dirname(__import__("os").path.abspath(__file__)))


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
def test_triton_interpreter():
    """The Triton backend's aggregate_linear under TRITON_INTERPRET=1 (a child process: the
    interpreter must be on before triton is imported) vs the composed float64 reference."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "triton_linear_interp.py")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout[-2000:] + r.stderr[-4000:]


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
@pytest.mark.skipif(__import__("os").environ.get("TRITON_INTERPRET") == "1", reason="needs the jit kernels")
@pytest.mark.parametrize("capability", [80, 90])
@pytest.mark.parametrize("dtype, border, tile", [(torch.float32, "zero", -1), (torch.bfloat16, "clamp", 0),
                                                 (torch.float16, "zero", 2), (torch.float32, "clamp", 3)])
def test_triton_aot_compile_has_no_spills(capability, dtype, border, tile):
    from triton_aot import aot_compile, resource_usage
    from tokenmix.ops.backends.triton.common import tile_configs

    tiles = tile_configs("aggregate_linear", dtype, 49)[tile]
    r = resource_usage(aot_compile("aggregate_linear", dtype, (7, 7), border, tiles, capability), capability)
    assert r["spill_stores"] == 0 and r["spill_loads"] == 0 and r["local"] == 0 and r["stack"] == 0, (tiles, r)
    assert 0 < r["regs"] <= 255


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
@pytest.mark.skipif(__import__("os").environ.get("TRITON_INTERPRET") == "1", reason="needs the jit kernels")
@pytest.mark.parametrize("capability", [80, 90])
@pytest.mark.parametrize("op, dtype, border, tile", [
    ("aggregate_linear_backward", torch.float32, "clamp", 3), ("aggregate_linear_backward", torch.bfloat16, "zero", -1),
    ("aggregate_linear_backward", torch.float64, "clamp", 2), ("aggregate_linear_dlinear", torch.float32, "zero", 1),
    ("aggregate_linear_dlinear", torch.bfloat16, "clamp", 1), ("aggregate_linear_dlinear", torch.float64, "zero", 0)])
def test_triton_backward_aot_compile_has_no_spills(capability, op, dtype, border, tile):
    """The backward's dx and dlinear kernels, K = 7 (benchmarks/triton_resources.py prints every
    configuration)."""
    from triton_aot import aot_compile, resource_usage
    from tokenmix.ops.backends.triton.common import tile_configs

    tiles = tile_configs(op, dtype, 49, border)[tile]
    r = resource_usage(aot_compile(op, dtype, (7, 7), border, tiles, capability), capability)
    assert r["spill_stores"] == 0 and r["spill_loads"] == 0 and r["local"] == 0 and r["stack"] == 0, (tiles, r)
    assert 0 < r["regs"] <= 255


@pytest.mark.skipif(not (HAVE_TRITON and torch.cuda.is_available()), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("window, B, C, G, H, W, M", [
    (Window(7), 2, 64, 4, 23, 17, 16),                                  # involution-like
    (Window(3, stride=2, dilation=2), 3, 12, 3, 19, 26, 5),
    (Window(5, dilation=(2, 1), border="clamp"), 2, 34, 2, 16, 11, 37)])
def test_triton_cuda_backward_matches_composed_and_is_deterministic(window, B, C, G, H, W, M, dtype):
    """The Triton backend's fused backward on a GPU against the composed float64 oracle on the
    same rounded values, bitwise equal on a rerun, and through the op's autograd."""
    b = get_backend("triton")
    x, h, weight, bias = _inputs(window, B, C, G, H, W, M, dtype=dtype)
    Ho, Wo = window.output_size(H, W)
    gy = torch.randn(B, C, Ho, Wo, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(dtype)
    _, want = _grads(lambda *t: composed(*t, window), [t.double() for t in (x, h, weight, bias)], gy.double())
    dev = [t.cuda() for t in (x, h, weight, bias)]
    got = b.aggregate_linear_backward(gy.cuda(), *dev, window, (True, True, True, True))
    again = b.aggregate_linear_backward(gy.cuda(), *dev, window, (True, True, True, True))
    atol, rtol = b.bwd_tol[dtype]
    scale = 4 if dtype == torch.bfloat16 else 1
    for g, w, a in zip(got, want, again):
        torch.testing.assert_close(g.cpu().double(), w, atol=atol * scale * 40, rtol=rtol * scale * 4)
        assert torch.equal(g, a), "not bitwise deterministic"
    leaves = [t.clone().requires_grad_(True) for t in dev]
    aggregate_linear(*leaves, window).backward(gy.cuda())
    for t, w in zip(leaves, want):
        torch.testing.assert_close(t.grad.cpu().double(), w, atol=atol * scale * 40, rtol=rtol * scale * 4)

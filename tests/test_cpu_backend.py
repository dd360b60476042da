"""The native CPU backend: build caching, fallback, and what the shared op suite
(tests/test_ops.py, parametrised over backends) does not already cover: broadcast and
non-contiguous weights on larger shapes, float32/16-bit tolerances on RedNet-like shapes
for all three primitives and the reduced correlate forms, thread-count independence, wide
rows. Everything is compared with the float64 reference backend.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenmix.ops import Window, aggregate, aggregate_transpose, correlate, native
from tokenmix.ops import backends as registry
from tokenmix.ops.backends import cpu as cpu_backend
from tokenmix.ops.backends.cpu import CpuBackend
from tokenmix.ops.backends.reference import ReferenceBackend

import native_test_hooks

REF = ReferenceBackend()

WINDOWS = [
    Window(7),
    Window(7, stride=2),
    Window(3, stride=(2, 3), dilation=(1, 2)),
    Window((5, 3), stride=(1, 2), dilation=(2, 1), padding=(3, 0)),
    Window(5, border="clamp"),
    Window(3, dilation=(2, 3), border="clamp"),
]


def _ref(op, *args, **kw):
    """The reference backend in float64."""
    args = [a.double() if isinstance(a, torch.Tensor) else a for a in args]
    return getattr(REF, op)(*args, **kw)


def _cpu():
    b = CpuBackend()
    reason = b.unavailable_reason()
    assert reason is None, f"the cpu backend must build on the test machine: {reason}"
    return b


def _weight(B, G, window, Ho, Wo, mode, dtype, gen):
    b = 1 if mode in ("batch1", "both1") else B
    ho, wo = (1, 1) if mode in ("space1", "both1") else (Ho, Wo)
    return torch.randn(b, G, window.taps, ho, wo, dtype=dtype, generator=gen)


# ------------------------------------------------------------------------------- build


def test_build_is_cached_and_reused_by_a_new_process():
    """The first use builds into torch's extension directory; a second process loads the
    same library without rebuilding it (no file there is rewritten), and importing tokenmix
    in that process does not touch the build until the backend is first asked."""
    _cpu()
    lib = native.build_info()["library"]
    assert lib and os.path.isfile(lib), lib
    ext_dir = os.path.dirname(lib)
    before = {f: os.stat(os.path.join(ext_dir, f)).st_mtime_ns for f in os.listdir(ext_dir)}
    code = ("import torch, tokenmix, tokenmix.ops\n"
            "from tokenmix.ops import native as c\n"
            "assert not c._state['loaded'] and c._state['error'] is None, 'import built the kernels'\n"
            "info = c.build_info()\n"
            "assert info['error'] is None, info\n"
            "print(info['library'], torch._C._dispatch_has_kernel_for_dispatch_key('tokenmix::aggregate', 'CPU'))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ),
                         timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [lib, "True"]
    after = {f: os.stat(os.path.join(ext_dir, f)).st_mtime_ns for f in os.listdir(ext_dir)}
    assert after == before, "a second process rebuilt the extension"


@pytest.fixture
def broken_build(monkeypatch):
    """The cpu backend as if the compiler were missing; restores the real state after."""
    saved = dict(native._state)

    def fail():
        raise RuntimeError("Error building extension 'tokenmix_aggregate_cpu': c++: command not found")

    monkeypatch.setattr(native, "_build", fail)
    native._state.update(loaded=False, error=None, seconds=None, library=None)
    monkeypatch.setattr(registry, "_WARNED", set())
    yield
    native._state.clear()
    native._state.update(saved)


def test_failed_build_falls_back_to_reference_with_one_warning(broken_build):
    window = Window(3, stride=2)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 9, 7, dtype=torch.float64, generator=g)
    Ho, Wo = window.output_size(9, 7)
    w = torch.randn(2, 2, 9, Ho, Wo, dtype=torch.float64, generator=g)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y1 = aggregate(x, w, window)
        y2 = aggregate(x, w, window)
        t = aggregate_transpose(y1, w, window, (9, 7))
    ours = [c for c in caught if "tokenmix" in str(c.message)]
    assert len(ours) == 1, [str(c.message) for c in ours]
    assert issubclass(ours[0].category, RuntimeWarning)
    assert "'cpu'" in str(ours[0].message) and "command not found" in str(ours[0].message)
    torch.testing.assert_close(y1, _ref("aggregate", x, w, window), atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(y2, y1, atol=0, rtol=0)
    torch.testing.assert_close(t, _ref("aggregate_transpose", y1, w, window, (9, 7)), atol=1e-12, rtol=1e-10)
    reason = CpuBackend().unavailable_reason()
    assert reason and "could not build" in reason
    with pytest.raises(ValueError, match="unavailable: could not build"):
        aggregate(x, w, window, backend="cpu")


def test_default_dispatch_is_cpu_when_built():
    _cpu()
    x, w = torch.randn(1, 2, 5, 5), torch.randn(1, 1, 9, 5, 5)
    assert registry.select_backend("aggregate", (x, w), Window(3)).name == "cpu"
    assert registry.select_backend("aggregate", (x.bfloat16(), w.bfloat16()), Window(3)).name == "cpu"


# ---------------------------------------------------------------------- correctness


@pytest.mark.parametrize("window", WINDOWS, ids=str)
@pytest.mark.parametrize("mode", ["full", "batch1", "space1", "both1"])
def test_broadcast_weights_float64(window, mode):
    b = _cpu()
    g = torch.Generator().manual_seed(hash((str(window), mode)) % 2**31)
    B, G, C, H, W = 2, 3, 12, 17, 23
    Ho, Wo = window.output_size(H, W)
    x = torch.randn(B, C, H, W, dtype=torch.float64, generator=g)
    y = torch.randn(B, C, Ho, Wo, dtype=torch.float64, generator=g)
    w = _weight(B, G, window, Ho, Wo, mode, torch.float64, g)
    tol = dict(atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(b.aggregate(x, w, window), _ref("aggregate", x, w, window), **tol)
    torch.testing.assert_close(b.aggregate_transpose(y, w, window, (H, W)),
                               _ref("aggregate_transpose", y, w, window, (H, W)), **tol)
    sb, ss = w.shape[0] == 1, w.shape[3] == 1
    torch.testing.assert_close(b.correlate(y, x, window, G, sb, ss), _ref("correlate", y, x, window, G, sb, ss),
                               atol=1e-11, rtol=1e-10)


def test_non_contiguous_and_broadcast_weights_through_autograd():
    """Strided views in, gradients of an expanded (stride-0) weight out: the op makes inputs
    contiguous and the weight gradient comes back summed over the broadcast dims."""
    _cpu()
    window = Window(5, stride=2, dilation=2)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 23, 19, dtype=torch.float64, generator=g).transpose(2, 3)  # (2, 8, 19, 23)
    Ho, Wo = window.output_size(19, 23)
    base = torch.randn(1, 4, 25, 1, 1, dtype=torch.float64, generator=g)
    for w in (base.expand(2, 4, 25, 1, 1), base.expand(2, 4, 25, Ho, Wo), base[:, :, :, :, :]):
        xr, wr = x.detach().requires_grad_(), w.detach().requires_grad_()
        xs, ws = x.detach().requires_grad_(), w.detach().requires_grad_()
        gy = torch.randn(2, 8, Ho, Wo, dtype=torch.float64, generator=g)
        out = aggregate(xr, wr, window, backend="cpu")
        out.backward(gy)
        ref = aggregate(xs, ws, window, backend="reference")
        ref.backward(gy)
        torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(xr.grad, xs.grad, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(wr.grad, ws.grad, atol=1e-11, rtol=1e-10)


@pytest.mark.parametrize("window", [Window(7), Window(7, stride=2), Window(7, border="clamp")], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_dtype_tolerances_on_rednet_like_shape(window, dtype):
    """float32/bfloat16/float16 against the float64 reference within the backend's own
    tolerances, forward (aggregate) and backward (aggregate_transpose, correlate with the
    reduced forms a broadcast weight's gradient uses)."""
    b = _cpu()
    ftol, btol = b.fwd_tol[dtype], b.bwd_tol[dtype]
    g = torch.Generator().manual_seed(1)
    B, C, G, H, W = 2, 32, 2, 21, 18
    Ho, Wo = window.output_size(H, W)
    x = torch.randn(B, C, H, W, generator=g).to(dtype)
    w = (torch.randn(B, G, 49, Ho, Wo, generator=g) / 7).to(dtype)
    y = (torch.randn(B, C, Ho, Wo, generator=g) / 4).to(dtype)
    out = b.aggregate(x, w, window)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), _ref("aggregate", x, w, window), atol=ftol[0], rtol=ftol[1])
    torch.testing.assert_close(b.aggregate_transpose(y, w, window, (H, W)).double(),
                               _ref("aggregate_transpose", y, w, window, (H, W)), atol=btol[0], rtol=btol[1])
    for sb, ss in ((False, False), (True, False), (False, True), (True, True)):
        got = b.correlate(y, x, window, G, sb, ss).double()
        exp = _ref("correlate", y, x, window, G, sb, ss)
        # the reduced forms sum up to B*Ho*Wo terms: scale the absolute tolerance with them
        n = (B if sb else 1) * (Ho * Wo if ss else 1)
        torch.testing.assert_close(got, exp, atol=btol[0] * n ** 0.5 * 4, rtol=btol[1])


def _three_ops_against_reference(case, seed, corr_terms):
    """aggregate, aggregate_transpose and correlate of a drawn case (window, B, C, G, H, W,
    weight mode, dtype) against the float64 reference, within the backend's tolerances for the
    dtype; correlate's absolute tolerance grows with the square root of the corr_terms products
    each of its outputs sums."""
    b = _cpu()
    window, B, C, G, H, W, mode, dtype = case
    g = torch.Generator().manual_seed(seed)
    Ho, Wo = window.output_size(H, W)
    x = torch.randn(B, C, H, W, generator=g).to(dtype)
    w = (_weight(B, G, window, Ho, Wo, mode, torch.float32, g) / 4).to(dtype)
    y = torch.randn(B, C, Ho, Wo, generator=g).to(dtype)
    ftol, btol = b.fwd_tol[dtype], b.bwd_tol[dtype]
    torch.testing.assert_close(b.aggregate(x, w, window).double(), _ref("aggregate", x, w, window),
                               atol=ftol[0], rtol=ftol[1])
    torch.testing.assert_close(b.aggregate_transpose(y, w, window, (H, W)).double(),
                               _ref("aggregate_transpose", y, w, window, (H, W)), atol=btol[0], rtol=btol[1])
    torch.testing.assert_close(b.correlate(y, x, window, G).double(), _ref("correlate", y, x, window, G),
                               atol=btol[0] * corr_terms ** 0.5, rtol=btol[1])


@st.composite
def _wide_cases(draw):
    """Rows narrower and wider than the kernels' vector blocks (float32 blocks are 8 or 16
    columns: packed rows, weights read and outputs written in place, the transpose's direct
    stores, the shifted last block) and channel counts that exercise every register-block
    size."""
    border = draw(st.sampled_from(["zero", "clamp", "reflect"]))
    K = (draw(st.integers(1, 7)), draw(st.integers(1, 7)))
    D = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    S = (1, 1) if border == "clamp" else (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    window = Window(K, stride=S, dilation=D, border=border)
    extra = 1 if border == "clamp" else 0  # the clamp window must fit in the image: K*d <= size
    lo = [D[a] * (K[a] - 1) + 1 + extra * (D[a] - 1) for a in (0, 1)]
    H = draw(st.integers(lo[0], max(lo[0], 12)))
    W = draw(st.integers(lo[1], 41))
    G = draw(st.sampled_from([1, 2]))
    Cg = draw(st.sampled_from([1, 3, 4, 8, 9, 16]))
    mode = draw(st.sampled_from(["full", "batch1", "space1", "both1"]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    return window, 2, G * Cg, G, H, W, mode, dtype


@settings(max_examples=80, deadline=None)
@given(case=_wide_cases(), seed=st.integers(0, 2**16))
def test_wide_rows_all_vector_paths(case, seed):
    """All three kernels on rows up to 41 wide, in float32 and float64, against the float64
    reference: the packed, in-place and scratch paths, both borders, stride and dilation."""
    _three_ops_against_reference(case, seed, corr_terms=case[2])


@st.composite
def _narrow_cases(draw):
    """Output rows under four vectors (8 float32 / 4 float64 columns each) with channel groups
    of whole vectors: the channels-last kernels and the column kernels beside them (any
    geometry, both borders, one or several row chunks per plane, broadcast weights, 16-bit
    types through float32)."""
    border = draw(st.sampled_from(["zero", "clamp", "reflect"]))
    K = (draw(st.integers(1, 7)), draw(st.integers(1, 7)))
    D = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    S = (1, 1) if border == "clamp" else (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    window = Window(K, stride=S, dilation=D, border=border)
    extra = 1 if border == "clamp" else 0
    lo = [D[a] * (K[a] - 1) + 1 + extra * (D[a] - 1) for a in (0, 1)]
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]))
    lanes = 4 if dtype == torch.float64 else 8
    H = draw(st.integers(lo[0], max(lo[0], 23)))
    W = draw(st.integers(lo[1], max(lo[1], 4 * lanes * S[1] + 1)))
    G = draw(st.sampled_from([1, 2, 3]))
    Cg = lanes * draw(st.sampled_from([1, 2, 3, 4]))
    mode = draw(st.sampled_from(["full", "batch1", "space1", "both1"]))
    return window, draw(st.integers(1, 3)), G * Cg, G, H, W, mode, dtype


@settings(max_examples=100, deadline=None)
@given(case=_narrow_cases(), seed=st.integers(0, 2**16))
def test_narrow_planes_channels_last(case, seed):
    """The channels-last kernels of narrow planes (aggregate and aggregate_transpose on rows
    under a vector, aggregate at stride > 1 and aggregate_transpose at any stride also on rows
    under four; correlate on rows of at most half a vector) against the float64 reference."""
    _three_ops_against_reference(case, seed, corr_terms=case[2] // case[3])


@st.composite
def _affine_cases(draw):
    """Planes of the affine channels-last kernels (agg_pixels_cl_affine, tr_pixels_cl_affine):
    float32, 8 or 16 channels per group, per-pixel weights, a zero border (symmetric or other
    padding, read from the rows' zero columns), K = 3, 5 or 7 columns at unit column dilation
    and column stride 1 or 2, any rows (kernel height, row stride and dilation), rows from
    narrower than a 4-pixel block to wider than four vectors; beside them the planes they must
    leave to the other kernels (column dilation 2, clamp border, bfloat16, static weights)."""
    border = draw(st.sampled_from(["zero", "clamp", "reflect"]))
    Kw = draw(st.sampled_from([3, 5, 7]))
    Kh = draw(st.integers(1, 7))
    dh, dw = draw(st.integers(1, 2)), draw(st.sampled_from([1, 1, 2]))
    S = (1, 1) if border == "clamp" else (draw(st.integers(1, 3)), draw(st.integers(1, 2)))
    pad = None
    if border == "zero" and draw(st.booleans()):  # other padding widths
        pad = (draw(st.integers(0, dh * (Kh - 1))), draw(st.integers(0, dw * (Kw - 1))))
    window = Window((Kh, Kw), stride=S, dilation=(dh, dw), padding=pad, border=border)
    hlo = dh * (Kh - 1) + 1 + (dh - 1 if border == "clamp" else 0)
    wlo = dw * (Kw - 1) + 1 + (dw - 1 if border == "clamp" else 0)
    H = draw(st.integers(hlo, max(hlo, 15)))
    W = draw(st.integers(wlo, 75))
    G = draw(st.sampled_from([1, 2]))
    Cg = draw(st.sampled_from([8, 16]))
    mode = draw(st.sampled_from(["full", "full", "batch1", "space1"]))
    dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.float32, torch.bfloat16]))
    return window, draw(st.integers(1, 2)), G * Cg, G, H, W, mode, dtype


@settings(max_examples=80, deadline=None)
@given(case=_affine_cases(), seed=st.integers(0, 2**16))
def test_affine_channels_last_kernels(case, seed):
    """The affine channels-last kernels (each column's channel vectors loaded, or stored, once
    for every tap of a block of pixels that reads it) on every row width they now take, against
    the float64 reference."""
    _three_ops_against_reference(case, seed, corr_terms=case[2] // case[3])


@st.composite
def _plan_cases(draw):
    """Geometries for the C++ plan (csrc/plan.cpp): rectangular kernels, stride and dilation up
    to 3 per axis, padding drawn per axis (asymmetric between the axes, up to the widest a tap
    can still reach the image with), both borders, H != W including odd and prime sizes."""
    border = draw(st.sampled_from(["zero", "clamp", "reflect"]))
    K = (draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    D = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    if border == "clamp":
        S, pad = (1, 1), None
    else:
        S = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
        pad = (draw(st.integers(0, D[0] * (K[0] - 1))), draw(st.integers(0, D[1] * (K[1] - 1))))
    window = Window(K, stride=S, dilation=D, padding=pad, border=border)
    sizes = st.sampled_from([1, 2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31]) | st.integers(1, 33)
    H, W = draw(sizes), draw(sizes)
    try:
        window.output_size(H, W)
    except ValueError:
        H, W = H + K[0] * D[0], W + K[1] * D[1]  # the window fits with room to spare
    G = draw(st.sampled_from([1, 2]))
    mode = draw(st.sampled_from(["full", "batch1", "space1", "both1"]))
    return window, draw(st.integers(1, 2)), G * draw(st.sampled_from([1, 3, 8])), G, H, W, mode, torch.float64


@settings(max_examples=60, deadline=None)
@given(case=_plan_cases(), seed=st.integers(0, 2**16))
def test_plan_geometries_against_reference(case, seed):
    """The C++ plan of drawn geometries gives the reference's results for all three ops (the
    plan's source tables, affine ranges and inverse tables are a port of Window.source_index)."""
    _three_ops_against_reference(case, seed, corr_terms=case[2])


@pytest.mark.parametrize("W", range(7, 42))
def test_stride2_rows_every_width(W):
    """Every row width from 7 to 41 columns at stride 2 through the column kernels (3 channels
    per group keeps the channels-last ones out): the phase split of the input rows
    (deinterleave2's blocks of 8 and 4 pairs and the block ending at the row's last pair, or the
    scatter fill of the narrowest rows) against the float64 reference, float32."""
    window = Window((3, 7), stride=2)
    _three_ops_against_reference((window, 2, 6, 2, 5, W, "full", torch.float32), seed=W, corr_terms=3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("C,W", [(8, 19), (16, 13), (16, 19), (16, 6)], ids=["wsrc", "wsrc-Cg8", "last", "last-narrow"])
def test_transpose_row_ends_carry_infinities_exactly(dtype, C, W):
    """At stride 1 with a zero border, aggregate_transpose copies each tap row of w shifted by
    the tap's column offset and zero-filled past the row ends (the mirrored aggregate's weights
    at their source pixels; 'wsrc'), or scatters channels-last ('last'). Infinities in the first
    and last column of y and of every tap's weight rows must reach exactly the input pixels the
    reference gives them: a lane taken past a row end would pair a weight with zero padding
    (NaN) or carry it into the neighbouring row."""
    b = _cpu()
    g = torch.Generator().manual_seed(11)
    window = Window(5, dilation=2)
    H = 9
    y = torch.randn(2, C, H, W, generator=g).to(dtype)
    w = torch.randn(2, 2, 25, H, W, generator=g).to(dtype)
    y[0, 1, 3, 0] = float("inf")
    y[1, 5, 4, W - 1] = float("-inf")
    w[0, 1, :, 5, 0] = float("inf")
    w[1, 0, :, 2, W - 1] = float("inf")
    out = b.aggregate_transpose(y, w, window, (H, W)).double()
    ref = _ref("aggregate_transpose", y, w, window, (H, W))
    assert torch.isinf(out).any() and torch.isfinite(out).any()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5, equal_nan=True)


def test_correlate_large_float32_result():
    """A per-pixel correlate result over 8 MB in float32 is written with streaming stores
    (odd row width: unaligned chunk starts and tails) and must equal the reference."""
    b = _cpu()
    g = torch.Generator().manual_seed(5)
    window = Window(7)
    q = torch.randn(1, 12, 109, 111, generator=g)
    k = torch.randn(1, 12, 109, 111, generator=g)
    out = b.correlate(q, k, window, 4)
    assert out.numel() * 4 > 8 << 20
    torch.testing.assert_close(out.double(), _ref("correlate", q, k, window, 4), atol=1e-5, rtol=1e-5)


def _results_on_threads(run, counts):
    """run() once with each torch thread count in counts, restoring the caller's count."""
    threads = torch.get_num_threads()
    try:
        results = []
        for n in counts:
            torch.set_num_threads(n)
            results.append(run())
        return results
    finally:
        torch.set_num_threads(threads)


def test_results_do_not_depend_on_thread_count():
    """No atomics, fixed reduction order: bitwise the same result on 1 and 2 threads."""
    b = _cpu()
    window = Window(5, stride=2)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 16, 19, 17, generator=g)
    Ho, Wo = window.output_size(19, 17)
    w = torch.randn(3, 4, 25, Ho, Wo, generator=g)
    y = torch.randn(3, 16, Ho, Wo, generator=g)
    threads = torch.get_num_threads()

    xn = torch.randn(3, 16, 9, 7, generator=g)  # narrow planes: the channels-last kernels
    wn = torch.randn(3, 2, 25, 5, 4, generator=g)
    yn = torch.randn(3, 16, 5, 4, generator=g)

    def run():
        return (b.aggregate(x, w, window), b.aggregate_transpose(y, w, window, (19, 17)),
                b.correlate(y, x, window, 4), b.correlate(y, x, window, 4, True, True),
                b.aggregate(xn, wn, window), b.aggregate_transpose(yn, wn, window, (9, 7)),
                b.correlate(yn, xn, window, 2))

    one, two = _results_on_threads(run, (1, max(2, threads)))
    for a, c in zip(one, two):
        assert torch.equal(a, c)


@settings(max_examples=60, deadline=None)
@given(case=st.one_of(_wide_cases(), _narrow_cases()), seed=st.integers(0, 2**16))
def test_thread_count_independence_drawn(case, seed):
    """Bitwise the same results on 1, 2 and 3 threads for drawn geometries (both borders,
    stride, dilation, odd row counts, broadcast weights, every dtype): the rows per task
    depend on the thread count, the results must not (a row summed by a two-row block and
    alone differ in rounding, so row pairing must not follow the chunking)."""
    b = _cpu()
    window, B, C, G, H, W, mode, dtype = case
    g = torch.Generator().manual_seed(seed)
    Ho, Wo = window.output_size(H, W)
    x = torch.randn(B, C, H, W, generator=g).to(dtype)
    w = _weight(B, G, window, Ho, Wo, mode, torch.float32, g).to(dtype)
    y = torch.randn(B, C, Ho, Wo, generator=g).to(dtype)

    def run():
        return (b.aggregate(x, w, window), b.aggregate_transpose(y, w, window, (H, W)),
                b.correlate(y, x, window, G), b.correlate(y, x, window, G, True, False),
                b.correlate(y, x, window, G, False, True))

    results = _results_on_threads(run, (1, 2, 3))
    for n, other in zip((2, 3), results[1:]):
        for name, a, c in zip(("aggregate", "aggregate_transpose", "correlate", "correlate sum_batch",
                               "correlate sum_space"), results[0], other):
            assert torch.equal(a, c), f"{name} differs between 1 and {n} threads"


class _lent_planes:
    """Force correlate's lent planes (csrc/scratch.h: lent_planes) in the tests' build of the
    kernels (tests/native_test_hooks.py): n >= 0 of the last planes computed by the scratch-free
    tail kernel, -1 = the kernel's own sizing."""

    def __init__(self, n):
        self.n = n

    def __enter__(self):
        self.prev = native_test_hooks.load().lent_planes_override(self.n)

    def __exit__(self, *exc):
        native_test_hooks.load().lent_planes_override(self.prev)


def _hooked_correlate(q, k, window, groups):
    """correlate through the tests' build of the kernels (the one _lent_planes sets)."""
    return native_test_hooks.load().correlate(q, k, *window.as_args(), groups, False, False, None)


@settings(max_examples=80, deadline=None)
@given(case=st.one_of(_wide_cases(), _narrow_cases()), seed=st.integers(0, 2**16), part=st.booleans())
def test_correlate_tail_drawn(case, seed, part):
    """correlate's scratch-free tail (the planes whose memory the other tasks borrow as scratch)
    on drawn geometries, every plane or all but the first (whose tasks then run on scratch lent
    by the others' output): against the float64 reference, and bitwise equal to the column
    kernels, whose multiply-add chains it repeats (the channels-last kernel of the narrowest
    planes sums in another order: there only the reference)."""
    b = _cpu()
    window, B, C, G, H, W, mode, dtype = case
    g = torch.Generator().manual_seed(seed)
    Ho, Wo = window.output_size(H, W)
    k = torch.randn(B, C, H, W, generator=g).to(dtype)
    q = torch.randn(B, C, Ho, Wo, generator=g).to(dtype)
    with _lent_planes(0):
        plain = _hooked_correlate(q, k, window, G)
    with _lent_planes(B * G - 1 if part else B * G):
        tail = _hooked_correlate(q, k, window, G)
    lanes = 4 if dtype == torch.float64 else 8
    if not (2 * Wo <= lanes and (C // G) % lanes == 0):
        assert torch.equal(tail, plain)
        assert torch.equal(plain, b.correlate(q, k, window, G))  # the tests' build is the shipping kernels
    btol = b.bwd_tol[dtype]
    torch.testing.assert_close(tail.double(), _ref("correlate", q, k, window, G), atol=btol[0] * (C // G) ** 0.5,
                               rtol=btol[1])


def _allocator_peak(fn):
    """Peak bytes held through the ATen CPU allocator during fn() (its results included):
    the running sum of torch.profiler's memory events, after one warm-up call."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    held = peak = 0
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    assert events, "the profiler recorded no allocation"
    for e in sorted(events, key=lambda e: e.start_ns()):
        held += e.nbytes()
        peak = max(peak, held)
    return peak


@pytest.mark.parametrize("threads", [2, 4])
@pytest.mark.parametrize("C,H,G,stride", [(64, 28, 8, 1), (64, 28, 8, 2), (256, 7, 16, 1), (256, 7, 16, 2)])
def test_backward_peak_is_its_results(C, H, G, stride, threads):
    """The memory bar of benchmarks/ops.py, exactly, on two and four threads: aggregate's
    forward + backward holds y, gx and gw and nothing more at its peak (gx first; correlate,
    the last kernel, borrows its per-thread scratch from its own result's last planes, with
    fewer rows per task where the threads' scratch would need too many), and correlate alone
    holds its result only. Narrow (7x7 stride 2) planes take the channels-last correlate."""
    window = Window(7, stride=stride)
    B = 8
    Ho, Wo = window.output_size(H, H)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, C, H, H, generator=g)
    w = torch.randn(B, G, 49, Ho, Wo, generator=g)
    gy = torch.randn(B, C, Ho, Wo, generator=g)

    def fwdbwd():
        xr, wr = x.detach().requires_grad_(), w.detach().requires_grad_()
        aggregate(xr, wr, window, backend="cpu").backward(gy)
        return xr.grad, wr.grad

    [peaks] = _results_on_threads(lambda: (_allocator_peak(fwdbwd),
                                           _allocator_peak(lambda: correlate(gy, x, window, G, backend="cpu"))),
                                   [threads])
    assert peaks == ((gy.numel() + x.numel() + w.numel()) * 4, w.numel() * 4)


def test_wide_rows_past_2_16():
    """A row longer than 2**16 pixels (index arithmetic and the per-thread scratch)."""
    b = _cpu()
    g = torch.Generator().manual_seed(3)
    W = 2**16 + 37
    for window in (Window((1, 5), stride=(1, 3), dilation=(1, 2)), Window((1, 3), border="clamp")):
        x = torch.randn(1, 2, 1, W, generator=g, dtype=torch.float64)
        Ho, Wo = window.output_size(1, W)
        w = torch.randn(1, 1, window.taps, Ho, Wo, generator=g, dtype=torch.float64)
        y = torch.randn(1, 2, Ho, Wo, generator=g, dtype=torch.float64)
        tol = dict(atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(b.aggregate(x, w, window), _ref("aggregate", x, w, window), **tol)
        torch.testing.assert_close(b.aggregate_transpose(y, w, window, (1, W)),
                                   _ref("aggregate_transpose", y, w, window, (1, W)), **tol)
        torch.testing.assert_close(b.correlate(y, x, window, 1, False, True),
                                   _ref("correlate", y, x, window, 1, False, True), atol=1e-10, rtol=1e-10)


def test_gradcheck_clamp_broadcast():
    _cpu()
    window = Window(3, dilation=2, border="clamp")
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 8, 7, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(1, 2, 9, 1, 1, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: aggregate(x, w, window, backend="cpu"), (x, w), fast_mode=True)
    q = torch.randn(2, 4, 8, 7, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k: correlate(q, k, window, 2, backend="cpu"), (q, x), fast_mode=True)


@settings(max_examples=30, deadline=None)
@given(case=st.one_of(_wide_cases(), _narrow_cases()), seed=st.integers(0, 2**16), part=st.booleans())
def test_correlate_tail_out_of_image_taps_are_zero(case, seed, part):
    """correlate's scratch-free tail writes exactly 0 at the taps outside the image however
    non-finite q is, and elsewhere the result on q with its non-finite entries replaced by 0
    (docs/design.md, "The op")."""
    from oracle import check_nonfinite_rule, poison, reads_nonfinite, brute_correlate
    window, B, C, G, H, W, mode, dtype = case
    g = torch.Generator().manual_seed(seed)
    Ho, Wo = window.output_size(H, W)
    k = torch.randn(B, C, H, W, generator=g).to(dtype)
    q, bad = poison(torch.randn(B, C, Ho, Wo, generator=g).to(dtype), g, 0.2)
    with _lent_planes(B * G - 1 if part else B * G):
        tail = _hooked_correlate(q, k, window, G)
    tainted = reads_nonfinite(brute_correlate, bad, torch.zeros(k.shape, dtype=torch.bool), window, G)
    want = _ref("correlate", torch.where(bad, 0, q), k, window, G)
    btol = _cpu().bwd_tol[dtype]
    check_nonfinite_rule(tail, want, tainted, (btol[0] * (C // G) ** 0.5, btol[1]), "correlate tail")

"""Triton backend, verified on a machine without a GPU.

Two kinds of test live here:

* In the normal pytest process (Triton's interpreter off): the backend can be constructed
  whenever Triton is importable; ``import tokenmix`` does not import Triton; every kernel
  compiles ahead of time for sm_80 and sm_90 with zero spills (bundled ptxas/cuobjdump).
* ``test_interp_*``: the kernels run on CPU tensors through Triton's interpreter against the
  float64 brute-force oracle, forward and backward. Triton decides when ``@triton.jit`` runs
  (for its own standard library too) whether to build interpreted functions, so these tests
  need a process started with ``TRITON_INTERPRET=1``. They are only *defined* in such a
  process; in the normal process ``test_interpreter_suite`` re-runs this file in a child
  pytest with ``TRITON_INTERPRET=1 -k test_interp_`` and fails unless every one of them
  passes. (Run them directly: ``TRITON_INTERPRET=1 pytest tests/test_triton.py -k interp``.)
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import subprocess
import sys

import pytest
import torch

from tokenmix.ops.backends import get_backend, list_backends, register_backend
from tokenmix.ops.backends.triton import TritonBackend
from tokenmix.ops.backends.triton.common import clamp_candidates
from tokenmix.ops.window import Window

HAVE_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET", "") == "1"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPS = ("aggregate", "correlate", "aggregate_transpose")
N_INTERP_TESTS = 10  # how many test_interp_* the child must report as passed


# --------------------------------------------------------------------- construction


def test_backend_constructs_when_triton_is_importable():
    """Fails if Triton is installed but the backend cannot be built or its kernels cannot be
    imported, so CI cannot silently fall back to another backend."""
    b = get_backend("triton")
    assert isinstance(b, TritonBackend) and b.name == "triton" and b.devices == frozenset({"cuda"})
    reason = b.unavailable_reason()
    if not HAVE_TRITON:
        assert reason is not None and "triton" in reason
        return
    if torch.cuda.is_available():
        assert reason is None
    else:
        assert reason == "no CUDA device (torch.cuda.is_available() is False)"
    for op in OPS:
        mod = importlib.import_module(f"tokenmix.ops.backends.triton.{op}")
        kernel = getattr(mod, f"{op}_kernel")
        assert "Grid:" in kernel.fn.__doc__ and "Work per program" in kernel.fn.__doc__
    ib = TritonBackend(interpret=True)
    assert ib.name == "triton_interpret" and ib.devices == frozenset({"cpu"})
    assert TritonBackend.name == "triton"  # the instance did not touch the class
    if not INTERPRET:
        assert "TRITON_INTERPRET=1" in ib.unavailable_reason()
    with pytest.raises(TypeError, match="interpret"):
        TritonBackend(interpret="yes")


_BLOCKED_TRITON = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ImportError("triton blocked by the test")
sys.meta_path.insert(0, Block())
import tokenmix
from tokenmix.ops.backends import get_backend
print(sorted(m for m in sys.modules if m.startswith("tokenmix.ops.backends.triton.")))
print(get_backend("triton").unavailable_reason())
"""


def test_tokenmix_works_without_triton():
    """With every ``triton`` import failing, ``import tokenmix`` works, no kernel module is
    imported, and the backend reports why it is unavailable. (``import tokenmix`` may still
    import triton when it is installed: torch.utils.flop_counter does, not tokenmix.)"""
    out = subprocess.run([sys.executable, "-c", _BLOCKED_TRITON], capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, TRITON_INTERPRET="0"), timeout=300)
    assert out.returncode == 0, out.stderr
    modules, reason = out.stdout.strip().split("\n")[-2:]
    assert modules == "[]"
    assert reason.startswith("triton cannot be imported (ImportError: triton blocked by the test")


@pytest.mark.parametrize("length,k,d", [(L, k, d) for L in range(1, 16) for k in (1, 2, 3, 4, 7) for d in (1, 2, 3)
                                        if k * d <= L])
def test_clamp_candidates_is_the_largest_fan_in(length, k, d):
    rows = Window((k, 1), dilation=(d, 1), border="clamp").axis_index(0, length)
    assert clamp_candidates(length, k, d) == int(torch.bincount(rows.flatten(), minlength=length).max())


# ------------------------------------------------------------- ahead-of-time compile

# A subset that runs in ~30 s: per kernel and target, the largest kernel (7x7) with both
# borders, a 16-bit and a 32-bit dtype and the extreme tiles, among them the two that spilled
# with 512-pixel tiles (bf16 zero / fp64 clamp aggregate, BLOCK_C=1).
# benchmarks/triton_resources.py prints every configuration.
AOT_CASES = [
    ("aggregate", torch.float16, "clamp", 0), ("aggregate", torch.bfloat16, "zero", 0),
    ("aggregate", torch.float32, "zero", -1), ("aggregate", torch.float64, "clamp", 0),
    ("correlate", torch.bfloat16, "zero", 1), ("correlate", torch.float32, "clamp", 0),
    ("aggregate_transpose", torch.bfloat16, "clamp", 0), ("aggregate_transpose", torch.float32, "zero", -1),
    ("aggregate", torch.float32, "reflect", -1), ("correlate", torch.float16, "reflect", 1),
    ("aggregate_transpose", torch.float32, "reflect", -1), ("aggregate_transpose", torch.float64, "reflect", 0),
]


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed (the construction test covers this)")
@pytest.mark.skipif(INTERPRET, reason="AOT compilation needs the jit kernels; runs in the parent process")
@pytest.mark.parametrize("capability", [80, 90])
@pytest.mark.parametrize("op,dtype,border,tile", AOT_CASES)
def test_aot_compile_has_no_spills(op, dtype, border, tile, capability):
    from triton_aot import aot_compile, resource_usage
    from tokenmix.ops.backends.triton.common import tile_configs

    tiles = tile_configs(op, dtype, 49)[tile]
    ck = aot_compile(op, dtype, (7, 7), border, tiles, capability)
    assert ck.asm["cubin"][:4] == b"\x7fELF"
    r = resource_usage(ck, capability)
    assert r["spill_stores"] == 0 and r["spill_loads"] == 0, (op, dtype, border, tiles, r)
    assert r["local"] == 0 and r["stack"] == 0, r
    assert 0 < r["regs"] <= 255 and r["regs"] == r["ptxas_regs"], r
    assert r["shared"] <= 48 * 1024, r


def test_kernels_do_not_specialise_on_shapes():
    """Every integer argument (shapes, strides, geometry) is declared do_not_specialize, so no
    new shape compiles a new variant; only K, border, dtype and tiles are compile-time."""
    if not HAVE_TRITON:
        pytest.skip("triton is not installed (the construction test covers this)")
    for op in OPS:
        kernel = getattr(importlib.import_module(f"tokenmix.ops.backends.triton.{op}"), f"{op}_kernel")
        if INTERPRET:
            continue  # interpreted functions carry no parameter metadata
        ints = [p for p in kernel.params if not p.is_constexpr and not p.name.endswith("_ptr")]
        assert ints and all(p.do_not_specialize for p in ints), [p.name for p in ints if not p.do_not_specialize]
        consts = sorted(p.name for p in kernel.params if p.is_constexpr)
        assert set(consts) <= {"KH", "KW", "CLAMP", "REFLECT", "ACC", "SUM_SPACE", "BLOCK_C", "BLOCK_P", "BLOCK_T"}, consts


# ------------------------------------------------------------- on a CUDA device

CUDA_CASES = [
    (Window(7), 2, 64, 4, 23, 17, "full"),                              # involution-like
    (Window(7, stride=2, dilation=2), 2, 6, 6, 19, 26, "both1"),       # depthwise conv
    (Window(5, dilation=(2, 1), border="clamp"), 2, 32, 2, 16, 11, "batch1"),  # neighborhood attn
    (Window((3, 5), stride=(2, 1), padding=(0, 4)), 3, 12, 3, 9, 8, "space1"),
]


@pytest.mark.skipif(not (HAVE_TRITON and torch.cuda.is_available()), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("case", CUDA_CASES)
def test_cuda_matches_reference_and_is_deterministic(case, dtype):
    from tokenmix.ops.functional import aggregate
    from tokenmix.ops.backends.reference import ReferenceBackend

    window, B, C, G, H, W, mode = case
    Ho, Wo = window.output_size(H, W)
    b = get_backend("triton")
    ref = ReferenceBackend()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, C, H, W, generator=gen, dtype=torch.float64)
    y = torch.randn(B, C, Ho, Wo, generator=gen, dtype=torch.float64)
    wb = 1 if mode in ("batch1", "both1") else B
    ws = (1, 1) if mode in ("space1", "both1") else (Ho, Wo)
    w = torch.randn(wb, G, window.taps, *ws, generator=gen, dtype=torch.float64)
    xd, yd, wd = (t.to("cuda", dtype) for t in (x, y, w))
    x, y, w = (t.to(dtype).double() for t in (x, y, w))  # the rounded values the kernels see
    sb, ss = wb == 1, ws == (1, 1)
    runs = [(b.aggregate(xd, wd, window), ref.aggregate(x, w, window), b.fwd_tol),
            (b.aggregate_transpose(yd, wd, window, (H, W)), ref.aggregate_transpose(y, w, window, (H, W)), b.bwd_tol),
            (b.correlate(yd, xd, window, G, sb, ss), ref.correlate(y, x, window, G, sb, ss), b.bwd_tol)]
    for got, want, tol in runs:
        atol, rtol = tol[dtype]
        torch.testing.assert_close(got.cpu().double(), want, atol=atol, rtol=rtol)
    again = [b.aggregate(xd, wd, window), b.aggregate_transpose(yd, wd, window, (H, W)),
             b.correlate(yd, xd, window, G, sb, ss)]
    for (got, _, _), rerun in zip(runs, again):
        assert torch.equal(got, rerun), "not bitwise deterministic"
    # through the custom op and its autograd (backend chosen by dispatch: triton first)
    xr = xd.clone().requires_grad_(True)
    wr = wd.clone().requires_grad_(True)
    aggregate(xr, wr, window).float().square().sum().backward()
    assert xr.grad.shape == xr.shape and wr.grad.shape == wr.shape


# ------------------------------------------------------------- interpreter (parent)


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed (the construction test covers this)")
@pytest.mark.skipif(INTERPRET, reason="this is the child process that runs the test_interp_* tests")
def test_interpreter_suite():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", "test_interp_",
           os.path.abspath(__file__)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    log = out.stdout[-6000:] + out.stderr[-3000:]
    assert out.returncode == 0, log
    m = re.search(r"(\d+) passed", out.stdout)
    assert m is not None and int(m.group(1)) == N_INTERP_TESTS, log
    assert "skipped" not in out.stdout.split("\n")[-2], log


# ------------------------------------------------------------- interpreter (child)

if INTERPRET:
    from hypothesis import example, given, settings
    from hypothesis import strategies as st

    from oracle import brute_aggregate, brute_aggregate_transpose, brute_correlate, check_nonfinite_ops, geometries
    from tokenmix.ops.functional import aggregate, aggregate_transpose, correlate
    from tokenmix.ops.backends.reference import ReferenceBackend

    DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
    MODES = ("full", "batch1", "space1", "both1")
    GUARD = 64

    @pytest.fixture(scope="module")
    def backend():
        b = TritonBackend(interpret=True)
        assert b.unavailable_reason() is None, b.unavailable_reason()
        register_backend(b)
        assert "triton_interpret" in list_backends()
        return b

    def poisoned(t: torch.Tensor) -> torch.Tensor:
        """A contiguous copy of t that lives between NaN guard bands in one storage, so an
        unmasked read past either end shows up as NaN in the result."""
        buf = torch.full((t.numel() + 2 * GUARD,), float("nan"), dtype=t.dtype)
        out = buf[GUARD:GUARD + t.numel()].view(t.shape)
        out.copy_(t)
        return out

    @st.composite
    def problems(draw):
        """(window, B, C, G, H, W, weight mode, dtype): small shapes (the interpreter runs one
        Python step per program and op), K up to 7, stride/dilation up to 2, every border."""
        window, _, _, _, H, W = draw(geometries(max_kernel=7, max_stride=2, max_dilation=2, max_size=9))
        B = draw(st.integers(1, 2))
        G = draw(st.sampled_from([1, 2]))
        C = G * draw(st.sampled_from([1, 3]))
        return window, B, C, G, H, W, draw(st.sampled_from(MODES)), draw(st.sampled_from(DTYPES))

    def weight(B, G, window, Ho, Wo, mode, gen):
        b = 1 if mode in ("batch1", "both1") else B
        ho, wo = (1, 1) if mode in ("space1", "both1") else (Ho, Wo)
        return torch.randn(b, G, window.taps, ho, wo, dtype=torch.float64, generator=gen)

    def close(got, want, tol, what):
        atol, rtol = tol
        assert got.shape == want.shape, (what, got.shape, want.shape)
        assert not torch.isnan(got).any(), f"{what}: NaN (out-of-bounds read of the guard band?)"
        err = (got.double() - want).abs()
        bound = atol + rtol * want.abs()
        assert bool((err <= bound).all()), f"{what}: max err {err.max().item():.3g}, worst excess " \
                                          f"{(err - bound).max().item():.3g}"

    # fixed corners on top of the drawn ones: K=7 with stride and dilation 2, K=7 clamp with
    # dilation on one axis only, a rectangular kernel with custom padding
    EXAMPLES_FWD = [
        (Window(7, stride=2, dilation=2), 2, 3, 1, 9, 14, "full", torch.float16),
        (Window(7, dilation=(2, 1), border="clamp"), 1, 2, 2, 14, 8, "space1", torch.bfloat16),
        (Window((3, 5), stride=(1, 2), padding=(0, 3)), 2, 2, 2, 5, 8, "batch1", torch.float32),
        (Window(5, stride=2, dilation=(1, 2), border="reflect"), 2, 3, 1, 7, 9, "full", torch.float32),
    ]
    EXAMPLES_BWD = [
        (Window(7, dilation=(1, 2), border="clamp"), 1, 3, 1, 7, 15, "both1", torch.float16),
        (Window((5, 3), stride=2, dilation=(1, 2), padding=(1, 0)), 2, 2, 2, 8, 7, "space1", torch.bfloat16),
        (Window((3, 5), stride=(2, 1), padding=(1, 3), border="reflect"), 1, 2, 2, 6, 8, "full", torch.float64),
    ]

    def _with_examples(examples):
        def deco(f):
            for e in examples:
                f = example(e)(f)
            return f
        return deco

    @settings(max_examples=8)
    @_with_examples(EXAMPLES_FWD)
    @given(problems())
    def test_interp_forward(backend, problem):
        """The three primitives on (NaN-guarded) inputs vs the float64 brute force on the
        same rounded values, within the backend's forward tolerance for the dtype."""
        window, B, C, G, H, W, mode, dtype = problem
        Ho, Wo = window.output_size(H, W)
        gen = torch.Generator().manual_seed(B * 1000 + C * 100 + H * 10 + W)
        x = torch.randn(B, C, H, W, dtype=torch.float64, generator=gen).to(dtype)
        y = torch.randn(B, C, Ho, Wo, dtype=torch.float64, generator=gen).to(dtype)
        w = weight(B, G, window, Ho, Wo, mode, gen).to(dtype)
        tol = backend.fwd_tol[dtype]
        got = backend.aggregate(poisoned(x), poisoned(w), window)
        assert got.dtype == dtype
        close(got, brute_aggregate(x, w, window), tol, "aggregate")
        got = backend.aggregate_transpose(poisoned(y), poisoned(w), window, (H, W))
        close(got, brute_aggregate_transpose(y, w, window, (H, W)), tol, "aggregate_transpose")
        sb, ss = mode in ("batch1", "both1"), mode in ("space1", "both1")
        got = backend.correlate(poisoned(y), poisoned(x), window, G, sb, ss)
        want = brute_correlate(y, x, window, G)
        if sb:
            want = want.sum(0, keepdim=True)
        if ss:
            want = want.sum((3, 4), keepdim=True)
        close(got, want, backend.bwd_tol[dtype] if (sb or ss) else tol, "correlate")

    def _grads(fn, inputs, gout):
        ins = [t.detach().clone().requires_grad_(True) for t in inputs]
        out = fn(*ins)
        return out, torch.autograd.grad(out, ins, gout)

    def _backward_with(b, op, a, c, window, size, gout):
        """The two gradients that the ops' autograd kernel computes for ``op(a, c)`` (its
        formulas, docs/design.md "Adjoints"), each primitive run on backend ``b``: on CPU
        tensors the interpreted backend runs outside the op, whose CPU kernel is native."""
        if op == "correlate":
            return b.aggregate(c, gout, window), b.aggregate_transpose(a, gout, window, size)
        sums = (c.shape[0] == 1, c.shape[3:] == (1, 1))
        if op == "aggregate":
            return b.aggregate_transpose(gout, c, window, size), b.correlate(gout, a, window, c.shape[1], *sums)
        return b.aggregate(gout, c, window), b.correlate(a, gout, window, c.shape[1], *sums)

    @settings(max_examples=4)
    @_with_examples(EXAMPLES_BWD)
    @given(problems())
    def test_interp_backward_aggregate(backend, problem):
        """The backward of aggregate on the interpreted Triton backend (aggregate_transpose, and
        correlate with the broadcast sums) vs autograd through the float64 reference."""
        window, B, C, G, H, W, mode, dtype = problem
        Ho, Wo = window.output_size(H, W)
        gen = torch.Generator().manual_seed(7 + B * 1000 + C * 100 + H * 10 + W)
        x = torch.randn(B, C, H, W, dtype=torch.float64, generator=gen).to(dtype)
        w = weight(B, G, window, Ho, Wo, mode, gen).to(dtype)
        gy = torch.randn(B, C, Ho, Wo, dtype=torch.float64, generator=gen).to(dtype)
        gx, gw = _backward_with(backend, "aggregate", x, w, window, (H, W), gy)
        ry, (rgx, rgw) = _grads(lambda a, b: aggregate(a, b, window, backend="reference"),
                                (x.double(), w.double()), gy.double())
        close(backend.aggregate(x, w, window), ry, backend.fwd_tol[dtype], "y")
        close(gx, rgx, backend.bwd_tol[dtype], "grad x")
        close(gw, rgw, backend.bwd_tol[dtype], "grad w")

    @settings(max_examples=4)
    @_with_examples(EXAMPLES_BWD)
    @given(problems())
    def test_interp_backward_correlate_and_transpose(backend, problem):
        """The backwards of correlate (aggregate, aggregate_transpose) and of
        aggregate_transpose (aggregate, correlate) on the interpreted Triton backend vs
        autograd through the float64 reference."""
        window, B, C, G, H, W, mode, dtype = problem
        Ho, Wo = window.output_size(H, W)
        gen = torch.Generator().manual_seed(11 + B * 1000 + C * 100 + H * 10 + W)
        q = torch.randn(B, C, Ho, Wo, dtype=torch.float64, generator=gen).to(dtype)
        k = torch.randn(B, C, H, W, dtype=torch.float64, generator=gen).to(dtype)
        go = torch.randn(B, G, window.taps, Ho, Wo, dtype=torch.float64, generator=gen).to(dtype)
        tol = backend.bwd_tol[dtype]
        gq, gk = _backward_with(backend, "correlate", q, k, window, (H, W), go)
        ro, (rgq, rgk) = _grads(lambda a, b: correlate(a, b, window, G, backend="reference"),
                                (q.double(), k.double()), go.double())
        close(backend.correlate(q, k, window, G), ro, backend.fwd_tol[dtype], "correlate")
        close(gq, rgq, tol, "grad q")
        close(gk, rgk, tol, "grad k")
        w = weight(B, G, window, Ho, Wo, mode, gen).to(dtype)
        gx = torch.randn(B, C, H, W, dtype=torch.float64, generator=gen).to(dtype)
        gy, gw = _backward_with(backend, "aggregate_transpose", q, w, window, (H, W), gx)
        _, (rgy, rgw) = _grads(lambda a, b: aggregate_transpose(a, b, window, (H, W), backend="reference"),
                               (q.double(), w.double()), gx.double())
        close(gy, rgy, tol, "grad y (transpose)")
        close(gw, rgw, tol, "grad w (transpose)")

    @settings(max_examples=6, deadline=None)
    @example((Window(3), 1, 2, 2, 6, 9, "full", torch.float32))
    @example((Window(7, stride=2), 2, 3, 1, 7, 8, "batch1", torch.float16))
    @given(problems())
    def test_interp_nonfinite_inputs_and_out_of_image_weights(backend, problem):
        """The rule for out-of-image taps (docs/design.md, "The op") on the interpreted
        kernels: NaN/+-inf weights at taps outside the image are never read, correlate and the
        weight gradients are exactly 0 there whatever q holds, and NaN/+-inf activations reach
        only the outputs that read them through an in-image tap; the primitives and each
        primitive's backward formulas."""
        window, B, C, G, H, W, mode, dtype = problem
        check_nonfinite_ops(lambda op, a, c: _forward_with(backend, op, a, c, window, G, (H, W)),
                            lambda op, a, c, g: _backward_with(backend, op, a, c, window, (H, W), g),
                            window, B, C, G, H, W, mode, dtype, torch.Generator().manual_seed(B * 100 + H * 10 + W),
                            backend.bwd_tol[dtype])

    @pytest.mark.parametrize("text", ["Window(3, stride=2**24)", "Window((1, 3), stride=2**31)",
                                      "Window(3, dilation=(1, 2**20), padding=(1, 2**20))",
                                      "Window(3, stride=(2**20, 1), padding=(2**20, 1))",
                                      "Window(3, stride=2**20, border='reflect')"])
    def test_interp_far_reaching_geometry(backend, text):
        """Strides, dilations and padding far beyond the image (int64 geometry arguments): the
        three primitives against the brute force."""
        window = eval(text)
        B, C, G, H, W = 2, 4, 2, 9, 7
        Ho, Wo = window.output_size(H, W)
        gen = torch.Generator().manual_seed(3)
        x = torch.randn(B, C, H, W, dtype=torch.float64, generator=gen)
        y = torch.randn(B, C, Ho, Wo, dtype=torch.float64, generator=gen)
        w = torch.randn(B, G, window.taps, Ho, Wo, dtype=torch.float64, generator=gen)
        tol = backend.fwd_tol[torch.float64]
        close(backend.aggregate(x, w, window), brute_aggregate(x, w, window), tol, "aggregate")
        close(backend.correlate(y, x, window, G), brute_correlate(y, x, window, G), tol, "correlate")
        close(backend.aggregate_transpose(y, w, window, (H, W)), brute_aggregate_transpose(y, w, window, (H, W)),
              tol, "aggregate_transpose")

    def _forward_with(b, op, a, c, window, G, size):
        if op == "aggregate":
            return b.aggregate(a, c, window)
        if op == "correlate":
            return b.correlate(a, c, window, G)
        return b.aggregate_transpose(a, c, window, size)

    def test_interp_dispatch_refuses_with_reasons(backend):
        """A forced triton backend on CPU tensors names the reason; the interpreted one runs
        (without autograd: a gradient through it is refused)."""
        x = torch.randn(1, 2, 5, 5)
        w = torch.randn(1, 2, 9, 5, 5)
        with pytest.raises(ValueError, match=r"backend='triton' cannot run aggregate.*device 'cpu' not in \['cuda'\]"):
            aggregate(x, w, Window(3), backend="triton")
        y = aggregate(x, w, Window(3), backend="triton_interpret")
        torch.testing.assert_close(y, ReferenceBackend().aggregate(x, w, Window(3)), atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="backend='triton_interpret' runs aggregate on these inputs without autograd"):
            aggregate(x.requires_grad_(), w, Window(3), backend="triton_interpret")
        # an empty batch: empty outputs, and a weight gradient summed over no images is 0
        x0, w0 = torch.randn(0, 2, 5, 5), torch.randn(1, 2, 9, 1, 1)
        assert backend.aggregate(x0, w0, Window(3)).shape == (0, 2, 5, 5)
        assert backend.aggregate_transpose(x0, w0, Window(3), (5, 5)).shape == (0, 2, 5, 5)
        g = backend.correlate(x0, x0, Window(3), 2, True, True)
        assert g.shape == (1, 2, 9, 1, 1) and not g.any()

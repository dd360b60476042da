"""The fused op ``tokenmix.ops.local_attention`` against the composed float64 reference
(correlate + relative position bias + per-pixel row/column biases + masked softmax +
aggregate), forward and every gradient (dq, dk, dv, drel_pos, drow_bias, dcol_bias), over drawn
geometries with key and value widths that differ; gradcheck, opcheck, FLOP counts, NaN
locality, torch.compile / torch.export."""

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tokenmix.kernel_gen._position import check_relative_window, masked_softmax, offset_index
from tokenmix.ops import Window, aggregate, correlate, local_attention
from tokenmix.ops import get_backend, native

BACKENDS = ["reference"] + (["cpu"] if native.load() else [])


def composed(q, k, v, window, heads, scale, rel_pos, row_bias=None, col_bias=None):
    """The composed path (the float64 oracle): what the attention mixers ran before. Tap t =
    a*Kw + b gets row_bias[:, :, a] + col_bias[:, :, b]."""
    H, W = k.shape[-2:]
    s = correlate(q, k, window, heads, backend="reference") * scale
    if rel_pos is not None:
        ri, ci = offset_index(window, H, W)
        b = rel_pos[:, ri[:, None, :, None], ci[None, :, None, :]]
        s = s + b.reshape(1, heads, window.taps, b.shape[-2], b.shape[-1])
    taps = torch.arange(window.taps)
    if row_bias is not None:
        s = s + row_bias[:, :, taps // window.kernel_size[1]]
    if col_bias is not None:
        s = s + col_bias[:, :, taps % window.kernel_size[1]]
    return aggregate(v, masked_softmax(s, window, H, W), window, backend="reference")


@st.composite
def attention_cases(draw):
    border = draw(st.sampled_from(["zero", "zero", "clamp"]))
    Kh = draw(st.integers(1, 7))
    Kw = draw(st.sampled_from([Kh, draw(st.integers(1, 7))]))
    dh, dw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    if border == "clamp":
        stride = 1
        H = draw(st.integers(Kh * dh, Kh * dh + 6))
        W = draw(st.integers(Kw * dw, Kw * dw + 6))
    else:
        stride = draw(st.integers(1, 3))
        H, W = draw(st.integers(1, 13)), draw(st.integers(1, 13))
    window = Window((Kh, Kw), stride=stride, dilation=(dh, dw), border=border)
    try:
        window.output_size(H, W)
    except ValueError:
        window = Window((Kh, Kw), stride=stride, dilation=(dh, dw), border="zero")
        H, W = max(H, Kh * dh), max(W, Kw * dw)
    heads = draw(st.sampled_from([1, 2, 3, 8]))
    Cg, Cgv = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    B = draw(st.integers(1, 2))
    try:
        check_relative_window(window)
        rel = draw(st.booleans())
    except ValueError:
        rel = False
    contiguous = draw(st.booleans())
    return dict(window=window, H=H, W=W, heads=heads, C=heads * Cg, Cv=heads * Cgv, B=B, rel=rel,
                row=draw(st.booleans()), col=draw(st.booleans()), contiguous=contiguous,
                seed=draw(st.integers(0, 2**16)))


def make_inputs(case, dtype=torch.float64, requires_grad=True):
    g = torch.Generator().manual_seed(case["seed"])
    window, B, C, H, W, heads = case["window"], case["B"], case["C"], case["H"], case["W"], case["heads"]
    Ho, Wo = window.output_size(H, W)

    def rand(*shape):
        if case["contiguous"]:
            t = torch.randn(*shape, generator=g, dtype=torch.float64)
        else:  # channels-last storage: a non-contiguous (B, C, h, w) view
            t = torch.randn(shape[0], shape[2], shape[3], shape[1], generator=g, dtype=torch.float64)
            t = t.permute(0, 3, 1, 2)
        return t.to(dtype).requires_grad_(requires_grad)

    q, k, v = rand(B, C, Ho, Wo), rand(B, C, H, W), rand(B, case.get("Cv", C), H, W)
    Kh, Kw = window.kernel_size
    rel = None
    if case["rel"]:
        rel = torch.randn(heads, 2 * Kh - 1, 2 * Kw - 1, generator=g, dtype=torch.float64).to(dtype)
        rel.requires_grad_(requires_grad)
    if "row" not in case:
        return q, k, v, rel

    def rand5(*shape):  # non-contiguous: stored with the last two dims swapped
        t = torch.randn(*shape[:3], shape[4], shape[3], generator=g, dtype=torch.float64).transpose(3, 4)
        t = t.contiguous() if case["contiguous"] else t
        return t.to(dtype).requires_grad_(requires_grad)

    row = rand5(B, heads, Kh, Ho, Wo) if case["row"] else None
    col = rand5(B, heads, Kw, Ho, Wo) if case["col"] else None
    return q, k, v, rel, row, col


def grads(out, inputs, seed=1):
    g = torch.Generator().manual_seed(seed)
    go = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    leaves = [t for t in inputs if t is not None]
    return torch.autograd.grad(out, leaves, go)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=30)
@given(case=attention_cases())
def test_matches_composed_float64(backend, case):
    # a pixel whose every tap is outside the image is NaN on the composed path (a softmax over
    # nothing) and 0 here: test_lse_and_all_masked_pixels covers it
    assume(bool(case["window"].valid_mask(case["H"], case["W"]).any(0).all()))
    q, k, v, rel, row, col = make_inputs(case)
    heads = case["heads"]
    scale = (case["C"] // heads) ** -0.5
    ref = composed(q, k, v, case["window"], heads, scale, rel, row, col)
    out = local_attention(q, k, v, case["window"], heads, rel_pos=rel, row_bias=row, col_bias=col, backend=backend)
    assert out.shape == (case["B"], case["Cv"], *case["window"].output_size(case["H"], case["W"]))
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-9)
    inputs = (q, k, v, rel, row, col)
    want = grads(ref, inputs)
    for a, b in zip(grads(out, inputs), want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)
    if backend == "reference":
        # the backend's explicit backward (what the op's autograd kernel runs; the call above
        # differentiates the composition instead)
        be, d = get_backend("reference"), [None if t is None else t.detach() for t in inputs]
        o, lse = be.local_attention(*d[:4], heads, scale, case["window"], row_bias=d[4], col_bias=d[5])
        go = torch.randn(o.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        got = be.local_attention_backward(go, *d[:4], o, lse, heads, scale, case["window"], row_bias=d[4],
                                          col_bias=d[5])
        for a, b in zip([g for g, t in zip(got, inputs) if t is not None], want):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2), (torch.float16, 5e-3)])
@pytest.mark.parametrize("window", [Window(7, stride=2), Window((3, 5), border="clamp", dilation=(1, 2))])
def test_low_precision(backend, dtype, tol, window):
    case = dict(window=window, H=13, W=14, heads=2, C=8, Cv=4, B=2, rel=True, row=True, col=True, contiguous=True,
                seed=3)
    inputs = make_inputs(case)
    ref = composed(*inputs[:3], window, 2, 0.5, *inputs[3:])
    lo = [t.detach().to(dtype).requires_grad_() for t in inputs]
    out = local_attention(*lo[:3], window, 2, scale=0.5, rel_pos=lo[3], row_bias=lo[4], col_bias=lo[5],
                          backend=backend)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    for a, b in zip(grads(out, lo), grads(ref, inputs)):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), b, atol=tol * 4, rtol=tol * 4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window", [Window(3, stride=2), Window((3, 2), border="clamp", dilation=(2, 1)),
                                    Window(3, padding=2)])
def test_gradcheck(backend, window):
    case = dict(window=window, H=7, W=6, heads=2, C=4, B=1, rel=window.padding != (2, 2), contiguous=True, seed=5)
    q, k, v, rel = make_inputs(case)
    args = (q, k, v) if rel is None else (q, k, v, rel)

    def f(q, k, v, rel=None):
        return local_attention(q, k, v, window, 2, rel_pos=rel, backend=backend)

    assert torch.autograd.gradcheck(f, args, fast_mode=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window", [Window((3, 2), stride=2, padding=1), Window((2, 3), border="clamp", dilation=(2, 1))])
def test_gradcheck_biases_and_value_width(backend, window):
    """Ck != Cv, both per-pixel biases (and the table): every gradient, float64."""
    case = dict(window=window, H=6, W=5, heads=2, C=4, Cv=2, B=2, rel=False, row=True, col=True,
                contiguous=False, seed=7)
    q, k, v, _, row, col = make_inputs(case)

    def f(q, k, v, row, col):
        return local_attention(q, k, v, window, 2, row_bias=row, col_bias=col, backend=backend)

    assert torch.autograd.gradcheck(f, (q, k, v, row, col), fast_mode=True)
    # one bias alone
    assert torch.autograd.gradcheck(lambda q, col: f(q, k, v, None, col), (q, col), fast_mode=True)


def test_lse_and_all_masked_pixels():
    """A pixel whose every tap is outside the image (zero border, padding past the window) gets
    0, a log-sum-exp of -inf, and zero gradients; the reference and cpu backends agree."""
    window = Window(1, padding=1)
    k, v = (torch.randn(1, 2, 4, 5, dtype=torch.float64) for _ in range(2))
    q = torch.randn(1, 2, 6, 7, dtype=torch.float64)
    for backend in BACKENDS:
        out, lse = get_backend(backend).local_attention(q, k, v, None, 1, 1.0, window)
        assert torch.isinf(lse[0, 0, 0]).all() and (out[:, :, 0] == 0).all() and (out[..., -1] == 0).all()
        torch.testing.assert_close(out[:, :, 1:-1, 1:-1], v)
        go = torch.randn_like(out)
        dq, dk, dv = get_backend(backend).local_attention_backward(go, q, k, v, None, out, lse, 1, 1.0, window)[:3]
        assert (dq[:, :, 0] == 0).all() and (dk == 0).all()
        torch.testing.assert_close(dv, go[:, :, 1:-1, 1:-1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_unread_values_do_not_leak(backend, bad):
    """NaN/inf in k and v at pixels no in-image tap reads (rows/columns past the last window, the
    columns between strided taps) reach neither the output nor any gradient."""
    for window, H, W in ((Window(3, stride=3, padding=0), 8, 11), (Window(1, stride=2), 7, 9),
                         (Window(3, stride=2, dilation=2), 9, 10)):
        Ho, Wo = window.output_size(H, W)
        read = torch.zeros(H, W, dtype=torch.bool)
        rows, cols = window.source_index(H, W)
        for r in rows.flatten().tolist():
            for c in cols.flatten().tolist():
                if r >= 0 and c >= 0:
                    read[r, c] = True
        assert not read.all()
        q = torch.randn(1, 4, Ho, Wo, requires_grad=True)
        k0, v0 = torch.randn(1, 4, H, W), torch.randn(1, 4, H, W)
        k = k0.masked_fill(~read, bad).requires_grad_()
        v = v0.masked_fill(~read, bad).requires_grad_()
        rel = torch.randn(2, 5, 5) if window.kernel_size == (3, 3) and window.padding[0] % window.dilation[0] == 0 \
            else None
        out = local_attention(q, k, v, window, 2, rel_pos=rel, backend=backend)
        assert torch.isfinite(out).all()
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
        assert torch.isfinite(dq).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all()
        assert (dk[..., ~read] == 0).all() and (dv[..., ~read] == 0).all()
        clean = local_attention(q, k0, v0, window, 2, rel_pos=rel, backend=backend)
        torch.testing.assert_close(out, clean)


def _op_args(window, rel=True, requires_grad=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    H, W = 7, 6
    Ho, Wo = window.output_size(H, W)
    q = torch.randn(2, 4, Ho, Wo, generator=g, dtype=dtype, requires_grad=requires_grad)
    k = torch.randn(2, 4, H, W, generator=g, dtype=dtype, requires_grad=requires_grad)
    v = torch.randn(2, 4, H, W, generator=g, dtype=dtype, requires_grad=requires_grad)
    Kh, Kw = window.kernel_size
    r = torch.randn(2, 2 * Kh - 1, 2 * Kw - 1, generator=g, dtype=dtype, requires_grad=requires_grad) if rel else None
    return q, k, v, r


@pytest.mark.parametrize("window", [Window(3, stride=2), Window(3, border="clamp")])
@pytest.mark.parametrize("rel,biases", [(True, False), (False, False), (False, True)])
def test_opcheck(window, rel, biases):
    q, k, v, r = _op_args(window, rel)
    extra = ()
    if biases:  # v narrower than k, both per-pixel biases
        v = v[:, :2].detach().requires_grad_()
        B, _, Ho, Wo = q.shape
        Kh, Kw = window.kernel_size
        row = torch.randn(B, 2, Kh, Wo, Ho).transpose(3, 4).requires_grad_()  # non-contiguous
        extra = (row, torch.randn(B, 2, Kw, Ho, Wo, requires_grad=True))
    geo = list(window.as_args())
    torch.library.opcheck(torch.ops.tokenmix.local_attention.default, (q, k, v, r, 2, 0.5, *geo, None, *extra))
    with torch.no_grad():
        out, lse = torch.ops.tokenmix.local_attention(q, k, v, r, 2, 0.5, *geo, None, *extra)
    go = torch.randn_like(out)
    d = [t.detach() for t in (q, k, v)]
    torch.library.opcheck(torch.ops.tokenmix.local_attention_backward.default,
                          (go, *d, None if r is None else r.detach(), out, lse, 2, 0.5, *geo, None,
                           *(t.detach() for t in extra)))


def test_flop_counts():
    from torch.utils.flop_counter import FlopCounterMode

    from tokenmix.analysis.flops import EXTRA_HANDLES
    window = Window(3, stride=2)
    q, k, v, r = _op_args(window)
    B, C, Ho, Wo = q.shape
    macs = B * C * Ho * Wo * 9
    with FlopCounterMode(display=False) as fc:
        out = local_attention(q, k, v, window, 2, rel_pos=r)
    assert fc.get_total_flops() == 2 * 2 * macs
    with FlopCounterMode(display=False) as fc:
        out.sum().backward()
    assert fc.get_total_flops() == 2 * 5 * macs
    assert "tokenmix::local_attention" in EXTRA_HANDLES
    # v of Cv = 2 channels: q.k on Ck = 4, the aggregation on Cv (forward 4 + 2, backward 3*4 + 2*2)
    v2 = v[:, :2].detach().requires_grad_()
    with FlopCounterMode(display=False) as fc:
        out = local_attention(q, k, v2, window, 2, rel_pos=r)
    assert fc.get_total_flops() == 2 * macs * 6 // 4
    with FlopCounterMode(display=False) as fc:
        out.sum().backward()
    assert fc.get_total_flops() == 2 * macs * 16 // 4


def test_fvcore_counts_it_as_correlate_aggregate_and_softmax():
    from tokenmix.analysis.flops import count_flops
    window = Window(3, stride=2)

    class M(torch.nn.Module):
        def forward(self, q, k, v):
            return local_attention(q, k, v, window, 2)

    q, k, v, _ = _op_args(window, rel=False, requires_grad=False)
    B, C, Ho, Wo = q.shape
    r = count_flops(M(), q, k, v)
    assert r.by_operator == {"correlate": B * C * Ho * Wo * 9, "aggregate": B * C * Ho * Wo * 9,
                             "softmax": B * 2 * 9 * Ho * Wo}
    assert r.macs == 2 * B * C * Ho * Wo * 9


def test_torch_compile_and_export():
    window = Window(3, border="clamp")
    q, k, v, r = _op_args(window)

    def f(q, k, v, r):
        return local_attention(q, k, v, window, 2, rel_pos=r)

    ref = f(q, k, v, r)
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v, r)
    torch.testing.assert_close(out, ref)
    (gq,) = torch.autograd.grad(out.sum(), q)
    (rq,) = torch.autograd.grad(ref.sum(), q)
    torch.testing.assert_close(gq, rq)

    class M(torch.nn.Module):
        def forward(self, q, k, v, r):
            return f(q, k, v, r)

    ep = torch.export.export(M(), tuple(t.detach() for t in (q, k, v, r)))
    assert "tokenmix.local_attention" in str(ep.graph)
    torch.testing.assert_close(ep.module()(q, k, v, r), ref)


def test_default_scale_and_heads_split():
    """Default scale (C/heads)**-0.5; head h = channels h*C/heads .. (h+1)*C/heads - 1: each
    head equals a one-head call on its channels."""
    window = Window(3)
    q, k, v, _ = _op_args(window, rel=False, requires_grad=False)
    out = local_attention(q, k, v, window, 2)
    torch.testing.assert_close(out, local_attention(q, k, v, window, 2, scale=2 ** -0.5))
    for h in range(2):
        sl = slice(2 * h, 2 * h + 2)
        one = local_attention(q[:, sl], k[:, sl], v[:, sl], window, 1)
        torch.testing.assert_close(out[:, sl], one)


@pytest.mark.parametrize("call,match", [
    (lambda q, k, v, w: local_attention(q, k, v, w, 3), "not divisible by heads=3"),
    (lambda q, k, v, w: local_attention(q, k, v, w, 0), "heads must be a positive int, got 0"),
    (lambda q, k, v, w: local_attention(q, k, v[:, :1], w, 2), r"channels Cv=1 of v are not divisible by heads=2"),
    (lambda q, k, v, w: local_attention(q, k, v[..., :3], w, 2), "k and v must have one batch and size"),
    (lambda q, k, v, w: local_attention(q, k, v, w, 2, row_bias=torch.zeros(2, 2, 3, 7, 5)),
     r"row_bias must have shape \(B, heads, Kh, Ho, Wo\) = \(2, 2, 3, 7, 6\), got \(2, 2, 3, 7, 5\)"),
    (lambda q, k, v, w: local_attention(q, k, v, w, 2, col_bias=torch.zeros(2, 2, 3, 7)), "col_bias must be 5-D"),
    (lambda q, k, v, w: local_attention(q, k, v, w, 2, col_bias=torch.zeros(2, 2, 3, 7, 6).double()),
     "q and col_bias must have one dtype"),
    (lambda q, k, v, w: local_attention(q, k, v, w, 2, rel_pos=torch.zeros(2, 3, 3)), r"rel_pos must have shape"),
    (lambda q, k, v, w: local_attention(q, k, v, w, 2, scale="a"), "scale must be a float, got 'a'"),
    (lambda q, k, v, w: local_attention(q[..., :2], k, v, w, 2), "q spatial size"),
    (lambda q, k, v, w: local_attention(q, k, v.double(), w, 2), "must have one dtype"),
])
def test_errors(call, match):
    window = Window(3)
    q, k, v, _ = _op_args(window, rel=False, requires_grad=False)
    with pytest.raises((ValueError, TypeError), match=match):
        call(q, k, v, window)


# ------------------------------------------------------------------------------ mixers

from tokenmix.mixers import create_mixer  # noqa: E402


def _ops_in(fn):
    """Names of the tokenmix ops that ``fn()`` calls (forward), as FlopCounterMode sees them."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc:
        fn()
    return {str(op).split(".")[1] for op in fc.get_flop_counts()["Global"] if str(op).startswith("tokenmix.")}


def _fused_and_composed(name, kw, H, W):
    """The mixer ``name`` built fused (the default) and with fused=False, one state_dict, and an
    input x (2, 8, H, W); asserts which path runs local_attention and that outputs and
    gradients (input and parameters) agree in float64."""
    torch.manual_seed(0)
    fused = create_mixer(name, 8, **kw).double()
    composed_m = create_mixer(name, 8, fused=False, **kw).double()
    composed_m.load_state_dict(fused.state_dict())
    assert list(fused.state_dict()) == list(composed_m.state_dict())
    x = torch.randn(2, 8, H, W, dtype=torch.float64, requires_grad=True)
    assert "local_attention" in _ops_in(lambda: fused(x))
    assert "local_attention" not in _ops_in(lambda: composed_m(x))
    y1, y2 = fused(x), composed_m(x)
    torch.testing.assert_close(y1, y2, atol=1e-10, rtol=1e-9)
    g = torch.randn_like(y1)
    p1 = [x] + list(fused.parameters())
    p2 = [x] + list(composed_m.parameters())
    for a, b in zip(torch.autograd.grad(y1, p1, g), torch.autograd.grad(y2, p2, g)):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)
    return fused, composed_m, x


@pytest.mark.parametrize("name,kw,H,W", [
    ("local_attention", dict(kernel_size=5, heads=2), 9, 11),
    ("local_attention", dict(kernel_size=3, stride=2, heads=4, qkv_bias=True, proj=True), 9, 8),
    ("local_attention", dict(kernel_size=3, dilation=2, heads=2, rel_pos=False), 7, 10),
    ("local_attention", dict(kernel_size=3, heads=2, fused_qkv=True), 6, 7),
    ("neighborhood_attention", dict(kernel_size=5, heads=2, qkv_bias=True, fused_qkv=True, proj=True), 8, 9),
    ("neighborhood_attention", dict(kernel_size=3, dilation=2, heads=2), 7, 9),
    ("neighborhood_attention", dict(kernel_size=5, heads=2, pad_to_window=True, fused_qkv=True), 3, 6),
])
def test_mixers_fused_equals_composed(name, kw, H, W):
    """The attention mixers run local_attention by default (fused=True): same parameters and
    state_dict as fused=False, equal outputs and gradients; kernel() still gives the full kernel."""
    fused, composed_m, x = _fused_and_composed(name, kw, H, W)
    if not kw.get("pad_to_window"):
        w = fused.kernel(x)
        Ho, Wo = fused.window.output_size(H, W)
        assert w.shape == (2, kw["heads"], fused.window.taps, Ho, Wo)
        torch.testing.assert_close(w.sum(2), torch.ones_like(w.sum(2)))


@pytest.mark.parametrize("name,kw,H,W", [
    ("global_attention", dict(heads=2, span=8, key_channels=6), 5, 7),          # the whole image
    ("global_attention", dict(heads=2, span=4, key_channels=4, stride=2), 9, 6),  # a sliding 4 x 4 clamp window
    ("attention_augmented", dict(heads=2, span=4, min_key_head_dim=3, value_ratio=0.25, stride=2), 7, 8),
])
def test_span_attention_fused_equals_composed(name, kw, H, W):
    """GlobalAttention / AttentionAugmentedConv run relative_attention through local_attention
    by default (dk != dv, the relative logits as row_bias/col_bias): same parameters and
    state_dict as fused=False, equal outputs and gradients, and the same fvcore count."""
    from tokenmix.analysis.flops import count_flops
    fused, composed_m, x = _fused_and_composed(name, kw, H, W)
    c1, c2 = count_flops(fused, x.detach(), strict=True), count_flops(composed_m, x.detach(), strict=True)
    assert c1.by_operator == c2.by_operator


def test_aa_resnet_counts_the_same_on_both_paths():
    """aa_resnet50: the same parameters and fvcore count (by operator) fused and composed."""
    import dataclasses

    from tokenmix.analysis.flops import count_flops
    from tokenmix.models import create_model
    from tokenmix.models.registry import get_config

    cfg = get_config("aa_resnet50")
    stages = tuple(dataclasses.replace(st, mixer_kwargs={**st.mixer_kwargs, "fused": False})
                   if st.mixer == "attention_augmented" else st for st in cfg.stages)
    fused, composed_m = create_model("aa_resnet50"), create_model("aa_resnet50", stages=stages)
    assert [p.shape for p in fused.parameters()] == [p.shape for p in composed_m.parameters()]
    x = torch.randn(1, 3, 64, 64)
    assert "local_attention" in _ops_in(lambda: fused.eval()(x))
    assert "local_attention" not in _ops_in(lambda: composed_m.eval()(x))
    assert count_flops(fused, x).by_operator == count_flops(composed_m, x).by_operator


def test_models_use_the_fused_path():
    from tokenmix.models import create_model
    torch.manual_seed(0)
    m = create_model("sasa_resnet26", num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    ops = _ops_in(lambda: m(x))
    assert "local_attention" in ops and "correlate" not in ops


# ------------------------------------------------------------------------------ triton

import importlib.util  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

HAVE_TRITON = importlib.util.find_spec("triton") is not None

# Run in a child process started with TRITON_INTERPRET=1: the Triton forward kernel on CPU
# tensors through the interpreter, against the reference backend (float64 on the same rounded
# inputs), over both borders, strides, dilations, rectangular windows, an all-masked pixel,
# heads, the four dtypes, with and without rel_pos; then the backward.
INTERP_SCRIPT = r"""
import torch
from tokenmix.ops import Window, get_backend, register_backend
from tokenmix.ops.backends.triton import TritonBackend
b = TritonBackend(interpret=True)
assert b.unavailable_reason() is None, b.unavailable_reason()
register_backend(b)
ref = get_backend("reference")
cases = [(Window(3), 2, 4, 5, 7), (Window(7, stride=2, dilation=2), 1, 2, 9, 14), (Window((3, 5), border="clamp", dilation=(2, 1)), 2, 6, 7, 6),
         (Window((5, 3), stride=(1, 2), padding=(2, 1)), 1, 3, 6, 8), (Window(1, padding=1), 1, 2, 3, 4)]
n = 0
for window, B, C, H, W in cases:
    for heads in (1, C // 2 if C % 2 == 0 else 1):
        for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            for rel in (False, True):
                if rel and window.padding == (1, 1) and window.kernel_size == (1, 1):
                    continue
                g = torch.Generator().manual_seed(n)
                Ho, Wo = window.output_size(H, W)
                q = torch.randn(B, C, Ho, Wo, generator=g, dtype=torch.float64)
                k = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
                v = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
                Kh, Kw = window.kernel_size
                r = torch.randn(heads, 2 * Kh - 1, 2 * Kw - 1, generator=g, dtype=torch.float64) if rel else None
                lo = [t.to(dtype) if t is not None else None for t in (q, k, v, r)]
                out, lse = b.local_attention(*lo[:3], lo[3], heads, 0.7, window)
                wo, wl = ref.local_attention(*[t.double() if t is not None else None for t in lo[:3]],
                                             None if r is None else lo[3].double(), heads, 0.7, window)
                tol = b.fwd_tol[dtype]
                torch.testing.assert_close(out.double(), wo, atol=tol[0] * 4, rtol=tol[1] * 4)
                torch.testing.assert_close(lse.double(), wl, atol=tol[0] * 4, rtol=tol[1] * 4)
                assert out.dtype == dtype and lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
                n += 1
# the backward (the fused kernels; test_triton_interpreter_backward covers them in full)
window = Window(3, stride=2)
g = torch.Generator().manual_seed(1)
q, go = (torch.randn(1, 4, 4, 4, dtype=torch.float64, generator=g) for _ in range(2))
k, v = (torch.randn(1, 4, 7, 8, dtype=torch.float64, generator=g) for _ in range(2))
r = torch.randn(2, 5, 5, dtype=torch.float64, generator=g)
out, lse = b.local_attention(q, k, v, r, 2, 0.5, window)
got = b.local_attention_backward(go, q, k, v, r, out, lse, 2, 0.5, window)
want = ref.local_attention_backward(go, q, k, v, r, out, lse, 2, 0.5, window)
for a, c in zip(got, want):
    torch.testing.assert_close(a, c)
# per-pixel biases and Cv != Ck: the reference composition on the interpreted primitives
rb, cb = (torch.randn(1, 2, 3, 4, 4, dtype=torch.float64, generator=g) for _ in range(2))
v2, go2 = v[:, :2].contiguous(), go[:, :2].contiguous()
out, lse = b.local_attention(q, k, v2, r, 2, 0.5, window, row_bias=rb, col_bias=cb)
wo, wl = ref.local_attention(q, k, v2, r, 2, 0.5, window, row_bias=rb, col_bias=cb)
torch.testing.assert_close(out, wo)
torch.testing.assert_close(lse, wl)
got = b.local_attention_backward(go2, q, k, v2, r, out, lse, 2, 0.5, window, row_bias=rb, col_bias=cb)
want = ref.local_attention_backward(go2, q, k, v2, r, out, lse, 2, 0.5, window, row_bias=rb, col_bias=cb)
assert len(got) == 6
for a, c in zip(got, want):
    torch.testing.assert_close(a, c)
print("INTERP OK", n)
"""


def _run_interpreted(script: str, expect: str):
    """Run ``script`` in a child process started with TRITON_INTERPRET=1; it must print ``expect``."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONDONTWRITEBYTECODE="1")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=root,
                         timeout=600)
    assert out.returncode == 0 and expect in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
def test_triton_interpreter():
    _run_interpreted(INTERP_SCRIPT, "INTERP OK 72")


# The fused Triton backward in the interpreter, against the float64 reference composition on
# the same rounded inputs (q, k, v, rel_pos, grad_out, and out/lse from the float64 forward): odd
# and prime sizes, H != W, stride and dilation 2, both borders, an all-masked pixel, heads 1..4,
# head widths 1, 2, 3, 5 and 33 (two channel blocks), the four dtypes, with and without a table;
# every input between NaN guard bands (an unmasked read past either end shows up as NaN); a
# rerun is bitwise equal; key/value widths that differ, against autograd of the reference.
INTERP_BWD_SCRIPT = r"""
import itertools
import torch
from tokenmix.ops import Window, get_backend, register_backend
from tokenmix.ops.backends.triton import TritonBackend
b = TritonBackend(interpret=True)
assert b.unavailable_reason() is None, b.unavailable_reason()
register_backend(b)
ref = get_backend("reference")
GUARD = 32

def poisoned(t):
    buf = torch.full((t.numel() + 2 * GUARD,), float("nan"), dtype=t.dtype)
    out = buf[GUARD:GUARD + t.numel()].view(t.shape)
    out.copy_(t)
    return out

cases = [(Window(3), 2, 6, 2, 5, 7), (Window(3, stride=2), 1, 4, 4, 7, 8),
         (Window((3, 5), border="clamp", dilation=(2, 1)), 1, 6, 3, 7, 6), (Window(5, stride=2, dilation=2), 1, 3, 1, 9, 11),
         (Window((5, 3), stride=(1, 2), padding=(2, 1)), 1, 6, 2, 6, 8), (Window(3, border="clamp"), 2, 5, 1, 5, 4),
         (Window(7, dilation=(1, 2), border="clamp"), 1, 2, 1, 7, 15), (Window(3, padding=(1, 0)), 1, 66, 2, 3, 5),
         (Window(1, padding=1), 1, 2, 1, 3, 4)]
dtypes = itertools.cycle([torch.float32, torch.bfloat16, torch.float64, torch.float16])
n = 0
for window, B, C, heads, H, W in cases:
    for rel in (False, True):
        if rel and window.kernel_size == (1, 1):
            continue
        dtype = next(dtypes)
        g = torch.Generator().manual_seed(n)
        Ho, Wo = window.output_size(H, W)
        Kh, Kw = window.kernel_size
        q, go = (torch.randn(B, C, Ho, Wo, generator=g, dtype=torch.float64).to(dtype).double() for _ in range(2))
        k, v = (torch.randn(B, C, H, W, generator=g, dtype=torch.float64).to(dtype).double() for _ in range(2))
        r = torch.randn(heads, 2 * Kh - 1, 2 * Kw - 1, generator=g, dtype=torch.float64).to(dtype).double() if rel else None
        out, lse = ref.local_attention(q, k, v, r, heads, 0.7, window)
        want = ref.local_attention_backward(go, q, k, v, r, out, lse, heads, 0.7, window)
        args = [poisoned(t.to(dtype)) if t is not None else None for t in (go, q, k, v, r, out)]
        lse_p = poisoned(lse.to(torch.float64 if dtype == torch.float64 else torch.float32))
        got = b.local_attention_backward(*args, lse_p, heads, 0.7, window)
        atol, rtol = b.bwd_tol[dtype]
        for name, a, w in zip(("dq", "dk", "dv", "drel"), got, want):
            assert a.dtype == (dtype if name != "drel" or rel else a.dtype) and a.shape == w.shape, (name, a.dtype, a.shape)
            assert not torch.isnan(a).any(), (name, window, dtype, "NaN: an unmasked read of the guard band?")
            torch.testing.assert_close(a.double(), w, atol=atol * 4, rtol=rtol * 4, msg=lambda m: f"{name} {window} {dtype} rel={rel}: {m}")
        again = b.local_attention_backward(*args, lse_p, heads, 0.7, window)
        assert all(torch.equal(a, c) for a, c in zip(got, again)), "not bitwise reproducible"
        n += 1
# key/value head widths that differ (the launcher takes them separately): autograd of the reference forward
window = Window(3, stride=2, dilation=(1, 2))
g = torch.Generator().manual_seed(7)
q = torch.randn(2, 4, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
k = torch.randn(2, 4, 6, 7, generator=g, dtype=torch.float64, requires_grad=True)
v = torch.randn(2, 6, 6, 7, generator=g, dtype=torch.float64, requires_grad=True)
r = torch.randn(2, 5, 5, generator=g, dtype=torch.float64, requires_grad=True)
out, lse = ref.local_attention(q, k, v, r, 2, 0.5, window)
go = torch.randn_like(out)
want = torch.autograd.grad(out, (q, k, v, r), go)
from tokenmix.ops.backends.triton.local_attention_backward import local_attention_backward
got = local_attention_backward(go, q.detach(), k.detach(), v.detach(), r.detach(), out.detach(), lse, 2, 0.5, window)
for a, c in zip(got, want):
    torch.testing.assert_close(a, c)
print("INTERP BWD OK", n)
"""


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
def test_triton_interpreter_backward():
    _run_interpreted(INTERP_BWD_SCRIPT, "INTERP BWD OK 17")


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="AOT compilation needs the jit kernels")
@pytest.mark.parametrize("capability", [80, 90])
@pytest.mark.parametrize("dtype,border,tile", [(torch.float32, "zero", 1), (torch.bfloat16, "clamp", 1),
                                               (torch.float64, "zero", 0), (torch.float16, "zero", 1)])
def test_triton_aot_compile_has_no_spills(dtype, border, tile, capability):
    from triton_aot import aot_compile, resource_usage
    from tokenmix.ops.backends.triton.common import tile_configs

    tiles = tile_configs("local_attention", dtype, 49)[tile]
    ck = aot_compile("local_attention", dtype, (7, 7), border, tiles, capability)
    r = resource_usage(ck, capability)
    assert r["spill_stores"] == 0 and r["spill_loads"] == 0, (dtype, border, tiles, r)
    assert r["local"] == 0 and r["stack"] == 0 and 0 < r["regs"] <= 255, r


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="AOT compilation needs the jit kernels")
@pytest.mark.parametrize("capability", [80, 90])
@pytest.mark.parametrize("op,dtype,border,tile", [
    ("local_attention_backward", torch.float32, "clamp", -1), ("local_attention_backward", torch.float64, "clamp", -1),
    ("local_attention_backward_kv", torch.float16, "clamp", 1), ("local_attention_backward_kv", torch.float64, "zero", 1),
    ("local_attention_backward_kv", torch.bfloat16, "zero", -1)])
def test_triton_backward_aot_compile_has_no_spills(op, dtype, border, tile, capability):
    """The backward's two kernels, 7x7, both borders, the tiles with the most registers
    (benchmarks/triton_resources.py prints them all)."""
    from triton_aot import aot_compile, resource_usage
    from tokenmix.ops.backends.triton.common import tile_configs

    tiles = tile_configs(op, dtype, 49)[tile]
    r = resource_usage(aot_compile(op, dtype, (7, 7), border, tiles, capability), capability)
    assert r["spill_stores"] == 0 and r["spill_loads"] == 0, (op, dtype, border, tiles, r)
    assert r["local"] == 0 and r["stack"] == 0 and 0 < r["regs"] <= 255 and r["shared"] <= 48 * 1024, r


@pytest.mark.skipif(not (HAVE_TRITON and torch.cuda.is_available()), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("window,C,heads,H,W", [(Window(7), 64, 2, 23, 17), (Window(7, dilation=(1, 2), border="clamp"), 96, 2, 16, 19),
                                                (Window(5, stride=2), 128, 2, 19, 26)])
def test_triton_backward_on_cuda_matches_reference(window, C, heads, H, W, dtype):
    """On a CUDA device: the fused backward against the float64 reference on the same rounded
    inputs (head widths 32, 48 and 64: one and two channel blocks), bitwise reproducible, and
    reached by autograd through the op."""
    b, ref = get_backend("triton"), get_backend("reference")
    g = torch.Generator().manual_seed(0)
    Ho, Wo = window.output_size(H, W)
    Kh, Kw = window.kernel_size
    q, go = (torch.randn(2, C, Ho, Wo, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
    k, v = (torch.randn(2, C, H, W, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
    r = (0.5 * torch.randn(heads, 2 * Kh - 1, 2 * Kw - 1, generator=g, dtype=torch.float64)).to(dtype)
    dev = [t.cuda() for t in (go, q, k, v, r)]
    out, lse = b.local_attention(*dev[1:4], dev[4], heads, 0.3, window)
    got = b.local_attention_backward(*dev, out, lse, heads, 0.3, window)
    want = ref.local_attention_backward(*(t.double() for t in (go, q, k, v, r)), out.cpu().double(), lse.cpu().double(),
                                        heads, 0.3, window)
    atol, rtol = b.bwd_tol[dtype]
    for a, w in zip(got, want):
        torch.testing.assert_close(a.cpu().double(), w, atol=atol * 4, rtol=rtol * 4)
    again = b.local_attention_backward(*dev, out, lse, heads, 0.3, window)
    assert all(torch.equal(a, c) for a, c in zip(got, again)), "not bitwise reproducible"
    qa, ka, va, ra = (t.clone().requires_grad_(True) for t in dev[1:])
    local_attention(qa, ka, va, window, heads, scale=0.3, rel_pos=ra).float().square().sum().backward()
    assert all(t.grad is not None and t.grad.shape == t.shape for t in (qa, ka, va, ra))


@pytest.mark.parametrize("window", [Window(3, stride=2), Window((3, 5), border="clamp"), Window(1, padding=1)])
def test_export_decomposition_matches_the_op(window):
    """tokenmix.export writes local_attention as its composition (for ONNX)."""
    from tokenmix.export import decompositions
    q, k, v, r = _op_args(window, rel=window.padding != (1, 1), requires_grad=False)
    args = (q, k, v, r, 2, 0.5, *window.as_args(), None)
    out, lse = torch.ops.tokenmix.local_attention(*args)
    d_out, d_lse = decompositions()[torch.ops.tokenmix.local_attention.default](*args)
    torch.testing.assert_close(d_out, out)
    torch.testing.assert_close(d_lse, lse)


def test_reflect_border_runs_the_reference_and_the_kernels_refuse_it():
    """The fused kernels take the zero and clamp borders; a reflect window runs the reference
    composition (every tap in the image, offsets before reflection), with gradients."""
    from tokenmix.ops import Window, local_attention

    win = Window(3, border="reflect")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 8, 7, 9, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(3))
    rel = torch.randn(2, 5, 5, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: local_attention(*a[:3], win, 2, rel_pos=a[3]), (q, k, v, rel))
    want = local_attention(q, k, v, win, 2, rel_pos=rel, backend="reference")
    torch.testing.assert_close(local_attention(q, k, v, win, 2, rel_pos=rel), want)
    with pytest.raises(ValueError, match="border 'reflect' of local_attention not in"):
        local_attention(q, k, v, win, 2, rel_pos=rel, backend="cpu")

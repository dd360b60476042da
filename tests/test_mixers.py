"""Mixers: each preset computes what its paper defines, and every preset works as a module
(forward/backward, dtypes, torch.compile, torch.jit.trace, gradients, state_dict)."""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch
import torch.nn.functional as F
from torch import nn

from tokenmix.mixers import Mixer, create_mixer, list_mixers, register_mixer
from tokenmix.kernel_gen.registry import _KERNEL_GENS
from tokenmix.mixers.registry import _MIXERS
from tokenmix.ops import Window

torch.manual_seed(0)


# ---------------------------------------------------------------- independent references


class OfficialInvolution(nn.Module):
    """The official RedNet involution (mmcls naive form), rewritten here independently with
    the same parameter layout: conv1 = 1x1 conv (no bias) + BN + ReLU, conv2 = 1x1 conv
    (bias), kernel from the avg-pooled input, applied with nn.Unfold."""

    def __init__(self, channels, kernel_size, stride, group_channels=16, reduction=4):
        super().__init__()
        self.k, self.s, self.c = kernel_size, stride, channels
        self.gc = group_channels
        self.g = channels // group_channels
        self.conv1 = nn.Sequential(nn.Conv2d(channels, channels // reduction, 1, bias=False),
                                   nn.BatchNorm2d(channels // reduction), nn.ReLU())
        self.conv2 = nn.Conv2d(channels // reduction, kernel_size ** 2 * self.g, 1)
        self.avgpool = nn.AvgPool2d(stride, stride) if stride > 1 else nn.Identity()
        self.unfold = nn.Unfold(kernel_size, 1, (kernel_size - 1) // 2, stride)

    def forward(self, x):
        weight = self.conv2(self.conv1(self.avgpool(x)))
        b, _, h, w = weight.shape
        weight = weight.view(b, self.g, self.k ** 2, h, w).unsqueeze(2)
        cols = self.unfold(x).view(b, self.g, self.gc, self.k ** 2, h, w)
        return (weight * cols).sum(3).view(b, self.c, h, w)


def _load_official(mixer: Mixer, ref: OfficialInvolution) -> None:
    g = mixer.generator
    with torch.no_grad():
        ref.conv1[0].weight.copy_(g.reduce.weight)
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(ref.conv1[1], name).copy_(getattr(g.norm, name))
        ref.conv2.weight.copy_(g.span.weight)
        ref.conv2.bias.copy_(g.span.bias)


def _randomise_bn(m: nn.Module) -> None:
    for bn in m.modules():
        if isinstance(bn, nn.BatchNorm2d):
            with torch.no_grad():
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.5, 0.5)
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 1.5)


# ------------------------------------------------------------------ paper equivalences


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("bias", [False, True])
def test_dwconv_equals_depthwise_conv2d(stride, bias):
    dim, K = 6, 5
    m = create_mixer("dwconv", dim, kernel_size=K, stride=stride, bias=bias, dtype=torch.float64)
    ref = nn.Conv2d(dim, dim, K, stride, K // 2, groups=dim, bias=bias, dtype=torch.float64)
    with torch.no_grad():
        ref.weight.copy_(m.generator.weight.view(dim, 1, K, K))
        if bias:
            m.bias.normal_()
            ref.bias.copy_(m.bias)
    x = torch.randn(2, dim, 9, 8, dtype=torch.float64)
    torch.testing.assert_close(m(x), ref(x), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("K", [3, 7])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("train", [False, True])
def test_involution_equals_official(K, stride, train):
    dim = 32
    m = create_mixer("involution", dim, kernel_size=K, stride=stride, dtype=torch.float64)
    ref = OfficialInvolution(dim, K, stride).double()
    _randomise_bn(m)
    _load_official(m, ref)
    m.train(train)
    ref.train(train)
    x = torch.randn(2, dim, 10, 12, dtype=torch.float64)
    torch.testing.assert_close(m(x), ref(x), atol=1e-12, rtol=1e-10)
    # same parameters, same count
    assert sum(p.numel() for p in m.parameters()) == sum(p.numel() for p in ref.parameters())
    assert sorted(m.state_dict()) == sorted([
        "generator.reduce.weight", "generator.norm.weight", "generator.norm.bias",
        "generator.norm.running_mean", "generator.norm.running_var", "generator.norm.num_batches_tracked",
        "generator.span.weight", "generator.span.bias"])


def test_involution_odd_size_stride2_pools_partial_windows():
    """ceil_mode pooling: for odd sizes the last row/column of kernels comes from the
    average of the pixels the last 2x2 window covers (PyTorch divides by the in-image count)."""
    dim = 16
    m = create_mixer("involution", dim, kernel_size=3, stride=2, dtype=torch.float64).eval()
    x = torch.randn(1, dim, 7, 5, dtype=torch.float64)
    pooled = m.generator.pool(x)
    assert pooled.shape[-2:] == (4, 3)
    torch.testing.assert_close(pooled[..., 3, 2], x[..., 6, 4])
    torch.testing.assert_close(pooled[..., 3, 0], x[..., 6, 0:2].mean(-1))
    torch.testing.assert_close(pooled[..., 0, 0], x[..., 0:2, 0:2].mean((-1, -2)))
    assert m(x).shape == (1, dim, 4, 3)


def _axis_allowed(L, K, s, d, border):
    """(Lo, L) bool: key y is in the window of output i along one axis, and the true offset
    y - i*s. Written from the definitions (conv-style zero border; NATTEN's clamp)."""
    Lo = (L - 1) // s + 1
    allowed = torch.zeros(Lo, L, dtype=torch.bool)
    for i in range(Lo):
        c = i * s
        if border == "zero":
            for y in range(L):
                allowed[i, y] = abs(y - c) <= d * (K // 2) and (y - c) % d == 0
        else:
            r, ip = i % d, i // d
            Lr = -(-(L - r) // d)
            start = min(max(ip - K // 2, 0), Lr - K)
            for y in range(L):
                allowed[i, y] = y % d == r and start <= y // d < start + K
    offset = torch.arange(L)[None, :] - (torch.arange(Lo) * s)[:, None]
    return allowed, offset


def _sdpa_reference(m, x, K, s, d, border):
    """Whole-image F.scaled_dot_product_attention with a window mask (and the relative
    position bias as a float mask) for a query_key mixer."""
    g = m.generator
    B, C, H, W = x.shape
    h, dh = g.heads, C // g.heads
    ay, oy = _axis_allowed(H, K, s, d, border)
    ax, ox = _axis_allowed(W, K, s, d, border)
    Ho, Wo = ay.shape[0], ax.shape[0]
    allowed = (ay[:, None, :, None] & ax[None, :, None, :]).reshape(Ho * Wo, H * W)
    mask = torch.zeros(h, Ho * Wo, H * W, dtype=x.dtype)
    if g.rel_pos is not None:
        iy = (oy // d + K - 1).clamp(0, 2 * K - 2)
        ix = (ox // d + K - 1).clamp(0, 2 * K - 2)
        mask = g.rel_pos[:, iy[:, None, :, None], ix[None, :, None, :]].reshape(h, Ho * Wo, H * W)
    mask = mask.masked_fill(~allowed, float("-inf"))
    q = g.query(x)[:, :, ::s, ::s].reshape(B, h, dh, Ho * Wo).transpose(-1, -2)
    k = g.key(x).reshape(B, h, dh, H * W).transpose(-1, -2)
    v = m.value(x).reshape(B, h, dh, H * W).transpose(-1, -2)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return y.transpose(-1, -2).reshape(B, C, Ho, Wo)


@pytest.mark.parametrize("K,stride,dilation,rel_pos", [(3, 1, 1, True), (5, 2, 1, True), (3, 1, 2, True),
                                                       (3, 2, 1, False)])
def test_local_attention_equals_masked_sdpa(K, stride, dilation, rel_pos):
    m = create_mixer("local_attention", 8, kernel_size=K, stride=stride, dilation=dilation, heads=2,
                     rel_pos=rel_pos, qkv_bias=True, dtype=torch.float64)
    if rel_pos:
        with torch.no_grad():
            m.generator.rel_pos.normal_()
    x = torch.randn(2, 8, 7, 6, dtype=torch.float64)
    torch.testing.assert_close(m(x), _sdpa_reference(m, x, K, stride, dilation, "zero"), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("K,dilation", [(3, 1), (5, 1), (3, 2)])
def test_neighborhood_attention_equals_clamp_masked_sdpa(K, dilation):
    m = create_mixer("neighborhood_attention", 8, kernel_size=K, dilation=dilation, heads=2, dtype=torch.float64)
    with torch.no_grad():
        m.generator.rel_pos.normal_()
    x = torch.randn(2, 8, 7, 6, dtype=torch.float64)
    torch.testing.assert_close(m(x), _sdpa_reference(m, x, K, 1, dilation, "clamp"), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("stride", [1, 2])
def test_positional_attention_equals_direct_loop(stride):
    C, heads, K = 8, 2, 3
    m = create_mixer("positional_attention", C, kernel_size=K, stride=stride, heads=heads, dtype=torch.float64)
    g = m.generator
    x = torch.randn(1, C, 5, 6, dtype=torch.float64)
    B, _, H, W = x.shape
    q, v = g.query(x), m.value(x)
    d = C // heads
    Ho, Wo = (H - 1) // stride + 1, (W - 1) // stride + 1
    ref = torch.zeros(B, C, Ho, Wo, dtype=x.dtype)
    for b in range(B):
        for hd in range(heads):
            cs = slice(hd * d, (hd + 1) * d)
            for i in range(Ho):
                for j in range(Wo):
                    logits, vals = [], []
                    for u in range(K):
                        for w_ in range(K):
                            dy, dx = u - K // 2, w_ - K // 2
                            yy, xx = i * stride + dy, j * stride + dx
                            if not (0 <= yy < H and 0 <= xx < W):
                                continue
                            r = torch.cat([g.rel_rows[hd, :, dy + K - 1], g.rel_cols[hd, :, dx + K - 1]])
                            logits.append(q[b, cs, i * stride, j * stride] @ r)
                            vals.append(v[b, cs, yy, xx])
                    p = torch.softmax(torch.stack(logits), 0)
                    ref[b, cs, i, j] = (p[:, None] * torch.stack(vals)).sum(0)
    torch.testing.assert_close(m(x), ref, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("stride", [1, 2])
def test_patch_involution_p1_equals_involution(stride):
    a = create_mixer("involution", 32, kernel_size=3, stride=stride, dtype=torch.float64)
    b = create_mixer("patch_involution", 32, kernel_size=3, stride=stride, patch_size=1, dtype=torch.float64)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 32, 7, 6, dtype=torch.float64)
    torch.testing.assert_close(b(x), a(x), atol=0, rtol=0)


# ------------------------------------------------------------------- per-preset contract
# Parametrised over list_mixers(): a preset is tested the moment it is registered.

STRIDE1_ONLY = {"neighborhood_attention"}  # border="clamp": stride > 1 is a ValueError
DIM = 32


def _make(name, stride=1, dtype=torch.float32, seed=0, **kw):
    torch.manual_seed(seed)
    if "attention" in name:
        kw.setdefault("heads", 4)
    m = create_mixer(name, DIM, kernel_size=3, stride=stride, dtype=dtype, **kw)
    # move BN running stats and zero-initialised parameters away from their defaults
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.5, 0.5)
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 1.5)
    return m


@pytest.mark.parametrize("name", list_mixers())
@pytest.mark.parametrize("stride", [1, 2])
def test_preset_shapes(name, stride):
    if stride > 1 and name in STRIDE1_ONLY:
        with pytest.raises(ValueError, match="stride"):
            create_mixer(name, DIM, kernel_size=3, stride=stride)
        return
    m = _make(name, stride)
    for H, W in ((7, 9), (8, 8), (5, 6)):
        y = m(torch.randn(2, DIM, H, W))
        assert y.shape == (2, DIM, math.ceil(H / stride), math.ceil(W / stride))


@settings(max_examples=20)
@given(name=st.sampled_from(list_mixers()), H=st.integers(1, 11), W=st.integers(1, 11),
       stride=st.integers(1, 3), K=st.sampled_from([1, 3, 5]), dilation=st.integers(1, 2))
def test_preset_shape_contract_and_wiring(name, H, W, stride, K, dilation):
    """Any size, stride, odd K: (B, C, H, W) -> (B, C, ceil(H/s), ceil(W/s)); an aggregation
    Mixer's output is the brute-force oracle's aggregate of value(x) with its own kernel."""
    from oracle import brute_aggregate

    if name in STRIDE1_ONLY:
        stride = 1
        H, W = max(H, K * dilation), max(W, K * dilation)
    kw = {"heads": 4} if "attention" in name else {}
    m = create_mixer(name, 16, kernel_size=K, stride=stride, dilation=dilation, dtype=torch.float64, **kw).eval()
    x = torch.randn(2, 16, H, W, dtype=torch.float64)
    with torch.no_grad():
        y = m(x)
    assert y.shape == (2, 16, -(-H // stride), -(-W // stride))
    if isinstance(m, Mixer):
        with torch.no_grad():
            ref = brute_aggregate(m.value(x), m.kernel(x), m.window)
        torch.testing.assert_close(y, m.proj(torch.as_tensor(ref, dtype=y.dtype)), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("name", list_mixers())
def test_preset_builds_at_dim256_k7(name):
    m = create_mixer(name, 256, kernel_size=7, device="meta")
    assert isinstance(m, nn.Module)
    assert all(p.device.type == "meta" for p in m.parameters())


@pytest.mark.parametrize("name", list_mixers())
def test_preset_float32_float64_forward_backward_and_grads_reach_every_parameter(name):
    """Float32 and float64 copies with the same weights agree; backward gives a finite,
    non-zero gradient for every parameter and for the input."""
    m64 = _make(name, dtype=torch.float64).train()
    m32 = _make(name, dtype=torch.float32).train()
    m32.load_state_dict(m64.state_dict())
    x64 = torch.randn(2, DIM, 6, 7, dtype=torch.float64, requires_grad=True)
    x32 = x64.detach().float().requires_grad_()
    y64, y32 = m64(x64), m32(x32)
    assert y64.dtype == torch.float64 and y32.dtype == torch.float32
    torch.testing.assert_close(y32.double(), y64, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y64)
    y64.backward(g)
    y32.backward(g.float())
    torch.testing.assert_close(x32.grad.double(), x64.grad, atol=1e-5, rtol=1e-5)
    for (n, p64), (_, p32) in zip(m64.named_parameters(), m32.named_parameters()):
        assert p64.grad is not None, f"{name}: no gradient reaches {n}"
        assert torch.isfinite(p64.grad).all() and p64.grad.abs().sum() > 0, f"{name}: zero gradient for {n}"
        torch.testing.assert_close(p32.grad.double(), p64.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", list_mixers())
def test_preset_bfloat16_and_autocast(name):
    """bfloat16 weights, and float32 weights under CPU autocast (kernels and values come out
    in different dtypes there), both track float32 to bfloat16 precision and backpropagate."""
    m32 = _make(name).eval()
    m16 = _make(name, dtype=torch.bfloat16).eval()
    m16.load_state_dict(m32.state_dict())
    x = torch.randn(2, DIM, 6, 7)
    ref = m32(x)
    tol = dict(atol=5e-2 * ref.abs().max().item(), rtol=0)
    y16 = m16(x.bfloat16())
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), ref, **tol)
    xa = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ya = m32(xa)
    assert ya.dtype == torch.bfloat16
    torch.testing.assert_close(ya.float(), ref, **tol)
    ya.float().sum().backward()
    assert xa.grad is not None and torch.isfinite(xa.grad).all()


@pytest.mark.parametrize("name", list_mixers())
def test_preset_state_dict_round_trip(name):
    a = _make(name, seed=1).eval()
    b = _make(name, seed=2).eval()
    x = torch.randn(1, DIM, 6, 5)
    if not a.state_dict():                   # parameter-free (pooling): nothing to round-trip
        assert not list(a.parameters()) and torch.equal(a(x), b(x))
        return
    assert not torch.equal(a(x), b(x))
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b(x), a(x), atol=0, rtol=0)
    # reset_parameters re-initialises in place and keeps every key and shape
    if hasattr(b, "reset_parameters"):
        shapes = {k: v.shape for k, v in b.state_dict().items()}
        b.reset_parameters()
        assert {k: v.shape for k, v in b.state_dict().items()} == shapes
        assert not torch.equal(b(x), a(x))


@pytest.mark.parametrize("name", list_mixers())
def test_preset_jit_trace(name):
    m = _make(name).eval()
    x = torch.randn(2, DIM, 6, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape checks become constants
        traced = torch.jit.trace(m, (x,), check_trace=False)
    x2 = torch.randn(2, DIM, 6, 5)
    torch.testing.assert_close(traced(x2), m(x2), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", list_mixers())
def test_preset_device_dtype_and_repr(name):
    m = _make(name, dtype=torch.float64)
    assert all(t.dtype == torch.float64 for t in m.parameters())
    assert f"{DIM}" in repr(m)
    if isinstance(m, Mixer):
        assert f"dim={DIM}" in m.extra_repr() and "kernel_size=(3, 3)" in m.extra_repr()


# ------------------------------------------------------------------------- bad configs


def test_unknown_mixer():
    with pytest.raises(ValueError, match="unknown mixer 'nope'; known: .*involution"):
        create_mixer("nope", 16)


@pytest.mark.parametrize("name", list_mixers())
def test_even_kernel_rejected(name):
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        create_mixer(name, DIM, kernel_size=4)


@pytest.mark.parametrize("name,kw,match", [
    ("conv", dict(groups=3), "dim=32 is not divisible by groups=3"),
    ("involution", dict(group_channels=5), "dim=32 is not divisible by group_channels=5"),
    ("involution", dict(groups=3), "dim=32 is not divisible by groups=3"),
    ("patch_involution", dict(groups=3), "dim=32 is not divisible by groups=3"),
    ("patch_involution", dict(patch_size=2), "patch_size must be odd"),
    ("dwconv", dict(kernel_size=(3, 4)), "kernel_size must be odd"),
    ("local_attention", dict(heads=3), "dim=32 is not divisible by heads=3"),
    ("neighborhood_attention", dict(heads=5), "dim=32 is not divisible by heads=5"),
    ("positional_attention", dict(heads=6), "dim=32 is not divisible by heads=6"),
    ("neighborhood_attention", dict(stride=2), "stride=1, got stride=2"),
    ("dwconv", dict(stride=0), "stride must be >= 1"),
])
def test_bad_mixer_config(name, kw, match):
    with pytest.raises(ValueError, match=match):
        create_mixer(name, DIM, **{"kernel_size": 3, **kw})


def test_neighborhood_attention_input_smaller_than_window():
    m = create_mixer("neighborhood_attention", DIM, kernel_size=5, heads=4)
    with pytest.raises(ValueError, match="clamp"):
        m(torch.randn(1, DIM, 4, 8))


def test_register_mixer():
    @register_mixer("_test_avg")
    def _avg(dim, *, kernel_size=3, stride=1, device=None, dtype=None):
        return nn.AvgPool2d(kernel_size, stride, kernel_size // 2)

    try:
        assert "_test_avg" in list_mixers()
        assert create_mixer("_test_avg", 4, kernel_size=3, stride=2)(torch.randn(1, 4, 5, 5)).shape == (1, 4, 3, 3)
    finally:
        _MIXERS.pop("_test_avg")


# ------------------------------------------------------------------------------ compile
# Each preset is compiled once. fullgraph=True with the "aot_eager" backend runs dynamo
# (no graph break allowed), the fake kernels and AOT autograd (forward and backward) over the
# preset's whole module; inductor code generation (10-30 s per graph on 2 cores, minutes for
# the attention presets) is exercised once, on a module holding dwconv and involution.


@pytest.mark.parametrize("name", list_mixers())
def test_preset_compile_fullgraph_equals_eager(name):
    m = _make(name).eval()
    x = torch.randn(2, DIM, 6, 7)
    xc = x.clone().requires_grad_()
    xe = x.clone().requires_grad_()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    yc, ye = compiled(xc), m(xe)
    torch.testing.assert_close(yc, ye, atol=1e-6, rtol=1e-5)
    g = torch.randn_like(ye)
    yc.backward(g)
    ye.backward(g)
    torch.testing.assert_close(xc.grad, xe.grad, atol=1e-6, rtol=1e-5)


def test_inductor_compile_equals_eager():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.dw = _make("dwconv", stride=2)
            self.inv = _make("involution", stride=2)

        def forward(self, x):
            return self.dw(x) + self.inv(x)

    m = Pair().eval()
    x = torch.randn(2, DIM, 7, 6)
    torch.testing.assert_close(torch.compile(m, fullgraph=True)(x), m(x), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ README

README = Path(__file__).resolve().parents[1] / "README.md"


def _section_blocks():
    text = README.read_text()
    start = text.index("## Mixers and kernel generators")
    nxt = re.search(r"^## |^<!-- ", text[start + 3:], re.M)
    section = text[start: start + 3 + nxt.start()] if nxt else text[start:]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_readme_mixer_section_runs():
    blocks = _section_blocks()
    assert len(blocks) >= 3
    gens, mixers = dict(_KERNEL_GENS), dict(_MIXERS)
    try:
        for i, code in enumerate(blocks):
            exec(compile(code, f"README.md[mixers block {i}]", "exec"), {"__name__": f"readme_block_{i}"})
    finally:  # leave the registries as they were
        _KERNEL_GENS.clear()
        _KERNEL_GENS.update(gens)
        _MIXERS.clear()
        _MIXERS.update(mixers)

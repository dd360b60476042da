"""Kernel generators: registry, output layout, and the generator-level semantics
(span channel layout, attention weights, patch P = 1 == bottleneck)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tokenmix.kernel_gen import (BottleneckKernel, create_kernel_gen, list_kernel_gens, register_kernel_gen)
from tokenmix.kernel_gen.bottleneck import CeilAvgPool2d
from tokenmix.kernel_gen.registry import _KERNEL_GENS
from tokenmix.mixers import Mixer
from tokenmix.ops import Window

BUILTIN = ["bottleneck", "patch", "positional", "query_key", "static"]
ATTENTION = ["query_key", "positional"]


def _gen(name, C=16, K=3, stride=1, dtype=torch.float64, **kw):
    if name in ATTENTION:
        kw.setdefault("heads", 2)
    return create_kernel_gen(name, C, kernel_size=K, stride=stride, dtype=dtype, **kw)


def test_registry_lists_builtins_and_rejects_unknown():
    assert set(BUILTIN) <= set(list_kernel_gens())
    with pytest.raises(ValueError, match="unknown kernel generator 'nope'; known: static, bottleneck, "):
        create_kernel_gen("nope", 16)


def test_register_custom_generator_used_by_mixer():
    @register_kernel_gen("_test_uniform")
    class Uniform(nn.Module):
        def __init__(self, channels, kernel_size=3, **kw):
            super().__init__()

        def forward(self, x, window):
            return x.new_full((1, 1, window.taps, 1, 1), 1.0 / window.taps)

    try:
        gen = create_kernel_gen("_test_uniform", 4)
        m = Mixer(4, gen, Window(3))
        x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
        ref = torch.nn.functional.avg_pool2d(x, 3, 1, 1, count_include_pad=True)
        torch.testing.assert_close(m(x), ref, atol=1e-12, rtol=1e-10)
        with pytest.raises(ValueError, match="already registered"):
            register_kernel_gen("_test_uniform")(type("Other", (nn.Module,), {}))
    finally:
        _KERNEL_GENS.pop("_test_uniform", None)


@pytest.mark.parametrize("name", BUILTIN)
@pytest.mark.parametrize("stride", [1, 2])
def test_output_layout(name, stride):
    C, K, H, W = 16, 3, 7, 6
    gen = _gen(name, C, K, stride).eval()
    win = Window(K, stride=stride)
    w = gen(torch.randn(2, C, H, W, dtype=torch.float64), win)
    Ho, Wo = math.ceil(H / stride), math.ceil(W / stride)
    G = gen.groups
    assert C % G == 0
    if name == "static":
        assert w.shape == (1, C, K * K, 1, 1)
    else:
        assert w.shape == (2, G, K * K, Ho, Wo)
    assert w.dtype == torch.float64


@pytest.mark.parametrize("name", ATTENTION)
@pytest.mark.parametrize("stride", [1, 2])
def test_attention_weights_are_distributions_over_valid_taps(name, stride):
    C, K, H, W = 8, 5, 6, 7
    gen = _gen(name, C, K, stride=stride)
    win = Window(K, stride=stride)
    w = gen(torch.randn(2, C, H, W, dtype=torch.float64), win)
    valid = win.valid_mask(H, W)
    assert (w[:, :, ~valid] == 0).all()          # padding takes no probability mass
    torch.testing.assert_close(w.sum(2), torch.ones_like(w.sum(2)), atol=1e-12, rtol=0)
    assert (w[:, :, valid] > 0).all()


def test_static_groups_share_one_filter_per_group():
    """static with G < C: the channels of a group share the group's K x K filter."""
    C, G, K = 6, 2, 3
    gen = _gen("static", C, K, stride=2, groups=G)
    m = Mixer(C, gen, Window(K, stride=2))
    ref = nn.Conv2d(C, C, K, 2, K // 2, groups=C, bias=False, dtype=torch.float64)
    with torch.no_grad():
        ref.weight.copy_(gen.weight.view(G, 1, 1, K, K).expand(G, C // G, 1, K, K).reshape(C, 1, K, K))
    x = torch.randn(2, C, 7, 8, dtype=torch.float64)
    torch.testing.assert_close(m(x), ref(x), atol=1e-12, rtol=1e-10)


def test_bottleneck_span_channel_layout():
    """span output channel g*K*K + t is tap t of group g; no normalisation of the kernel."""
    C, K = 32, 3
    gen = _gen("bottleneck", C, K).eval()
    x = torch.randn(2, C, 5, 6, dtype=torch.float64)
    w = gen(x, Window(K))
    span = gen.span(gen.act(gen.norm(gen.reduce(x))))
    G = C // 16
    for g in range(G):
        for t in range(K * K):
            torch.testing.assert_close(w[:, g, t], span[:, g * K * K + t], atol=0, rtol=0)


def test_bottleneck_defaults_match_official():
    gen = create_kernel_gen("bottleneck", 64, kernel_size=7, stride=2)
    assert gen.groups == 4 and gen.reduce.out_channels == 16
    # nn.AvgPool2d(2, 2, ceil_mode=True), bitwise (tests/test_export.py), export-friendly
    assert isinstance(gen.pool, CeilAvgPool2d) and gen.pool.stride == 2
    assert gen.reduce.bias is None and gen.span.bias is not None
    assert gen.span.out_channels == 4 * 49
    assert isinstance(create_kernel_gen("bottleneck", 64).pool, nn.Identity)


def test_ceil_pool_equals_official_floor_pool_on_even_sizes():
    x = torch.randn(2, 16, 8, 10, dtype=torch.float64)
    ours = create_kernel_gen("bottleneck", 16, stride=2).pool(x)
    torch.testing.assert_close(ours, nn.AvgPool2d(2, 2)(x), atol=0, rtol=0)


def test_ceil_pool_keeps_only_its_input_for_backward():
    # autograd keeps the pool's own input (already kept by the layers around it), never a padded copy
    x = torch.randn(2, 16, 7, 9, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        CeilAvgPool2d(2)(x)
    assert saved and all(t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for t in saved), \
        [tuple(t.shape) for t in saved]


@pytest.mark.parametrize("stride", [1, 2])
def test_patch_p1_equals_bottleneck(stride):
    C, K = 32, 3
    b = _gen("bottleneck", C, K, stride)
    p = _gen("patch", C, K, stride, patch_size=1)
    assert list(b.state_dict()) == list(p.state_dict())
    p.load_state_dict(b.state_dict())
    win = Window(K, stride=stride)
    x = torch.randn(2, C, 7, 8, dtype=torch.float64)
    for train in (True, False):
        b.train(train)
        p.train(train)
        torch.testing.assert_close(p(x, win), b(x, win), atol=0, rtol=0)


def test_patch_kernel_sees_its_neighborhood():
    """With P = 3 the kernel at (i, j) depends on pixel (i+1, j) and not on (i+2, j); with
    P = 1 only on (i, j)."""
    C, K = 16, 3
    win = Window(K)
    x = torch.randn(1, C, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x2 = x.clone()
    x2[:, :, 3, 2] += 1.0
    for P, changed, same in ((3, [(2, 2), (3, 2), (4, 2)], [(1, 2), (5, 2)]), (1, [(3, 2)], [(2, 2), (4, 2)])):
        torch.manual_seed(P)
        g = _gen("patch", C, K, patch_size=P).eval()
        with torch.no_grad():  # keep every ReLU open, so no change can be masked to 0
            g.norm.bias.fill_(100.0)
        d = (g(x2, win) - g(x, win)).abs().sum((0, 1, 2))
        for i, j in changed:
            assert d[i, j] > 0
        for i, j in same:
            assert d[i, j] == 0


def test_query_key_bias_indexed_by_true_offset_in_clamp_border():
    """Near the edge of a clamp window, tap t of output (0, 0) reads pixel (u, v): the bias
    must be rel_pos[h, u + K - 1, v + K - 1] (true offset), not the tap's nominal offset."""
    C, K = 4, 3
    gen = _gen("query_key", C, K)
    with torch.no_grad():
        gen.rel_pos.copy_(torch.arange(gen.rel_pos.numel(), dtype=torch.float64).view_as(gen.rel_pos))
    win = Window(K, border="clamp")
    bias = gen.position_bias(win, 5, 5)  # (1, heads, K*K, 5, 5)
    for u in range(K):
        for v in range(K):
            t = u * K + v
            assert bias[0, 1, t, 0, 0] == gen.rel_pos[1, u + K - 1, v + K - 1]
            assert bias[0, 1, t, 2, 2] == gen.rel_pos[1, u - 1 + K - 1, v - 1 + K - 1]
            assert bias[0, 0, t, 4, 1] == gen.rel_pos[0, u - 2 + K - 1, v - 1 + K - 1]


@pytest.mark.parametrize("name", BUILTIN)
def test_window_mismatch_is_a_clear_error(name):
    gen = _gen(name, 16, 3)
    with pytest.raises(ValueError, match="kernel_size"):
        gen(torch.randn(1, 16, 6, 6, dtype=torch.float64), Window(5))


def test_bottleneck_stride_mismatch_is_a_clear_error():
    gen = _gen("bottleneck", 16, 3, stride=1)
    with pytest.raises(ValueError, match="stride"):
        gen(torch.randn(1, 16, 6, 6, dtype=torch.float64), Window(3, stride=2))


@pytest.mark.parametrize("name,kw,match", [
    ("static", dict(groups=3), "channels=16 is not divisible by groups=3"),
    ("bottleneck", dict(group_channels=5), "channels=16 is not divisible by group_channels=5"),
    ("bottleneck", dict(groups=2, group_channels=8), "not both"),
    ("bottleneck", dict(reduction=32), "reduction"),
    ("query_key", dict(heads=3), "channels=16 is not divisible by heads=3"),
    ("positional", dict(heads=16), "must be even"),
    ("patch", dict(patch_size=2), "patch_size must be odd"),
])
def test_bad_generator_config(name, kw, match):
    with pytest.raises(ValueError, match=match):
        create_kernel_gen(name, 16, kernel_size=3, **kw)


@pytest.mark.parametrize("name", BUILTIN)
def test_generators_refuse_a_window_of_another_stride(name):
    """A generator is built for the stride of the windows it serves (bottleneck and patch pool
    their kernel branch by it, the attention generators take their queries at it)."""
    gen = _gen(name, 16, 3, stride=2)
    assert gen.stride == 2
    with pytest.raises(ValueError, match=r"was built for stride=2, got a window with stride=\(1, 1\)"):
        gen(torch.randn(1, 16, 6, 6, dtype=torch.float64), Window(3))

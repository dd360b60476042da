"""The involution paper's Table 1 rows beyond ResNet/RedNet/SASA: the local relation, axial and
global (attention-augmented) attention mixers against direct per-pixel loops written here,
gradcheck, torch.compile(fullgraph=True), strict flop counts, the LR-Net, AA-ResNet and
Axial-ResNet models' params and GMACs, and ``tokenmix zoo``."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tokenmix.analysis import count_flops, count_params
from tokenmix.kernel_gen import create_kernel_gen
from tokenmix.mixers import create_mixer
from tokenmix.ops import Window


def _perturb_bn(m: nn.Module) -> None:
    """Move BN statistics and affine parameters away from identity (eval-mode tests)."""
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.5, 0.5)
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 1.5)


def _compiled_equals_eager(m: nn.Module, x: torch.Tensor) -> None:
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    yc, ye = compiled(xc), m(xe)
    torch.testing.assert_close(yc, ye, atol=1e-10, rtol=1e-8)
    g = torch.randn_like(ye)
    yc.backward(g)
    ye.backward(g)
    torch.testing.assert_close(xc.grad, xe.grad, atol=1e-10, rtol=1e-8)


# ------------------------------------------------------------------------------ local relation


def _local_relation_loop(m, x):
    """The local relation layer, one output pixel and one tap at a time (float64)."""
    gen, win = m.generator, m.window
    B, C, H, W = x.shape
    G = gen.groups
    (K, _), (s, _), (d, _), (p, _) = win.kernel_size, win.stride, win.dilation, win.padding
    Ho, Wo = win.output_size(H, W)
    wq = gen.query.weight[:, :, 0, 0]
    wk = gen.key.weight[:, :, 0, 0]
    l1, l2 = gen.geometry[0], gen.geometry[2]
    cg = C // G
    y = torch.zeros(B, C, Ho, Wo, dtype=x.dtype)
    for b in range(B):
        for i in range(Ho):
            for j in range(Wo):
                q = wq @ x[b, :, i * s, j * s]
                taps = []
                for u in range(K):
                    for v in range(K):
                        r, c = i * s - p + u * d, j * s - p + v * d
                        if 0 <= r < H and 0 <= c < W:
                            pos = torch.tensor([u * d - p, v * d - p], dtype=x.dtype)
                            geo = l2.weight[:, :, 0, 0] @ torch.relu(l1.weight[:, :, 0, 0] @ pos + l1.bias) + l2.bias
                            taps.append((r, c, q * (wk @ x[b, :, r, c]) + geo))
                logits = torch.stack([t[2] for t in taps])  # (taps, G)
                a = torch.softmax(logits, dim=0)
                for t, (r, c, _) in enumerate(taps):
                    y[b, :, i, j] += a[t].repeat_interleave(cg) * x[b, :, r, c]
    return y


@pytest.mark.parametrize("K,stride,dilation,H,W", [(3, 1, 1, 5, 4), (5, 2, 1, 7, 6), (3, 1, 2, 6, 5), (3, 3, 1, 7, 5)])
def test_local_relation_matches_direct_loop(K, stride, dilation, H, W):
    torch.manual_seed(0)
    m = create_mixer("local_relation", 16, kernel_size=K, stride=stride, dilation=dilation, group_channels=4,
                     dtype=torch.float64)
    x = torch.randn(2, 16, H, W, dtype=torch.float64)
    torch.testing.assert_close(m(x), _local_relation_loop(m, x), atol=1e-12, rtol=1e-10)


def test_local_relation_generator_layout_and_clamp_border():
    """Kernel (B, G, K*K, Ho, Wo), softmax over taps; with a clamp window the geometry prior
    follows the true offsets, so a clamp kernel near an edge differs from a mid-image one."""
    torch.manual_seed(0)
    gen = create_kernel_gen("local_relation", 16, kernel_size=3, group_channels=8, dtype=torch.float64)
    assert gen.groups == 2 and gen.geometry_hidden == 1
    x = torch.randn(2, 16, 6, 5, dtype=torch.float64)
    w = gen(x, Window(3))
    assert w.shape == (2, 2, 9, 6, 5)
    torch.testing.assert_close(w.sum(2), torch.ones(2, 2, 6, 5, dtype=torch.float64))
    wc = gen(x, Window(3, border="clamp"))
    assert wc.shape == (2, 2, 9, 6, 5) and torch.isfinite(wc).all()
    torch.testing.assert_close(wc[..., 1:-1, 1:-1], w[..., 1:-1, 1:-1])  # interior: the same offsets
    with pytest.raises(ValueError, match="group_channels=5"):
        create_kernel_gen("local_relation", 16, group_channels=5)


def test_local_relation_gradcheck():
    torch.manual_seed(0)
    m = create_mixer("local_relation", 8, kernel_size=3, stride=2, group_channels=4, dtype=torch.float64)
    x = torch.randn(1, 8, 5, 4, dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in m.named_parameters()]

    def f(x, *ps):
        return torch.func.functional_call(m, dict(zip(names, ps)), (x,))

    inputs = (x, *[p.detach().clone().requires_grad_() for p in m.parameters()])
    assert torch.autograd.gradcheck(f, inputs, atol=1e-7, rtol=1e-5)


def test_local_relation_compile_fullgraph():
    torch.manual_seed(0)
    m = create_mixer("local_relation", 16, kernel_size=3, stride=2, group_channels=4, dtype=torch.float64)
    _compiled_equals_eager(m, torch.randn(2, 16, 7, 6, dtype=torch.float64))


def test_local_relation_strict_flops():
    C, H, K, G = 32, 10, 5, 4
    m = create_mixer("local_relation", C, kernel_size=K, group_channels=C // G)
    r = count_flops(m, torch.randn(1, C, H, H), strict=True)
    KK, HW, hidden = K * K, H * H, m.generator.geometry_hidden
    assert r.by_operator == {
        "conv": 2 * C * G * HW + 2 * hidden * KK + hidden * G * KK,  # q, k maps; the geometry MLP on K*K offsets
        "correlate": G * HW * KK,
        "softmax": G * KK * HW,
        "aggregate": C * HW * KK,
    }


# ------------------------------------------------------------------------------ the models at 224

BUILT = {"lrnet26": (14.7, 2.6), "lrnet50": (23.3, 4.3)}


@pytest.fixture(scope="module")
def counted():
    """Params and strict fvcore GMACs of each built Table 1 row, one batch-1 trace at 224x224."""
    from tokenmix.analysis import zoo_rows

    return {r.name: r for r in zoo_rows(list(BUILT), size=224)}


@pytest.mark.parametrize("name", sorted(BUILT))
def test_table1_models_within_2_percent_of_paper(counted, name):
    params_m, gmacs = BUILT[name]
    row = counted[name]
    assert row.flops.unsupported == {}
    assert abs(row.params / 1e6 / params_m - 1) <= 0.02, (name, row.params)
    assert abs(row.gmacs / gmacs - 1) <= 0.02, (name, row.gmacs)


def test_lrnet_layout():
    from tokenmix.models import create_model

    m = create_model("lrnet26")
    mixers = [b.mixer for s in m.stages for b in s]
    assert len(mixers) == 8 and all(type(x.generator).__name__ == "LocalRelationKernel" for x in mixers)
    assert mixers[0].window.kernel_size == (7, 7) and mixers[0].generator.groups == 112 // 8
    assert m.config.out_channels == (256, 512, 1024, 2048)

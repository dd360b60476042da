"""SAN (Zhao, Jia, Koltun, CVPR 2020): the pairwise and patchwise generators against direct
per-pixel loops, their gradients, compile and flop counts; the six models' parameter counts and
GMACs against the official numbers; the official-checkpoint converter against a pure-PyTorch
transcription of the official model (``model/san.py`` of hszhao/SAN) whose subtraction and
aggregation follow the index math of the official CUDA kernels (``lib/sa/functions/*_refpad.py``).

``python tests/test_san.py`` rewrites ``tests/data/san*_keys.txt`` from the transcription.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tokenmix.analysis import count_flops, torch_flops
from tokenmix.analysis.tables import PUBLISHED
from tokenmix.kernel_gen import PairwiseKernel, PatchwiseKernel, create_kernel_gen
from tokenmix.kernel_gen.san import coordinate_map, window_taps
from tokenmix.mixers import create_mixer
from tokenmix.models import (SANConfig, convert_official_san, create_model, get_config, list_models,
                             load_official_san, official_san_keys)
from tokenmix.models.convert_san import san_channel_permutation
from tokenmix.models.san import SANBlock
from tokenmix.ops import Window

DATA = os.path.join(os.path.dirname(__file__), "data")
VARIANTS = [f"san{d}_{t}" for t in ("pairwise", "patchwise") for d in (10, 15, 19)]
# official model/san.py: san(sa_type, layers, kernels=[3, 7, 7, 7, 7]) as config/imagenet/*.yaml
OFFICIAL_LAYERS = {10: [2, 1, 2, 4, 1], 15: [3, 2, 3, 5, 2], 19: [3, 3, 4, 6, 3]}
OFFICIAL_KERNELS = [3, 7, 7, 7, 7]
# parameter counts of the official definitions (counted from the transcription below)
OFFICIAL_PARAMS = {"san10_pairwise": 10_531_848, "san15_pairwise": 14_065_436, "san19_pairwise": 17_596_156,
                   "san10_patchwise": 11_841_124, "san15_patchwise": 16_181_310, "san19_patchwise": 20_518_470}
# official README (GFLOPs of its counter, 224x224)
README_GMACS = {"san10_pairwise": 2.2, "san15_pairwise": 3.0, "san19_pairwise": 3.8,
                "san10_patchwise": 1.9, "san15_patchwise": 2.6, "san19_patchwise": 3.3}


def _variant_args(name):
    depth, kind = name[3:].split("_")
    return (0 if kind == "pairwise" else 1), OFFICIAL_LAYERS[int(depth)]


# ------------------------------------------------------------------------------------------
# The official model, transcribed into pure PyTorch (CUDA kernels replaced by their index math)


def _official_src(L, K, stride, dilation, pad):
    """Source rows of every tap (K, Lo) as the refpad kernels compute them: one reflection,
    ``-i`` below 0 and ``2*(L-1) - i`` beyond the end."""
    Lo = (L + 2 * pad - (dilation * (K - 1) + 1)) // stride + 1
    i = torch.arange(Lo)[None, :] * stride - pad + torch.arange(K)[:, None] * dilation
    i = torch.where(i < 0, -i, i)
    i = torch.where(i >= L, 2 * (L - 1) - i, i)
    return i, Lo


def off_subtraction2(x1, x2, K, stride=1, dilation=1):
    """subtraction2_refpad: out[n, c, kh*K+kw, h*Wo+w] = x1[centre] - x2[tap] (centre not reflected)."""
    n, c, H, W = x1.shape
    pad = (dilation * (K - 1) + 1) // 2
    ri, Ho = _official_src(H, K, stride, dilation, pad)
    ci, Wo = _official_src(W, K, stride, dilation, pad)
    hc = torch.arange(Ho) * stride - pad + (K - 1) // 2 * dilation
    wc = torch.arange(Wo) * stride - pad + (K - 1) // 2 * dilation
    centre = x1[:, :, hc][:, :, :, wc]
    taps = x2[:, :, ri[:, None, :, None], ci[None, :, None, :]]  # (n, c, K, K, Ho, Wo)
    return (centre[:, :, None, None] - taps).reshape(n, c, K * K, Ho * Wo)


def off_subtraction(x, K, stride=1, dilation=1):
    """subtraction_refpad: x[centre] - x[tap]."""
    return off_subtraction2(x, x, K, stride, dilation)


def off_aggregation(x, w, K, stride=1, dilation=1):
    """aggregation_refpad: out[n, c, h, w] = sum_k w[n, c % Cw, k, h*Wo+w] * x[n, c, tap k]."""
    n, c, H, W = x.shape
    pad = (dilation * (K - 1) + 1) // 2
    ri, Ho = _official_src(H, K, stride, dilation, pad)
    ci, Wo = _official_src(W, K, stride, dilation, pad)
    taps = x[:, :, ri[:, None, :, None], ci[None, :, None, :]].reshape(n, c, K * K, Ho * Wo)
    return (w[:, torch.arange(c) % w.shape[1]] * taps).sum(2).view(n, c, Ho, Wo)


def off_position(H, W):
    loc_w = torch.linspace(-1.0, 1.0, W).unsqueeze(0).repeat(H, 1)
    loc_h = torch.linspace(-1.0, 1.0, H).unsqueeze(1).repeat(1, W)
    return torch.cat([loc_w.unsqueeze(0), loc_h.unsqueeze(0)], 0).unsqueeze(0)


class OffSAM(nn.Module):
    def __init__(self, sa_type, in_planes, rel_planes, out_planes, share_planes, kernel_size=3, stride=1, dilation=1):
        super().__init__()
        self.sa_type, self.kernel_size, self.stride = sa_type, kernel_size, stride
        self.conv1 = nn.Conv2d(in_planes, rel_planes, kernel_size=1)
        self.conv2 = nn.Conv2d(in_planes, rel_planes, kernel_size=1)
        self.conv3 = nn.Conv2d(in_planes, out_planes, kernel_size=1)
        if sa_type == 0:
            self.conv_w = nn.Sequential(nn.BatchNorm2d(rel_planes + 2), nn.ReLU(inplace=True),
                                        nn.Conv2d(rel_planes + 2, rel_planes, kernel_size=1, bias=False),
                                        nn.BatchNorm2d(rel_planes), nn.ReLU(inplace=True),
                                        nn.Conv2d(rel_planes, out_planes // share_planes, kernel_size=1))
            self.conv_p = nn.Conv2d(2, 2, kernel_size=1)
            self.softmax = nn.Softmax(dim=-2)
        else:
            self.conv_w = nn.Sequential(nn.BatchNorm2d(rel_planes * (pow(kernel_size, 2) + 1)), nn.ReLU(inplace=True),
                                        nn.Conv2d(rel_planes * (pow(kernel_size, 2) + 1), out_planes // share_planes,
                                                  kernel_size=1, bias=False),
                                        nn.BatchNorm2d(out_planes // share_planes), nn.ReLU(inplace=True),
                                        nn.Conv2d(out_planes // share_planes,
                                                  pow(kernel_size, 2) * out_planes // share_planes, kernel_size=1))
            self.unfold_i = nn.Unfold(kernel_size=1, dilation=dilation, padding=0, stride=stride)
            self.unfold_j = nn.Unfold(kernel_size=kernel_size, dilation=dilation, padding=0, stride=stride)
            self.pad = nn.ReflectionPad2d(kernel_size // 2)

    def forward(self, x):
        K = self.kernel_size
        x1, x2, x3 = self.conv1(x), self.conv2(x), self.conv3(x)
        if self.sa_type == 0:
            p = self.conv_p(off_position(x.shape[2], x.shape[3]).to(x.dtype))
            w = self.softmax(self.conv_w(torch.cat([off_subtraction2(x1, x2, K, self.stride),
                                                    off_subtraction(p, K, self.stride).repeat(x.shape[0], 1, 1, 1)], 1)))
        else:
            if self.stride != 1:
                x1 = self.unfold_i(x1)
            x1 = x1.view(x.shape[0], -1, 1, x.shape[2] * x.shape[3])
            x2 = self.unfold_j(self.pad(x2)).view(x.shape[0], -1, 1, x1.shape[-1])
            w = self.conv_w(torch.cat([x1, x2], 1)).view(x.shape[0], -1, pow(K, 2), x1.shape[-1])
        return off_aggregation(x3, w, K, self.stride)


class OffBottleneck(nn.Module):
    def __init__(self, sa_type, in_planes, rel_planes, mid_planes, out_planes, share_planes=8, kernel_size=7, stride=1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.sam = OffSAM(sa_type, in_planes, rel_planes, mid_planes, share_planes, kernel_size, stride)
        self.bn2 = nn.BatchNorm2d(mid_planes)
        self.conv = nn.Conv2d(mid_planes, out_planes, kernel_size=1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn1(x))
        out = self.relu(self.bn2(self.sam(out)))
        return self.conv(out) + x


class OffSAN(nn.Module):
    def __init__(self, sa_type, layers, kernels, num_classes):
        super().__init__()
        c = 64
        self.conv_in, self.bn_in = nn.Conv2d(3, c, 1, bias=False), nn.BatchNorm2d(c)
        self.conv0, self.bn0 = nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)
        self.layer0 = self._make_layer(sa_type, c, layers[0], kernels[0])
        for i, mult in ((1, 4), (2, 2), (3, 2), (4, 2)):
            c *= mult
            setattr(self, f"conv{i}", nn.Conv2d(c // mult, c, 1, bias=False))
            setattr(self, f"bn{i}", nn.BatchNorm2d(c))
            setattr(self, f"layer{i}", self._make_layer(sa_type, c, layers[i], kernels[i]))
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(c, num_classes)

    @staticmethod
    def _make_layer(sa_type, planes, blocks, kernel_size=7, stride=1):
        return nn.Sequential(*[OffBottleneck(sa_type, planes, planes // 16, planes // 4, planes, 8, kernel_size, stride)
                               for _ in range(blocks)])

    def forward(self, x):
        x = self.relu(self.bn_in(self.conv_in(x)))
        for i in range(5):
            x = self.pool(x)
            x = getattr(self, f"conv{i}")(x)
            x = self.relu(getattr(self, f"bn{i}")(getattr(self, f"layer{i}")(x)))
        return self.fc(self.avgpool(x).flatten(1))


def official_model(name, num_classes=1000):
    sa_type, layers = _variant_args(name)
    return OffSAN(sa_type, layers, OFFICIAL_KERNELS, num_classes)


def randomize(model, seed=0):
    """Random BN affine parameters and running statistics (the convs keep their random init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                for t, lo, hi in ((m.weight, 0.5, 1.5), (m.bias, -0.2, 0.2), (m.running_mean, -0.2, 0.2),
                                  (m.running_var, 0.5, 1.5)):
                    t.copy_(torch.rand(t.shape, generator=g) * (hi - lo) + lo)
                m.num_batches_tracked.fill_(int(torch.randint(1, 1000, (1,), generator=g)))
    return model


def key_file(name):
    return os.path.join(DATA, f"{name}_keys.txt")


def read_keys(name):
    out = {}
    with open(key_file(name)) as f:
        for line in f:
            k, shape = line.rstrip("\n").split(" ", 1)
            out[k] = tuple(int(v) for v in shape.strip("()").split(",") if v.strip())
    return out


def write_keys():
    for name in VARIANTS:
        with torch.device("meta"):
            sd = official_model(name).state_dict()
        with open(key_file(name), "w") as f:
            for k, v in sd.items():
                f.write(f"{k} {tuple(v.shape)}\n")


# ------------------------------------------------------------------------------------------
# the generators against a direct per-pixel loop


def _reflect(i, L):
    if i < 0:
        i = -i
    if i >= L:
        i = 2 * (L - 1) - i
    return i


def _src(i, u, L, K, s, d, border):
    """Source index of tap u of output i along an axis of length L; None outside (zero border)."""
    r = i * s - d * (K - 1) // 2 + u * d
    if border == "reflect":
        return _reflect(r, L)
    return r if 0 <= r < L else None


def _bn(bn, v):
    return (v - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias


def _lin(conv, v):
    out = conv.weight[:, :, 0, 0] @ v
    return out if conv.bias is None else out + conv.bias


def naive_kernel(gen, x, K, s, d, border):
    """The generator's kernel (B, G, K*K, Ho, Wo) pixel by pixel, tap by tap (eval-mode BN)."""
    B, C, H, W = x.shape
    Ho, Wo = (H - 1) // s + 1, (W - 1) // s + 1
    pairwise = isinstance(gen, PairwiseKernel)
    G = gen.groups
    out = torch.zeros(B, G, K * K, Ho, Wo, dtype=x.dtype)
    lin_w, lin_h = torch.linspace(-1, 1, W, dtype=x.dtype), torch.linspace(-1, 1, H, dtype=x.dtype)
    m = gen.mlp
    for b in range(B):
        for i in range(Ho):
            for j in range(Wo):
                phi = _lin(gen.query, x[b, :, i * s, j * s])
                pc = _lin(gen.position, torch.stack([lin_w[j * s], lin_h[i * s]])) if pairwise else None
                feats = []
                for u in range(K):
                    for v in range(K):
                        r, c = _src(i, u, H, K, s, d, border), _src(j, v, W, K, s, d, border)
                        inside = r is not None and c is not None
                        psi = _lin(gen.key, x[b, :, r, c]) if inside else torch.zeros(gen.rel_channels, dtype=x.dtype)
                        if pairwise:
                            pt = _lin(gen.position, torch.stack([lin_w[c], lin_h[r]])) if inside else torch.zeros(2, dtype=x.dtype)
                            f = torch.cat([phi - psi, pc - pt])
                            hdn = torch.relu(_bn(m[3], _lin(m[2], torch.relu(_bn(m[0], f)))))
                            out[b, :, u * K + v, i, j] = _lin(m[5], hdn)
                        else:
                            feats.append(psi)
                if pairwise:
                    out[b, :, :, i, j] = torch.softmax(out[b, :, :, i, j], dim=1)
                else:
                    f = torch.cat([phi] + [torch.stack(feats, 1).reshape(-1)])  # channel-major: c*K*K + t
                    hdn = torch.relu(_bn(m[3], _lin(m[2], torch.relu(_bn(m[0], f)))))
                    out[b, :, :, i, j] = _lin(m[5], hdn).view(G, K * K)
    return out


def _random_gen(cls, C=16, K=3, stride=1, groups=2, rel=3, seed=0):
    torch.manual_seed(seed)
    gen = cls(C, K, stride=stride, groups=groups, rel_channels=rel, dtype=torch.float64)
    return randomize(gen, seed).eval()


GEOMETRIES = [  # (K, stride, dilation, border, H, W)
    (3, 1, 1, "reflect", 5, 7),
    (3, 2, 1, "reflect", 7, 6),
    (5, 1, 2, "reflect", 11, 5),
    (3, 1, 1, "zero", 5, 7),
    (5, 3, 1, "zero", 7, 4),
]


@pytest.mark.parametrize("cls", [PairwiseKernel, PatchwiseKernel])
@pytest.mark.parametrize("K,s,d,border,H,W", GEOMETRIES)
def test_generator_equals_direct_loop(cls, K, s, d, border, H, W):
    gen = _random_gen(cls, K=K, stride=s)
    x = torch.randn(2, 16, H, W, dtype=torch.float64)
    window = Window(K, stride=s, dilation=d, border=border)
    with torch.no_grad():
        got = gen(x, window)
        want = naive_kernel(gen, x, K, s, d, border)
    assert got.shape == want.shape == (2, 2, K * K, (H - 1) // s + 1, (W - 1) // s + 1)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


def test_window_taps_is_the_gather_and_coordinates():
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64)
    taps = window_taps(x, Window(3, border="reflect"), 3)
    want = F.unfold(F.pad(x, (1, 1, 1, 1), mode="reflect"), 3).view(2, 3, 9, 6, 5)
    assert torch.equal(taps, want)
    for H, W in ((4, 3), (1, 2), (224, 97)):
        torch.testing.assert_close(coordinate_map(H, W), off_position(H, W), atol=1e-6, rtol=0)


@pytest.mark.parametrize("cls", [PairwiseKernel, PatchwiseKernel])
@pytest.mark.parametrize("border", ["reflect", "zero"])
def test_generator_gradcheck(cls, border):
    gen = _random_gen(cls, C=8, K=3, groups=2, rel=1)
    x = torch.randn(1, 8, 4, 5, dtype=torch.float64, requires_grad=True)
    window = Window(3, border=border)
    assert torch.autograd.gradcheck(lambda x: gen(x, window), (x,), fast_mode=True)
    # and through the key projection (train mode: batch statistics)
    gen.train()
    kw = gen.key.weight.detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda kw: torch.func.functional_call(gen, {"key.weight": kw}, (x.detach(), window)),
                                    (kw,), fast_mode=True)


@pytest.mark.parametrize("border", ["reflect", "zero"])
def test_mixer_compile_fullgraph_equals_eager(border):
    torch.manual_seed(0)
    mixer = nn.ModuleList([create_mixer(n, 16, kernel_size=3, border=border) for n in ("san_pairwise", "san_patchwise")])
    mixer = mixer.eval()

    def f(x):
        return mixer[0](x) + mixer[1](x)

    x = torch.randn(2, 16, 6, 7)
    xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    yc = torch.compile(f, fullgraph=True, backend="aot_eager")(xc)
    ye = f(xe)
    torch.testing.assert_close(yc, ye, atol=1e-6, rtol=1e-5)
    yc.sum().backward()
    ye.sum().backward()
    torch.testing.assert_close(xc.grad, xe.grad, atol=1e-6, rtol=1e-5)


class _GenModule(nn.Module):
    def __init__(self, gen, window):
        super().__init__()
        self.gen, self.window = gen, window

    def forward(self, x):
        return self.gen(x, self.window)


@pytest.mark.parametrize("name", ["pairwise", "patchwise"])
def test_generator_flops_strict_by_hand(name):
    B, C, H, W, K, R, G = 2, 16, 7, 9, 3, 3, 2
    gen = create_kernel_gen(name, C, kernel_size=K, groups=G, rel_channels=R).eval()
    m = _GenModule(gen, Window(K))
    x = torch.randn(B, C, H, W)
    r = count_flops(m, x, strict=True)
    T, HW = K * K, H * W
    assert r.unsupported == {}
    if name == "pairwise":  # key taps of every image + position taps once
        assert r.by_operator["correlate"] == B * R * HW * T + 2 * HW * T
        convs = 2 * B * HW * C * R + HW * 4 + B * T * HW * ((R + 2) * R + R * G)
        assert r.by_operator["softmax"] == B * G * T * HW
    else:
        assert r.by_operator["correlate"] == B * R * HW * T
        convs = 2 * B * HW * C * R + B * HW * (R * (T + 1) * G + G * G * T)
    assert r.by_operator["conv"] == convs
    assert torch_flops(m, x) == 2 * r.macs


# ------------------------------------------------------------------------------------------
# models: registry, parameters, GMACs


def test_registered_and_config_checks():
    assert set(VARIANTS) <= set(list_models())
    cfg = get_config("san15_patchwise")
    assert isinstance(cfg, SANConfig) and cfg.layers == (3, 2, 3, 5, 2) and cfg.kernels == (3, 7, 7, 7, 7)
    assert SANConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="sa_type='nope'"):
        SANConfig(sa_type="nope")
    with pytest.raises(ValueError, match=r"kernels\[1\]=4 must be odd"):
        SANConfig(kernels=(3, 4, 7, 7, 7))
    with pytest.raises(ValueError, match="unknown override"):
        create_model("san10_pairwise", mixer="involution")
    with pytest.raises(ValueError, match=r"H and W >= 128.*\(1, 3, 100, 140\)"):
        create_model("san10_patchwise", num_classes=3)(torch.randn(1, 3, 100, 140))
    with pytest.raises(ValueError, match="not divisible by share_planes=8"):
        create_mixer("san_pairwise", 12, kernel_size=3)


def test_safetensors_round_trip_keeps_the_config(tmp_path):
    from tokenmix.models import config_from_weights, model_from_weights, save_weights

    model = create_model("san10_patchwise", num_classes=3, layers=(1,) * 5, width=32, kernels=(3,) * 5).eval()
    path = tmp_path / "san.safetensors"
    save_weights(model, path)
    assert config_from_weights(path) == model.config
    clone = model_from_weights(path).eval()
    x = torch.randn(1, 3, 64, 70)
    assert torch.equal(clone(x), model(x))


@pytest.mark.parametrize("name", VARIANTS)
def test_param_counts_equal_the_official_definition(name):
    with torch.device("meta"):
        ours, official = create_model(name), official_model(name)
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(p.numel() for p in official.parameters()) == OFFICIAL_PARAMS[name]
    assert round(n / 1e6, 1) == PUBLISHED[name].params_m  # the README's params column


@pytest.mark.parametrize("name", ["san10_pairwise", "san10_patchwise"])
def test_gmacs_within_5_percent_of_readme(name):
    """fvcore (strict) at 224x224. Counted on the zero-border twin while the CPU backend traces
    the reflect border as the reference's decomposition: the ops' counts depend on shapes only."""
    torch.manual_seed(0)
    model = create_model(name, border="zero").eval()
    r = count_flops(model, torch.randn(1, 3, 224, 224), strict=True)
    assert r.unsupported == {} and r.by_operator["aggregate"] > 0 and r.by_operator["correlate"] > 0
    assert abs(r.total / 1e9 / README_GMACS[name] - 1) <= 0.05, r.total


# ------------------------------------------------------------------------------------------
# the official checkpoints


@pytest.mark.parametrize("name", VARIANTS)
def test_official_key_files_match_transcription_and_converter(name):
    keys = read_keys(name)
    with torch.device("meta"):
        official = {k: tuple(v.shape) for k, v in official_model(name).state_dict().items()}
        ours = official_san_keys(create_model(name))
    assert official == keys
    assert ours == keys  # one to one: every official tensor has exactly one tokenmix tensor


def test_channel_permutation():
    p = san_channel_permutation(16, 8)  # G = 2: official channels 0, 2, 4, ... share weight channel 0
    assert p.tolist() == [0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15]
    assert all(int(p[c]) % 2 == c // 8 for c in range(16))


def _block_pair(sa_type, planes, K, seed=0):
    torch.manual_seed(seed)
    off = randomize(OffBottleneck(sa_type, planes, planes // 16, planes // 4, planes, 8, K), seed)
    ours = SANBlock("pairwise" if sa_type == 0 else "patchwise", planes, planes // 16, planes // 4, 8, K)
    sd = {"layer0.0." + k: v for k, v in off.state_dict().items()}
    conv = convert_official_san(sd, "san10_pairwise")
    ours.load_state_dict({k[len("layer0.0."):]: v for k, v in conv.items()}, strict=True)
    return off, ours


@pytest.mark.parametrize("sa_type", [0, 1])
@pytest.mark.parametrize("train", [False, True])
def test_block_equals_official_at_odd_sizes(sa_type, train):
    off, ours = _block_pair(sa_type, 64, 5)
    off.train(train), ours.train(train)
    for H, W in ((13, 11), (7, 9)):
        x = torch.randn(2, 64, H, W)
        torch.testing.assert_close(ours(x), off(x), atol=1e-5, rtol=1e-5)


def test_permutation_is_needed():
    """Without the channel permutation the block computes something else (G > 1)."""
    off, ours = _block_pair(0, 64, 3)
    off.eval(), ours.eval()
    x = torch.randn(1, 64, 9, 8)
    sd = {k: v for k, v in off.state_dict().items()}
    plain = {k.replace("sam.conv1.", "mixer.generator.query.").replace("sam.conv2.", "mixer.generator.key.")
             .replace("sam.conv3.", "mixer.value.").replace("sam.conv_p.", "mixer.generator.position.")
             .replace("sam.conv_w.", "mixer.generator.mlp."): v for k, v in sd.items()}
    ours.load_state_dict(plain, strict=True)
    assert (ours(x) - off(x)).abs().max() > 1e-3


def _official_checkpoint(name, tmp_path, seed=0):
    torch.manual_seed(seed)
    off = randomize(official_model(name), seed).eval()
    path = tmp_path / f"{name}.pth"
    # the official training script's layout: DistributedDataParallel keys inside 'state_dict'
    torch.save({"epoch": 100, "state_dict": {"module." + k: v for k, v in off.state_dict().items()},
                "top1_val": 77.1}, path)
    return off, path


@pytest.mark.parametrize("name,size", [("san10_pairwise", (224, 224)), ("san10_patchwise", (143, 161))])
def test_official_checkpoint_loads_and_matches_official_forward(name, size, tmp_path):
    """A synthetic checkpoint with the official names, shapes and layout, random values:
    the converted tokenmix model equals the official forward (224x224, and an odd size whose
    last stage, 4x5, still exceeds the reflect padding 3)."""
    off, path = _official_checkpoint(name, tmp_path)
    model = load_official_san(path, name)
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        want, got = off(x), model(x)
    assert got.shape == (1, 1000)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_converter_errors_are_one_line(tmp_path):
    off = official_model("san10_patchwise", num_classes=4)
    sd = off.state_dict()
    with pytest.raises(ValueError, match="variant='san11_pairwise' is not a SAN model"):
        load_official_san(sd, "san11_pairwise")
    bad = dict(sd)
    bad.pop("layer0.0.sam.conv1.weight")
    bad["layer0.0.sam.extra"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save(bad, path)
    with pytest.raises(ValueError) as e:
        load_official_san(path, "san10_patchwise")
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    assert "missing keys (1): ['layer0.0.sam.conv1.weight']" in msg and "'layer0.0.sam.extra'" in msg
    with pytest.raises(ValueError, match=r"missing keys \(\d+\): \['layer0.0.sam.conv_p.bias'.*"
                                         r"shape mismatches \(\d+\): \[.layer0.0.sam.conv_w.0.bias: got \(40,\)"):
        load_official_san(sd, "san10_pairwise")  # patchwise weights into the pairwise model
    model = load_official_san(sd, "san10_patchwise")
    assert model.fc.out_features == 4 and not model.training


if __name__ == "__main__":
    write_keys()

"""tokenmix.models MetaFormer family: exact parameter counts of every preset, the backbone's
contract (stages, odd sizes, overrides), every mixer preset inside a tiny MetaFormer (forward,
backward, torch.compile, strict FLOP counting), and the official PoolFormer / NAT / DiNAT
converters against functional re-implementations of the official forwards written here
(NATTEN < 0.20 semantics for neighborhood attention)."""

from __future__ import annotations

import copy
import json
import math
import os
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tokenmix.analysis import count_flops
from tokenmix.mixers import create_mixer, list_mixers
from tokenmix.models import (MetaFormer, MetaFormerConfig, MetaStageConfig, config_from_weights, convert_official_nat,
                             convert_official_poolformer, create_model, load_official_nat, load_official_poolformer,
                             load_weights, save_weights)

DATA = os.path.join(os.path.dirname(__file__), "data")

# Parameter counts of the official implementations (sail-sg/poolformer models/poolformer.py,
# sail-sg/metaformer metaformer_baselines.py, SHI-Labs/Neighborhood-Attention-Transformer
# classification/{nat,dinat}.py with NATTEN's NeighborhoodAttention2D), 1000 classes; three
# of them are re-derived below from the official key lists under tests/data/.
OFFICIAL_PARAMS = {
    "poolformer_s12": 11_915_176, "poolformer_s24": 21_388_968, "poolformer_s36": 30_862_760,
    "poolformer_m36": 56_172_520, "poolformer_m48": 73_473_448, "convformer_s18": 26_774_448,
    "nat_mini": 19_984_174, "nat_tiny": 27_901_582, "nat_small": 50_743_297, "nat_base": 89_769_652,
    "dinat_mini": 19_984_174, "dinat_tiny": 27_901_582, "dinat_small": 50_719_681, "dinat_base": 89_769_652,
}
KEY_FILES = {"poolformer_s12": "poolformer_s12", "nat_mini": "nat_mini", "dinat_mini": "nat_mini",
             "nat_small": "nat_small"}
DINAT_MINI_DILATIONS = [[1, 8, 1], [1, 4, 1, 4], [1, 2, 1, 2, 1, 2], [1, 1, 1, 1, 1]]  # official dinat.py


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def build_meta(name, **kw):
    with torch.device("meta"):
        return create_model(name, **kw)


def official_shapes(name):
    shapes = {}
    with open(os.path.join(DATA, f"official_{KEY_FILES[name]}_keys.txt")) as f:
        for line in f:
            if line.strip():
                key, shape = line.strip().split(" ", 1)
                shapes[key] = tuple(int(v) for v in re.findall(r"\d+", shape))
    return shapes


# ---------------------------------------------------------------------------------------------
# parameter counts


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAMS))
def test_exact_param_counts(name):
    assert n_params(build_meta(name)) == OFFICIAL_PARAMS[name]


@pytest.mark.parametrize("name", sorted(KEY_FILES))
def test_official_key_lists_match_counts_and_converter(name):
    shapes = official_shapes(name)
    assert sum(math.prod(s) for s in shapes.values()) == OFFICIAL_PARAMS[name]
    model = build_meta(name)
    convert = convert_official_poolformer if name.startswith("pool") else convert_official_nat
    fake = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    converted = convert(fake)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# the backbone


def tiny(mixer="pooling", **kw):
    """A small MetaFormer: one block per stage, dims 16/32/32/32, every mixer at K = 3."""
    kw.setdefault("mixer_kwargs", {"kernel_size": 3, **({"heads": 4} if "attention" in mixer else {})})
    return create_model("poolformer_s12", num_classes=10, depths=(1, 1, 1, 1), dims=(16, 32, 32, 32), mixer=mixer, **kw)


def test_stage_outputs_feature_info_and_odd_sizes():
    model = create_model("nat_mini", num_classes=7, depths=(1, 1, 1, 1)).eval()
    assert [f["reduction"] for f in model.feature_info] == [4, 8, 16, 32]
    assert [f["channels"] for f in model.feature_info] == [64, 128, 256, 512]
    x = torch.randn(2, 3, 61, 45)
    with torch.no_grad():
        outs = model.forward_stages(x)
        assert [tuple(o.shape) for o in outs] == [(2, 64, 16, 12), (2, 128, 8, 6), (2, 256, 4, 3), (2, 512, 2, 2)]
        assert torch.equal(model.forward_stages(x, [-1])[0], outs[3])
        assert torch.equal(model.forward_features(x), outs[3])
        assert model(x).shape == (2, 7)
        assert model.forward_head(outs[3], pre_logits=True).shape == (2, 512)
    with pytest.raises(ValueError, match="indices"):
        model.forward_stages(x, [4])


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAMS))
def test_every_preset_forward_backward_at_odd_size(name):
    """One block per stage (the full depths are checked by the parameter counts, the DiNAT
    dilations by the converter tests): finite outputs and a gradient for every parameter."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, depths=(1, 1, 1, 1)).train()
    y = model(torch.randn(2, 3, 65, 57))
    assert y.shape == (2, 10) and torch.isfinite(y).all()
    y.square().sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, pname


def test_any_mixer_in_any_family():
    x = torch.randn(1, 3, 64, 64)
    pf = create_model("poolformer_s12", mixer="involution", num_classes=5).eval()
    assert type(pf.stages[2][0].mixer.generator).__name__ == "BottleneckKernel"
    assert pf.stages[2][0].mixer.window.kernel_size == (3, 3)           # the stage keeps its K
    nat = create_model("nat_mini", mixer=("dwconv", "involution", "neighborhood_attention", "neighborhood_attention"),
                       num_classes=5).eval()
    assert nat.stages[0][0].mixer.window.kernel_size == (7, 7) and nat.stages[3][0].mixer.fused_qkv
    dinat = create_model("dinat_mini", mixer=("pooling", "dwconv", "neighborhood_attention", "conv"))
    assert dinat.stages[2][1].mixer.window.dilation == (2, 2)          # unchanged stage keeps its dilations
    assert dinat.stages[1][1].mixer.window.dilation == (1, 1)          # changed stage drops them
    with torch.no_grad():
        for m in (pf, nat, dinat.eval()):
            assert m(x).shape[0] == 1


def test_overrides_and_config_errors():
    with pytest.raises(ValueError, match=r"unknown override\(s\) \['widths'\].*dims"):
        create_model("nat_mini", widths=(1, 2, 3, 4))
    with pytest.raises(ValueError, match="stage 0 block 0: create_mixer\\('nope'"):
        create_model("poolformer_s12", mixer="nope")
    with pytest.raises(ValueError, match="stage 1 block 0.*heads=3"):
        create_model("nat_mini", mixer_kwargs=({}, {"heads": 3}, {}, {}))
    with pytest.raises(ValueError, match="stride 1"):
        MetaStageConfig(1, 16, "dwconv", {"stride": 2})
    with pytest.raises(ValueError, match="block_mixer_kwargs"):
        MetaStageConfig(2, 16, "dwconv", {}, ({"dilation": 2},))
    with pytest.raises(ValueError, match="norm='batch' is not known"):
        MetaFormerConfig("x", (MetaStageConfig(1, 16),), norm="batch")
    with pytest.raises(ValueError, match="drop_path_rate"):
        create_model("nat_mini", drop_path_rate=1.5)


def test_drop_path_layer_scale_and_safetensors_round_trip(tmp_path):
    model = create_model("nat_small", depths=(1, 1, 2, 1), num_classes=3, drop_path_rate=0.5)
    assert model.stages[0][0].ls1.scale.detach().eq(1e-5).all()
    x = torch.randn(4, 3, 32, 32)
    model.train()
    assert not torch.equal(model(x), model(x))                          # stochastic depth in training
    model.eval()
    with torch.no_grad():
        y = model(x)
    path = tmp_path / "nat.safetensors"
    save_weights(model, path)
    cfg = config_from_weights(path)
    assert cfg == model.config and isinstance(cfg, MetaFormerConfig)
    clone = load_weights(create_model(cfg), path).eval()
    with torch.no_grad():
        assert torch.equal(clone(x), y)


def test_pooling_mixer_equals_poolformer_pooling():
    for K, size in ((3, (7, 9)), (5, (6, 5)), (3, (1, 4))):
        m = create_mixer("pooling", 8, kernel_size=K, dtype=torch.float64)
        x = torch.randn(2, 8, *size, dtype=torch.float64)
        ref = nn.AvgPool2d(K, 1, K // 2, count_include_pad=False)(x) - x
        torch.testing.assert_close(m(x), ref, atol=1e-12, rtol=1e-12)
    assert list(create_mixer("pooling", 8, kernel_size=3).parameters()) == []


@pytest.mark.parametrize("name", list_mixers())
def test_every_mixer_in_a_metaformer_backward_compile_and_strict_flops(name):
    """Each preset at stride 1 in all four stages: forward and backward reach every parameter,
    torch.compile(fullgraph=True) (aot_eager: dynamo + AOT autograd) equals eager, and
    count_flops(strict=True) has a handle for every traced op."""
    torch.manual_seed(0)
    model = tiny(name).train()
    x = torch.randn(2, 3, 96, 96)
    y = model(x)
    assert y.shape == (2, 10)
    y.square().sum().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    model.eval()
    torch._dynamo.reset()  # the same block code is compiled once per preset: stay under the recompile limit
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    xc = x.clone().requires_grad_()
    xe = x.clone().requires_grad_()
    yc, ye = compiled(xc), model(xe)
    torch.testing.assert_close(yc, ye, atol=1e-5, rtol=1e-5)
    yc.sum().backward()
    ye.sum().backward()
    torch.testing.assert_close(xc.grad, xe.grad, atol=1e-5, rtol=1e-4)
    r = count_flops(model, x[:1], strict=True)
    assert r.unsupported == {} and r.total > 0
    if name not in ("conv",):
        assert r.by_operator.get("aggregate", 0) > 0, r.by_operator


# ---------------------------------------------------------------------------------------------
# official checkpoints: functional re-implementations of the official forwards


def synthetic_official(shapes, seed=0):
    """float64 tensors with exactly the official names and shapes, scaled so that every part
    matters: norms and layer scales around 1 (not the 1e-5 init), relative position biases of
    order 1 (so that a wrongly indexed table shows), weights ~ N(0, 1/fan_in)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in shapes.items():
        leaf = key.rsplit(".", 1)[-1]
        if leaf == "rpb":
            sd[key] = torch.randn(shape, generator=g, dtype=torch.float64)
        elif leaf == "bias":
            sd[key] = 0.1 * torch.randn(shape, generator=g, dtype=torch.float64)
        elif len(shape) == 1:                       # norm weights, layer scales (gamma, layer_scale_*)
            sd[key] = torch.rand(shape, generator=g, dtype=torch.float64) + 0.5
        else:
            sd[key] = torch.randn(shape, generator=g, dtype=torch.float64) / math.sqrt(math.prod(shape[1:]))
    return sd


def official_poolformer_forward(sd, x):
    """sail-sg/poolformer PoolFormer.forward (eval), from the official state dict."""
    def gn(t, p):
        return F.group_norm(t, 1, sd[p + ".weight"], sd[p + ".bias"], 1e-5)

    x = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=4, padding=2)
    for n in range(7):
        if n % 2:
            x = F.conv2d(x, sd[f"network.{n}.proj.weight"], sd[f"network.{n}.proj.bias"], stride=2, padding=1)
            continue
        j = 0
        while f"network.{n}.{j}.norm1.weight" in sd:
            p = f"network.{n}.{j}"
            y = gn(x, p + ".norm1")
            x = x + sd[p + ".layer_scale_1"].view(1, -1, 1, 1) * (F.avg_pool2d(y, 3, 1, 1, count_include_pad=False) - y)
            y = F.gelu(F.conv2d(gn(x, p + ".norm2"), sd[p + ".mlp.fc1.weight"], sd[p + ".mlp.fc1.bias"]))
            y = F.conv2d(y, sd[p + ".mlp.fc2.weight"], sd[p + ".mlp.fc2.bias"])
            x = x + sd[p + ".layer_scale_2"].view(1, -1, 1, 1) * y
            j += 1
    x = gn(x, "norm").mean((-2, -1))
    return F.linear(x, sd["head.weight"], sd["head.bias"])


def legacy_neighborhood(length, K, d):
    """NATTEN < 0.20 (CPU/CUDA kernels' get_window_start / get_pb_start), for every query i of
    an axis: the keys it attends to, (length, K), and their rows of the bias table, (length, K)."""
    r = K // 2
    keys, rows = [], []
    for i in range(length):
        if d == 1:
            start = max(i - r, 0) + (length - i - r - 1 if i + r >= length else 0)
            pb = r + (r - i if i < r else 0) + (length - i - 1 - r if i + r >= length else 0)
        elif i - r * d < 0:
            start, pb = i % d, K - 1 - i // d
        elif i + r * d >= length:
            a = (length // d) * d
            b = length - a
            start = length - b + i % d - 2 * r * d if i % d < b else a + i % d - K * d
            pb = (length - i - 1) // d
        else:
            start, pb = i - r * d, r
        keys.append([start + u * d for u in range(K)])
        rows.append([pb + u for u in range(K)])
    return torch.tensor(keys), torch.tensor(rows)


def official_na2d(sd, p, x, K, d):
    """NATTEN < 0.20 NeighborhoodAttention2D.forward on channels-last x: (B, H, W, C)."""
    B, H0, W0, C = x.shape
    x = F.pad(x, (0, 0, 0, max(0, K * d - W0), 0, max(0, K * d - H0)))
    _, H, W, _ = x.shape
    heads = sd[p + ".rpb"].shape[0]
    hd = C // heads
    qkv = F.linear(x, sd[p + ".qkv.weight"], sd[p + ".qkv.bias"]).reshape(B, H, W, 3, heads, hd).permute(3, 0, 4, 1, 2, 5)
    q, k, v = qkv[0] * hd ** -0.5, qkv[1], qkv[2]                        # (B, heads, H, W, hd)
    (ki, kb), (kj, lb) = legacy_neighborhood(H, K, d), legacy_neighborhood(W, K, d)
    flat = ki[:, None, :, None] * W + kj[None, :, None, :]               # (H, W, K, K) key pixels
    kk = k.flatten(2, 3)[:, :, flat]                                      # (B, heads, H, W, K, K, hd)
    vv = v.flatten(2, 3)[:, :, flat]
    attn = torch.einsum("bhxyc,bhxyuvc->bhxyuv", q, kk)
    attn = attn + sd[p + ".rpb"][:, kb[:, None, :, None], lb[None, :, None, :]]  # (heads, H, W, K, K)
    attn = attn.reshape(B, heads, H, W, K * K).softmax(-1).reshape(B, heads, H, W, K, K)
    out = torch.einsum("bhxyuv,bhxyuvc->bxyhc", attn, vv).reshape(B, H, W, C)[:, :H0, :W0]
    return F.linear(out, sd[p + ".proj.weight"], sd[p + ".proj.bias"])


def official_nat_forward(sd, x, dilations=None, K=7):
    """SHI-Labs NAT / DiNAT forward (eval), channels-last as the official code."""
    def ln(t, p):
        return F.layer_norm(t, t.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], 1e-5)

    x = F.conv2d(x, sd["patch_embed.proj.0.weight"], sd["patch_embed.proj.0.bias"], stride=2, padding=1)
    x = F.conv2d(x, sd["patch_embed.proj.1.weight"], sd["patch_embed.proj.1.bias"], stride=2, padding=1)
    x = ln(x.permute(0, 2, 3, 1), "patch_embed.norm")
    for L in range(4):
        j = 0
        while f"levels.{L}.blocks.{j}.norm1.weight" in sd:
            p = f"levels.{L}.blocks.{j}"
            g1, g2 = sd.get(p + ".gamma1", 1.0), sd.get(p + ".gamma2", 1.0)
            x = x + g1 * official_na2d(sd, p + ".attn", ln(x, p + ".norm1"), K, dilations[L][j] if dilations else 1)
            y = F.gelu(F.linear(ln(x, p + ".norm2"), sd[p + ".mlp.fc1.weight"], sd[p + ".mlp.fc1.bias"]))
            x = x + g2 * F.linear(y, sd[p + ".mlp.fc2.weight"], sd[p + ".mlp.fc2.bias"])
            j += 1
        if f"levels.{L}.downsample.reduction.weight" in sd:
            x = F.conv2d(x.permute(0, 3, 1, 2), sd[f"levels.{L}.downsample.reduction.weight"], stride=2, padding=1)
            x = ln(x.permute(0, 2, 3, 1), f"levels.{L}.downsample.norm")
    x = ln(x, "norm").mean((1, 2))
    return F.linear(x, sd["head.weight"], sd["head.bias"])


DILATIONS = {"nat_mini": None, "dinat_mini": DINAT_MINI_DILATIONS, "poolformer_s12": None}


@pytest.fixture(scope="module")
def official():
    """Per model name (built on first use): a synthetic float64 official checkpoint, the model
    converted from its float32 copy, and the official forward's output per input size."""
    cache = {}

    def get(name, size=None):
        if name not in cache:
            sd = synthetic_official(official_shapes(name), seed=len(cache))
            sd32 = {k: v.float() for k, v in sd.items()}
            model = (load_official_poolformer({"state_dict": sd32}, "s12") if name.startswith("pool")
                     else load_official_nat(sd32, name))
            cache[name] = {"sd": sd, "model": model, "refs": {}}
        entry = cache[name]
        if size is not None and size not in entry["refs"]:
            x = torch.randn(1, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(size))
            with torch.no_grad():
                ref = (official_poolformer_forward(entry["sd"], x) if name.startswith("pool")
                       else official_nat_forward(entry["sd"], x, DILATIONS[name]))
            entry["refs"][size] = (x, ref)
        return entry

    return get


def assert_matches_official(model, x, ref):
    """The converted model (float32) equals the official forward (float64) to 1e-5 of its scale."""
    with torch.no_grad():
        got = model(x.float()).double()
    assert ref.abs().max() > 1e-2                                         # not a comparison of zeros
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("name,size", [("poolformer_s12", 224), ("poolformer_s12", 97), ("nat_mini", 224),
                                       ("nat_mini", 97), ("dinat_mini", 224), ("dinat_mini", 97), ("dinat_mini", 231)])
def test_converter_matches_official_forward(official, name, size):
    """224: NAT windows clamped at every border; 97: DiNAT's dilated windows are larger than
    the maps of stages 1-3 (padded as NATTEN < 0.20 did); 231: dilation groups of unequal
    length (58 = 7 * 8 + 2 pixels at stage 1)."""
    entry = official(name, size)
    assert not entry["model"].training
    assert_matches_official(entry["model"], *entry["refs"][size])


@pytest.mark.parametrize("name", ["nat_mini", "dinat_mini"])
def test_converter_check_can_fail(official, name):
    """Two entries of one head's relative position table swapped: the comparison fails."""
    entry = official(name, 97)
    model = copy.deepcopy(entry["model"])
    with torch.no_grad():
        rel = model.stages[0][0].mixer.generator.rel_pos
        rel[0, 0, 0], rel[0, 12, 12] = rel[0, 12, 12].clone(), rel[0, 0, 0].clone()
    with pytest.raises(AssertionError):
        assert_matches_official(model, *entry["refs"][97])


def test_nat_small_layer_scale_converts(tmp_path):
    sd = synthetic_official(official_shapes("nat_small"), seed=1)
    path = tmp_path / "nat_small.pth"
    torch.save({k: v.float() for k, v in sd.items()}, path)
    model = load_official_nat(path, "nat_small")
    state = model.state_dict()
    for ours, theirs in [("stages.2.17.ls2.scale", "levels.2.blocks.17.gamma2"),
                         ("stages.1.3.mixer.generator.rel_pos", "levels.1.blocks.3.attn.rpb"),
                         ("stages.3.4.mixer.proj.weight", "levels.3.blocks.4.attn.proj.weight"),
                         ("downsamples.2.norm.bias", "levels.2.downsample.norm.bias"),
                         ("stem.conv2.weight", "patch_embed.proj.1.weight")]:
        assert torch.equal(state[ours], sd[theirs].float()), ours
    x = torch.randn(1, 3, 65, 65, dtype=torch.float64)
    with torch.no_grad():
        assert_matches_official(model, x, official_nat_forward(sd, x))


def test_bad_official_checkpoints_list_the_keys():
    sd = {k: v.float() for k, v in synthetic_official(official_shapes("nat_mini")).items()}
    bad = dict(sd)
    del bad["levels.1.blocks.2.attn.rpb"]
    bad["levels.4.blocks.0.norm1.weight"] = torch.zeros(1)
    with pytest.raises(ValueError) as e:
        load_official_nat(bad, "nat_mini")
    assert "missing keys (1): ['levels.1.blocks.2.attn.rpb']" in str(e.value)
    assert "unexpected keys (1): ['levels.4.blocks.0.norm1.weight']" in str(e.value)
    bad = {**sd, "levels.0.blocks.0.attn.rpb": torch.zeros(2, 9, 9)}
    with pytest.raises(ValueError, match=r"shape mismatches \(1\).*levels\.0\.blocks\.0\.attn\.rpb"):
        load_official_nat(bad, "nat_mini")
    with pytest.raises(ValueError, match="missing keys"):
        load_official_nat(sd, "nat_tiny")
    with pytest.raises(ValueError, match="variant='nat_huge'"):
        load_official_nat(sd, "nat_huge")
    with pytest.raises(ValueError, match="variant='s10'"):
        load_official_poolformer(sd, "s10")
    with pytest.raises(ValueError, match="no conversion rule.*neck.weight"):
        convert_official_poolformer({"neck.weight": torch.zeros(1)})


# ---------------------------------------------------------------------------------------------
# tokenmix compare --backbone metaformer


def test_compare_in_a_tiny_metaformer(tmp_path):
    from tokenmix.cli import main
    from tokenmix.compare import build_backbone

    out = tmp_path / "cmp"
    rc = main(["compare", "--mixers", "pooling,involution", "--backbone", "metaformer", "--epochs", "1",
               "--width", "16", "--out", str(out), "--no-progress"])
    assert rc == 0
    payload = json.loads((out / "compare.json").read_text())
    assert payload["config"]["backbone"] == "metaformer"
    for r in payload["results"]:
        model = build_backbone("metaformer", r["mixer"], 10, 1, 16, 1, 3)
        assert isinstance(model, MetaFormer) and r["params"] == n_params(model)
        assert [f["reduction"] for f in model.feature_info] == [1, 2]
    assert payload["plots"]["kernels"] == {"involution": {"file": "kernels_involution.png", "reduce": "sum"}}
    with pytest.raises(ValueError, match="backbone='big'"):
        build_backbone("big", "conv", 10, 1, 16, 1, 3)


def test_docs_examples_run():
    """The python blocks of docs/models.md (except the one reading checkpoint files)."""
    text = open(os.path.join(os.path.dirname(__file__), "..", "docs", "models.md")).read()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if ".pth" not in b]
    assert blocks
    for i, code in enumerate(blocks):
        exec(compile(code, f"docs/models.md[block {i}]", "exec"), {"__name__": "docs_models"})

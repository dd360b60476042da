"""tokenmix.models: exact parameter counts, forward/backward of every registered model, config
overrides, safetensors round trip, and the official RedNet converter against an independent
functional forward written here from the official (mmcls) state_dict."""

from __future__ import annotations

import math
import os
import re

import pytest
import torch
import torch.nn.functional as F

from tokenmix.models import (ModelConfig, StageConfig, StemConfig, config_from_weights, convert_official_rednet,
                             create_model, get_config, list_models, load_official_rednet, load_weights,
                             official_rednet_keys, register_model, save_weights)

# names and shapes of the official mmcls RedNet-50 checkpoint (copy of shared/reference/)
KEYS_FILE = os.path.join(os.path.dirname(__file__), "data", "official_rednet50_keys.txt")

PARAMS = {
    "resnet26": 13_696_552, "resnet38": 19_626_792, "resnet50": 25_557_032,
    "resnet101": 44_549_160, "resnet152": 60_192_808,
    "rednet26": 9_233_166, "rednet38": 12_386_986, "rednet50": 15_540_806,
    "rednet101": 25_652_950, "rednet152": 33_984_582,
}
SASA_PUBLISHED = {"sasa_resnet26": 10.3e6, "sasa_resnet38": 14.1e6, "sasa_resnet50": 18.0e6}


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def build_meta(name, **kw):
    """Construct on the meta device: parameter counts without allocating or initialising."""
    with torch.device("meta"):
        return create_model(name, **kw)


# ---------------------------------------------------------------------------------------------
# registry and parameter counts

def test_registered_names():
    expected = {f"{f}{d}" for f in ("resnet", "rednet") for d in (26, 38, 50, 101, 152)}
    expected |= {f"sasa_resnet{d}" for d in (26, 38, 50)}
    assert expected <= set(list_models())


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_exact_param_counts(name):
    assert n_params(build_meta(name)) == PARAMS[name]


@pytest.mark.parametrize("name", sorted(SASA_PUBLISHED))
def test_sasa_param_counts_within_5_percent(name):
    n = n_params(build_meta(name))
    assert abs(n - SASA_PUBLISHED[name]) <= 0.05 * SASA_PUBLISHED[name], n


def test_num_classes_changes_only_the_head():
    assert n_params(build_meta("resnet50", num_classes=10)) == PARAMS["resnet50"] - 2049 * 990
    assert n_params(build_meta("resnet50", num_classes=0)) == PARAMS["resnet50"] - 2049 * 1000


# ---------------------------------------------------------------------------------------------
# every registered bottleneck model: forward/backward at small and odd sizes, stage outputs
# (the MetaFormer family: tests/test_metaformer.py)

@pytest.mark.parametrize("name", [n for n in list_models() if isinstance(get_config(n), ModelConfig)])
def test_forward_backward(name):
    torch.manual_seed(0)
    # zero_init_last_bn=False so that every parameter must receive a non-zero gradient
    model = create_model(name, num_classes=10, zero_init_last_bn=False).train()
    for hw in [(64, 64), (65, 57)]:
        model.zero_grad(set_to_none=True)
        x = torch.randn(2, 3, *hw)
        y = model(x)
        assert y.shape == (2, 10)
        assert torch.isfinite(y).all()
        y.square().sum().backward()
        for pname, p in model.named_parameters():
            assert p.grad is not None, pname
            assert torch.isfinite(p.grad).all(), pname
            assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", ["resnet26", "rednet26"])
def test_stage_outputs_strides_and_features(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7).eval()
    x = torch.randn(2, 3, 67, 45)
    with torch.no_grad():
        stages = model.forward_stages(x)
        assert [tuple(s.shape) for s in stages] == [
            (2, c, math.ceil(67 / r), math.ceil(45 / r)) for c, r in zip((256, 512, 1024, 2048), (4, 8, 16, 32))]
        assert [f["reduction"] for f in model.feature_info] == [4, 8, 16, 32]
        assert [f["channels"] for f in model.feature_info] == [256, 512, 1024, 2048]
        feats = model.forward_features(x)
        torch.testing.assert_close(feats, stages[-1], rtol=0, atol=0)
        picked = model.forward_stages(x, indices=[1, -1])
        torch.testing.assert_close(picked[0], stages[1], rtol=0, atol=0)
        torch.testing.assert_close(picked[1], stages[3], rtol=0, atol=0)
        torch.testing.assert_close(model(x), model.forward_head(feats), rtol=0, atol=0)
        assert model.forward_head(feats, pre_logits=True).shape == (2, 2048)
    with pytest.raises(ValueError, match="indices"):
        model.forward_stages(x, indices=[4])


def test_zero_init_last_bn():
    model = create_model("rednet26", num_classes=10)
    for i, stage in enumerate(model.stages):
        for j, block in enumerate(stage):
            assert torch.count_nonzero(block.bn3.weight) == 0, (i, j)
            assert torch.all(block.bn1.weight == 1)
    model = create_model("rednet26", num_classes=10, zero_init_last_bn=False)
    assert all(torch.all(b.bn3.weight == 1) for s in model.stages for b in s)


# ---------------------------------------------------------------------------------------------
# overrides

def _blocks(model):
    return [b for stage in model.stages for b in stage]


def test_mixer_kwargs_reach_every_stage_involution():
    model = build_meta("rednet50", mixer_kwargs={"kernel_size": 5, "group_channels": 4, "reduction": 16})
    blocks = _blocks(model)
    assert len(blocks) == 16
    for block in blocks:
        width = block.conv1.out_channels
        gen = block.mixer.generator
        assert block.mixer.window.kernel_size == (5, 5)
        assert gen.groups == width // 4
        assert gen.reduce.out_channels == width // 16
        assert gen.span.out_channels == (width // 4) * 25
    strides = [b.mixer.window.stride for b in blocks]
    assert strides == [(2, 2) if i in (3, 7, 13) else (1, 1) for i in range(16)]
    # the stem involution is not an ablation target: unchanged, K=3, 16 channels per group
    stem = model.stem.mixer
    assert stem.window.kernel_size == (3, 3) and stem.generator.groups == 2
    assert stem.generator.reduce.out_channels == 8
    model = build_meta("rednet26", stem_mixer_kwargs={"kernel_size": 5})
    assert model.stem.mixer.window.kernel_size == (5, 5)


def test_mixer_override_on_resnet():
    model = build_meta("resnet50", mixer="involution")
    for block in _blocks(model):
        assert block.mixer.window.kernel_size == (3, 3)           # ResNet's kernel size is kept
        assert block.mixer.generator.groups == block.conv1.out_channels // 16
    assert model.config.stem.type == "conv7"
    model = build_meta("resnet26", mixer=("conv", "conv", "involution", "involution"),
                       mixer_kwargs=({}, {}, {"kernel_size": 7}, {"kernel_size": 7}))
    kinds = [type(b.mixer).__name__ for b in _blocks(model)]
    assert kinds == ["Conv2d"] * 3 + ["Mixer"] * 5
    assert all(b.mixer.window.kernel_size == (7, 7) for b in _blocks(model)[3:])
    cfg = get_config("resnet50", depths=(1, 1, 1, 1), widths=(8, 16, 32, 64), num_classes=3)
    assert [s.depth for s in cfg.stages] == [1, 1, 1, 1] and cfg.out_channels == (32, 64, 128, 256)


def test_create_model_from_config_and_registry_errors():
    cfg = ModelConfig(name="tiny", stem=StemConfig("rednet", 16, "involution", {"kernel_size": 3, "group_channels": 4}),
                      stages=(StageConfig(1, 8, 1, "involution", {"kernel_size": 3, "group_channels": 4}),
                              StageConfig(1, 16, 2, "dwconv", {"kernel_size": 5})), num_classes=4)
    model = create_model(cfg)
    assert model(torch.randn(2, 3, 19, 23)).shape == (2, 4)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="resnet50"):
        create_model("resnet51")
    with pytest.raises(ValueError, match="num_classes"):
        create_model("resnet26", num_class=10)
    with pytest.raises(ValueError, match="involution"):          # the mixers registry lists names
        build_meta("resnet26", mixer="no_such_mixer")
    with pytest.raises(ValueError, match="stage 0 block 0"):
        build_meta("resnet26", mixer_kwargs={"no_such_kwarg": 1})
    with pytest.raises(ValueError, match="depths"):
        get_config("resnet26", depths=(1, 2))
    with pytest.raises(ValueError, match="stem_mixer_kwargs"):
        get_config("resnet26", stem_mixer_kwargs={"kernel_size": 5})
    with pytest.raises(ValueError, match="already registered"):
        register_model("resnet50", get_config("resnet50"))
    with pytest.raises(ValueError, match="stride"):
        StageConfig(1, 8, 1, "conv", {"stride": 2})
    with pytest.raises(ValueError, match="stem type"):
        StemConfig("conv5")


# ---------------------------------------------------------------------------------------------
# safetensors

def test_safetensors_round_trip(tmp_path):
    torch.manual_seed(0)
    model = create_model("rednet26", num_classes=10, zero_init_last_bn=False)
    with torch.no_grad():
        model.train()(torch.randn(2, 3, 40, 40))        # non-trivial BN running statistics
    model.eval()
    path = tmp_path / "rednet26.safetensors"
    save_weights(model, path)
    torch.manual_seed(1)
    other = create_model("rednet26", num_classes=10, zero_init_last_bn=False).eval()
    x = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        assert not torch.equal(other(x), model(x))
        load_weights(other, path)
        assert torch.equal(other(x), model(x))
    for (k, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), k
    assert config_from_weights(path) == model.config
    with pytest.raises(ValueError, match=r"missing keys .*stem\.conv\.weight"):
        load_weights(create_model("resnet26", num_classes=10), path)
    with pytest.raises(ValueError, match=r"shape mismatches .*fc\.weight"):
        load_weights(create_model("rednet26", num_classes=5), path)


# ---------------------------------------------------------------------------------------------
# official RedNet converter

def official_shapes():
    shapes = {}
    with open(KEYS_FILE) as f:
        for line in f:
            line = line.strip()
            if line:
                key, shape = line.split(" ", 1)
                shapes[key] = tuple(int(v) for v in re.findall(r"\d+", shape))
    return shapes


def synthetic_official(shapes, seed=0, dtype=torch.float32, calibrate_on=None):
    """Random tensors with exactly the official names and shapes. With ``calibrate_on`` (an
    input batch) the BN running statistics are set to that batch's (see official_forward)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            sd[key] = torch.tensor(1000, dtype=torch.long)
        elif key.endswith("running_var"):
            sd[key] = torch.rand(shape, generator=g, dtype=dtype) + 0.5
        elif key.endswith("running_mean") or key.endswith("bias"):
            sd[key] = 0.1 * torch.randn(shape, generator=g, dtype=dtype)
        elif len(shape) == 1:                               # BN weight
            sd[key] = torch.rand(shape, generator=g, dtype=dtype) + 0.5
        else:
            fan_in = math.prod(shape[1:])
            sd[key] = torch.randn(shape, generator=g, dtype=dtype) * math.sqrt(1.0 / fan_in)
    if calibrate_on is not None:
        with torch.no_grad():
            official_forward(sd, calibrate_on.to(dtype), calibrate=True)
    return sd


def official_forward(sd, x, calibrate=False):
    """Official RedNet forward (mmcls code, eval mode) written with torch.nn.functional from
    the official state_dict: the naive involution with avg-pool, unfold, and sum over taps.

    ``calibrate=True`` instead normalises with the batch statistics and writes them into the
    running buffers of ``sd`` (momentum 1), so that random weights behave like trained ones
    (an involution is quadratic in its input: without normalised activations 16 blocks of
    random weights overflow)."""
    def bn(t, p):
        return F.batch_norm(t, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"],
                            sd[p + ".bias"], calibrate, 1.0, 1e-5)

    def involution(t, p, K, stride, group_channels=16):
        B, C, H, W = t.shape
        G = C // group_channels
        k = F.avg_pool2d(t, stride, stride) if stride > 1 else t
        k = F.relu(bn(F.conv2d(k, sd[p + ".conv1.conv.weight"]), p + ".conv1.bn"))
        k = F.conv2d(k, sd[p + ".conv2.conv.weight"], sd[p + ".conv2.conv.bias"])
        b, _, h, w = k.shape
        k = k.view(b, G, K * K, h, w).unsqueeze(2)
        u = F.unfold(t, K, 1, (K - 1) // 2, stride).view(b, G, group_channels, K * K, h, w)
        return (k * u).sum(dim=3).view(b, C, h, w)

    x = F.relu(bn(F.conv2d(x, sd["backbone.stem.0.conv.weight"], stride=2, padding=1), "backbone.stem.0.bn"))
    x = F.relu(bn(involution(x, "backbone.stem.1", 3, 1), "backbone.stem.2"))
    x = F.relu(bn(F.conv2d(x, sd["backbone.stem.4.conv.weight"], padding=1), "backbone.stem.4.bn"))
    x = F.max_pool2d(x, 3, 2, 1)
    for layer in range(1, 5):
        j = 0
        while f"backbone.layer{layer}.{j}.conv1.weight" in sd:
            p = f"backbone.layer{layer}.{j}"
            stride = 2 if (j == 0 and layer > 1) else 1
            out = F.relu(bn(F.conv2d(x, sd[p + ".conv1.weight"]), p + ".bn1"))
            out = F.relu(bn(involution(out, p + ".conv2", 7, stride), p + ".bn2"))
            out = bn(F.conv2d(out, sd[p + ".conv3.weight"]), p + ".bn3")
            if p + ".downsample.0.weight" in sd:
                x = bn(F.conv2d(x, sd[p + ".downsample.0.weight"], stride=stride), p + ".downsample.1")
            x = F.relu(out + x)
            j += 1
    x = x.mean(dim=(2, 3))
    return F.linear(x, sd["head.fc.weight"], sd["head.fc.bias"])


def test_official_key_list_is_what_rednet50_expects():
    assert official_rednet_keys(build_meta("rednet50")) == official_shapes()


def _cast(sd, dtype):
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}


def test_converter_matches_official_functional_forward():
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    sd32 = _cast(synthetic_official(official_shapes(), dtype=torch.float64, calibrate_on=x), torch.float32)
    model = load_official_rednet({"state_dict": sd32, "meta": {"epoch": 100}}, depth=50)
    assert not model.training
    assert set(convert_official_rednet(sd32)) == set(model.state_dict())
    model = model.double()                               # float32 -> float64 is exact
    sd = _cast(sd32, torch.float64)
    with torch.no_grad():
        got = model(x)
        ref = official_forward(sd, x)
    assert ref.abs().max() > 1e-3                        # the comparison is not between zeros
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9 * ref.abs().max().item())
    with torch.no_grad():                                # and it can fail: one tap swapped
        w = model.stages[2][1].mixer.generator.span.weight
        w[[0, 1]] = w[[1, 0]].clone()
        assert not torch.allclose(model(x), ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item())


def test_load_official_from_path(tmp_path):
    sd = synthetic_official(official_shapes(), seed=1)
    path = tmp_path / "rednet50_official.pth"
    torch.save({"meta": {"mmcls_version": "0.12.0"}, "state_dict": sd}, path)
    model = load_official_rednet(path, depth=50)
    state = model.state_dict()
    for ours, theirs in [("stages.2.5.mixer.generator.span.weight", "backbone.layer3.5.conv2.conv2.conv.weight"),
                         ("stem.mixer.generator.norm.running_var", "backbone.stem.1.conv1.bn.running_var"),
                         ("stem.bn2.weight", "backbone.stem.2.weight"),
                         ("stages.3.0.downsample.0.weight", "backbone.layer4.0.downsample.0.weight"),
                         ("fc.bias", "head.fc.bias")]:
        assert torch.equal(state[ours], sd[theirs]), ours
    converted = convert_official_rednet(sd)
    assert all(torch.equal(state[k], v) for k, v in converted.items())
    # a backbone-only checkpoint (as detection configs save it) loads with num_classes=0
    backbone = load_official_rednet({k: v for k, v in sd.items() if k.startswith("backbone.")}, 50, num_classes=0)
    assert backbone(torch.randn(1, 3, 32, 32)).shape == (1, 2048)


def _subset_depth(shapes, blocks):
    """Official keys of another depth by the same rules: keep/replicate the depth-50 blocks."""
    out = {}
    for key, shape in shapes.items():
        m = re.match(r"backbone\.layer(\d)\.(\d+)\.(.*)", key)
        if not m:
            out[key] = shape
            continue
        layer, j, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        if j == 0:
            out[key] = shape
        elif j == 1:
            for jj in range(1, blocks[layer - 1]):
                out[f"backbone.layer{layer}.{jj}.{rest}"] = shape
    return out


def test_other_depths_follow_the_same_rules():
    shapes26 = _subset_depth(official_shapes(), (1, 2, 4, 1))
    model = load_official_rednet(synthetic_official(shapes26), depth=26)
    assert n_params(model) == PARAMS["rednet26"]
    shapes101 = _subset_depth(official_shapes(), (3, 4, 23, 3))
    assert official_rednet_keys(build_meta("rednet101")) == shapes101


def test_bad_official_checkpoints_list_the_keys():
    shapes = official_shapes()
    sd = synthetic_official(shapes)
    bad = dict(sd)
    del bad["backbone.layer2.3.conv2.conv1.bn.running_var"]
    bad["backbone.layer5.0.conv1.weight"] = torch.zeros(1)
    with pytest.raises(ValueError) as e:
        load_official_rednet(bad, depth=50)
    msg = str(e.value)
    assert "missing keys (1): ['backbone.layer2.3.conv2.conv1.bn.running_var']" in msg
    assert "unexpected keys (1): ['backbone.layer5.0.conv1.weight']" in msg
    bad = dict(sd)
    bad["backbone.stem.1.conv2.conv.weight"] = torch.zeros(9, 8, 1, 1)   # G=1 instead of 2
    with pytest.raises(ValueError, match=r"shape mismatches \(1\).*stem\.1\.conv2\.conv\.weight"):
        load_official_rednet(bad, depth=50)
    with pytest.raises(ValueError, match="missing keys"):
        load_official_rednet(sd, depth=101)
    with pytest.raises(ValueError, match="depth"):
        load_official_rednet(sd, depth=34)
    with pytest.raises(ValueError, match="backbone.neck.weight"):
        convert_official_rednet({**sd, "backbone.neck.weight": torch.zeros(1)})


# ---------------------------------------------------------------------------------------------
# README

def test_readme_models_section_runs():
    text = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    start = text.index("## Models")
    nxt = re.search(r"^## |^<!-- ", text[start + 3:], re.M)
    section = text[start: start + 3 + nxt.start()] if nxt else text[start:]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) >= 2
    scope = {"__name__": "readme_models"}
    for i, code in enumerate(blocks):                 # the blocks share one namespace, in order
        exec(compile(code, f"README.md[models block {i}]", "exec"), scope)


def test_checkpoint_mixer_same_outputs_gradients_and_bn_statistics():
    torch.manual_seed(0)
    plain = create_model("rednet26", num_classes=10, zero_init_last_bn=False).double().train()
    ckpt = create_model("rednet26", num_classes=10, zero_init_last_bn=False, checkpoint_mixer=True).double().train()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 37, 33, dtype=torch.float64)
    y0, y1 = plain(x), ckpt(x)
    torch.testing.assert_close(y1, y0, rtol=1e-12, atol=1e-12)
    y0.square().sum().backward()
    y1.square().sum().backward()
    for (name, p0), (_, p1) in zip(plain.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(p1.grad, p0.grad, rtol=1e-10, atol=1e-12, msg=name)
    for (name, b0), (_, b1) in zip(plain.named_buffers(), ckpt.named_buffers()):
        assert torch.equal(b0, b1), name                 # updated once, not again on recompute
    assert ckpt.stages[0][0].mixer.generator.norm.num_batches_tracked.item() == 1
    assert ckpt.stem.mixer.generator.norm.num_batches_tracked.item() == 1

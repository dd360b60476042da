"""Export: the decompositions of the tokenmix ops against the ops, ONNX (checked with
onnxruntime) and ``torch.export`` with dynamic height and width for the registered models.

The registered models differ in their block counts (and MetaFormers in their widths) within a
family; what export has to handle is the set of stems, stage mixers and their arguments.
``_family`` reduces a registered model to that, one model per family is exported (one block
per stage), and ``test_every_registered_model_has_an_exported_family`` checks that every
registered model's family is among them.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from torch.export import Dim

from tokenmix import export as tx
from tokenmix.kernel_gen.bottleneck import CeilAvgPool2d
from tokenmix.models import ModelConfig, SANConfig, create_model, get_config, list_models
from tokenmix.ops import Window, aggregate, aggregate_transpose, correlate

WINDOWS = [Window(3), Window(5, stride=2), Window(3, stride=2, dilation=2), Window((3, 5), stride=(2, 1), padding=(0, 1)),
           Window(3, border="clamp"), Window(3, border="clamp", dilation=2)]


@pytest.mark.parametrize("window", WINDOWS, ids=repr)
@pytest.mark.parametrize("broadcast", [False, True])
def test_decompositions_match_the_ops(window, broadcast):
    x = torch.randn(2, 8, 11, 10, dtype=torch.float64)
    Ho, Wo = window.output_size(11, 10)
    w = torch.randn(1, 2, window.taps, 1, 1, dtype=torch.float64) if broadcast else \
        torch.randn(2, 2, window.taps, Ho, Wo, dtype=torch.float64)
    q = torch.randn(2, 8, Ho, Wo, dtype=torch.float64)
    args = window.as_args()
    torch.testing.assert_close(tx._aggregate(x, w, *args), aggregate(x, w, window), rtol=0, atol=1e-12)
    torch.testing.assert_close(tx._aggregate_transpose(q, w, *args, (11, 10)),
                               aggregate_transpose(q, w, window, (11, 10)), rtol=0, atol=1e-12)
    for sums in ((False, False), (True, True), (True, False)):
        torch.testing.assert_close(tx._correlate(q, x, *args, 4, *sums),
                                   torch.ops.tokenmix.correlate(q, x, *args, 4, *sums, None), rtol=0, atol=1e-12)
    assert torch.equal(tx._correlate(q, x, *args, 4, False, False), tx._correlate(q, x, *args, 4, False, False))
    torch.testing.assert_close(tx._correlate(q, x, *args, 4, False, False), correlate(q, x, window, 4), rtol=0,
                               atol=1e-12)


@pytest.mark.parametrize("stride", [2, 3])
@pytest.mark.parametrize("size", [(7, 9), (8, 8), (1, 5)])
def test_ceil_avg_pool_is_bitwise_the_pooling_op(stride, size):
    x = torch.randn(2, 3, *size)
    want = torch.nn.AvgPool2d(stride, stride, ceil_mode=True)(x)
    for got in (CeilAvgPool2d(stride)(x), CeilAvgPool2d(stride).export_form(x)):
        assert got.shape == want.shape and torch.equal(got, want)


def _family(name: str):
    """A registered model's config without its block counts (and a MetaFormer's widths); the
    per-block mixer arguments (DiNAT's dilations) as a set."""
    cfg = get_config(name)
    if isinstance(cfg, ModelConfig):
        return dataclasses.replace(cfg, name="", stages=tuple(dataclasses.replace(s, depth=1) for s in cfg.stages))
    if isinstance(cfg, SANConfig):
        return dataclasses.replace(cfg, name="", layers=(1,) * 5)
    blocks = sorted({json.dumps(dict(k), sort_keys=True) for s in cfg.stages for k in s.block_mixer_kwargs})
    stages = tuple(dataclasses.replace(s, depth=1, dim=1, block_mixer_kwargs=()) for s in cfg.stages)
    return dataclasses.replace(cfg, name="", stages=stages), tuple(blocks)


def _families():
    seen, names = [], []
    for name in list_models():
        fam = _family(name)
        if fam is None or fam not in seen:
            seen.append(fam)
            names.append(name)
    return names


FAMILIES = _families()


def _small(name: str):
    """``name`` with one block per stage (bottleneck models: narrow stages too), and the
    smallest input side it takes: (model, side)."""
    torch.manual_seed(0)
    if isinstance(get_config(name), ModelConfig):
        return create_model(name, num_classes=10, depths=(1, 1, 1, 1), widths=(16, 16, 32, 32)).eval(), 33
    if isinstance(get_config(name), SANConfig):  # 3x3 windows: the reflect border needs 64 pixels
        return create_model(name, num_classes=10, layers=(1,) * 5, width=32, kernels=(3,) * 5).eval(), 64
    # MetaFormer: a clamp-border window (NAT) must fit in the stride-32 stage. With one block
    # per stage a DiNAT loses its per-block dilations: its first stage gets dilation 2 instead
    dilated = any("dilation" in k for s in get_config(name).stages for k in s.block_mixer_kwargs)
    extra = {"mixer_kwargs": ({"dilation": 2}, {}, {}, {})} if dilated else {}
    model = create_model(name, num_classes=10, depths=(1, 1, 1, 1), **extra).eval()
    return model, 224 if any(s.mixer == "neighborhood_attention" for s in model.config.stages) else 64


def test_every_registered_model_has_an_exported_family():
    exported = [_family(n) for n in FAMILIES]
    assert all(_family(n) in exported for n in list_models())
    assert {"rednet26", "resnet26", "sasa_resnet26"} <= set(FAMILIES)


@pytest.mark.parametrize("name", FAMILIES)
def test_onnx_export_matches_onnxruntime(name, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model, side = _small(name)
    x = torch.randn(2, 3, max(side, 64), max(side, 48))
    program = torch.onnx.export(model, (x,), dynamo=True, verbose=False)
    ops = {n.op_type for n in program.model_proto.graph.node}
    assert not any("tokenmix" in n.domain for n in program.model_proto.graph.node), ops
    path = tmp_path / f"{name}.onnx"
    program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


# global (AA-ResNet) and axial attention build a clamp window as large as the image per call
WINDOW_PER_SIZE = {"aa_resnet50", "axial_resnet_s"}


@pytest.mark.parametrize("name", FAMILIES)
def test_torch_export_with_dynamic_height_and_width(name):
    """Named dims: export fails (instead of quietly adding a guard) when any layer's sizes
    cannot stay symbolic over the whole range. From 33 pixels up: below, the stride-32 stage
    is 1 x 1, which the ops' checks cannot tell from a broadcast kernel."""
    model, side = _small(name)
    if name in WINDOW_PER_SIZE:  # the window's tap count follows the input size: one program per size
        program = torch.export.export(model, (torch.randn(1, 3, side + 31, side + 5),))
        x = torch.randn(1, 3, side + 31, side + 5)
        with torch.no_grad():
            assert torch.equal(program.module()(x), model(x))
        return
    dims = {2: Dim("height", min=side, max=1024), 3: Dim("width", min=side, max=1024)}
    program = torch.export.export(model, (torch.randn(1, 3, side + 31, side + 31),), dynamic_shapes=(dims,))
    exported = program.module()
    for size in ((side + 31, side + 31), (side + 37, side + 12), (side, side + 64), (side + 63, side + 95)):
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            assert torch.equal(exported(x), model(x)), size


def test_an_exported_program_keeps_the_ops_and_decompose_lowers_them():
    """Only torch.onnx.export writes the ops as standard ops; torch.export keeps them, and
    decompose lowers a program that holds them."""
    ort = pytest.importorskip("onnxruntime")
    model, _ = _small("rednet26")
    x = torch.randn(1, 3, 40, 48)
    program = torch.export.export(model, (x,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert any(t.startswith("tokenmix.") for t in targets), targets
    onnx_program = torch.onnx.export(tx.decompose(program), (x,), dynamo=True, verbose=False)
    session = ort.InferenceSession(onnx_program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), rtol=1e-4, atol=1e-4)

"""FLOP counting that sees every mixer: fvcore's ``FlopCountAnalysis`` with handles for the
``tokenmix::`` ops and for the common ops fvcore skips, plus torch's ``FlopCounterMode``.

Conventions (fvcore's): **one flop = one multiply-add (MAC)**, so ResNet-50 is 4.1 G.
torch's ``FlopCounterMode`` counts **two** flops per multiply-add; :func:`torch_flops`
returns that count and ``2 * FlopCount.macs == torch_flops(...)`` holds exactly.

=====================================  ==========================================================
traced op                              counted (fvcore convention)
=====================================  ==========================================================
``tokenmix::aggregate``                B*C*Ho*Wo*K*K MACs (:func:`tokenmix.ops.flops.aggregate_macs`)
``tokenmix::correlate``                B*C*Ho*Wo*K*K MACs (``correlate_macs``)
``tokenmix::aggregate_transpose``      B*C*Ho*Wo*K*K MACs (``aggregate_transpose_macs``)
``tokenmix::local_attention``          as its composition: B*Ck*Ho*Wo*K*K MACs under ``correlate``
                                       and B*Cv*Ho*Wo*K*K under ``aggregate``, B*heads*K*K*Ho*Wo
                                       under ``softmax``
``tokenmix::aggregate_linear``         B*Ho*Wo*(G*K*K*M + C*K*K) MACs: the kernel's linear map
                                       and the aggregation (``aggregate_linear_macs``)
conv, linear, (add)mm, (b)mm, matmul   MACs, fvcore's own handles
``aten::einsum``                       MACs; two operands: exact (product of all index sizes)
``aten::scaled_dot_product_attention`` B*H*L*S*(E + Ev) MACs (q.k and attn.v; as torch counts it)
``aten::batch_norm``                   fvcore's handle: 2 per element (affine, eval), 1 without
                                       affine; group/layer/instance norm as fvcore
``aten::softmax`` / ``log_softmax``    1 per element (not a MAC)
``aten::{max,avg}_pool2d``             (output elements) * (window area) (not a MAC)
``aten::adaptive_{avg,max}_pool2d``,   1 per input element (fvcore's handle; not a MAC)
``aten::mean``, ``aten::sum``
elementwise arithmetic / activations   0, explicitly ignored (:data:`ELEMENTWISE_OPS`), as fvcore
(add, mul, sigmoid, exp, ...)          already ignores ``relu``; they are memory-bound and not MACs
shape / data-movement ops              0, explicitly ignored (:data:`DATA_MOVEMENT_OPS`)
=====================================  ==========================================================

``FlopCount.macs`` sums the multiply-add operators only (:data:`MAC_OPERATORS`); ``total``
adds the norm, pool and softmax counts above. Models are counted as at inference: eval mode,
no autograd, every mixer on its composed path (``fused = False``, so a generator's last linear
map counts as its convolution; the fused op counts the same total); all restored afterwards.

``strict=True`` (the default) raises :class:`UnsupportedOpError` when the trace contains any
op that has neither a handle nor an explicit ignore entry, so a new op can never count as 0
silently (fvcore itself only logs a warning).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field
from math import prod
from typing import Any, Dict, List

import torch
from torch import nn

from .._args import check_pair
from ..ops import library  # noqa: F401  (defines torch.ops.tokenmix.* so traces name them)
from ..ops.flops import aggregate_linear_macs, aggregate_macs, aggregate_transpose_macs, correlate_macs

__all__ = [
    "FlopCount",
    "UnsupportedOpError",
    "count_flops",
    "torch_flops",
    "flop_analysis",
    "module_hook_flops",
    "EXTRA_HANDLES",
    "ELEMENTWISE_OPS",
    "DATA_MOVEMENT_OPS",
    "MAC_OPERATORS",
]


# ------------------------------------------------------------------------------ helpers


def _shape(value) -> List[int]:
    """Complete shape of a traced tensor value (a ``torch._C.Value``)."""
    if not value.isCompleteTensor():
        raise ValueError(f"traced value {value.debugName()!r} has no complete tensor shape")
    return list(value.type().sizes())


def _ivalue(value) -> Any:
    """Constant of a traced value; lists built with ``prim::ListConstruct`` included."""
    node = value.node()
    if node.kind() == "prim::ListConstruct":
        return [_ivalue(v) for v in node.inputs()]
    return value.toIValue()


# ------------------------------------------------------------------------------ handles
# Every handle takes (inputs, outputs): the traced values of the node, and returns a count.


def aggregate_handle(inputs, outputs) -> int:
    """``tokenmix::aggregate(x, w, ...)``: B*C*Ho*Wo*K*K multiply-adds."""
    return aggregate_macs(_shape(inputs[0]), _shape(inputs[1]), _shape(outputs[0]))


def correlate_handle(inputs, outputs) -> int:
    """``tokenmix::correlate(q, k, ...) -> (B|1, G, K*K, Ho|1, Wo|1)``: B*C*Ho*Wo*K*K MACs."""
    return correlate_macs(_shape(inputs[0]), _shape(outputs[0])[2])


def aggregate_transpose_handle(inputs, outputs) -> int:
    """``tokenmix::aggregate_transpose(y, w, ...)``: B*C*Ho*Wo*K*K multiply-adds."""
    return aggregate_transpose_macs(_shape(inputs[0]), _shape(inputs[1]))


def local_attention_handle(inputs, outputs) -> Counter:
    """``tokenmix::local_attention(q, k, v, rel_pos, heads, ...)``: counted as the composition it
    fuses, B*Ck*Ho*Wo*K*K MACs of ``correlate`` (q.k) and B*Cv*Ho*Wo*K*K of ``aggregate`` (v
    has Cv channels), plus the softmax's one flop per score (B*heads*K*K*Ho*Wo), so a model
    counts the same on the fused and the composed path (the bias adds are not counted)."""
    q, v = _shape(inputs[0]), _shape(inputs[2])
    heads = int(_ivalue(inputs[4]))
    kernel = _ivalue(inputs[6])
    taps = int(kernel[0]) * int(kernel[1])
    out = (q[0], v[1], q[2], q[3])
    return Counter({"correlate": correlate_macs(q, taps), "aggregate": correlate_macs(out, taps),
                    "softmax": q[0] * heads * taps * q[2] * q[3]})


def aggregate_linear_handle(inputs, outputs) -> int:
    """``tokenmix::aggregate_linear(x, h, weight, bias, kernel_size, ...)``: the kernel's linear
    map B*Ho*Wo*G*K*K*M plus the aggregation B*C*Ho*Wo*K*K multiply-adds (what the composed
    1x1 convolution and aggregate count)."""
    kernel_size = _ivalue(inputs[4])
    return aggregate_linear_macs(_shape(inputs[0]), _shape(inputs[1]), _shape(inputs[2]),
                                 int(kernel_size[0]) * int(kernel_size[1]))


def sdpa_handle(inputs, outputs) -> int:
    """``aten::scaled_dot_product_attention(q, k, v, ...)``, q (..., L, E), k (..., S, E),
    v (..., S, Ev): L*S*E MACs for q.k plus L*S*Ev for attn.v per batch/head."""
    q, k, v = (_shape(t) for t in inputs[:3])
    batch = prod(q[:-2])
    return int(batch * q[-2] * k[-2] * (q[-1] + v[-1]))


def einsum_handle(inputs, outputs) -> int:
    """``aten::einsum(equation, operands)``: with two operands (no ellipsis) the exact
    contraction count, the product of the sizes of every index letter (what torch's bmm
    decomposition executes); otherwise fvcore's handle (numpy's optimised path / 2)."""
    from fvcore.nn.jit_handles import einsum_flop_jit

    equation = str(_ivalue(inputs[0])).replace(" ", "")
    operands = [_shape(v) for v in inputs[1].node().inputs()]
    lhs = equation.split("->")[0].split(",")
    if len(operands) != 2 or "." in equation or len(lhs) != 2:
        return int(einsum_flop_jit(inputs, outputs))
    sizes: Dict[str, int] = {}
    for letters, shape in zip(lhs, operands):
        for letter, n in zip(letters, shape):
            sizes[letter] = int(n)
    return int(prod(sizes.values()))


def per_element_handle(inputs, outputs) -> int:
    """One flop per element of the first input (softmax, mean, sum, adaptive pooling)."""
    return int(prod(_shape(inputs[0])))


def pool_handle(inputs, outputs) -> int:
    """``aten::{max,avg}_pool2d(x, kernel_size, ...)``: output elements * window area."""
    kernel = _ivalue(inputs[1])  # [k] (one value for both axes) or [kh, kw]
    kernel = check_pair("kernel_size", kernel[0] if len(kernel) == 1 else kernel)
    return int(prod(_shape(outputs[0])) * kernel[0] * kernel[1])


EXTRA_HANDLES: Dict[str, Any] = {
    "tokenmix::aggregate": aggregate_handle,
    "tokenmix::correlate": correlate_handle,
    "tokenmix::aggregate_transpose": aggregate_transpose_handle,
    "tokenmix::local_attention": local_attention_handle,
    "tokenmix::aggregate_linear": aggregate_linear_handle,
    "aten::scaled_dot_product_attention": sdpa_handle,
    "aten::einsum": einsum_handle,
    "aten::softmax": per_element_handle,
    "aten::_softmax": per_element_handle,
    "aten::log_softmax": per_element_handle,
    "aten::max_pool2d": pool_handle,
    "aten::avg_pool2d": pool_handle,
    "aten::adaptive_max_pool2d": per_element_handle,
    "aten::mean": per_element_handle,
    "aten::sum": per_element_handle,
}
"""fvcore handles added on top of fvcore's defaults, by traced op name."""

ELEMENTWISE_OPS = frozenset(
    f"aten::{name}{suffix}"
    for name in (
        "add", "sub", "rsub", "mul", "div", "neg", "abs", "pow", "sqrt", "rsqrt", "exp", "log",
        "sigmoid", "tanh", "gelu", "silu", "hardswish", "hardsigmoid", "hardtanh", "relu6",
        "leaky_relu", "elu", "clamp_min", "clamp_max", "where", "ne", "lt", "le", "logical_not",
        "logical_and", "logical_or", "masked_fill", "fill", "zero", "reciprocal", "square",
        "softplus", "erf", "minimum", "maximum", "floor_divide", "remainder", "sign", "round",
        "eq", "gt", "ge", "bitwise_and", "bitwise_or", "mish", "clamp",
    )
    for suffix in ("", "_")
)
"""Elementwise ops counted as 0 flops (explicitly, so strict mode accepts them)."""

DATA_MOVEMENT_OPS = frozenset(
    f"aten::{name}"
    for name in (
        "unfold", "im2col", "col2im", "pad", "reflection_pad2d", "replicate_pad2d", "repeat",
        "expand_as", "view_as", "reshape_as", "clone", "flip", "movedim", "unflatten", "linspace",
        "meshgrid", "contiguous", "pixel_shuffle", "pixel_unshuffle", "channel_shuffle",
        "repeat_interleave", "tile", "broadcast_to", "index_select", "take_along_dim",
        "alias", "lift_fresh", "scalar_tensor", "tensor", "empty_like", "ones_like", "new_ones",
        "mT", "adjoint", "swapaxes", "unsafe_view", "_unsafe_view", "as_strided",
    )
)
"""Shape and data-movement ops counted as 0 flops (explicitly)."""

MAC_OPERATORS = frozenset(
    {"conv", "linear", "addmm", "mm", "bmm", "matmul", "einsum", "baddbmm",
     "aggregate", "correlate", "aggregate_transpose", "aggregate_linear", "scaled_dot_product_attention"}
)
"""``by_operator`` keys whose counts are multiply-adds (those torch's FlopCounterMode counts)."""


# ------------------------------------------------------------------------------ results


class UnsupportedOpError(ValueError):
    """Raised by strict counting when the trace holds ops with no flop handle."""


@dataclass(frozen=True)
class FlopCount:
    """fvcore flop counts (one multiply-add = one flop).

    Attributes:
        total: all counted flops of the model.
        by_module: flops of every submodule by qualified name ("" is the model).
        by_operator: flops by operator (fvcore's short names: "conv", "aggregate", ...).
        unsupported: ops with no handle and how often they ran (empty when strict).
    """

    total: int
    by_module: Dict[str, int] = field(default_factory=dict)
    by_operator: Dict[str, int] = field(default_factory=dict)
    unsupported: Dict[str, int] = field(default_factory=dict)

    @property
    def macs(self) -> int:
        """Multiply-adds of the contraction operators (:data:`MAC_OPERATORS`) only."""
        return sum(v for k, v in self.by_operator.items() if k in MAC_OPERATORS)

    @property
    def gmacs(self) -> float:
        return self.macs / 1e9


# ------------------------------------------------------------------------------ counting


@contextlib.contextmanager
def _inference(model: nn.Module, no_grad: bool = True):
    """Eval mode (and no_grad), with every mixer on its composed path (``fused = False``), so the
    counts split into the generator's and the aggregation's as the model is written; the fused
    ops count the same total (``tokenmix::aggregate_linear``: the linear map plus the
    aggregation). Restored afterwards."""
    was_training = [m.training for m in model.modules()]
    fused = [m for m in model.modules() if getattr(m, "fused", None) is True]
    model.eval()
    for m in fused:
        m.fused = False
    try:
        with torch.no_grad() if no_grad else contextlib.nullcontext():
            yield
    finally:
        for m, t in zip(model.modules(), was_training):
            m.training = t
        for m in fused:
            m.fused = True


def flop_analysis(model: nn.Module, *inputs: torch.Tensor):
    """fvcore ``FlopCountAnalysis`` of ``model(*inputs)`` with :data:`EXTRA_HANDLES`
    registered and :data:`ELEMENTWISE_OPS` / :data:`DATA_MOVEMENT_OPS` explicitly ignored.
    Lazy: nothing is traced until a count is asked for. Warnings are left to the caller."""
    from fvcore.nn import FlopCountAnalysis

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not inputs:
        raise ValueError("count_flops needs at least one input tensor, got none")
    analysis = FlopCountAnalysis(model, tuple(inputs))
    analysis.set_op_handle(**EXTRA_HANDLES)
    analysis.set_op_handle(**{name: None for name in ELEMENTWISE_OPS | DATA_MOVEMENT_OPS})
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return analysis


def count_flops(model: nn.Module, *inputs: torch.Tensor, strict: bool = True) -> FlopCount:
    """Count the flops of ``model(*inputs)`` with fvcore (one multiply-add = one flop).

    Args:
        model: any ``nn.Module``; counted in eval mode under ``torch.no_grad`` (its
            training flags are restored).
        inputs: example inputs, e.g. ``x: (B, 3, H, W)``; counts scale with B.
        strict: raise :class:`UnsupportedOpError` when any traced op has no handle.

    Returns:
        :class:`FlopCount` with ``total``, ``by_module``, ``by_operator`` and ``macs``.

    Example::

        >>> from torch import nn
        >>> count_flops(nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.zeros(1, 3, 4, 4)).total
        3456
    """
    analysis = flop_analysis(model, *inputs)
    with _inference(model):
        total = int(analysis.total())
        unsupported = dict(analysis.unsupported_ops())
    if strict and unsupported:
        listed = ", ".join(f"{k} (x{v})" for k, v in sorted(unsupported.items()))
        raise UnsupportedOpError(
            f"count_flops(strict=True): no flop handle for {listed} in {type(model).__name__}; "
            "register one with tokenmix.analysis.flops.EXTRA_HANDLES (or pass strict=False)"
        )
    return FlopCount(
        total=total,
        by_module={k: int(v) for k, v in analysis.by_module().items()},
        by_operator={k: int(v) for k, v in analysis.by_operator().items()},
        unsupported=unsupported,
    )


_TORCH_FORMULAS_ADDED = False


def _ensure_torch_formulas() -> None:
    """torch's FlopCounterMode has no formula for the CPU flash-attention kernel that
    ``F.scaled_dot_product_attention`` dispatches to on CPU (it would count 0); add one that
    uses torch's own sdpa count. Done on first use, not at import."""
    global _TORCH_FORMULAS_ADDED
    if _TORCH_FORMULAS_ADDED:
        return
    from torch.utils import flop_counter

    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None and cpu_sdpa.default not in flop_counter.flop_registry:

        @flop_counter.register_flop_formula(cpu_sdpa)
        def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)

    _TORCH_FORMULAS_ADDED = True


def torch_flops(model: nn.Module, *inputs: torch.Tensor, by_operator: bool = False):
    """Flops of ``model(*inputs)`` by ``torch.utils.flop_counter.FlopCounterMode``:
    **two** flops per multiply-add, contraction ops only (conv, mm, bmm, sdpa and the
    ``tokenmix::`` ops, whose formulas live in :mod:`tokenmix.ops.library`). Counted in
    eval mode, forward only (autograd stays on: FlopCounterMode's module tracker fails under
    no_grad on generators that return a parameter view). Returns the total, or
    ``(total, {op name: flops})``."""
    from torch.utils.flop_counter import FlopCounterMode

    _ensure_torch_formulas()
    with _inference(model, no_grad=False), FlopCounterMode(display=False) as counter:
        model(*inputs)
    total = int(counter.get_total_flops())
    if not by_operator:
        return total
    ops = {str(k): int(v) for k, v in counter.get_flop_counts().get("Global", {}).items()}
    return total, ops


def module_hook_flops(model: nn.Module, *inputs: torch.Tensor) -> int:
    """The counting rules of mmcv's module-hook FLOP counter (``get_model_complexity_info``,
    the counter of mmcls's ``get_flops`` tool), re-implemented for comparison: per call of
    ``nn.Conv2d``: MACs + one add per output element if it has a bias; ``nn.BatchNorm2d``: 2 per
    input element (affine) else 1; ``nn.ReLU``: 1 per output element; ``nn.{Max,Avg,
    AdaptiveAvg,AdaptiveMax}Pool2d``: 1 per input element; ``nn.Linear``: MACs.

    It sees modules only, so it is blind to functional ops such as ``tokenmix::aggregate``
    (or the official involution's unfold-multiply-sum): compare with :func:`count_flops` to
    see what such a counter misses. Counted in eval mode under no_grad, with every mixer on its
    composed path (``fused = False``; restored afterwards): a fused mixer never calls its
    generator's last convolution, which a module counter would then miss.
    """
    total = [0]

    def conv(m, i, o):
        total[0] += o.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        total[0] += o.numel() if m.bias is not None else 0

    def bn(m, i, o):
        total[0] += i[0].numel() * (2 if m.affine else 1)

    def per_output(m, i, o):
        total[0] += o.numel()

    def per_input(m, i, o):
        total[0] += i[0].numel()

    def linear(m, i, o):
        total[0] += i[0].numel() * m.out_features

    rules = ((nn.Conv2d, conv), (nn.BatchNorm2d, bn), (nn.ReLU, per_output), (nn.Linear, linear),
             ((nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d), per_input))
    handles = []
    for m in model.modules():
        for kind, hook in rules:
            if isinstance(m, kind):
                handles.append(m.register_forward_hook(hook))
                break
    try:
        with _inference(model):
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return int(total[0])

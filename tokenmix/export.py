"""The ``tokenmix::`` custom ops written as standard PyTorch ops, for ONNX export only.

The CPU and Triton kernels behind ``tokenmix::aggregate``, ``tokenmix::correlate``,
``tokenmix::aggregate_transpose``, ``tokenmix::aggregate_linear`` and ``tokenmix::local_attention``
(the fused forms of the mixers, written as their compositions) are not ONNX operators. :func:`decompositions` maps each op
to standard PyTorch ops: one gather of every tap's source pixel from the input extended by a
zero row and column (:func:`tap_index`, every border), a product with the weight and a sum
over the taps (``Pad``, ``Gather``, ``Mul``, ``ReduceSum`` in ONNX; the transpose is a
scatter-add). It holds the K*K taps of the input at once: meant for export, not for running.

Inside ``torch.onnx.export`` the functional API (:mod:`tokenmix.ops.functional`) calls these
forms instead of the ops, so a model exports as it is; an already exported program is
lowered with :func:`decompose`. Nothing changes outside an export.

    >>> import torch, tokenmix.export
    >>> model = tokenmix.models.create_model("rednet26").eval()
    >>> x = torch.randn(1, 3, 224, 224)
    >>> onnx_program = torch.onnx.export(model, (x,), dynamo=True)   # torch.onnx.ONNXProgram
    >>> program = tokenmix.export.decompose(torch.export.export(model, (x,)))
    >>> onnx_program = torch.onnx.export(program, (x,), dynamo=True)

``torch.export.export`` needs none of this (the ops have fake implementations for symbolic
shapes), with dynamic height and width included.
"""

from __future__ import annotations

from typing import Any, Callable, Dict

import torch

from .ops import Window


def _window(kernel_size, stride, dilation, padding, border) -> Window:
    return Window.from_args(kernel_size, stride, dilation, padding, border)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def tap_index(window: Window, height: int, width: int, device=None) -> torch.Tensor:
    """(K*K, Ho, Wo) int64: where tap t of output (i, j) reads, as a flat index into the
    input with one zero row and one zero column appended, ``(H + 1) * (W + 1)`` positions
    (out-of-image taps read the zero at row H / column W)."""
    rows, cols = window.source_index(height, width, device=device)  # (Kh, Ho), (Kw, Wo); -1 outside
    rows = torch.where(rows < 0, torch.full_like(rows, height), rows)
    cols = torch.where(cols < 0, torch.full_like(cols, width), cols)
    idx = rows[:, None, :, None] * (width + 1) + cols[None, :, None, :]  # (Kh, Kw, Ho, Wo)
    return idx.reshape(window.taps, rows.shape[1], cols.shape[1])


def _taps(x: torch.Tensor, window: Window) -> torch.Tensor:
    """x: (..., H, W) -> (..., K*K, Ho, Wo), tap t of output (i, j) = x[..., src_t(i, j)] (0
    outside the image): one Gather of the zero-extended input."""
    H, W = x.shape[-2:]
    idx = tap_index(window, H, W, x.device)
    flat = torch.nn.functional.pad(x, (0, 1, 0, 1)).flatten(-2)  # (..., (H + 1) * (W + 1))
    return flat[..., idx.flatten()].unflatten(-1, idx.shape)


def _aggregate(x, w, kernel_size, stride, dilation, padding, border, backend=None):
    """x: (B, C, H, W), w: (B|1, G, K*K, Ho|1, Wo|1) -> (B, C, Ho, Wo)."""
    window = _window(kernel_size, stride, dilation, padding, border)
    B, C, H, W = x.shape
    G = w.shape[1]
    cd = _compute_dtype(x.dtype)
    cols = _taps(x.to(cd).reshape(B, G, C // G, H, W), window)  # (B, G, C/G, K*K, Ho, Wo)
    y = (w.to(cd).unsqueeze(2) * cols).sum(3)
    return y.reshape(B, C, y.shape[-2], y.shape[-1]).to(x.dtype)


def _correlate(q, k, kernel_size, stride, dilation, padding, border, groups, sum_batch, sum_space, backend=None):
    """q: (B, C, Ho, Wo), k: (B, C, H, W) -> (B|1, G, K*K, Ho|1, Wo|1)."""
    window = _window(kernel_size, stride, dilation, padding, border)
    B, C, Ho, Wo = q.shape
    H, W = k.shape[-2:]
    cd = _compute_dtype(q.dtype)
    cols = _taps(k.to(cd).reshape(B, groups, C // groups, H, W), window)  # (B, G, C/G, K*K, Ho, Wo)
    s = (q.to(cd).reshape(B, groups, C // groups, 1, Ho, Wo) * cols).sum(2)  # (B, G, K*K, Ho, Wo)
    if sum_batch:
        s = s.sum(0, keepdim=True)
    if sum_space:
        s = s.sum((3, 4), keepdim=True)
    return s.to(q.dtype)


def _aggregate_transpose(y, w, kernel_size, stride, dilation, padding, border, input_size, backend=None):
    """y: (B, C, Ho, Wo), w: (B|1, G, K*K, Ho|1, Wo|1) -> (B, C, *input_size): the adjoint of
    :func:`_aggregate` in x, one scatter-add into the zero-extended input."""
    window = _window(kernel_size, stride, dilation, padding, border)
    B, C, Ho, Wo = y.shape
    H, W = input_size
    G = w.shape[1]
    cd = _compute_dtype(y.dtype)
    idx = tap_index(window, H, W, y.device)
    contrib = w.to(cd).unsqueeze(2) * y.to(cd).reshape(B, G, C // G, 1, Ho, Wo)  # (B, G, C/G, K*K, Ho, Wo)
    out = torch.zeros(B, G, C // G, (H + 1) * (W + 1), dtype=cd, device=y.device)
    out = out.index_add(-1, idx.flatten(), contrib.flatten(-3))
    return out.unflatten(-1, (H + 1, W + 1))[..., :H, :W].reshape(B, C, H, W).to(y.dtype)


def _local_attention(q, k, v, rel_pos, heads, scale, kernel_size, stride, dilation, padding, border, backend=None,
                     row_bias=None, col_bias=None):
    """The fused attention op as its composition: (out (B, Cv, Ho, Wo), lse (B, heads, Ho, Wo))."""
    window = _window(kernel_size, stride, dilation, padding, border)
    B, C, Ho, Wo = q.shape
    H, W = k.shape[-2:]
    cd = _compute_dtype(q.dtype)
    s = _correlate(q.to(cd), k.to(cd), kernel_size, stride, dilation, padding, border, heads, False, False) * scale
    if rel_pos is not None:
        dy, dx = window.relative_offset(H, W, device=q.device)
        (Kh, Kw), (dh, dw) = window.kernel_size, window.dilation
        ri = torch.div(dy, dh, rounding_mode="floor") + (Kh - 1)
        ci = torch.div(dx, dw, rounding_mode="floor") + (Kw - 1)
        idx = (ri[:, None, :, None] * (2 * Kw - 1) + ci[None, :, None, :]).reshape(window.taps, Ho, Wo)
        s = s + rel_pos.to(cd).reshape(heads, -1)[:, idx].unsqueeze(0)
    if row_bias is not None or col_bias is not None:  # tap (a, b): + row_bias[a] + col_bias[b]
        s = s.reshape(B, heads, kernel_size[0], kernel_size[1], Ho, Wo)
        if row_bias is not None:
            s = s + row_bias.to(cd).unsqueeze(3)
        if col_bias is not None:
            s = s + col_bias.to(cd).unsqueeze(2)
        s = s.reshape(B, heads, kernel_size[0] * kernel_size[1], Ho, Wo)
    valid = window.valid_mask(H, W, device=q.device)
    s = s.masked_fill(~valid, float("-inf"))
    lse = torch.logsumexp(s, dim=2)
    finite = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    p = torch.where(valid, torch.exp(s - finite.unsqueeze(2)), torch.zeros_like(s))
    out = _aggregate(v.to(cd), p, kernel_size, stride, dilation, padding, border)
    return out.to(q.dtype), lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)


def _aggregate_linear(x, h, weight, bias, kernel_size, stride, dilation, padding, border, backend=None):
    """x: (B, C, H, W), h: (B, M, Ho, Wo), weight (G*K*K, M), bias (G*K*K,) or None ->
    (B, C, Ho, Wo): the kernel ``weight @ h + bias`` made whole (a ``MatMul``), then
    :func:`_aggregate`. Weights of taps that no output pixel reads inside the image multiply
    the zero padding, as in the composed form."""
    B, M, Ho, Wo = h.shape
    taps = kernel_size[0] * kernel_size[1]
    w = torch.matmul(weight, h.reshape(B, M, Ho * Wo))
    if bias is not None:
        w = w + bias.unsqueeze(-1)
    w = w.reshape(B, weight.shape[0] // taps, taps, Ho, Wo)
    return _aggregate(x, w, kernel_size, stride, dilation, padding, border)


def decompositions() -> Dict[Any, Callable]:
    """``{op overload: decomposition}`` of the ``tokenmix::`` ops, for
    ``ExportedProgram.run_decompositions``."""
    ops = torch.ops.tokenmix
    return {ops.aggregate.default: _aggregate, ops.correlate.default: _correlate,
            ops.aggregate_transpose.default: _aggregate_transpose, ops.local_attention.default: _local_attention,
            ops.aggregate_linear.default: _aggregate_linear}


def decompose(program: "torch.export.ExportedProgram") -> "torch.export.ExportedProgram":
    """``program`` with every ``tokenmix::`` op replaced by its standard-op form (the other
    ops are left as they are)."""
    return program.run_decompositions(decompositions())


__all__ = ["decompositions", "decompose", "tap_index"]

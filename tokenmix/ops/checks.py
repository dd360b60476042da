"""Argument checks of the three primitives, in one place. Every error is a ValueError or
TypeError that names the argument and shows the offending value."""

from __future__ import annotations

from typing import Sequence, Tuple

import torch

from .window import Window

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _tensor(name: str, t, ndim: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have a floating dtype in {FLOAT_DTYPES}, got {t.dtype}")


def _window(window) -> None:
    if not isinstance(window, Window):
        raise TypeError(f"window must be a tokenmix.ops.Window, got {type(window).__name__}: {window!r}")


def _same(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> None:
    t0 = tensors[0]
    for n, t in zip(names[1:], tensors[1:]):
        if t.device != t0.device:
            raise ValueError(f"{names[0]} and {n} must be on one device, got {t0.device} and {t.device}")
        if t.dtype != t0.dtype:
            raise TypeError(f"{names[0]} and {n} must have one dtype, got {t0.dtype} and {t.dtype}")


def _weight(w: torch.Tensor, B: int, C: int, window: Window, out_hw: Tuple[int, int], what: str) -> None:
    G = w.shape[1]
    if G < 1 or C % G != 0:
        raise ValueError(f"channels C={C} of {what} are not divisible by groups G={G} (w.shape[1]); "
                         f"w has shape {tuple(w.shape)}")
    def expected() -> str:  # formatted only for an error (this check runs on every call)
        return f"(B|1, G, K*K, Ho|1, Wo|1) = ({B}|1, {G}, {window.taps}, {out_hw[0]}|1, {out_hw[1]}|1)"

    if w.shape[0] not in (1, B):
        raise ValueError(f"w batch {w.shape[0]} must be 1 or {B}; w must be {expected()}, got {tuple(w.shape)}")
    if w.shape[2] != window.taps:
        raise ValueError(f"w.shape[2] must be K*K = {window.taps} for kernel_size={window.kernel_size}; "
                         f"w must be {expected()}, got {tuple(w.shape)}")
    if tuple(w.shape[3:]) not in (tuple(out_hw), (1, 1)):
        raise ValueError(f"w spatial size {tuple(w.shape[3:])} must be the output size {tuple(out_hw)} or (1, 1); "
                         f"w must be {expected()}, got {tuple(w.shape)}")


def check_aggregate(x, w, window) -> Tuple[int, int]:
    """Validate ``aggregate(x, w, window)``; returns (Ho, Wo)."""
    _window(window)
    _tensor("x", x, 4, "(B, C, H, W)")
    _tensor("w", w, 5, "(B|1, G, K*K, Ho|1, Wo|1)")
    _same(("x", "w"), (x, w))
    B, C, H, W = x.shape
    out_hw = window.output_size(H, W)
    _weight(w, B, C, window, out_hw, "x")
    return out_hw


def check_correlate(q, k, window, groups) -> Tuple[int, int]:
    _window(window)
    _tensor("q", q, 4, "(B, C, Ho, Wo)")
    _tensor("k", k, 4, "(B, C, H, W)")
    _same(("q", "k"), (q, k))
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    if q.shape[:2] != k.shape[:2]:
        raise ValueError(f"q and k must have the same (B, C), got q {tuple(q.shape)} and k {tuple(k.shape)}")
    C = q.shape[1]
    if C % groups:
        raise ValueError(f"channels C={C} of q/k are not divisible by groups={groups}")
    out_hw = window.output_size(*k.shape[2:])
    if tuple(q.shape[2:]) != tuple(out_hw):
        raise ValueError(f"q spatial size {tuple(q.shape[2:])} must be the window's output size {out_hw} "
                         f"for k of size {tuple(k.shape[2:])} and {window}")
    return out_hw


def check_input_size(input_size) -> Tuple[int, int]:
    if (not isinstance(input_size, (tuple, list, torch.Size)) or len(input_size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in input_size)):
        raise ValueError(f"input_size must be a pair of positive ints (H, W), got {input_size!r}")
    return int(input_size[0]), int(input_size[1])


def check_aggregate_transpose(y, w, window, input_size) -> Tuple[int, int]:
    _window(window)
    H, W = check_input_size(input_size)
    _tensor("y", y, 4, "(B, C, Ho, Wo)")
    _tensor("w", w, 5, "(B|1, G, K*K, Ho|1, Wo|1)")
    _same(("y", "w"), (y, w))
    out_hw = window.output_size(H, W)
    if tuple(y.shape[2:]) != tuple(out_hw):
        raise ValueError(f"y spatial size {tuple(y.shape[2:])} must be the window's output size {out_hw} "
                         f"for input_size={(H, W)} and {window}")
    _weight(w, y.shape[0], y.shape[1], window, out_hw, "y")
    return H, W


def _operands(window, *specs) -> None:
    """The preamble of the fused ops' checks: ``window`` is a Window and every ``(name, tensor,
    ndim, layout)`` of ``specs`` whose tensor is not None a floating tensor of that rank, all of
    them on one device with one dtype."""
    _window(window)
    given = [(name, t) for name, t, ndim, layout in specs if t is not None]
    for name, t, ndim, layout in specs:
        if t is not None:
            _tensor(name, t, ndim, layout)
    _same([n for n, _ in given], [t for _, t in given])


def check_local_attention(q, k, v, window, heads, rel_pos=None, row_bias=None, col_bias=None) -> Tuple[int, int]:
    """Validate ``local_attention(q, k, v, window, heads, rel_pos=..., row_bias=...,
    col_bias=...)``: q (B, Ck, Ho, Wo), k (B, Ck, H, W), v (B, Cv, H, W), Ck and Cv divisible
    by heads; returns (Ho, Wo)."""
    Kh, Kw = window.kernel_size if isinstance(window, Window) else (0, 0)
    _operands(window, ("q", q, 4, "(B, Ck, Ho, Wo)"), ("k", k, 4, "(B, Ck, H, W)"), ("v", v, 4, "(B, Cv, H, W)"),
              ("rel_pos", rel_pos, 3, "(heads, 2*Kh-1, 2*Kw-1)"), ("row_bias", row_bias, 5, "(B, heads, Kh, Ho, Wo)"),
              ("col_bias", col_bias, 5, "(B, heads, Kw, Ho, Wo)"))
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        raise ValueError(f"heads must be a positive int, got {heads!r}")
    if k.shape[0] != v.shape[0] or k.shape[2:] != v.shape[2:]:
        raise ValueError(f"k and v must have one batch and size (B, _, H, W), got k {tuple(k.shape)} "
                         f"and v {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2]:
        raise ValueError(f"q and k must have the same (B, Ck), got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if q.shape[1] % heads:
        raise ValueError(f"channels Ck={q.shape[1]} of q/k are not divisible by heads={heads}")
    if v.shape[1] % heads:
        raise ValueError(f"channels Cv={v.shape[1]} of v are not divisible by heads={heads}")
    out_hw = window.output_size(*k.shape[2:])
    if tuple(q.shape[2:]) != tuple(out_hw):
        raise ValueError(f"q spatial size {tuple(q.shape[2:])} must be the window's output size {out_hw} "
                         f"for k of size {tuple(k.shape[2:])} and {window}")
    for name, bias, taps, axis in (("row_bias", row_bias, Kh, "Kh"), ("col_bias", col_bias, Kw, "Kw")):
        want = (q.shape[0], heads, taps, *out_hw)
        if bias is not None and tuple(bias.shape) != want:
            raise ValueError(f"{name} must have shape (B, heads, {axis}, Ho, Wo) = {want}, got {tuple(bias.shape)}")
    if rel_pos is not None:
        if tuple(rel_pos.shape) != (heads, 2 * Kh - 1, 2 * Kw - 1):
            raise ValueError(f"rel_pos must have shape (heads, 2*Kh-1, 2*Kw-1) = {(heads, 2 * Kh - 1, 2 * Kw - 1)}, "
                             f"got {tuple(rel_pos.shape)}")
        window.check_relative_offsets("rel_pos needs")
    return out_hw


def check_aggregate_linear(x, h, weight, bias, window, grad_y=None) -> Tuple[int, int]:
    """Validate ``aggregate_linear(x, h, weight, bias, window)`` (and its backward's ``grad_y``);
    returns (Ho, Wo)."""
    _operands(window, ("x", x, 4, "(B, C, H, W)"), ("h", h, 4, "(B, M, Ho, Wo)"), ("weight", weight, 2, "(G*K*K, M)"),
              ("bias", bias, 1, "(G*K*K,)"))
    B, C, H, W = x.shape
    out_hw = window.output_size(H, W)
    if h.shape[0] != B:
        raise ValueError(f"h batch {h.shape[0]} must be x's batch {B}; h must be (B, M, Ho, Wo), got {tuple(h.shape)}")
    if tuple(h.shape[2:]) != tuple(out_hw):
        raise ValueError(f"h spatial size {tuple(h.shape[2:])} must be the window's output size {tuple(out_hw)} "
                         f"for x of size {(H, W)} and {window}")
    rows, M = weight.shape
    if weight.shape[1] != h.shape[1]:
        raise ValueError(f"weight.shape[1] must be h's channels M={h.shape[1]}, got weight of shape {tuple(weight.shape)}")
    if rows < 1 or rows % window.taps:
        raise ValueError(f"weight.shape[0] must be G*K*K, a multiple of K*K = {window.taps} for "
                         f"kernel_size={window.kernel_size}, got weight of shape {tuple(weight.shape)}")
    G = rows // window.taps
    if C % G:
        raise ValueError(f"channels C={C} of x are not divisible by groups G={G} (weight.shape[0] / K*K); "
                         f"weight has shape {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (rows,):
        raise ValueError(f"bias must have shape (G*K*K,) = ({rows},), got {tuple(bias.shape)}")
    if grad_y is not None:
        _tensor("grad_y", grad_y, 4, "(B, C, Ho, Wo)")
        _same(("x", "grad_y"), (x, grad_y))
        if tuple(grad_y.shape) != (B, C, *out_hw):
            raise ValueError(f"grad_y must have the output's shape {(B, C, *out_hw)}, got {tuple(grad_y.shape)}")
    return out_hw

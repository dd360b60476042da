"""Public functional API of the shared aggregation op (``docs/design.md``, "The op").

Channels of group g are the contiguous block ``[g*C/G, (g+1)*C/G)``; tap ``t = u*Kw + v``
of output (i, j) reads input ``src_t(i, j)`` as defined by :class:`~tokenmix.ops.Window`.

Taps outside the image (zero border) contribute nothing, on every backend: their weights are
never read, ``correlate`` and the weight gradients are exactly 0 there whatever the inputs
hold, so a generator may leave anything (NaN, inf) at those taps. NaN or inf in an activation
reaches exactly the outputs that read it through an in-image tap.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import checks, library, native  # importing library defines torch.ops.tokenmix
from .backends import FUSED_OPS, cpu_runs_first, select_backend
from .window import Window

_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps")
#: The borders the native CPU kernels implement (the fused ops: fewer); a CPU call with another
#: border runs in Python.
_NATIVE_CPU_BORDERS = ("zero", "clamp", "reflect")
_NATIVE_CPU_FUSED_BORDERS = ("zero", "clamp")


def autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype in force for ``device``, or None when autocast is off there."""
    if device.type in _AUTOCAST_DEVICES and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def _autocast(a: torch.Tensor, b: torch.Tensor):
    """Under autocast, run in the autocast dtype (as conv2d/matmul do), so a generated kernel
    and a value that autocast left in different dtypes can meet; otherwise unchanged."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        dt = autocast_dtype(a.device)
        if dt is not None:
            return a.to(dt), b.to(dt)
    return a, b


def _call(op: str, tensors, args, window: Window, backend: Optional[str], extra=()):
    """Run ``torch.ops.tokenmix.<op>(*args, *extra)`` (``args`` ending with ``backend``, ``extra``
    the optional arguments after it), the one route of every call, whose autograd kernel
    and CPU kernels are the native library's. Four cases run the op's Python device kernel
    (:data:`tokenmix.ops.library.KERNELS`) directly instead: a backend other than ``"cpu"``
    forced on CPU tensors, a backend registered before "cpu" that runs on CPU tensors, a CPU
    call whose border the native kernels do not implement, and a process where the native
    library cannot be built. Inputs that need a gradient then run the
    reference backend, whose pure-PyTorch composition autograd differentiates by itself, or a
    forced backend's refusal is raised.

    Inside ``torch.onnx.export`` the op is written as standard PyTorch ops instead
    (:mod:`tokenmix.export`), since ONNX has no operator for it."""
    if torch.compiler.is_exporting() and torch.onnx.is_in_onnx_export():
        from ..export import decompositions

        return decompositions()[getattr(torch.ops.tokenmix, op).default](*args, *extra)
    borders = _NATIVE_CPU_FUSED_BORDERS if op.startswith(FUSED_OPS) else _NATIVE_CPU_BORDERS
    native_cpu = tensors[0].device.type != "cpu" or (
        (backend == "cpu" or (backend is None and cpu_runs_first())) and window.border in borders)
    if native_cpu and native.load():
        return getattr(torch.ops.tokenmix, op)(*args, *extra)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        chosen = select_backend(op, tensors, window, backend)  # a forced backend's refusal, the fallback warning
        if backend is not None and chosen.name != "reference":
            raise ValueError(f"backend={backend!r} runs {op} on these inputs without autograd "
                             f"(the native library is not loaded or the tensors are on the CPU); "
                             f"use backend=None or 'reference' for a gradient")
        args = (*args[:-1], "reference")
    return library.KERNELS[op](*args, *extra)


def aggregate(x: torch.Tensor, w: torch.Tensor, window: Window, *, backend: Optional[str] = None) -> torch.Tensor:
    """Apply a per-pixel kernel: ``y[b,c,i,j] = sum_t w[b,g(c),t,i,j] * x[b,c,src_t(i,j)]``.

    Args:
        x: (B, C, H, W) input.
        w: (B|1, G, K*K, Ho|1, Wo|1) kernel, G dividing C. A weight of batch 1 and/or spatial
            1x1 broadcasts: with G = C and shape (1, C, K*K, 1, 1) this is a depthwise conv.
            Entries at taps outside the image are never read (any value, NaN or inf included,
            leaves y and the gradient in x unchanged); the gradient in w is 0 there.
        window: the :class:`Window` geometry.
        backend: force a backend by name ("reference", "cpu", "triton"); default: dispatch.

    Under ``torch.autocast`` the inputs are cast to the autocast dtype (as for conv2d).

    Returns:
        y: (B, C, Ho, Wo) with ``(Ho, Wo) = window.output_size(H, W)``.

    Equivalent PyTorch code (zero border; the reference backend avoids the K*K copy)::

        cols = F.unfold(x, window.kernel_size, window.dilation, window.padding, window.stride)
        cols = cols.view(B, G, C // G, K * K, Ho, Wo)
        y = (cols * w.unsqueeze(2)).sum(3).view(B, C, Ho, Wo)
    """
    x, w = _autocast(x, w)
    checks.check_aggregate(x, w, window)
    return _call("aggregate", (x, w), (x, w, *window.as_args(), backend), window, backend)


def correlate(q: torch.Tensor, k: torch.Tensor, window: Window, groups: int, *,
              backend: Optional[str] = None) -> torch.Tensor:
    """Windowed grouped dot product (the q.k of local attention, and the weight gradient of
    :func:`aggregate`): ``out[b,g,t,i,j] = sum_{c in g} q[b,c,i,j] * k[b,c,src_t(i,j)]``,
    exactly 0 on out-of-image taps whatever q and k hold (NaN or inf in q at a pixel does not
    reach that pixel's out-of-image taps).

    Args:
        q: (B, C, Ho, Wo) queries, ``(Ho, Wo) = window.output_size(H, W)``.
        k: (B, C, H, W) keys.
        window: the :class:`Window` geometry.
        groups: G, dividing C (attention heads).

    Returns:
        (B, G, K*K, Ho, Wo).

    Equivalent PyTorch code (zero border)::

        cols = F.unfold(k, window.kernel_size, window.dilation, window.padding, window.stride)
        cols = cols.view(B, G, C // G, K * K, Ho, Wo)
        out = (cols * q.view(B, G, C // G, 1, Ho, Wo)).sum(2)
    """
    q, k = _autocast(q, k)
    checks.check_correlate(q, k, window, groups)
    return _call("correlate", (q, k), (q, k, *window.as_args(), groups, False, False, backend), window, backend)


def aggregate_transpose(y: torch.Tensor, w: torch.Tensor, window: Window, input_size: Tuple[int, int], *,
                        backend: Optional[str] = None) -> torch.Tensor:
    """Adjoint of :func:`aggregate` in x:
    ``x[b,c,h,w] = sum_{t,i,j : src_t(i,j) = (h,w)} w[b,g(c),t,i,j] * y[b,c,i,j]``,
    so that ``<aggregate(x, w), y> = <x, aggregate_transpose(y, w)>``.

    Args:
        y: (B, C, Ho, Wo).
        w: (B|1, G, K*K, Ho|1, Wo|1); entries at taps outside the image are never read.
        window: the :class:`Window` geometry.
        input_size: (H, W) of the input that ``aggregate`` read; ``window.output_size(H, W)``
            must be (Ho, Wo).

    Returns:
        (B, C, H, W).

    Equivalent PyTorch code (zero border)::

        cols = (y.view(B, G, C // G, 1, Ho, Wo) * w.unsqueeze(2)).view(B, C * K * K, Ho * Wo)
        x = F.fold(cols, input_size, window.kernel_size, window.dilation, window.padding, window.stride)
    """
    y, w = _autocast(y, w)
    H, W = checks.check_aggregate_transpose(y, w, window, input_size)
    return _call("aggregate_transpose", (y, w), (y, w, *window.as_args(), [H, W], backend), window, backend)


def local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: Window, heads: int, *,
                    scale: Optional[float] = None, rel_pos: Optional[torch.Tensor] = None,
                    row_bias: Optional[torch.Tensor] = None, col_bias: Optional[torch.Tensor] = None,
                    backend: Optional[str] = None) -> torch.Tensor:
    """Fused local self-attention, flash-attention style: the scores and their softmax are
    never stored, forward or backward.

    ``out[b,c,i,j] = sum_t p_t * v[b,c,src_t(i,j)]`` with, for head h (query/key channels
    ``h*Ck/heads .. (h+1)*Ck/heads - 1``, value and output channels ``h*Cv/heads .. (h+1)*Cv/heads - 1``,
    as :class:`~tokenmix.kernel_gen.QueryKeyKernel` splits them) and tap ``t = a*Kw + b`` (window
    row a, window column b)::

        p_t = softmax_t(scale * q[b,h,:,i,j] . k[b,h,:,src_t(i,j)]
                        + rel_pos[h, dy_t/dh + Kh-1, dx_t/dw + Kw-1]
                        + row_bias[b,h,a,i,j] + col_bias[b,h,b,i,j])

    over the window's taps; ``(dy_t, dx_t)`` is the true offset of tap t
    (:meth:`Window.relative_offset`, which shifts near the edges of a clamp border). Each bias
    term is optional and added unscaled. ``row_bias``/``col_bias`` are per-pixel, per-head logits
    of the window row / column, the decomposed form of 2-D relative logits (Bello et al.'s AA-Net,
    SAM/MViTv2's "decomposed relative position": ``row_bias[b,h,a,i,j] = q . rel_h[offset_a]``).
    Taps outside the image (zero border) take no probability mass and their values are never
    read; a pixel whose every tap is outside the image gets 0.

    Autograd keeps q, k, v, the biases, the output and one log-sum-exp per (pixel, head); the
    backward recomputes the scores (``tokenmix::local_attention_backward``). The gradients of
    the per-pixel biases are the score gradient dS summed over the other window axis:
    ``d row_bias[a] = sum_b dS[a, b]``, ``d col_bias[b] = sum_a dS[a, b]`` (0 on taps outside
    the image).

    Args:
        q: (B, Ck, Ho, Wo) queries at the output pixels, ``(Ho, Wo) = window.output_size(H, W)``.
        k: (B, Ck, H, W) keys.
        v: (B, Cv, H, W) values; Ck and Cv divisible by heads.
        window: the :class:`Window` geometry.
        heads: number of heads.
        scale: score scale; default ``(Ck / heads) ** -0.5``.
        rel_pos: optional (heads, 2*Kh-1, 2*Kw-1) relative position bias table.
        row_bias: optional (B, heads, Kh, Ho, Wo) per-pixel bias of each window row.
        col_bias: optional (B, heads, Kw, Ho, Wo) per-pixel bias of each window column.
        backend: force a backend by name; default: dispatch.

    Returns:
        (B, Cv, Ho, Wo).

    Equivalent composed code (what ``backend="reference"`` computes)::

        s = correlate(q, k, window, heads) * scale + bias            # (B, heads, K*K, Ho, Wo)
        s = (s.unflatten(2, (Kh, Kw)) + row_bias.unsqueeze(3) + col_bias.unsqueeze(2)).flatten(2, 3)
        s = s.masked_fill(~window.valid_mask(H, W), float("-inf"))
        out = aggregate(v, torch.softmax(s, dim=2), window)
    """
    dt = autocast_dtype(q.device) if isinstance(q, torch.Tensor) else None
    if dt is not None:
        q, k, v, rel_pos, row_bias, col_bias = (t.to(dt) if isinstance(t, torch.Tensor) else t
                                                for t in (q, k, v, rel_pos, row_bias, col_bias))
    checks.check_local_attention(q, k, v, window, heads, rel_pos, row_bias, col_bias)
    if scale is None:
        scale = (q.shape[1] // heads) ** -0.5
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale == scale:
        raise ValueError(f"scale must be a float, got {scale!r}")
    tensors = tuple(t for t in (q, k, v, rel_pos, row_bias, col_bias) if t is not None)
    args = (q, k, v, rel_pos, heads, float(scale), *window.as_args(), backend)
    extra = () if row_bias is None and col_bias is None else (row_bias, col_bias)
    return _call("local_attention", tensors, args, window, backend, extra)[0]


def aggregate_linear(x: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     window: Window, *, backend: Optional[str] = None) -> torch.Tensor:
    """:func:`aggregate` with a kernel that is a per-pixel linear map of features, without
    storing that kernel: ``y = aggregate(x, w, window)`` where
    ``w[b, g, t, i, j] = sum_m weight[g*K*K + t, m] * h[b, m, i, j] + bias[g*K*K + t]``.

    The kernel exists only a tile at a time (on the CPU: one image, a block of its groups
    where its kernel exceeds about 2 MiB, or a few whole images of narrow planes), in the
    forward and again in the backward, which recomputes it; autograd keeps x, h, weight and
    bias, never w.

    Args:
        x: (B, C, H, W) input.
        h: (B, M, Ho, Wo) features, ``(Ho, Wo) = window.output_size(H, W)``.
        weight: (G*K*K, M), G dividing C; row ``g*K*K + t`` makes tap t of group g (the
            weight of a 1x1 convolution M -> G*K*K, viewed as a matrix).
        bias: (G*K*K,) or None.
        window: the :class:`Window` geometry.
        backend: force a backend by name ("reference", "cpu", "triton"); default: dispatch.

    Rows of weight and bias for a tap that no output pixel reads inside the image (zero
    border) are never read. Under ``torch.autocast`` the inputs are cast to the autocast dtype.

    Returns:
        y: (B, C, Ho, Wo).

    Equivalent PyTorch code::

        w = (torch.einsum("rm,bmij->brij", weight, h) + bias.view(1, -1, 1, 1))
        y = aggregate(x, w.view(B, G, K * K, Ho, Wo), window)
    """
    dt = autocast_dtype(x.device) if isinstance(x, torch.Tensor) else None
    if dt is not None:
        x, h, weight = (t.to(dt) if isinstance(t, torch.Tensor) else t for t in (x, h, weight))
        bias = bias.to(dt) if isinstance(bias, torch.Tensor) else bias
    checks.check_aggregate_linear(x, h, weight, bias, window)
    tensors = (x, h, weight) if bias is None else (x, h, weight, bias)
    return _call("aggregate_linear", tensors, (x, h, weight, bias, *window.as_args(), backend), window, backend)

"""Public functional API of the shared aggregation op (``docs/design.md``, "The op").

Channels of group g are the contiguous block ``[g*C/G, (g+1)*C/G)``; tap ``t = u*Kw + v``
of output (i, j) reads input ``src_t(i, j)`` as defined by :class:`~tokenmix.ops.Window`.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import checks, library, native  # importing library defines torch.ops.tokenmix
from .backends import cpu_runs_first, select_backend
from .window import Window

_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps")


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


def _call(op: str, tensors, args, window: Window, backend: Optional[str]):
    """Run ``torch.ops.tokenmix.<op>(*args)``, the one route of every call, whose autograd kernel
    and CPU kernels are the native library's. Three cases run the op's Python device kernel
    (:data:`tokenmix.ops.library.KERNELS`) directly instead: a backend other than ``"cpu"``
    forced on CPU tensors, a backend registered before "cpu" that runs on CPU tensors, and a
    process where the native library cannot be built. Inputs that need a gradient then run the
    reference backend, whose pure-PyTorch composition autograd differentiates by itself, or a
    forced backend's refusal is raised."""
    native_cpu = (backend == "cpu" or tensors[0].device.type != "cpu"
                  or (backend is None and cpu_runs_first()))
    if native_cpu and native.load():
        return getattr(torch.ops.tokenmix, op)(*args)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        chosen = select_backend(op, tensors, window, backend)  # a forced backend's refusal, the fallback warning
        if backend is not None and chosen.name != "reference":
            raise ValueError(f"backend={backend!r} runs {op} on these inputs without autograd "
                             f"(the native library is not loaded or the tensors are on the CPU); "
                             f"use backend=None or 'reference' for a gradient")
        args = (*args[:-1], "reference")
    return library.KERNELS[op](*args)


def aggregate(x: torch.Tensor, w: torch.Tensor, window: Window, *, backend: Optional[str] = None) -> torch.Tensor:
    """Apply a per-pixel kernel: ``y[b,c,i,j] = sum_t w[b,g(c),t,i,j] * x[b,c,src_t(i,j)]``.

    Args:
        x: (B, C, H, W) input.
        w: (B|1, G, K*K, Ho|1, Wo|1) kernel, G dividing C. A weight of batch 1 and/or spatial
            1x1 broadcasts: with G = C and shape (1, C, K*K, 1, 1) this is a depthwise conv.
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
    0 on out-of-image taps.

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
        w: (B|1, G, K*K, Ho|1, Wo|1).
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


def aggregate_linear(x: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     window: Window, *, backend: Optional[str] = None) -> torch.Tensor:
    """:func:`aggregate` with a kernel that is a per-pixel linear map of features, without
    storing that kernel: ``y = aggregate(x, w, window)`` where
    ``w[b, g, t, i, j] = sum_m weight[g*K*K + t, m] * h[b, m, i, j] + bias[g*K*K + t]``.

    The kernel exists only a tile at a time (on the CPU: a block of groups of one image, or a
    few whole images, of at most about 512 KiB), in the forward and again in the backward,
    which recomputes it; autograd keeps x, h, weight and bias, never w.

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

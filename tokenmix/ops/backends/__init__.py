"""Backends declare what they support; the dispatcher takes the first that can run the
inputs and, when a forced backend cannot, raises with every reason (``docs/design.md``,
"Backends").

Built-in backends are named here by import path and constructed on first use, so importing
tokenmix never imports Triton or compiles anything.
"""

from __future__ import annotations

import importlib
import threading
import warnings
from typing import ClassVar, Dict, FrozenSet, List, Optional, Sequence, Tuple

import torch

from ..._registry import Registry
from ..window import Window

OPS = ("aggregate", "correlate", "aggregate_transpose", "local_attention", "local_attention_backward",
       "aggregate_linear", "aggregate_linear_backward")
#: Name prefixes of the fused ops, which a backend may implement for fewer borders than the primitives.
FUSED_OPS = ("local_attention", "aggregate_linear")
#: The four floating dtypes and the three borders, for backends that take them all.
FLOATING = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
BORDERS = frozenset({"zero", "clamp", "reflect"})
#: (rtol, atol) against the float64 reference for results that differ from it by summation
#: order only (float16 and bfloat16 summed in float32, rounded once).
SUMMATION_ORDER_TOL = {torch.float64: (1e-12, 1e-10), torch.float32: (1e-5, 1e-5),
                       torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-3, 2e-3)}


class Backend:
    """Base class of an aggregation backend.

    Subclasses set the class attributes and implement the three primitives. Inputs reach a
    backend already validated (shapes consistent, same device and dtype); the weight may be
    broadcast, i.e. have size 1 in its batch and/or both spatial dims. Outputs are new
    tensors with the input's dtype.
    """

    name: ClassVar[str] = "base"
    devices: ClassVar[FrozenSet[str]] = frozenset()
    dtypes: ClassVar[FrozenSet[torch.dtype]] = frozenset()
    borders: ClassVar[FrozenSet[str]] = frozenset({"zero", "clamp"})
    #: The borders of the fused ops (local_attention, aggregate_linear) where they differ.
    fused_borders: ClassVar[FrozenSet[str]] = frozenset({"zero", "clamp"})
    #: (atol, rtol) against the float64 reference, per input dtype; forward and backward.
    fwd_tol: ClassVar[Dict[torch.dtype, Tuple[float, float]]] = {}
    bwd_tol: ClassVar[Dict[torch.dtype, Tuple[float, float]]] = {}

    # -- availability ----------------------------------------------------------------
    def unavailable_reason(self) -> Optional[str]:
        """None when the backend can run here, else why not (no compiler, no Triton...)."""
        return None

    # -- support ----------------------------------------------------------------------
    def not_supported_reasons(self, op: str, tensors: Sequence[torch.Tensor], window: Window) -> List[str]:
        reasons = []
        t0 = tensors[0]
        if t0.device.type not in self.devices:
            reasons.append(f"device {t0.device.type!r} not in {sorted(self.devices)}")
        if t0.dtype not in self.dtypes:
            reasons.append(f"dtype {t0.dtype} not in {sorted(str(d) for d in self.dtypes)}")
        if window.border not in self.borders:
            reasons.append(f"border {window.border!r} not in {sorted(self.borders)}")
        if op.startswith("local_attention") and getattr(type(self), op, None) is getattr(Backend, op):
            reasons.append(f"{op} not implemented")
        elif op.startswith(FUSED_OPS) and window.border not in self.fused_borders:
            reasons.append(f"border {window.border!r} of {op} not in {sorted(self.fused_borders)}")
        return reasons

    # -- primitives -------------------------------------------------------------------
    def aggregate(self, x: torch.Tensor, w: torch.Tensor, window: Window) -> torch.Tensor:
        raise NotImplementedError

    def correlate(self, q: torch.Tensor, k: torch.Tensor, window: Window, groups: int,
                  sum_batch: bool = False, sum_space: bool = False) -> torch.Tensor:
        """(B, G, K*K, Ho, Wo); with ``sum_batch``/``sum_space`` the batch/spatial dims are
        summed to size 1 (the weight gradient of a broadcast weight)."""
        raise NotImplementedError

    def aggregate_transpose(self, y: torch.Tensor, w: torch.Tensor, window: Window,
                            input_size: Tuple[int, int]) -> torch.Tensor:
        raise NotImplementedError

    def local_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_pos: Optional[torch.Tensor],
                        heads: int, scale: float, window: Window, row_bias: Optional[torch.Tensor] = None,
                        col_bias: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Fused local attention (:func:`tokenmix.ops.local_attention`): ``(out (B, Cv, Ho, Wo),
        lse (B, heads, Ho, Wo))``, lse the log-sum-exp of each pixel's scores (float32, float64
        for float64 inputs; -inf where every tap is outside the image). Optional: a backend
        without it is skipped for this op."""
        raise NotImplementedError

    def local_attention_backward(self, grad_out, q, k, v, rel_pos, out, lse, heads: int, scale: float,
                                 window: Window, row_bias=None, col_bias=None):
        """``(dq, dk, dv, drel_pos, drow_bias, dcol_bias)`` of :meth:`local_attention` from the
        saved q, k, v, rel_pos, out, lse and the biases (the gradient of an absent tensor: shape
        (0,))."""
        raise NotImplementedError

    def aggregate_linear(self, x: torch.Tensor, h: torch.Tensor, weight: torch.Tensor,
                         bias: Optional[torch.Tensor], window: Window) -> torch.Tensor:
        """``aggregate(x, weight @ h + bias)``; by default composed of this backend's primitives
        one image at a time (:mod:`tokenmix.ops.linear_tiles`)."""
        from .. import linear_tiles

        return linear_tiles.forward(self, x, h, weight, bias, window)

    def aggregate_linear_backward(self, grad_y: torch.Tensor, x: torch.Tensor, h: torch.Tensor,
                                  weight: torch.Tensor, bias: Optional[torch.Tensor], window: Window,
                                  output_mask: Tuple[bool, bool, bool, bool]):
        """(dx, dh, dweight, dbias) of :meth:`aggregate_linear`, None where ``output_mask`` is
        False or the bias is absent; by default composed of this backend's primitives."""
        from .. import linear_tiles

        return linear_tiles.backward(self, grad_y, x, h, weight, bias, window, output_mask)

    def __repr__(self):
        return f"<tokenmix backend {self.name!r}>"


# name -> "module:Class" (constructed on first use) or an instance; order is dispatch priority.
_BACKENDS = Registry("backend")
for _name, _path in (("triton", "tokenmix.ops.backends.triton:TritonBackend"),
                     ("cpu", "tokenmix.ops.backends.cpu:CpuBackend"),
                     ("reference", "tokenmix.ops.backends.reference:ReferenceBackend")):
    _BACKENDS.register(_name, _path)
_LOCK = threading.Lock()
_WARNED: set = set()


def register_backend(backend: Backend, *, first: bool = False) -> Backend:
    """Register a Backend instance under ``backend.name`` (replacing one of that name);
    ``first=True`` gives it priority."""
    if not isinstance(backend, Backend):
        raise TypeError(f"backend must be a tokenmix.ops.Backend instance, got {type(backend).__name__}")
    with _LOCK:
        return _BACKENDS.register(backend.name, backend, overwrite=True, first=first)


def cpu_runs_first() -> bool:
    """Whether no registered backend comes before "cpu" that runs on CPU tensors: then dispatch
    picks the cpu backend for CPU tensors whenever it can, and the ops' native CPU kernels take
    CPU calls directly. The built-ins named by import path before it (triton) run on CUDA only."""
    for name in _BACKENDS.names():
        if name == "cpu":
            return True
        entry = _BACKENDS[name]
        if isinstance(entry, Backend) and "cpu" in entry.devices:
            return False
    return False


def list_backends() -> List[str]:
    """Backend names in dispatch priority order."""
    return _BACKENDS.names()


def get_backend(name: str) -> Backend:
    """The Backend registered as ``name`` (constructed on first use)."""
    entry = _BACKENDS.lookup(name)
    if isinstance(entry, str):
        with _LOCK:
            entry = _BACKENDS[name]
            if isinstance(entry, str):
                module, cls = entry.split(":")
                entry = getattr(importlib.import_module(module), cls)()
                _BACKENDS[name] = entry
    return entry  # type: ignore[return-value]


def _reasons(b: Backend, op: str, tensors, window) -> List[str]:
    reasons = b.not_supported_reasons(op, tensors, window)
    if not reasons:
        why = b.unavailable_reason()
        if why:
            reasons.append(f"unavailable: {why}")
    return reasons


def select_backend(op: str, tensors: Sequence[torch.Tensor], window: Window,
                   backend: Optional[str] = None) -> Backend:
    """The backend that runs ``op`` on ``tensors``.

    With ``backend=None`` the first registered backend with no reasons against the inputs
    wins; a backend that supports the inputs but is unavailable on this machine (no
    compiler, no Triton) is skipped with one warning. A forced ``backend`` that cannot run
    raises ValueError listing every reason.
    """
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    if backend is not None:
        b = get_backend(backend)
        reasons = _reasons(b, op, tensors, window)
        if reasons:
            raise ValueError(f"backend={backend!r} cannot run {op} on these inputs: " + "; ".join(reasons))
        return b
    device = tensors[0].device.type
    for name in list_backends():
        b = get_backend(name)
        # the device test first: the common refusal, decided without formatting its reasons
        if device not in b.devices or b.not_supported_reasons(op, tensors, window):
            continue
        why = b.unavailable_reason()
        if why is None:
            return b
        if name not in _WARNED:
            _WARNED.add(name)
            warnings.warn(f"tokenmix: backend {name!r} is unavailable ({why}); falling back to the next backend",
                          RuntimeWarning, stacklevel=3)
    refused = [f"{name}: " + "; ".join(_reasons(get_backend(name), op, tensors, window)) for name in list_backends()]
    raise ValueError(f"no tokenmix backend can run {op} on these inputs: " + " | ".join(refused))

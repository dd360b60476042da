"""Triton GPU backend of the three primitives (``docs/triton-backend.md``; the backend
contract: ``docs/design.md``, "Backends").

One file per kernel (``aggregate.py``, ``correlate.py``, ``aggregate_transpose.py``, the fused
``local_attention.py`` and its backward ``local_attention_backward.py``): the
``@triton.jit`` kernel, whose docstring states the grid and the work per program, then its
launcher. This module holds the backend class; the tile heuristics the launchers share are in
``common.py``, the device helpers the kernels share in ``device.py``. It never imports Triton
at import time: ``import tokenmix`` works without Triton or a GPU; the kernel modules are
imported on the first call.

Properties of every kernel: float32 accumulation (float64 for float64 inputs); shapes,
strides, stride/dilation/padding are runtime arguments, only the kernel size, the border,
the accumulator dtype and the tile sizes are compile-time; image and plane offsets are
int64; no atomics, so every result is bitwise deterministic.

Testing without a GPU: ``TritonBackend(interpret=True)`` (name ``"triton_interpret"``,
device ``cpu``) runs the same launchers, unchanged, on CPU tensors through Triton's
interpreter. Triton decides at decoration time whether ``@triton.jit`` (its own standard
library included) builds an interpreted function, so this only works in a process started
with ``TRITON_INTERPRET=1`` (set before triton is first imported); otherwise
``unavailable_reason()`` says so. tests/test_triton.py runs its interpreter tests in such a
subprocess and registers the backend there; nothing here reads the environment.
"""

from __future__ import annotations

import importlib
from typing import Optional, Tuple

import torch

from .. import Backend
from ...window import Window
from .common import KERNELS



# ---------------------------------------------------------------------------- the backend


class TritonBackend(Backend):
    """Triton kernels for CUDA tensors (``TritonBackend()``), or the same launchers on CPU
    tensors through Triton's interpreter (``TritonBackend(interpret=True)``, named
    ``"triton_interpret"``; slow, for tests)."""

    name = "triton"
    devices = frozenset({"cuda"})
    dtypes = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
    borders = frozenset({"zero", "clamp", "reflect"})
    # Against the float64 reference run on the same (rounded) inputs. 16-bit outputs are
    # rounded once from a float32 accumulator: half an ulp is 4.9e-4 (fp16), 3.9e-3 (bf16).
    fwd_tol = {torch.float64: (1e-12, 1e-10), torch.float32: (1e-5, 1e-5),
               torch.float16: (1e-3, 1e-3), torch.bfloat16: (8e-3, 8e-3)}
    bwd_tol = {torch.float64: (1e-11, 1e-10), torch.float32: (1e-4, 1e-5),
               torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}

    def __init__(self, interpret: bool = False):
        if not isinstance(interpret, bool):
            raise TypeError(f"interpret must be a bool, got {interpret!r}")
        self.interpret = interpret
        if interpret:
            self.name = "triton_interpret"
            self.devices = frozenset({"cpu"})

    def unavailable_reason(self) -> Optional[str]:
        try:
            import triton  # noqa: F401
        except Exception as e:  # ImportError, or a broken install
            return f"triton cannot be imported ({type(e).__name__}: {e})"
        if self.interpret:
            import triton.language as tl
            from triton.runtime.interpreter import InterpretedFunction

            if not isinstance(tl.zeros, InterpretedFunction):
                return ("Triton's interpreter is off in this process: set TRITON_INTERPRET=1 before triton "
                        "is first imported")
            return None
        if not torch.cuda.is_available():
            return "no CUDA device (torch.cuda.is_available() is False)"
        return None

    # -- kernels ------------------------------------------------------------------------
    def _launch(self, op: str, *args):
        """Run the launcher of ``op`` (its kernel module is imported on first use) on the
        device of the first tensor, so that a tensor on ``cuda:1`` is not launched on the
        current device."""
        module, _, lname = KERNELS[op]
        launch = getattr(importlib.import_module(module), lname)
        t0 = args[0]
        if t0.is_cuda:
            with torch.cuda.device(t0.device):
                return launch(*args)
        return launch(*args)

    # -- primitives ---------------------------------------------------------------------
    def aggregate(self, x: torch.Tensor, w: torch.Tensor, window: Window) -> torch.Tensor:
        return self._launch("aggregate", x.contiguous(), w.contiguous(), window)

    def correlate(self, q: torch.Tensor, k: torch.Tensor, window: Window, groups: int,
                  sum_batch: bool = False, sum_space: bool = False) -> torch.Tensor:
        return self._launch("correlate", q.contiguous(), k.contiguous(), window, groups, sum_batch, sum_space)

    def aggregate_transpose(self, y: torch.Tensor, w: torch.Tensor, window: Window,
                            input_size: Tuple[int, int]) -> torch.Tensor:
        return self._launch("aggregate_transpose", y.contiguous(), w.contiguous(), window, tuple(input_size))

    def local_attention(self, q, k, v, rel_pos, heads, scale, window, row_bias=None, col_bias=None):
        """Forward in one kernel (``local_attention.py``): the scores stay in registers. A call
        with per-pixel tap biases (row_bias, col_bias) or with k and v of different widths runs
        the reference composition on this backend's primitives."""
        if row_bias is not None or col_bias is not None or k.shape[1] != v.shape[1]:
            return self._composed().local_attention(q, k, v, rel_pos, heads, scale, window, row_bias, col_bias)
        return self._launch("local_attention", q.contiguous(), k.contiguous(), v.contiguous(),
                            None if rel_pos is None else rel_pos.contiguous(), heads, scale, window)

    def _composed(self):
        """The reference backend's composition of local attention, on this backend's primitives."""
        from ..reference import ReferenceBackend

        composed = ReferenceBackend()
        composed.correlate = self.correlate
        composed.aggregate = self.aggregate
        composed.aggregate_transpose = self.aggregate_transpose
        return composed

    def local_attention_backward(self, grad_out, q, k, v, rel_pos, out, lse, heads, scale, window, row_bias=None,
                                 col_bias=None):
        """Two kernels (``local_attention_backward.py``): the scores are recomputed tile by tile,
        nothing of the kernel's size is stored. A call with per-pixel tap biases or with k and
        v of different widths runs the reference composition on this backend's primitives
        (it recomputes the scores from lse, but holds K*K-sized temporaries while it runs)."""
        if row_bias is not None or col_bias is not None or k.shape[1] != v.shape[1]:
            return self._composed().local_attention_backward(grad_out, q, k, v, rel_pos, out, lse, heads, scale,
                                                             window, row_bias, col_bias)
        grads = self._launch("local_attention_backward", grad_out.contiguous(), q.contiguous(), k.contiguous(),
                             v.contiguous(), None if rel_pos is None else rel_pos.contiguous(), out.contiguous(),
                             lse.contiguous(), heads, scale, window)
        none = q.new_empty(0)
        return (*grads, none, none)

    def aggregate_linear(self, x: torch.Tensor, h: torch.Tensor, weight: torch.Tensor,
                         bias: Optional[torch.Tensor], window: Window) -> torch.Tensor:
        """The fused forward kernel (the weights generated in registers, never stored) for the
        16- and 32-bit floats; float64 (whose kernel spills on sm_80) runs the default,
        composed of the primitives one image at a time."""
        if x.dtype == torch.float64:
            return super().aggregate_linear(x, h, weight, bias, window)
        return self._launch("aggregate_linear", x.contiguous(), h.contiguous(), weight.contiguous(),
                            None if bias is None else bias.contiguous(), window)

    def aggregate_linear_backward(self, grad_y, x, h, weight, bias, window, output_mask):
        """Two fused kernels (``aggregate_linear.py``) that regenerate the kernel tile by tile
        in registers, for the zero and clamp borders (the fused ops' borders) in every dtype;
        a reflect window, which dispatch never sends here, runs the default composition."""
        if window.border == "reflect":
            return super().aggregate_linear_backward(grad_y, x, h, weight, bias, window, output_mask)
        return self._launch("aggregate_linear_backward", grad_y.contiguous(), x.contiguous(), h.contiguous(),
                            weight.contiguous(), None if bias is None else bias.contiguous(), window,
                            tuple(output_mask))

    def __repr__(self):
        return f"<tokenmix backend {self.name!r}{' (interpreter)' if self.interpret else ''}>"

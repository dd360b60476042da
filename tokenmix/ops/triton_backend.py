"""Triton GPU backend of the three primitives (DESIGN.md 2.3).

One file per kernel (``triton_aggregate.py``, ``triton_correlate.py``,
``triton_aggregate_transpose.py``): the ``@triton.jit`` kernel, whose docstring states the
grid and the work per program, then its launcher. This module holds the backend class and
the small tile heuristics the launchers share. It never imports Triton at import time:
``import tokenmix`` works without Triton or a GPU; the kernel modules are imported on the
first call.

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
from functools import lru_cache
from typing import Optional, Tuple

import torch

from .registry import Backend
from .window import Window

_INT32_MAX = 2**31 - 1
_KERNELS = {  # primitive -> (module, jit kernel name, launcher name)
    "aggregate": ("tokenmix.ops.triton_aggregate", "aggregate_kernel", "aggregate"),
    "correlate": ("tokenmix.ops.triton_correlate", "correlate_kernel", "correlate"),
    "aggregate_transpose": ("tokenmix.ops.triton_aggregate_transpose", "aggregate_transpose_kernel",
                            "aggregate_transpose"),
}


# ---------------------------------------------------------------- shared launcher helpers


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def acc_dtype(dtype: torch.dtype):
    """Triton accumulator dtype for an input dtype: float64 for float64, else float32."""
    import triton.language as tl

    return tl.float64 if dtype == torch.float64 else tl.float32


def channel_tile(channels_per_group: int) -> int:
    """BLOCK_C of aggregate/aggregate_transpose: the channels of one group that share each
    weight load (power of two, at most 16)."""
    return min(_next_pow2(channels_per_group), 16)


def pixel_tile(pixels: int, block_c: int, dtype: torch.dtype) -> int:
    """BLOCK_P of aggregate/aggregate_transpose: about 1024 accumulators per program (512 for
    float64), between 64 and 256 pixels, and no larger than the plane needs. (512-pixel
    tiles spilled: bf16 aggregate on sm_80, fp64 clamp aggregate on sm_90.)"""
    budget = 512 if dtype == torch.float64 else 1024
    p = max(64, min(256, budget // block_c))
    return min(p, max(16, _next_pow2(pixels)))


def channel_pixel_grid(B: int, G: int, Cg: int, pixels: int, dtype: torch.dtype):
    """Tiles and grid of aggregate/aggregate_transpose, whose programs own ``BLOCK_C``
    channels of one group by ``BLOCK_P`` pixels (the kernels undo it with ``split_program``).
    Returns ``(BLOCK_C, BLOCK_P, n_cblk, n_pblk, grid)``."""
    block_c = channel_tile(Cg)
    block_p = pixel_tile(pixels, block_c, dtype)
    n_cblk = -(-Cg // block_c)
    n_pblk = -(-pixels // block_p)
    return block_c, block_p, n_cblk, n_pblk, (launchable(B * G * n_cblk * n_pblk),)


def tap_tile(taps: int) -> int:
    """BLOCK_T of correlate: all K*K taps of a pixel in one program (next power of two)."""
    return _next_pow2(taps)


def correlate_pixel_tile(pixels: int, block_t: int, dtype: torch.dtype) -> int:
    """BLOCK_P of correlate: about 2048 accumulators (1024 for float64), 16..256 pixels."""
    budget = 1024 if dtype == torch.float64 else 2048
    p = max(16, min(256, budget // block_t))
    return min(p, max(16, _next_pow2(pixels)))


def weight_strides(w: torch.Tensor) -> Tuple[int, int, int, int]:
    """(batch, group, tap, pixel) element strides of a contiguous (B|1, G, KK, Ho|1, Wo|1)
    weight; a broadcast dim gets stride 0 (never expanded in memory)."""
    sb = 0 if w.shape[0] == 1 else w.stride(0)
    sp = 0 if (w.shape[3] == 1 and w.shape[4] == 1) else 1
    return sb, w.stride(1), w.stride(2), sp


def check_plane(*sizes: int) -> None:
    """Offsets inside one (H, W) or (Ho, Wo) plane are int32: refuse planes of >= 2**31 elements
    (a pair of sizes per plane: ``check_plane(H, W, Ho, Wo)``)."""
    for a, b in zip(sizes[::2], sizes[1::2]):
        if a * b > _INT32_MAX:
            raise ValueError(f"triton backend: one spatial plane of {a}x{b} = {a * b} elements exceeds 2**31 - 1")


def launchable(programs: int) -> int:
    if programs > _INT32_MAX:
        raise ValueError(f"triton backend: {programs} programs exceed the 1-D grid limit 2**31 - 1; "
                         f"use a smaller batch")
    return programs


@lru_cache(maxsize=256)
def clamp_candidates(length: int, k: int, d: int) -> int:
    """Largest number of (output, tap) pairs that read one input position along an axis of the
    clamp border (at most 2K-1; K in the interior). The transpose kernel loops this many
    candidates per axis."""
    best = 0
    for h in range(length):
        r, hp = h % d, h // d
        lr = -(-(length - r) // d)
        lo = 0 if hp - k + 1 <= 0 else hp - k + 1 + k // 2
        hi = lr - 1 if hp >= lr - k else hp + k // 2
        best = max(best, hi - lo + 1)
    return best


# ---------------------------------------------------------------------------- the backend


class TritonBackend(Backend):
    """Triton kernels for CUDA tensors (``TritonBackend()``), or the same launchers on CPU
    tensors through Triton's interpreter (``TritonBackend(interpret=True)``, named
    ``"triton_interpret"``; slow, for tests)."""

    name = "triton"
    devices = frozenset({"cuda"})
    dtypes = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
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
        module, _, lname = _KERNELS[op]
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

    def __repr__(self):
        return f"<tokenmix backend {self.name!r}{' (interpreter)' if self.interpret else ''}>"


# ------------------------------------------------------------- ahead-of-time compilation
# Used by tests/test_triton.py (zero spills on sm_80/sm_90 without a GPU) and
# benchmarks/triton_resources.py. Needs Triton's bundled ptxas/cuobjdump, no GPU.

_PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float64: "*fp64"}
_BIG = 1 << 20  # a plane large enough that the tile heuristics pick their largest tiles


def tile_configs(op: str, dtype: torch.dtype, taps: int):
    """Every tile configuration the launcher of ``op`` picks for large planes (smaller planes
    only shrink BLOCK_P): a list of constexpr dicts."""
    if op == "correlate":
        bt = tap_tile(taps)
        return [dict(BLOCK_T=bt, BLOCK_P=correlate_pixel_tile(_BIG, bt, dtype), SUM_SPACE=s) for s in (False, True)]
    if op not in _KERNELS:
        raise ValueError(f"op must be one of {list(_KERNELS)}, got {op!r}")
    return [dict(BLOCK_C=c, BLOCK_P=pixel_tile(_BIG, c, dtype)) for c in (1, 2, 4, 8, 16)]


def aot_compile(op: str, dtype: torch.dtype, kernel_size: Tuple[int, int], border: str, tiles: dict,
                capability: int, num_warps: int = 4, specialize: Optional[dict] = None):
    """Compile the kernel of ``op`` with ``triton.compile`` for ``GPUTarget("cuda", capability,
    32)`` on any machine (no GPU needed); pointers are assumed 16-byte aligned, integer
    arguments generic except those named in ``specialize`` (name -> value), which become
    compile-time constants as Triton's launcher makes integer arguments equal to 1.
    Returns the CompiledKernel."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if dtype not in _PTR:
        raise ValueError(f"dtype must be one of {list(_PTR)}, got {dtype}")
    module, kname, _ = _KERNELS[op]
    kernel = getattr(importlib.import_module(module), kname)
    if not hasattr(kernel, "arg_names") or not hasattr(kernel, "cache_key"):
        raise RuntimeError("aot_compile needs the jit kernels: unset TRITON_INTERPRET before triton is imported")
    constexprs = dict(KH=kernel_size[0], KW=kernel_size[1], CLAMP=border == "clamp",
                      ACC=tl.float64 if dtype == torch.float64 else tl.float32, **tiles, **(specialize or {}))
    sig = {}
    for n in kernel.arg_names:
        if n in constexprs:
            sig[n] = "constexpr"
        elif n.endswith("_ptr"):
            sig[n] = _PTR[dtype]
        else:
            sig[n] = "i32"
    if op == "correlate" and tiles.get("SUM_SPACE"):
        sig["out_ptr"] = "*fp64" if dtype == torch.float64 else "*fp32"
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names) if n.endswith("_ptr")}
    src = ASTSource(kernel, sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", capability, 32),
                          options=dict(num_warps=num_warps, enable_fp_fusion=True))  # as the launchers


def resource_usage(compiled, capability: int) -> dict:
    """Registers, spills, local and shared memory of a compiled kernel, from the bundled
    ``cuobjdump -res-usage`` on its cubin and ``ptxas -v`` on its PTX:
    ``{"regs", "spill_stores", "spill_loads", "local", "stack", "shared"}`` (bytes except regs;
    ``shared`` is Triton's static allocation)."""
    import os
    import re
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    ptxas = get_ptxas(capability).path  # the ptxas Triton itself uses for this target
    cuobjdump = os.path.join(os.path.dirname(ptxas), "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        cubin, ptx = os.path.join(tmp, "k.cubin"), os.path.join(tmp, "k.ptx")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        res = subprocess.run([cuobjdump, "-res-usage", cubin],
                             capture_output=True, text=True, check=True).stdout
        log = subprocess.run([ptxas, "-v", "--regAllocOptLevel=2",
                              f"--gpu-name={sm_arch_from_capability(capability)}", ptx,
                              "-o", os.path.join(tmp, "k.o")],
                             capture_output=True, text=True, check=True).stderr

    def grab(pattern, text):
        m = re.search(pattern, text)
        if m is None:
            raise RuntimeError(f"cannot find {pattern!r} in:\n{text}")
        return int(m.group(1))

    return dict(regs=grab(r"REG:(\d+)", res), local=grab(r"LOCAL:(\d+)", res), stack=grab(r"STACK:(\d+)", res),
                spill_stores=grab(r"(\d+) bytes spill stores", log), spill_loads=grab(r"(\d+) bytes spill loads", log),
                ptxas_regs=grab(r"Used (\d+) registers", log), shared=int(compiled.metadata.shared))

"""Ahead-of-time compilation of the Triton kernels for a GPU target on any machine (no GPU
needed), and the static resources of the result (registers, spills, local and shared memory)
read with the ptxas and cuobjdump that Triton bundles. Used by ``benchmarks/triton_resources.py``
and by the tests (zero spills on sm_80 and sm_90)."""

from __future__ import annotations

import importlib
from typing import Optional, Tuple

import torch

from tokenmix.ops.backends.triton.common import KERNELS

_PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float64: "*fp64"}


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
    module, kname, _ = KERNELS[op]
    kernel = getattr(importlib.import_module(module), kname)
    if not hasattr(kernel, "arg_names") or not hasattr(kernel, "cache_key"):
        raise RuntimeError("aot_compile needs the jit kernels: unset TRITON_INTERPRET before triton is imported")
    constexprs = dict(KH=kernel_size[0], KW=kernel_size[1], CLAMP=border == "clamp", REFLECT=border == "reflect",
                      ACC=tl.float64 if dtype == torch.float64 else tl.float32, **tiles, **(specialize or {}))
    constexprs = {n: v for n, v in constexprs.items() if n in kernel.arg_names}  # the kernel's own
    sig = {}
    for n in kernel.arg_names:
        if n in constexprs:
            sig[n] = "constexpr"
        elif n.endswith("_acc_ptr"):  # accumulator-dtype scratch
            sig[n] = "*fp64" if dtype == torch.float64 else "*fp32"
        elif n.endswith("_ptr"):
            sig[n] = _PTR[dtype]
        elif n == "scale":
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
    if op == "correlate" and tiles.get("SUM_SPACE"):
        sig["out_ptr"] = "*fp64" if dtype == torch.float64 else "*fp32"
    for n in ("lse_ptr", "delta_ptr", "drel_ptr"):  # per-pixel statistics and partial sums: the accumulator type
        if n in sig:
            sig[n] = "*fp64" if dtype == torch.float64 else "*fp32"
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

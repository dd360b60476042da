"""Same-process A/B of the CPU kernels: an earlier git revision's against the working tree's.

On a shared machine two runs of benchmarks/ops.py a minute apart can differ by far more than
most kernel changes do; and building the other revision in place does not help either, since
torch's extension cache rebuilds whatever sources are checked out. This script takes the base
revision's C++ sources with `git show`, renames their `tokenmix_cpu` library to
`tokenmix_cpu_base`, builds them beside the current kernels, and times the raw kernels of both
builds in one process, alternating call by call (the order alternating too), on the RedNet-50
stage shapes of benchmarks/ops.py. It prints, per shape and op, the median of the paired ratios
new/base (below 1: the working tree is faster) and whether the results are bit-identical,
then the geometric means.

    python benchmarks/ab_kernels.py HEAD~1                 # one thread (CPU time), all ops
    python benchmarks/ab_kernels.py 3350e9f --threads 2 --ops aggregate aggregate_transpose
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from torch.utils.cpp_extension import load

from tokenmix.ops import Window
from tokenmix.ops.backends import cpu as cpu_backend

SHAPES = [(64, 56, 4), (128, 28, 8), (256, 14, 16), (512, 7, 32)]  # (C, H=W, G), as benchmarks/ops.py
SOURCES = ["aggregate_cpu.cpp", "autograd_cpu.cpp", "aggregate_cpu.h"]


def build_base(rev: str, out: str):
    """The base revision's kernels as torch.ops.tokenmix_cpu_base."""
    root = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True,
                          check=True).stdout.strip()
    for name in SOURCES:
        text = subprocess.run(["git", "show", f"{rev}:tokenmix/ops/csrc/{name}"], cwd=root, capture_output=True,
                              text=True, check=True).stdout
        with open(os.path.join(out, name), "w") as f:
            f.write(text.replace("tokenmix_cpu", "tokenmix_cpu_base"))
    load(name="tokenmix_cpu_base_ab", sources=[os.path.join(out, n) for n in SOURCES[:2]],
         extra_cflags=list(cpu_backend._CFLAGS), extra_ldflags=list(cpu_backend._LDFLAGS), is_python_module=False,
         build_directory=out, verbose=False)
    return torch.ops.tokenmix_cpu_base


def calls(ns, x, w, y, window, G, H):
    """The three raw kernels of one build on one case."""
    pl = cpu_backend._plan(window, H, H)
    return {
        "aggregate": lambda: ns.aggregate(x, w, pl.rows, pl.cols, pl.coff, pl.stride, pl.fa, pl.fb, pl.pad_ok),
        "aggregate_transpose": lambda: ns.aggregate_transpose(y, w, pl.rows, pl.cols, pl.coff, pl.stride, pl.pad_ok,
                                                              pl.ca, pl.cb, pl.rptr, pl.rpair, pl.cptr, pl.cpair, H, H),
        "correlate": lambda: ns.correlate(y, x, pl.rows, pl.cols, pl.coff, pl.stride, pl.fa, pl.fb, pl.pad_ok, G,
                                          False, False),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("base", help="git revision whose kernels are the baseline")
    ap.add_argument("--threads", type=int, default=1, help="1: the calling thread's CPU time; more: wall time")
    ap.add_argument("--pairs", type=int, default=16, help="alternated (base, new) call pairs per shape and op")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--ops", nargs="+", default=["aggregate", "aggregate_transpose", "correlate"],
                    choices=["aggregate", "aggregate_transpose", "correlate"])
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    reason = cpu_backend.CpuBackend().unavailable_reason()
    if reason:
        print(f"cpu backend unavailable: {reason}", file=sys.stderr)
        return 1
    new = torch.ops.tokenmix_cpu
    with tempfile.TemporaryDirectory() as tmp:
        base = build_base(args.base, tmp)
    logs = {op: [] for op in args.ops}
    print(f"new/base, median of {args.pairs} paired calls, {args.threads} thread(s); * = results not bit-identical")
    for C, H, G in SHAPES:
        for s in (1, 2):
            window = Window(7, stride=s)
            Ho, Wo = window.output_size(H, H)
            g = torch.Generator().manual_seed(0)
            x = torch.randn(args.batch, C, H, H, generator=g)
            w = torch.randn(args.batch, G, window.taps, Ho, Wo, generator=g)
            y = torch.randn(args.batch, C, Ho, Wo, generator=g)
            fb, fn = calls(base, x, w, y, window, G, H), calls(new, x, w, y, window, G, H)
            line = f"{C}@{H}x{H} s{s}:"
            for op in args.ops:
                rb, rn = fb[op](), fn[op]()
                torch.testing.assert_close(rn, rb, rtol=1e-4, atol=1e-4)
                ratios = []
                for k in range(args.pairs):
                    order = (fb[op], fn[op]) if k % 2 == 0 else (fn[op], fb[op])
                    t = {}
                    for f in order:
                        t0 = clock()
                        f()
                        t[f] = clock() - t0
                    ratios.append(t[fn[op]] / t[fb[op]])
                m = statistics.median(ratios)
                logs[op].append(math.log(m))
                line += f"  {op} {m:.3f}{'' if torch.equal(rb, rn) else '*'}"
            print(line, flush=True)
    print("geomean new/base: " + ", ".join(f"{op} {math.exp(sum(v) / len(v)):.3f}" for op, v in logs.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

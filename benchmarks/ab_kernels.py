"""Same-process A/B of the CPU kernels: an earlier git revision's against the working tree's.

On a shared machine two runs of benchmarks/ops.py a minute apart can differ by far more than
most kernel changes do; and building the other revision in place does not help either, since
torch's extension cache rebuilds whatever sources are checked out. This script takes the base
revision's CPU kernel sources (``tokenmix/ops/backends/cpu/csrc``) with `git show`, builds them
under another op namespace beside the current library (in the extension directory, once per
base commit), and times both in one process, alternating call by call (the order alternating
too), on the RedNet-50 stage shapes of benchmarks/ops.py. It prints, per shape and op, the
median of the paired ratios new/base (below 1: the working tree is faster) and whether the
results are bit-identical, then the geometric means.

The working tree's kernels run as the ``tokenmix::`` ops' CPU kernels (below autograd, backend
"cpu"). A base revision of either layout works:

- kernels registered on the ``tokenmix::`` ops (this layout): built with
  ``-DTOKENMIX_TEST_HOOKS``, which registers them as the ops of another namespace, renamed here
  to ``tokenmix_ab_base``, called with the same arguments;
- the earlier raw ``tokenmix_cpu`` ops, whose geometry plan was computed in Python
  (``_plan`` in that revision's ``tokenmix/ops/backends/cpu/__init__.py``): the library renamed
  to ``tokenmix_ab_base`` and the plan computed by that revision's own Python code, taken from
  the file's text.

    python benchmarks/ab_kernels.py 01bf1b0                # one thread (CPU time), all ops
    python benchmarks/ab_kernels.py HEAD~1 --threads 2 --ops aggregate aggregate_transpose
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import statistics
import subprocess
import sys
import time
import types
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from tokenmix.ops import Window, native

SHAPES = [(64, 56, 4), (128, 28, 8), (256, 14, 16), (512, 7, 32)]  # (C, H=W, G), as benchmarks/ops.py
CPU_SOURCES = "tokenmix/ops/backends/cpu"
OPS = ("aggregate", "aggregate_transpose", "correlate")


def _git(*args: str) -> str:
    root = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True,
                          check=True).stdout.strip()
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout


def _base_plan(rev: str):
    """The `_plan(window, H, W)` of a revision whose CPU backend planned in Python: the file's
    geometry section, executed with the names it imports."""
    text = _git("show", f"{rev}:{CPU_SOURCES}/__init__.py")
    start = text.index("# ---") if "# ---" in text else 0
    section = text[start:text.index("class CpuBackend")]
    module = types.ModuleType("tokenmix_ab_base_plan")
    module.__dict__.update(torch=torch, functools=functools, dataclass=dataclass, Optional=Optional, Tuple=Tuple,
                           Window=Window)
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(section, f"{rev}:{CPU_SOURCES}/__init__.py", "exec"), module.__dict__)
    return module._plan


def build_base(rev: str, out: str):
    """The base revision's kernels as torch.ops.tokenmix_ab_base; returns (ops, plan or None)."""
    names = [n for n in _git("ls-tree", "--name-only", f"{rev}:{CPU_SOURCES}/csrc").split() if n.endswith((".cpp", ".h"))]
    texts = {n: _git("show", f"{rev}:{CPU_SOURCES}/csrc/{n}") for n in names}
    raw = any("TORCH_LIBRARY(tokenmix_cpu" in t for t in texts.values())
    src = os.path.join(out, "src")  # the build directory's own files are cleared before a build
    os.makedirs(src, exist_ok=True)
    for n, t in texts.items():
        with open(os.path.join(src, n), "w") as f:
            f.write(t.replace("tokenmix_cpu", "tokenmix_ab_base") if raw else t.replace("tokenmix_test_hooks",
                                                                                       "tokenmix_ab_base"))
    flags = list(native.CFLAGS) + ([] if raw else ["-DTOKENMIX_TEST_HOOKS", "-fvisibility=hidden"])
    native.build_and_load("tokenmix_ab_base", [os.path.join(src, n) for n in names if n.endswith(".cpp")], out, flags,
                          native.LDFLAGS, what=f"the kernels of {rev}")
    return torch.ops.tokenmix_ab_base, (_base_plan(rev) if raw else None)


def op_calls(ns, x, w, y, window, G, H):
    """The three ops of the tokenmix:: layout (the working tree's, or a base built with hooks)."""
    args = window.as_args()
    return {
        "aggregate": lambda: ns.aggregate(x, w, *args, "cpu"),
        "aggregate_transpose": lambda: ns.aggregate_transpose(y, w, *args, [H, H], "cpu"),
        "correlate": lambda: ns.correlate(y, x, *args, G, False, False, "cpu"),
    }


def raw_calls(ns, plan, x, w, y, window, G, H):
    """The raw kernels of the earlier layout, with that revision's plan."""
    pl = plan(window, H, H)
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
    ap.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    if not native.load():
        print(f"native library unavailable: {native.error()}", file=sys.stderr)
        return 1
    commit = _git("rev-parse", "--short=12", args.base).strip()
    out = os.path.join(native.cache_root(), f"tokenmix_ab_base_{commit}")
    os.makedirs(out, exist_ok=True)
    base, base_plan = build_base(commit, out)
    logs = {op: [] for op in args.ops}
    identical = True
    print(f"new/base, median of {args.pairs} paired calls, {args.threads} thread(s); * = results not bit-identical")
    torch.set_grad_enabled(False)
    for C, H, G in SHAPES:
        for s in (1, 2):
            window = Window(7, stride=s)
            Ho, Wo = window.output_size(H, H)
            g = torch.Generator().manual_seed(0)
            x = torch.randn(args.batch, C, H, H, generator=g)
            w = torch.randn(args.batch, G, window.taps, Ho, Wo, generator=g)
            y = torch.randn(args.batch, C, Ho, Wo, generator=g)
            fb = (raw_calls(base, base_plan, x, w, y, window, G, H) if base_plan is not None
                  else op_calls(base, x, w, y, window, G, H))
            fn = op_calls(torch.ops.tokenmix, x, w, y, window, G, H)
            line = f"{C}@{H}x{H} s{s}:"
            for op in args.ops:
                rb, rn = fb[op](), fn[op]()
                torch.testing.assert_close(rn, rb, rtol=1e-4, atol=1e-4)
                same = torch.equal(rb, rn)
                identical = identical and same
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
                line += f"  {op} {m:.3f}{'' if same else '*'}"
            print(line, flush=True)
    print("geomean new/base: " + ", ".join(f"{op} {math.exp(sum(v) / len(v)):.3f}" for op, v in logs.items()))
    print("results bit-identical: " + ("all" if identical else "NOT all (marked *)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

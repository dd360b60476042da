"""Per-call cost of the op on a tiny input, where the kernels take a few microseconds and what
a call costs is the route to them: checks, dispatch, the autograd node, the backward's calls.

The input is x (1, 16, 7, 7), a per-pixel w (1, 1, 9, 7, 7), K = 3, on one thread; the times
are medians over rounds of many calls, for a forward without gradient and for a forward +
backward (``aggregate(x, w).sum().backward()``, x and w both needing a gradient).

With ``--base REV`` the same measurement runs, alternately, in subprocesses on a checkout of
revision REV (a temporary git worktree, its native library built in a directory of its own)
and on the working tree, so both sides are timed in one run on one machine:

    python benchmarks/call_overhead.py                  # the working tree only
    python benchmarks/call_overhead.py --base 6280675   # before/after, with the ratio
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure(calls: int, rounds: int) -> dict:
    """Median microseconds per call of the forward and of the forward + backward."""
    import torch

    import tokenmix
    from tokenmix.ops import Window, aggregate

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 7, 7, generator=g)
    w = torch.randn(1, 1, 9, 7, 7, generator=g)
    win = Window(3)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()

    def forward():
        aggregate(x, w, win)

    def forward_backward():
        aggregate(xr, wr, win).sum().backward()

    out = {"tokenmix": os.path.dirname(tokenmix.__file__)}
    for name, f, n in (("forward_us", forward, calls), ("forward_backward_us", forward_backward, calls // 4)):
        for _ in range(n // 10 + 1):
            f()
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            for _ in range(n):
                f()
            times.append((time.perf_counter() - t0) / n * 1e6)
        out[name] = statistics.median(times)
    return out


def run_in(tree: str, ext_dir: str, calls: int, rounds: int) -> dict:
    """:func:`measure` in a subprocess that imports tokenmix from ``tree``."""
    env = dict(os.environ, PYTHONPATH=tree, TORCH_EXTENSIONS_DIR=ext_dir, OMP_NUM_THREADS="1")
    code = (f"import sys, json; sys.path.insert(0, {os.path.join(ROOT, 'benchmarks')!r}); "
            f"import call_overhead as c; print(json.dumps(c.measure({calls}, {rounds})))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tree, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"error: the measurement in {tree} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if os.path.realpath(result["tokenmix"]) != os.path.realpath(os.path.join(tree, "tokenmix")):
        raise SystemExit(f"error: the measurement in {tree} imported tokenmix from {result['tokenmix']}")
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default=None, help="git revision to compare against (run alternately in subprocesses)")
    ap.add_argument("--calls", type=int, default=4000, help="calls per timed round of the forward (default 4000)")
    ap.add_argument("--rounds", type=int, default=9, help="timed rounds per process (default 9)")
    ap.add_argument("--pairs", type=int, default=3, help="alternated (base, working tree) process pairs (default 3)")
    args = ap.parse_args(argv)
    if args.base is None:
        r = measure(args.calls, args.rounds)
        print(f"forward {r['forward_us']:.1f} us, forward+backward {r['forward_backward_us']:.1f} us "
              f"(one thread, x (1, 16, 7, 7), K=3)")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        base_tree = os.path.join(tmp, "base")
        subprocess.run(["git", "worktree", "add", "--detach", base_tree, args.base], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            sides = {"base": (base_tree, os.path.join(tmp, "ext-base")),
                     "working tree": (ROOT, os.environ.get("TORCH_EXTENSIONS_DIR", os.path.join(tmp, "ext-new")))}
            runs = {k: [] for k in sides}
            for _ in range(args.pairs):
                for k, (tree, ext) in sides.items():
                    runs[k].append(run_in(tree, ext, args.calls, args.rounds))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", base_tree], cwd=ROOT, capture_output=True)
    print(f"median us per call, one thread, x (1, 16, 7, 7), K=3; {args.pairs} processes per side, alternated")
    print("| side | forward | forward+backward |")
    print("|---|---|---|")
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("forward_us", "forward_backward_us")}
           for k, v in runs.items()}
    for k in sides:
        print(f"| {k if k != 'base' else 'base ' + args.base} | {med[k]['forward_us']:.1f} | "
              f"{med[k]['forward_backward_us']:.1f} |")
    print(f"| working tree / base | {med['working tree']['forward_us'] / med['base']['forward_us']:.2f} | "
          f"{med['working tree']['forward_backward_us'] / med['base']['forward_backward_us']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

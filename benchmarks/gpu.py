"""GPU benchmark of the Triton backend (needs a CUDA device; exits cleanly without one).

For the four RedNet-50 stage shapes (K=7) it times, with ``triton.testing.do_bench`` (median
of the kernel time, CUDA events), in one run:

* involution (per-pixel weights, G = C/16): ``aggregate`` forward and forward + backward on
  the ``triton`` backend, the ``reference`` backend and a plain ``F.unfold`` implementation;
* depthwise convolution (static (1, C, K*K, 1, 1) weights, G = C): ``aggregate`` on
  ``triton`` vs ``F.conv2d(groups=C)`` (cuDNN) vs ``F.unfold``;
* neighborhood attention (clamp border, G = C/32 heads): ``correlate`` then ``aggregate`` on
  ``triton`` vs ``reference`` (no unfold form exists for the clamp border);
* SASA local attention (zero border, 8 heads, relative position bias): the fused
  ``local_attention`` (dispatched: its Triton kernel where the backend has one, else the
  reference composition), forward and forward + backward, in the "triton" column, against the
  composed correlate + bias + softmax + aggregate on the ``triton`` backend in the "ref" column
  (so ref/triton = composed / fused);
* the fused ``aggregate_linear`` (RedNet's generator: M = C/4 features, G = C/16), forward and
  forward + backward on ``triton`` against its composed form on the same backend (the kernel
  materialised by a 1x1 convolution, then ``aggregate``): the "composed/fused" column;
* the backward of ``local_attention`` alone (SASA: zero border; neighborhood attention: clamp
  border; both with a relative position table), from the tensors its forward saved: the
  backend's fused backward against its composition of the primitives, "composed/fused";
and the machine's own ceiling: the device-to-device copy bandwidth (best of a 256 MiB copy,
read + write bytes), from which each triton time gets ``ceiling = bytes / bandwidth`` where
bytes is what the op must at least read and write once. It prints ratios (other / triton,
and ceiling / triton, 1.0 = at the copy bandwidth), never bare times alone, and writes
``gpu.json`` and ``gpu.csv`` to ``--out``.

    python benchmarks/gpu.py                    # float32 and bfloat16, batch 32
    python benchmarks/gpu.py --dtypes float16 --batch 64
    python benchmarks/gpu.py --smoke            # plumbing check on the CPU: tiny shapes, the
                                                # reference backend stands in for triton
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from tokenmix.ops import Window, aggregate, aggregate_linear, correlate, local_attention
from tokenmix.ops.backends import get_backend

SHAPES = [(64, 56), (128, 28), (256, 14), (512, 7)]  # (C, H=W): RedNet-50 stages
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def unfold_aggregate(x: torch.Tensor, w: torch.Tensor, window: Window) -> torch.Tensor:
    """aggregate through ``F.unfold`` (zero border): materialises the K*K-times copy of x."""
    B, C, H, W = x.shape
    G = w.shape[1]
    Ho, Wo = window.output_size(H, W)
    cols = F.unfold(x, window.kernel_size, dilation=window.dilation, padding=window.padding, stride=window.stride)
    cols = cols.view(B, G, C // G, window.taps, Ho, Wo)
    return (cols * w.unsqueeze(2)).sum(3).view(B, C, Ho, Wo)


def make_timer(smoke: bool) -> Callable[[Callable[[], object]], float]:
    if smoke:
        def bench(fn):
            fn()
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3
        return bench
    from triton.testing import do_bench

    def bench(fn):
        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    return bench


def copy_bandwidth(bench, device, smoke: bool) -> float:
    """Best device copy bandwidth in bytes/s (read + write)."""
    n = (1 << 16) if smoke else (256 << 20) // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = min(bench(lambda: dst.copy_(src)) for _ in range(3))
    return 2 * src.numel() * 4 / (ms * 1e-3)


def fwd_bwd(fn, *inputs):
    """A callable running fn forward and backward (grads of every input)."""
    ins = [t.detach().clone().requires_grad_(True) for t in inputs]

    def run():
        out = fn(*ins)
        out.backward(torch.ones_like(out))
        for t in ins:
            t.grad = None
    return run


def nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=sorted(DTYPES))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--smoke", action="store_true", help="CPU plumbing check, reference backend as 'triton'")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)

    if args.smoke:
        device, be, B, shapes = "cpu", "reference", 1, [(16, 9), (32, 7)]
    else:
        if not torch.cuda.is_available():
            print("benchmarks/gpu.py: no CUDA device (torch.cuda.is_available() is False); nothing to time. "
                  "The static figures come from benchmarks/triton_resources.py.")
            return 0
        why = get_backend("triton").unavailable_reason()
        if why:
            print(f"benchmarks/gpu.py: the triton backend is unavailable ({why})")
            return 1
        device, be, B, shapes = "cuda", "triton", args.batch, SHAPES
    bench = make_timer(args.smoke)
    bw = copy_bandwidth(bench, device, args.smoke)
    name = "cpu (smoke)" if args.smoke else torch.cuda.get_device_name()
    print(f"device: {name}; copy bandwidth {bw / 1e9:.0f} GB/s; batch {B}; K=7")
    rows: List[Dict] = []
    head = f"{'case':<28} {'dtype':<9} {'C':>4} {'HxW':>6} {'triton/ceiling':>15} {'ref/triton':>11} " \
           f"{'unfold/triton':>14} {'conv2d/triton':>14} {'composed/fused':>15}"
    print(head)
    print("-" * len(head))
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, dtype):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    for dn in args.dtypes:
        dt = DTYPES[dn]
        for C, H in shapes:
            zero, clamp = Window(7), Window(7, border="clamp")
            x = rnd(B, C, H, H, dtype=dt)
            # involution: G = C/16, per-pixel weights
            G = max(1, C // 16)
            w = rnd(B, G, 49, H, H, dtype=dt)
            cases = {
                "involution fwd": dict(
                    triton=lambda: aggregate(x, w, zero, backend=be),
                    ref=lambda: aggregate(x, w, zero, backend="reference"),
                    unfold=lambda: unfold_aggregate(x, w, zero),
                    bytes=nbytes(x, w, x)),
                "involution fwd+bwd": dict(
                    triton=fwd_bwd(lambda a, b: aggregate(a, b, zero, backend=be), x, w),
                    ref=fwd_bwd(lambda a, b: aggregate(a, b, zero, backend="reference"), x, w),
                    unfold=fwd_bwd(lambda a, b: unfold_aggregate(a, b, zero), x, w),
                    bytes=3 * nbytes(x, w, x)),
            }
            # depthwise conv: static weights, G = C
            wd = rnd(1, C, 49, 1, 1, dtype=dt)
            wc = wd.view(C, 1, 7, 7)
            cases["depthwise fwd"] = dict(
                triton=lambda: aggregate(x, wd, zero, backend=be),
                ref=lambda: aggregate(x, wd, zero, backend="reference"),
                unfold=lambda: unfold_aggregate(x, wd, zero),
                conv2d=lambda: F.conv2d(x, wc, padding=3, groups=C),
                bytes=nbytes(x, x))
            cases["depthwise fwd+bwd"] = dict(
                triton=fwd_bwd(lambda a, b: aggregate(a, b, zero, backend=be), x, wd),
                ref=fwd_bwd(lambda a, b: aggregate(a, b, zero, backend="reference"), x, wd),
                unfold=fwd_bwd(lambda a, b: unfold_aggregate(a, b, zero), x, wd),
                conv2d=fwd_bwd(lambda a, b: F.conv2d(a, b, padding=3, groups=C), x, wc),
                bytes=3 * nbytes(x, x))
            # neighborhood attention (clamp border): logits = correlate(q, k), out = aggregate(v, attn)
            heads = max(1, C // 32)
            q, k = rnd(B, C, H, H, dtype=dt), rnd(B, C, H, H, dtype=dt)

            def na(backend, q=q, k=k, x=x, heads=heads):
                a = correlate(q, k, clamp, heads, backend=backend).softmax(2)
                return aggregate(x, a, clamp, backend=backend)
            cases["neighborhood attn fwd"] = dict(
                triton=lambda: na(be), ref=lambda: na("reference"),
                bytes=nbytes(q, k, x, x) + 3 * B * heads * 49 * H * H * x.element_size())
            # SASA local attention: fused local_attention vs the composed form on the backend
            la_heads = 8 if C % 8 == 0 else 1
            rel = 0.02 * rnd(la_heads, 13, 13, dtype=dt)
            v = rnd(B, C, H, H, dtype=dt)

            def la_fused(q, k, v, rel, heads=la_heads):
                return local_attention(q, k, v, zero, heads, rel_pos=rel)

            def la_composed(q, k, v, rel, heads=la_heads, backend=be):
                s = correlate(q * (C // heads) ** -0.5, k, zero, heads, backend=backend)
                idx = torch.arange(7, device=q.device) + 3  # zero border: one table entry per tap
                b = rel[:, idx[:, None], idx[None, :]].reshape(1, heads, 49, 1, 1)
                return aggregate(v, (s + b).softmax(2), zero, backend=backend)
            cases["local attn fwd (fused)"] = dict(
                triton=lambda: la_fused(q, k, v, rel), ref=lambda: la_composed(q, k, v, rel),
                bytes=nbytes(q, k, v, x))
            cases["local attn fwd+bwd (fused)"] = dict(
                triton=fwd_bwd(la_fused, q, k, v, rel), ref=fwd_bwd(la_composed, q, k, v, rel),
                bytes=3 * nbytes(q, k, v, x))
            # the backward alone, on the tensors the forward saved: the backend's fused backward
            # against its composition of the primitives (the "composed/fused" column); SASA
            # (zero border, table) and neighborhood attention (clamp border, table)
            bk = get_backend(be)
            for label, win, hh in (("local attn bwd", zero, la_heads), ("neighborhood attn bwd", clamp, heads)):
                sc = (C // hh) ** -0.5
                tab = 0.02 * rnd(hh, 13, 13, dtype=dt)
                o_, l_ = bk.local_attention(q, k, v, tab, hh, sc, win)
                bargs = (rnd(*o_.shape, dtype=dt), q, k, v, tab, o_, l_, hh, sc, win)
                composed_bwd = bk._composed().local_attention_backward if hasattr(bk, "_composed") else bk.local_attention_backward
                cases[label] = dict(
                    triton=lambda bargs=bargs: bk.local_attention_backward(*bargs),
                    composed=lambda bargs=bargs, f=composed_bwd: f(*bargs),
                    bytes=2 * nbytes(q, k, v, x) + B * hh * H * H * 4)
            # the fused op vs its composed form (kernel by a 1x1 convolution, then aggregate)
            M = max(1, C // 4)
            h = rnd(B, M, H, H, dtype=dt)
            lw, lb = rnd(G * 49, M, dtype=dt) * M ** -0.5, rnd(G * 49, dtype=dt)

            def composed(a, hh, ww, bb, G=G, H=H):
                kernel = F.conv2d(hh, ww[:, :, None, None], bb).view(a.shape[0], G, 49, H, H)
                return aggregate(a, kernel, zero, backend=be)

            def fused(a, hh, ww, bb):
                return aggregate_linear(a, hh, ww, bb, zero, backend=be)
            cases["aggregate_linear fwd"] = dict(
                triton=lambda: fused(x, h, lw, lb), composed=lambda: composed(x, h, lw, lb),
                bytes=nbytes(x, h, x))
            cases["aggregate_linear fwd+bwd"] = dict(
                triton=fwd_bwd(fused, x, h, lw, lb), composed=fwd_bwd(composed, x, h, lw, lb),
                bytes=3 * nbytes(x, h, x))
            for case, c in cases.items():
                t = bench(c["triton"])
                row = dict(case=case, dtype=dn, C=C, H=H, W=H, batch=B, triton_ms=t,
                           ceiling_ms=c["bytes"] / bw * 1e3)
                for other in ("ref", "unfold", "conv2d", "composed"):
                    if other in c:
                        row[f"{other}_ms"] = bench(c[other])
                rows.append(row)

                def ratio(key):
                    return f"{row[key] / t:.2f}" if key in row else "-"
                print(f"{case:<28} {dn:<9} {C:>4} {f'{H}x{H}':>6} {row['ceiling_ms'] / t:>15.2f} "
                      f"{ratio('ref_ms'):>11} {ratio('unfold_ms'):>14} {ratio('conv2d_ms'):>14} "
                      f"{ratio('composed_ms'):>15}", flush=True)
    if args.smoke:
        return 0
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu.json"), "w") as f:
        json.dump(dict(device=name, copy_bandwidth=bw, rows=rows), f, indent=1)
    keys = sorted({k for r in rows for k in r})
    with open(os.path.join(args.out, "gpu.csv"), "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=keys)
        wr.writeheader()
        wr.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

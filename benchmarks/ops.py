"""Benchmark of the aggregation op on the CPU against the machine's own ceiling.

For the four RedNet-50 stage shapes (K=7, stride 1 and 2) it measures, in one run:

* the machine: memory bandwidth (best copy of a 256 MiB float32 tensor, read + write bytes)
  and float32 matmul rate (best ``torch.matmul`` of two 2048 x 2048 matrices), at the start,
  between the timing rounds and at the end of the run; the best is used (so the ceiling is
  the fastest the machine showed, which makes the ratios conservative);
* per shape, the ceiling time = max(bytes / bandwidth, 2 * MACs / matmul rate), where
  forward ``aggregate`` must read x and w and write y, and forward + backward also runs
  ``aggregate_transpose`` (read gy, w; write gx) and ``correlate`` (read gy, x; write gw):
  3x the bytes and MACs of the forward;
* the best wall time of the ``cpu`` backend, the ``reference`` backend and a plain
  ``F.unfold`` implementation (forward, and forward + backward through autograd); the
  ``cpu`` backend is timed in ``--rounds`` rounds spread over the run (a shared machine has
  slow spells lasting seconds) and its best time is kept;
* the peak extra memory of each, two ways: exactly, as the peak of the running sum of the
  bytes the ATen CPU allocator hands out and takes back during the call (torch.profiler's
  memory events; results, autograd buffers and the C++ kernels' per-thread scratch are all
  allocated through it), and as a cross-check that nothing is allocated behind the
  allocator's back, the rise of the process' peak resident set (VmHWM, reset through
  /proc/self/clear_refs) above the resident set at the start of the call, with glibc told
  (mallopt) to mmap every allocation >= 64 KiB and to trim freed memory, so an allocation
  cannot hide in memory that was already resident. The RSS figure resolves only about
  +-0.25 MB per thread (the kernel updates RSS counters in per-thread batches), so it can
  read below the outputs' own size.

Prints a table of ratios and writes ``ops.json`` and ``ops.csv`` to ``--out``.

``--linear`` instead compares the fused ``aggregate_linear(x, h, weight, bias)`` with its
composed form (``w = conv1x1(h)`` materialised, then ``aggregate``) at the same stage shapes
with RedNet-50's generator (M = C/4 features, G = C/16 groups): best time of the forward and
of forward + backward (all four gradients), calls of the two interleaved, and the exact peak
of the allocator's bytes during each call (results and gradients included), next to the
bytes of the results and gradients themselves. Writes ``ops_linear.json``.

    python benchmarks/ops.py                # full run (a few minutes on 2 cores)
    python benchmarks/ops.py --linear --threads 1 --clock thread   # fused vs composed
    python benchmarks/ops.py --quick        # batch 2, fewer repeats, no unfold backward

``--attention`` instead benchmarks the fused ``local_attention`` against its composed form
(correlate + relative position bias + masked softmax + aggregate, as the attention mixers run
with ``fused=False``) at the SASA-ResNet-50 stage shapes (K=7, 8 heads, rel_pos; the stride-2
first block of stages 2-4) and a NAT-like clamp shape: best time forward and forward+backward
(in ``--rounds`` interleaved rounds) and the exact peak of the bytes held through the allocator
during the call (results and gradients included); writes ``ops_attention.json``.

    python benchmarks/ops.py --attention --threads 1 --clock thread
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import json
import math
import os
import platform
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from tokenmix.kernel_gen._position import masked_softmax, offset_index
from tokenmix.ops import Window, aggregate, aggregate_linear, correlate, local_attention
from tokenmix.ops.backends import cpu as cpu_backend

SHAPES = [(64, 56, 4), (128, 28, 8), (256, 14, 16), (512, 7, 32)]  # (C, H=W, G): RedNet-50 stages


# ------------------------------------------------------------------------------ memory
def _malloc_no_reuse() -> bool:
    """Ask glibc to mmap allocations >= 64 KiB and to give freed memory back at once."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, 64 * 1024)) and bool(libc.mallopt(-1, 0))  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
    except OSError:
        return False


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> Optional[int]:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status("VmRSS")
    except OSError:
        return None


# ------------------------------------------------------------------------------ timing
# wall: time.perf_counter. thread: time.thread_time, the CPU time of the calling thread,
# which excludes the time the scheduler gives to other processes; only meaningful with one
# thread (the kernels then run in the calling thread), and then used for the ceiling too.
CLOCK = {"fn": time.perf_counter}
# --cold: a 128 MiB buffer (four times a 32 MiB L3) is read before every timed call, so the
# call's operands come from memory, not from a cache that still holds them from the call
# before (back to back, the operands of the smaller stages fit in such an L3).
COLD = {"buf": None}


def best_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Best time of ``repeats`` calls after ``warmup`` calls (default allocator settings)."""
    for _ in range(warmup):
        fn()
    best = math.inf
    for _ in range(repeats):
        if COLD["buf"] is not None:
            COLD["buf"].sum()
        t0 = CLOCK["fn"]()
        out = fn()
        best = min(best, CLOCK["fn"]() - t0)
        del out
    return best


def peak_extra(fn: Callable[[], object]) -> int:
    """Peak resident memory a call adds (its results included), after one warm-up call.
    Run after ``_malloc_no_reuse()``; timings are taken before that, with glibc's defaults."""
    fn()
    base = _reset_peak()
    if base is None:
        return -1
    out = fn()
    peak = _status("VmHWM") - base
    del out
    return peak


def alloc_peak(fn: Callable[[], object]) -> Optional[int]:
    """Exact peak of the bytes held through the ATen CPU allocator during one call (its
    results included), after one warm-up call: the running sum of torch.profiler's memory
    events in time order. None where this torch's profiler does not expose them."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    try:
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except AttributeError:
        return None
    held = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        held += e.nbytes()
        peak = max(peak, held)
    return peak


def machine_rates(repeats: int = 5) -> Dict[str, float]:
    src = torch.ones(64 * 1024 * 1024)  # 256 MiB
    dst = torch.empty_like(src)
    dst.copy_(src)
    t_copy = min(_timed(lambda: dst.copy_(src)) for _ in range(repeats))
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)
    t_mm = min(_timed(lambda: torch.matmul(a, b)) for _ in range(repeats))
    return {"bandwidth": 2 * src.numel() * 4 / t_copy, "flops": 2 * n ** 3 / t_mm}


def _timed(fn) -> float:
    t0 = CLOCK["fn"]()
    fn()
    return CLOCK["fn"]() - t0


# ----------------------------------------------------------------------- implementations
def unfold_aggregate(x: torch.Tensor, w: torch.Tensor, window: Window) -> torch.Tensor:
    """The usual port: materialise the K*K shifted copies of x with F.unfold."""
    B, C, H, W = x.shape
    G, KK = w.shape[1], w.shape[2]
    Ho, Wo = window.output_size(H, W)
    cols = F.unfold(x, window.kernel_size, dilation=window.dilation, padding=window.padding, stride=window.stride)
    cols = cols.view(B, G, C // G, KK, Ho, Wo)
    return (cols * w.unsqueeze(2)).sum(3).view(B, C, Ho, Wo)


def _impl(name: str):
    if name == "unfold":
        return unfold_aggregate
    return lambda x, w, window: aggregate(x, w, window, backend=name)


def _fwd(f, x, w, window):
    def run():
        with torch.no_grad():
            return f(x, w, window)
    return run


def _fwdbwd(f, x, w, gy, window):
    def run():
        xr, wr = x.detach().requires_grad_(), w.detach().requires_grad_()
        f(xr, wr, window).backward(gy)
        return xr.grad, wr.grad
    return run


# ------------------------------------------------------------------------- local attention
# (C, H=W, stride, heads, border): SASA-ResNet-50's attention layers (the bottleneck widths; the
# first block of stages 2-4 has stride 2) and NAT-mini's first stage (clamp border, 2 heads)
ATTENTION_SHAPES = [(64, 56, 1, 8, "zero"), (128, 56, 2, 8, "zero"), (128, 28, 1, 8, "zero"),
                    (256, 28, 2, 8, "zero"), (256, 14, 1, 8, "zero"), (512, 14, 2, 8, "zero"),
                    (512, 7, 1, 8, "zero"), (64, 56, 1, 2, "clamp")]


def composed_attention(q, k, v, window, heads, scale, rel_pos):
    """The composed form the attention mixers run with fused=False."""
    H, W = k.shape[-2:]
    s = correlate(q * scale, k, window, heads)
    ri, ci = offset_index(window, H, W, device=k.device)
    b = rel_pos[:, ri[:, None, :, None], ci[None, :, None, :]]
    s = s + b.reshape(1, heads, window.taps, b.shape[-2], b.shape[-1])
    return aggregate(v, masked_softmax(s, window, H, W), window)


def fused_attention(q, k, v, window, heads, scale, rel_pos):
    return local_attention(q, k, v, window, heads, scale=scale, rel_pos=rel_pos)


def _attention_cases(batch):
    for (C, H, s, heads, border) in ATTENTION_SHAPES:
        window = Window(7, stride=s, border=border)
        Ho, Wo = window.output_size(H, H)
        g = torch.Generator().manual_seed(0)
        q = torch.randn(batch, C, Ho, Wo, generator=g)
        k, v = torch.randn(batch, C, H, H, generator=g), torch.randn(batch, C, H, H, generator=g)
        rel = 0.02 * torch.randn(heads, 13, 13, generator=g)
        gy = torch.randn(batch, C, Ho, Wo, generator=g)
        yield (C, H, s, heads, border), window, (q, k, v, rel), gy


def _attention_runs(f, inputs, gy, window, heads):
    q, k, v, rel = inputs
    scale = (q.shape[1] // heads) ** -0.5

    def fwd():
        with torch.no_grad():
            return f(q, k, v, window, heads, scale, rel)

    def fwdbwd():
        leaves = [t.detach().requires_grad_() for t in inputs]
        f(*leaves[:3], window, heads, scale, leaves[3]).backward(gy)
        return [t.grad for t in leaves]

    return fwd, fwdbwd


def attention_benchmark(batch: int, repeats: int, rounds: int) -> Dict[str, object]:
    impls = {"composed": composed_attention, "fused": fused_attention}
    cases = list(_attention_cases(batch))
    rows = [{"C": c[0], "H": c[1], "stride": c[2], "heads": c[3], "border": c[4], "B": batch} for c, *_ in cases]
    for _ in range(rounds):  # interleaved rounds: a slow spell of a shared machine hits both forms
        for row, (shape, window, inputs, gy) in zip(rows, cases):
            for name, f in impls.items():
                fwd, fwdbwd = _attention_runs(f, inputs, gy, window, shape[3])
                for mode, run in (("fwd", fwd), ("fwdbwd", fwdbwd)):
                    t = best_time(run, repeats, 1)
                    row[f"{name}_{mode}_s"] = min(row.get(f"{name}_{mode}_s", math.inf), t)
        print("  timed a round", file=sys.stderr, flush=True)
    for row, (shape, window, inputs, gy) in zip(rows, cases):
        for name, f in impls.items():
            fwd, fwdbwd = _attention_runs(f, inputs, gy, window, shape[3])
            row[f"{name}_fwd_alloc_peak"] = alloc_peak(fwd)
            row[f"{name}_fwdbwd_alloc_peak"] = alloc_peak(fwdbwd)
        q, k, v, rel = inputs
        row["out_bytes"] = q.numel() * 4
        row["grad_bytes"] = sum(t.numel() * 4 for t in inputs)
        for mode in ("fwd", "fwdbwd"):
            row[f"{mode}_fused_over_composed"] = row[f"fused_{mode}_s"] / row[f"composed_{mode}_s"]
    return {"rows": rows}


def summarise_attention(result: Dict[str, object]) -> str:
    rows = result["rows"]
    out = [f"local_attention, fused vs composed: threads {torch.get_num_threads()}; clock {result['meta']['clock']};"
           f" batch {rows[0]['B']}; K=7, rel_pos",
           "| shape (C@HxW, stride, heads, border) | fwd composed ms | fwd fused ms | fused/composed "
           "| f+b composed ms | f+b fused ms | fused/composed | f+b peak composed MiB | f+b peak fused MiB "
           "| out + grads MiB |",
           "|" + "---|" * 10]
    mib = 2 ** 20
    for r in rows:
        out.append(f"| {r['C']}@{r['H']}x{r['H']}, s={r['stride']}, {r['heads']}, {r['border']} "
                   f"| {r['composed_fwd_s'] * 1e3:.1f} | {r['fused_fwd_s'] * 1e3:.1f} | {r['fwd_fused_over_composed']:.2f} "
                   f"| {r['composed_fwdbwd_s'] * 1e3:.1f} | {r['fused_fwdbwd_s'] * 1e3:.1f} "
                   f"| {r['fwdbwd_fused_over_composed']:.2f} "
                   f"| {(r['composed_fwdbwd_alloc_peak'] or 0) / mib:.1f} | {(r['fused_fwdbwd_alloc_peak'] or 0) / mib:.1f} "
                   f"| {(r['out_bytes'] + r['grad_bytes']) / mib:.1f} |")
    tot_c = sum(r["composed_fwdbwd_s"] for r in rows if r["border"] == "zero")
    tot_f = sum(r["fused_fwdbwd_s"] for r in rows if r["border"] == "zero")
    out.append("")
    out.append(f"SASA-ResNet-50 shapes, forward+backward summed once per shape: composed {tot_c * 1e3:.1f} ms, "
               f"fused {tot_f * 1e3:.1f} ms ({tot_f / tot_c:.2f})")
    return "\n".join(out)


# --------------------------------------------------------------------------------- main
def _cases(batch, kernel, strides):
    for (C, H, G) in SHAPES:
        for s in strides:
            window = Window(kernel, stride=s)
            Ho, Wo = window.output_size(H, H)
            g = torch.Generator().manual_seed(0)
            x = torch.randn(batch, C, H, H, generator=g)
            w = torch.randn(batch, G, window.taps, Ho, Wo, generator=g)
            gy = torch.randn(batch, C, Ho, Wo, generator=g)
            yield C, H, G, s, window, x, w, gy


def run_benchmark(batch: int, kernel: int, strides: List[int], repeats: int, slow_repeats: int,
                  impls: List[str], unfold_backward: bool, rounds: int = 3) -> Dict[str, object]:
    rates0 = machine_rates()
    rows = []
    cases = list(_cases(batch, kernel, strides))
    for (C, H, G, s, window, x, w, gy) in cases:
        if True:
            Ho, Wo = window.output_size(H, H)
            KK = window.taps
            nx, nw, ny = x.numel() * 4, w.numel() * 4, gy.numel() * 4
            macs = batch * C * Ho * Wo * KK
            row = {"C": C, "H": H, "G": G, "K": kernel, "stride": s, "B": batch, "Ho": Ho,
                   "x_bytes": nx, "w_bytes": nw, "y_bytes": ny, "macs": macs,
                   "fwd_bytes": nx + nw + ny, "fwdbwd_bytes": 3 * (nx + nw + ny),
                   "fwd_limit_bytes": ny + nw, "fwdbwd_limit_bytes": ny + nx + nw}
            for name in impls:
                f = _impl(name)
                n = repeats if name == "cpu" else slow_repeats
                warm = 1 if name == "cpu" else 0
                row[f"{name}_fwd_s"] = best_time(_fwd(f, x, w, window), n, warm)
                if name != "unfold" or unfold_backward:
                    row[f"{name}_fwdbwd_s"] = best_time(_fwdbwd(f, x, w, gy, window), n, warm)
            rows.append(row)
            print(f"  timed C={C} H={H} stride={s}", file=sys.stderr, flush=True)
    # a shared machine has slow spells lasting seconds: the cpu backend is timed again in
    # further rounds spread over the run, with the machine's rates measured between them, and
    # the best of every round is kept (for the kernels and for the ceiling alike)
    rates_mid = []
    if "cpu" in impls:
        f = _impl("cpu")
        for _ in range(rounds - 1):
            rates_mid.append(machine_rates())
            for row, (C, H, G, s, window, x, w, gy) in zip(rows, cases):
                row["cpu_fwd_s"] = min(row["cpu_fwd_s"], best_time(_fwd(f, x, w, window), repeats, 1))
                row["cpu_fwdbwd_s"] = min(row["cpu_fwdbwd_s"], best_time(_fwdbwd(f, x, w, gy, window), repeats, 1))
            print("  timed cpu again", file=sys.stderr, flush=True)
    rates1 = machine_rates()
    # memory pass in a fresh process whose glibc mmaps every allocation >= 64 KiB (timings
    # above use glibc's defaults, which recycle freed memory as a long-running job would)
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-only", "--batch", str(batch), "--kernel", str(kernel),
           "--threads", str(torch.get_num_threads()), "--strides", *map(str, strides), "--impls", *impls]
    if not unfold_backward:
        cmd.append("--no-unfold-backward")
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    peaks = json.loads(proc.stdout.strip().splitlines()[-1])
    malloc_ok = peaks.pop("malloc_no_reuse")
    for row, p in zip(rows, peaks["rows"]):
        row.update(p)
    bw = max(r["bandwidth"] for r in [rates0, rates1] + rates_mid)
    fl = max(r["flops"] for r in [rates0, rates1] + rates_mid)
    for row in rows:
        for mode, k in (("fwd", 1), ("fwdbwd", 3)):
            ceil = max(row[f"{mode}_bytes"] / bw, 2 * k * row["macs"] / fl)
            row[f"{mode}_ceiling_s"] = ceil
            row[f"{mode}_bound"] = "memory" if row[f"{mode}_bytes"] / bw >= 2 * k * row["macs"] / fl else "compute"
            if "cpu" in impls:
                row[f"{mode}_cpu_over_ceiling"] = row[f"cpu_{mode}_s"] / ceil
                row[f"{mode}_peak_over_limit"] = row[f"cpu_{mode}_peak"] / row[f"{mode}_limit_bytes"]
                alloc = row.get(f"cpu_{mode}_alloc_peak")
                if alloc is not None:
                    row[f"{mode}_alloc_over_limit"] = alloc / row[f"{mode}_limit_bytes"]
                    row[f"{mode}_alloc_beyond_limit_bytes"] = alloc - row[f"{mode}_limit_bytes"]
                for other in ("reference", "unfold"):
                    if f"{other}_{mode}_s" in row:
                        row[f"{mode}_{other}_over_cpu"] = row[f"{other}_{mode}_s"] / row[f"cpu_{mode}_s"]
    return {"rows": rows, "rates_start": rates0, "rates_between": rates_mid, "rates_end": rates1, "bandwidth": bw, "flops": fl,
            "malloc_no_reuse": malloc_ok}


def memory_pass(batch, kernel, strides, impls, unfold_backward) -> Dict[str, object]:
    malloc_ok = _malloc_no_reuse()
    out = []
    for (C, H, G, s, window, x, w, gy) in _cases(batch, kernel, strides):
        row = {}
        for name in impls:
            f = _impl(name)
            row[f"{name}_fwd_peak"] = peak_extra(_fwd(f, x, w, window))
            row[f"{name}_fwd_alloc_peak"] = alloc_peak(_fwd(f, x, w, window))
            if name != "unfold" or unfold_backward:
                row[f"{name}_fwdbwd_peak"] = peak_extra(_fwdbwd(f, x, w, gy, window))
                row[f"{name}_fwdbwd_alloc_peak"] = alloc_peak(_fwdbwd(f, x, w, gy, window))
        out.append(row)
        print(f"  memory C={C} H={H} stride={s}", file=sys.stderr, flush=True)
    return {"rows": out, "malloc_no_reuse": malloc_ok}


def _geomean(vals):
    vals = [v for v in vals if v is not None]
    return math.exp(sum(math.log(v) for v in vals) / len(vals)) if vals else float("nan")


def summarise(result: Dict[str, object]) -> str:
    rows = result["rows"]
    out = []
    out.append(f"machine: bandwidth {result['bandwidth'] / 1e9:.1f} GB/s (start {result['rates_start']['bandwidth'] / 1e9:.1f},"
               f" end {result['rates_end']['bandwidth'] / 1e9:.1f}); fp32 matmul {result['flops'] / 1e9:.1f} GFLOP/s"
               f" (start {result['rates_start']['flops'] / 1e9:.1f}, end {result['rates_end']['flops'] / 1e9:.1f});"
               f" threads {torch.get_num_threads()}; clock {result['meta']['clock']}; batch {rows[0]['B']}"
               + ("; cold caches" if result["meta"]["cold"] else ""))
    hdr = ("| shape (C@HxW, G, stride) | bound | fwd cpu/ceil | fwd ref/cpu | fwd unfold/cpu | fwd peak/limit |"
           " f+b cpu/ceil | f+b ref/cpu | f+b unfold/cpu | f+b peak/limit |")
    out.append(hdr)
    out.append("|" + "---|" * 10)

    def fmt(row, key, spec=".2f"):
        v = row.get(key)
        return "-" if v is None else format(v, spec)

    for r in rows:
        out.append(f"| {r['C']}@{r['H']}x{r['H']}, G={r['G']}, s={r['stride']} | {r['fwd_bound']} "
                   f"| {fmt(r, 'fwd_cpu_over_ceiling')} | {fmt(r, 'fwd_reference_over_cpu', '.0f')} "
                   f"| {fmt(r, 'fwd_unfold_over_cpu', '.0f')} | {fmt(r, 'fwd_alloc_over_limit', '.3f')} "
                   f"| {fmt(r, 'fwdbwd_cpu_over_ceiling')} | {fmt(r, 'fwdbwd_reference_over_cpu', '.0f')} "
                   f"| {fmt(r, 'fwdbwd_unfold_over_cpu', '.0f')} | {fmt(r, 'fwdbwd_alloc_over_limit', '.3f')} |")
    gf = _geomean([r.get("fwd_cpu_over_ceiling") for r in rows])
    gb = _geomean([r.get("fwdbwd_cpu_over_ceiling") for r in rows])
    unf = [r.get("fwd_unfold_over_cpu") for r in rows if r.get("fwd_unfold_over_cpu")]
    unb = [r.get("fwdbwd_unfold_over_cpu") for r in rows if r.get("fwdbwd_unfold_over_cpu")]
    pk = [r[f"{m}_peak_over_limit"] for r in rows for m in ("fwd", "fwdbwd") if f"{m}_peak_over_limit" in r]
    exact = [r[f"{m}_alloc_over_limit"] for r in rows for m in ("fwd", "fwdbwd") if f"{m}_alloc_over_limit" in r]
    beyond = [r["fwdbwd_alloc_beyond_limit_bytes"] for r in rows if "fwdbwd_alloc_beyond_limit_bytes" in r]
    out.append("")
    out.append(f"geometric mean cpu/ceiling: forward {gf:.2f} (target <= 2), forward+backward {gb:.2f} (target <= 3)")
    if unf:
        out.append(f"unfold/cpu: forward min {min(unf):.0f} geomean {_geomean(unf):.0f}"
                   + (f"; forward+backward min {min(unb):.0f} geomean {_geomean(unb):.0f}" if unb else "")
                   + " (target >= 50)")
    if exact:
        out.append(f"cpu peak extra memory / limit (allocator, exact; the table's peak/limit columns): max {max(exact):.3f}"
                   f" (target <= 1; limit = output + weight-gradient bytes for the forward, y + gx + gw bytes for"
                   f" forward+backward)" + (f"; forward+backward beyond the limit: at most {max(beyond)} bytes"
                                            if beyond and max(beyond) > 0 else ""))
    if pk:
        out.append(f"cpu peak extra memory / limit (resident set, +-0.25 MB per thread): max {max(pk):.2f}")
    return "\n".join(out)


def composed_linear(x, h, weight, bias, window):
    """aggregate_linear's composed form: the kernel materialised by a 1x1 convolution."""
    B, _, Ho, Wo = h.shape
    w = F.conv2d(h, weight[:, :, None, None], bias)
    return aggregate(x, w.view(B, weight.shape[0] // window.taps, window.taps, Ho, Wo), window)


def linear_benchmark(batch: int, kernel: int, strides: List[int], repeats: int) -> Dict[str, object]:
    """Fused aggregate_linear against its composed form at the RedNet-50 stage shapes."""
    rows = []
    impls = {"fused": lambda *a: aggregate_linear(*a), "composed": composed_linear}
    for (C, H, G) in SHAPES:
        for s in strides:
            window = Window(kernel, stride=s)
            Ho, Wo = window.output_size(H, H)
            M = C // 4
            g = torch.Generator().manual_seed(0)
            x = torch.randn(batch, C, H, H, generator=g)
            h = torch.randn(batch, M, Ho, Wo, generator=g)
            weight = torch.randn(G * window.taps, M, generator=g) * M ** -0.5
            bias = torch.randn(G * window.taps, generator=g)
            gy = torch.randn(batch, C, Ho, Wo, generator=g)

            def fwd(f):
                def run():
                    with torch.no_grad():
                        return f(x, h, weight, bias, window)
                return run

            def fwdbwd(f):
                def run():
                    ins = [t.detach().requires_grad_() for t in (x, h, weight, bias)]
                    f(*ins, window).backward(gy)
                    return [t.grad for t in ins]
                return run

            row = {"C": C, "H": H, "G": G, "M": M, "stride": s}
            for kind, make in (("fwd", fwd), ("fwdbwd", fwdbwd)):
                fns = {n: make(f) for n, f in impls.items()}
                for fn in fns.values():
                    fn()
                best = {n: math.inf for n in fns}
                order = list(fns)
                for r in range(repeats):  # interleaved (a slow spell hits both), in turn first
                    for n in (order if r % 2 == 0 else order[::-1]):
                        best[n] = min(best[n], _timed(fns[n]))
                for n in fns:
                    row[f"{kind}_{n}_s"] = best[n]
                    row[f"{kind}_{n}_peak_bytes"] = alloc_peak(fns[n])
                row[f"{kind}_ratio"] = best["fused"] / best["composed"]
            out_bytes = 4 * batch * C * Ho * Wo
            grad_bytes = 4 * (x.numel() + h.numel() + weight.numel() + bias.numel())
            row["fwd_result_bytes"], row["fwdbwd_result_bytes"] = out_bytes, grad_bytes + out_bytes
            row["kernel_bytes"] = 4 * batch * G * window.taps * Ho * Wo
            rows.append(row)
    return {"rows": rows}


def summarise_linear(result: Dict[str, object]) -> str:
    mb = 2 ** 20
    lines = ["aggregate_linear (fused) vs composed (conv1x1 kernel + aggregate); time ratio fused/composed; "
             "peak = allocator peak during the call (MB), results = outputs (+ gradients)",
             f"{'C':>4} {'H':>3} {'s':>1} | {'fwd ratio':>9} {'peak f/c':>13} {'res':>5} | "
             f"{'fwd+bwd ratio':>13} {'peak f/c':>13} {'res':>5} | {'kernel':>6}"]
    for r in result["rows"]:
        def pk(kind):
            a, b = r[f"{kind}_fused_peak_bytes"], r[f"{kind}_composed_peak_bytes"]
            return f"{a / mb:6.1f}/{b / mb:6.1f}" if a is not None and b is not None else "n/a"
        lines.append(f"{r['C']:>4} {r['H']:>3} {r['stride']:>1} | {r['fwd_ratio']:>9.2f} {pk('fwd'):>13} "
                     f"{r['fwd_result_bytes'] / mb:5.1f} | {r['fwdbwd_ratio']:>13.2f} {pk('fwdbwd'):>13} "
                     f"{r['fwdbwd_result_bytes'] / mb:5.1f} | {r['kernel_bytes'] / mb:6.1f}")
    fw = [r["fwd_ratio"] for r in result["rows"]]
    fb = [r["fwdbwd_ratio"] for r in result["rows"]]
    lines.append(f"geomean time ratio fused/composed: forward {_geomean(fw):.2f}, forward+backward {_geomean(fb):.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--kernel", type=int, default=7)
    ap.add_argument("--strides", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=7, help="timed calls of the cpu backend (best is kept)")
    ap.add_argument("--slow-repeats", type=int, default=2, help="timed calls of reference and unfold")
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds of cpu timings spread over the run, machine rates measured between them")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--clock", choices=["wall", "thread"], default="wall",
                    help="wall time, or the calling thread's CPU time (needs --threads 1; robust on a shared machine)")
    ap.add_argument("--cold", action="store_true",
                    help="read a 128 MiB buffer before every timed call: operands come from memory, not a warm cache")
    ap.add_argument("--impls", nargs="+", default=["cpu", "reference", "unfold"])
    ap.add_argument("--no-unfold-backward", action="store_true")
    ap.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--attention", action="store_true",
                    help="benchmark the fused local_attention against its composed form instead")
    ap.add_argument("--quick", action="store_true", help="batch 2, 3 repeats, 1 slow repeat, no unfold backward")
    ap.add_argument("--linear", action="store_true",
                    help="aggregate_linear (fused) against its composed form instead (writes ops_linear.json)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.repeats, args.slow_repeats, args.no_unfold_backward, args.rounds = 2, 3, 1, True, 1
    if args.clock == "thread":
        if args.threads != 1:
            ap.error("--clock thread needs --threads 1")
        CLOCK["fn"] = time.thread_time
    if args.cold:
        COLD["buf"] = torch.zeros(32 * 1024 * 1024)
    torch.set_num_threads(args.threads)
    if args.memory_only:  # internal: the memory pass, run in its own process
        print(json.dumps(memory_pass(args.batch, args.kernel, args.strides, args.impls, not args.no_unfold_backward)))
        return 0
    if args.attention or args.linear:  # a fused op against its composed form
        if args.attention:
            name, result = "attention", attention_benchmark(args.batch, args.repeats, max(1, args.rounds))
        else:
            name, result = "linear", linear_benchmark(args.batch, args.kernel, args.strides, args.repeats)
        result["meta"] = {"torch": torch.__version__, "threads": torch.get_num_threads(), "clock": args.clock,
                          "processor": platform.processor(), "machine": platform.machine(),
                          "argv": sys.argv[1:], "loadavg": os.getloadavg()}
        text = (summarise_attention if args.attention else summarise_linear)(result)
        result["summary"] = text
        print(text)
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"ops_{name}.json")
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {path}")
        return 0
    t0 = time.perf_counter()
    reason = cpu_backend.CpuBackend().unavailable_reason()
    load_s = time.perf_counter() - t0
    if reason and "cpu" in args.impls:
        print(f"cpu backend unavailable: {reason}", file=sys.stderr)
        return 1
    result = run_benchmark(args.batch, args.kernel, args.strides, args.repeats, args.slow_repeats, args.impls,
                           not args.no_unfold_backward, max(1, args.rounds))
    result["meta"] = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
                      "processor": platform.processor(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                      "cpu_backend_load_s": load_s, "clock": args.clock, "cold": args.cold, "argv": sys.argv[1:],
                      "loadavg": os.getloadavg()}
    text = summarise(result)
    result["summary"] = text
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "ops.json"), "w") as f:
        json.dump(result, f, indent=1)
    keys = sorted({k for r in result["rows"] for k in r})
    with open(os.path.join(args.out, "ops.csv"), "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=keys)
        wr.writeheader()
        wr.writerows(result["rows"])
    print(f"wrote {os.path.join(args.out, 'ops.json')} and ops.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())

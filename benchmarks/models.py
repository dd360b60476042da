"""RedNet vs ResNet on the CPU: inference latency, training-step time and training memory.

For each pair (rednet50 vs resnet50, rednet26 vs resnet26, sasa_resnet50 vs resnet50), in one
run and one process:

* inference latency: batch 1, 224x224, eval mode, ``torch.no_grad``; median (and best) of
  ``--reps`` calls after warm-up, the models' calls interleaved (A B B A ...) so that
  load changes on a shared machine hit both alike;
* training step: batch 8, 224x224, forward + cross-entropy + backward + SGD(momentum) step;
  median of ``--train-reps`` steps after one warm-up step, interleaved; RedNet as registered
  (fused mixers: the involution kernel is never stored), on the composed path (every mixer
  built with ``fused=False`` through the config's ``mixer_kwargs``; inference timed too) and
  with ``checkpoint_mixer=True`` (mixers recomputed in backward);
* saved for backward: the bytes of the unique storages that autograd keeps for the backward of
  one training forward (batch 8; counted through ``torch.autograd.graph.saved_tensors_hooks``,
  parameters included);
* training memory: the rise of the process' peak resident set (VmHWM, reset through
  /proc/self/clear_refs) above the resident set just before one steady-state step (grads and
  momentum buffers already allocated), with glibc told to mmap allocations >= 64 KiB and to
  trim freed memory, so nothing hides in memory that was already resident. This counts the
  activations saved for backward and every temporary, including the C++ kernels' scratch.
  "training peak" adds the persistent training state (params + grads + momentum, 3 x 4 bytes
  per parameter), i.e. what a GPU's max_memory_allocated would count.

Ratios are rednet / resnet (< 1: RedNet is faster / smaller). Prints a table and writes
``models.json`` to ``--out`` (default ``benchmarks/results``). Also reports which tokenmix
backend ran the aggregation (``tokenmix.ops.select_backend``) and the thread count.

    python benchmarks/models.py             # the three pairs (several minutes on 2 cores)
    python benchmarks/models.py --quick     # 26-layer pair only, fewer repeats
    python benchmarks/models.py --pair nat_mini,convformer_s18   # any two registered models
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from tokenmix.models import ModelConfig, create_model, get_config, list_models
from tokenmix.ops import select_backend


# ------------------------------------------------------------------------------ memory
def malloc_release_eagerly() -> bool:
    """glibc: mmap every allocation >= 64 KiB (M_MMAP_THRESHOLD) and trim freed memory at
    once (M_TRIM_THRESHOLD 0), so a step's allocations show up in the resident set."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, 64 * 1024)) and bool(libc.mallopt(-1, 0))
    except (OSError, AttributeError):
        return False


def proc_status(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> Optional[int]:
    """Reset VmHWM to the current resident set; returns that resident set (bytes) or None."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return proc_status("VmRSS")


def peak_extra_bytes(fn: Callable[[], None]) -> Optional[int]:
    gc.collect()
    base = reset_peak_rss()
    fn()
    if base is None:
        return None
    return proc_status("VmHWM") - base


# ------------------------------------------------------------------------------ workloads
class Trainer:
    """One model with its optimizer and a fixed batch; ``step()`` is one training step."""

    def __init__(self, name: str, batch: int, size: int, seed: int = 0, **overrides):
        torch.manual_seed(seed)
        self.name = name
        self.model = create_model(name, **overrides).train()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.x = torch.randn(batch, 3, size, size)
        self.y = torch.randint(0, 1000, (batch,))
        self.params = sum(p.numel() for p in self.model.parameters())

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=False)
        loss = F.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        self.opt.step()


def composed_overrides(name: str) -> Dict[str, object]:
    """create_model overrides that build every mixer of ``name`` that has a fused form on its
    composed path (``fused=False`` in the stages' and the stem's ``mixer_kwargs``); {} when it
    has none (a MetaFormer config, or no involution or AA attention mixer)."""
    cfg = get_config(name)
    if not isinstance(cfg, ModelConfig):
        return {}
    fusable = ("involution", "patch_involution", "attention_augmented", "global_attention")
    stages = tuple(dataclasses.replace(st, mixer_kwargs={**st.mixer_kwargs, "fused": False})
                   if st.mixer in fusable else st for st in cfg.stages)
    out: Dict[str, object] = {}
    if stages != cfg.stages:
        out["stages"] = stages
    if cfg.stem.type == "rednet" and cfg.stem.mixer in fusable:
        out["stem"] = dataclasses.replace(cfg.stem, mixer_kwargs={**cfg.stem.mixer_kwargs, "fused": False})
    return out


def variant_overrides(variant: str) -> Dict[str, object]:
    """``name``, ``name+ckpt`` (checkpoint_mixer=True) or ``name+composed`` (fused=False)."""
    name, _, kind = variant.partition("+")
    if kind == "ckpt":
        return {"checkpoint_mixer": True}
    if kind == "composed":
        return composed_overrides(name)
    return {}


def saved_for_backward_bytes(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Bytes of the unique storages autograd saves for the backward of one training forward
    (``saved_tensors_hooks``; a storage saved by several nodes counts once)."""
    storages: Dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        storages[st.data_ptr()] = max(storages.get(st.data_ptr(), 0), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), y)
    del loss
    return sum(storages.values())


# --clock thread: the calling thread's CPU time (time.thread_time), which leaves out the time
# the scheduler gives to other processes on a shared machine; meaningful with --threads 1.
CLOCK = {"fn": time.perf_counter}


def interleaved_medians(fns: Dict[str, Callable[[], None]], reps: int, warmup: int) -> Dict[str, List[float]]:
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: Dict[str, List[float]] = {k: [] for k in fns}
    clock = CLOCK["fn"]
    order = list(fns.items())
    for r in range(reps):  # the order reversed every other round: none always runs after the same one
        for k, fn in (order if r % 2 == 0 else order[::-1]):
            t0 = clock()
            fn()
            times[k].append(clock() - t0)
    return times


def backend_used(name: str = "rednet50") -> Dict[str, str]:
    """Which tokenmix backend runs aggregate / correlate for a RedNet stage-1 involution."""
    model = create_model(name, num_classes=10).eval()
    mixer = model.stages[0][0].mixer
    x = torch.randn(1, mixer.dim, 56, 56)
    with torch.no_grad():
        w = mixer.kernel(x)
    out = {}
    for op, tensors in [("aggregate", [x, w]), ("correlate", [x, x]), ("aggregate_transpose", [x, w])]:
        try:
            out[op] = select_backend(op, tensors, mixer.window).name
        except ValueError as e:
            out[op] = f"none ({e})"
    return out


SUFFIX = {"": "", "ckpt": "_ckpt", "composed": "_composed"}
LABEL = {"": "", "ckpt": " checkpoint_mixer", "composed": " composed (fused=False)"}


def compare(a: str, b: str, args) -> Dict[str, object]:
    """Latency, training step and memory of model ``a`` against model ``b`` (ratios a / b)."""
    row: Dict[str, object] = {"model_a": a, "model_b": b}
    # inference latency, batch 1
    composed = a + "+composed"
    with_composed = args.composed_variant and bool(composed_overrides(a))
    inf_variants = [a, composed, b] if with_composed else [a, b]
    models = {n: create_model(n.split("+")[0], **variant_overrides(n)).eval() for n in inf_variants}
    x1 = torch.randn(1, 3, args.size, args.size)

    def infer(m):
        def run():
            with torch.no_grad():
                m(x1)
        return run

    lat = interleaved_medians({n: infer(m) for n, m in models.items()}, args.reps, warmup=2)
    row["params"] = {n: sum(p.numel() for p in m.parameters()) for n, m in models.items() if "+" not in n}
    del models
    gc.collect()
    row["latency_s"] = {n: statistics.median(t) for n, t in lat.items()}
    row["latency_all_s"] = lat
    # training step time, batch 8 (RedNet also with checkpoint_mixer=True)
    ck = a + "+ckpt"
    # the checkpoint_mixer=True variant exists for the bottleneck family (a ModelConfig field)
    with_ck = args.checkpoint_variant and isinstance(get_config(a), ModelConfig) and a.startswith("rednet")
    variants = [a] + ([composed] if with_composed else []) + ([ck] if with_ck else []) + [b]
    trainers = {n: Trainer(n.split("+")[0], args.batch, args.size, **variant_overrides(n)) for n in variants}
    row["saved_for_backward_bytes"] = {n: saved_for_backward_bytes(t.model, t.x, t.y) for n, t in trainers.items()}
    steps = interleaved_medians({n: t.step for n, t in trainers.items()}, args.train_reps, warmup=1)
    row["train_step_s"] = {n: statistics.median(t) for n, t in steps.items()}
    row["train_step_all_s"] = steps
    # training memory: one steady-state step each
    extra = {}
    for n in variants:
        t = trainers.pop(n)
        gc.collect()
        extra[n] = peak_extra_bytes(t.step)
        row.setdefault("train_state_bytes", {})[n] = 3 * 4 * t.params
        del t
        gc.collect()
    row["train_step_peak_extra_bytes"] = extra
    if all(v is not None for v in extra.values()):
        row["train_peak_bytes"] = {n: extra[n] + row["train_state_bytes"][n] for n in extra}
    row["latency_best_s"] = {n: min(t) for n, t in lat.items()}
    row["train_step_best_s"] = {n: min(t) for n, t in steps.items()}
    r = {"latency": row["latency_s"][a] / row["latency_s"][b],
         "latency_best": row["latency_best_s"][a] / row["latency_best_s"][b]}
    if with_composed:
        r["latency_composed"] = row["latency_s"][composed] / row["latency_s"][b]
        r["latency_fused_vs_composed"] = row["latency_s"][a] / row["latency_s"][composed]
        r["train_step_fused_vs_composed"] = row["train_step_s"][a] / row["train_step_s"][composed]
    for v in variants[:-1]:
        sfx = SUFFIX[v.partition("+")[2]]
        r["saved_for_backward" + sfx] = row["saved_for_backward_bytes"][v] / row["saved_for_backward_bytes"][b]
        r["train_step" + sfx] = row["train_step_s"][v] / row["train_step_s"][b]
        r["train_step_best" + sfx] = row["train_step_best_s"][v] / row["train_step_best_s"][b]
        if "train_peak_bytes" in row:
            r["train_step_peak_extra" + sfx] = extra[v] / extra[b]
            r["train_peak" + sfx] = row["train_peak_bytes"][v] / row["train_peak_bytes"][b]
    row["variants"] = variants
    row["ratios"] = r
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", default="50,26,sasa50",
                   help="depths to compare, rednet{d} vs resnet{d}, and sasa{d}: sasa_resnet{d} vs resnet{d}")
    p.add_argument("--pair", default=None, metavar="A,B",
                   help="compare any two registered models instead, e.g. nat_mini,convformer_s18 (ratios A / B)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8, help="training batch")
    p.add_argument("--reps", type=int, default=15, help="inference calls per model")
    p.add_argument("--train-reps", type=int, default=3, help="training steps per model")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--clock", choices=["wall", "thread"], default="wall",
                   help="wall time, or the calling thread's CPU time (needs --threads 1; robust on a shared machine)")
    p.add_argument("--no-checkpoint-variant", dest="checkpoint_variant", action="store_false",
                   help="skip the rednet + checkpoint_mixer=True training variant")
    p.add_argument("--no-composed-variant", dest="composed_variant", action="store_false",
                   help="skip the rednet composed-path (fused=False) variant")
    p.add_argument("--quick", action="store_true", help="26 only, 5 inference calls, 2 training steps")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    if args.quick:
        args.pairs, args.reps, args.train_reps = "26", 5, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "thread":
        if torch.get_num_threads() != 1:
            p.error("--clock thread needs --threads 1")
        CLOCK["fn"] = time.thread_time
    eager = malloc_release_eagerly()
    backends = backend_used()
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "clock": args.clock,
            "cpu_count": os.cpu_count(),
            "machine": platform.processor() or platform.machine(), "backend": backends,
            "malloc_release_eagerly": eager, "size": args.size, "train_batch": args.batch,
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}
    print(f"torch {info['torch']}, {info['threads']} threads, {info['cpu_count']} cpus, "
          f"load {info['load_average']}; tokenmix backend: {backends}")
    if args.pair is not None:
        pairs = [tuple(n.strip() for n in args.pair.split(","))]
        known = list_models()
        if len(pairs[0]) != 2 or any(n not in known for n in pairs[0]):
            p.error(f"--pair {args.pair!r} must be two registered model names; known: {', '.join(known)}")
    else:
        pairs = []
        for v in args.pairs.split(","):
            v = v.strip()
            if v.startswith("sasa"):
                pairs.append((f"sasa_resnet{int(v[4:])}", f"resnet{int(v[4:])}"))
            else:
                pairs.append((f"rednet{int(v)}", f"resnet{int(v)}"))
    rows = []
    for pair in pairs:
        row = compare(*pair, args)
        rows.append(row)
        red, res = row["model_a"], row["model_b"]
        r = row["ratios"]
        print(f"\n{red} vs {res}  (params {row['params'][red] / 1e6:.2f}M vs {row['params'][res] / 1e6:.2f}M)")
        print(f"  inference latency b1 {args.size}px : {row['latency_s'][red] * 1e3:8.1f} ms vs "
              f"{row['latency_s'][res] * 1e3:8.1f} ms   ratio {r['latency']:.2f}x (median; "
              f"best {row['latency_best_s'][red] * 1e3:.1f} vs {row['latency_best_s'][res] * 1e3:.1f} ms: "
              f"{r['latency_best']:.2f}x)")
        mb = 2 ** 20
        if "latency_composed" in r:
            v = red + "+composed"
            print(f"  inference latency, composed path: {row['latency_s'][v] * 1e3:8.1f} ms; fused / composed "
                  f"{r['latency_fused_vs_composed']:.2f}x; training step fused / composed "
                  f"{r['train_step_fused_vs_composed']:.2f}x")
        for v in row["variants"][:-1]:
            kind = v.partition("+")[2]
            sfx, label = SUFFIX[kind], red + LABEL[kind]
            print(f"  [{label}]")
            sb = row["saved_for_backward_bytes"]
            print(f"    saved for backward b{args.batch}       : {sb[v] / mb:8.0f} MB vs {sb[res] / mb:8.0f} MB   "
                  f"ratio {r['saved_for_backward' + sfx]:.3f}x")
            print(f"    training step b{args.batch}            : {row['train_step_s'][v]:8.2f} s  vs "
                  f"{row['train_step_s'][res]:8.2f} s    ratio {r['train_step' + sfx]:.2f}x (median; best "
                  f"{r['train_step_best' + sfx]:.2f}x)")
            if "train_peak" + sfx in r:
                ex, pk = row["train_step_peak_extra_bytes"], row["train_peak_bytes"]
                print(f"    step peak extra (activations) : {ex[v] / mb:8.0f} MB vs {ex[res] / mb:8.0f} MB   "
                      f"ratio {r['train_step_peak_extra' + sfx]:.2f}x")
                print(f"    training peak (+params/grads/momentum): {pk[v] / mb:6.0f} MB vs {pk[res] / mb:6.0f} MB   "
                      f"ratio {r['train_peak' + sfx]:.2f}x")
            else:
                print("    training memory: not measurable here (no /proc/self/clear_refs)")
    info["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "models.json")
    with open(path, "w") as f:
        json.dump({"info": info, "results": rows}, f, indent=2)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

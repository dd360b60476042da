"""Bytes that autograd saves for the backward of a model's forward, counted through
``torch.autograd.graph.saved_tensors_hooks``: every tensor packed for the backward is counted
once per unique storage (a parameter, an input or an activation saved by several nodes counts
once). Reported alone and as a ratio to a baseline model.

    python benchmarks/saved_tensors.py                          # sasa_resnet50 / resnet50, batch 8, 224
    python benchmarks/saved_tensors.py --models sasa_resnet50 --unfused
    python benchmarks/saved_tensors.py --batch 2 --size 64      # a quick run

``--unfused`` builds the attention mixers with ``fused=False`` (the composed path, which saves
the scores and the softmax). The forward runs at one thread unless ``--threads`` says otherwise;
only the forward runs (the hooks see every tensor when it is saved).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, Tuple

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tokenmix.models import create_model  # noqa: E402


def saved_bytes(model: nn.Module, x: torch.Tensor) -> Tuple[int, Dict[int, int]]:
    """(total bytes, {ndim: bytes}) of the unique storages that ``model(x)`` saves for backward."""
    seen: Dict[int, Tuple[int, int]] = {}

    def pack(t: torch.Tensor):
        st = t.untyped_storage()
        key = st.data_ptr()
        if key not in seen or seen[key][0] < st.nbytes():
            seen[key] = (st.nbytes(), t.dim())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    del out
    by_dim: Dict[int, int] = {}
    for nbytes, dim in seen.values():
        by_dim[dim] = by_dim.get(dim, 0) + nbytes
    return sum(b for b, _ in seen.values()), by_dim


def build(name: str, unfused: bool) -> nn.Module:
    model = create_model(name)
    if unfused:
        for m in model.modules():
            if hasattr(m, "fused") and (hasattr(m, "generator") or hasattr(m, "kernel_gen")):
                m.fused = False
    return model.train()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["sasa_resnet50"])
    ap.add_argument("--baseline", default="resnet50")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--unfused", action="store_true", help="attention mixers on the composed path (fused=False)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size)
    base, _ = saved_bytes(build(args.baseline, False), x)
    print(f"batch {args.batch}, {args.size}x{args.size}, {args.threads} thread(s)")
    print(f"{args.baseline:<20} {base / 2**20:10.1f} MiB saved for backward")
    for name in args.models:
        total, by_dim = saved_bytes(build(name, args.unfused), x)
        tag = " (fused=False)" if args.unfused else ""
        five = by_dim.get(5, 0)
        print(f"{name + tag:<20} {total / 2**20:10.1f} MiB saved for backward, ratio to {args.baseline}: "
              f"{total / base:.3f} (5-D tensors: {five / 2**20:.1f} MiB; without them {(total - five) / base:.3f})")


if __name__ == "__main__":
    main()

"""``tokenmix mixers``: params and MACs of every mixer preset at one size."""

from __future__ import annotations

import argparse
import sys

from ..cli import Command


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dim", type=int, default=256, help="channels C (default 256)")
    p.add_argument("--size", type=int, default=14, help="input side length H = W (default 14)")
    p.add_argument("--kernel-size", type=int, default=7, help="K (default 7)")
    p.add_argument("--stride", type=int, default=1, help="stride (default 1)")
    p.add_argument("--mixers", default=None, metavar="NAMES",
                   help="comma-separated preset names (default: every registered preset)")


def run(args: argparse.Namespace) -> int:
    from .tables import format_mixers, mixer_rows

    names = None if args.mixers is None else [n.strip() for n in args.mixers.split(",") if n.strip()]
    try:
        rows = mixer_rows(args.dim, args.size, args.kernel_size, stride=args.stride, names=names)
    except (ValueError, TypeError) as e:
        print(f"tokenmix mixers: error: {e}", file=sys.stderr)
        return 2
    print(f"input (1, {args.dim}, {args.size}, {args.size}), kernel {args.kernel_size}, stride {args.stride}; "
          "MMACs = fvcore flops / 1e6 (one multiply-add = one flop)")
    print(format_mixers(rows))
    return 0


COMMAND = Command("params and MACs of every mixer preset", configure, run)

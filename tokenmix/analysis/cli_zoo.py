"""``tokenmix zoo``: params and GMACs of the model zoo beside the paper's Table 1."""

from __future__ import annotations

import argparse
import sys

from ..cli import Command


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", default=None, metavar="NAMES",
                   help="comma-separated model names (default: every registered model)")
    p.add_argument("--size", type=int, default=224, help="input side length (default 224, the paper's)")
    p.add_argument("--latency", action="store_true",
                   help="also measure CPU milliseconds per image (batch 1, median of 5 runs)")


def run(args: argparse.Namespace) -> int:
    from .tables import format_zoo, zoo_rows

    names = None if args.models is None else [n.strip() for n in args.models.split(",") if n.strip()]
    try:
        rows = zoo_rows(names, size=args.size, latency=args.latency,
                        progress=lambda n: print(f"counting {n} ...", file=sys.stderr, flush=True))
    except (ValueError, TypeError) as e:
        print(f"tokenmix zoo: error: {e}", file=sys.stderr)
        return 2
    print(format_zoo(rows))
    print(f"\nGMACs: fvcore flops of a (1, 3, {args.size}, {args.size}) input, one multiply-add = one flop, "
          "tokenmix ops included; 'ours / published' divides by the README value where there is one.")
    return 0


COMMAND = Command("params and GMACs of the model zoo beside the paper's numbers", configure, run)

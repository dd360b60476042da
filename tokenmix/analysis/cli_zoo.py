"""``tokenmix zoo``: the paper's Table 1 beside our params and GMACs (default), or any
registered models (``--models``, ``--all``) beside their published numbers."""

from __future__ import annotations

import argparse
import sys

from ..cli import Command


def configure(p: argparse.ArgumentParser) -> None:
    which = p.add_mutually_exclusive_group()
    which.add_argument("--models", default=None, metavar="NAMES",
                       help="comma-separated registered model names instead of the paper's Table 1 rows")
    which.add_argument("--all", action="store_true", help="every registered model instead of the Table 1 rows")
    p.add_argument("--size", type=int, default=224, help="input side length (default 224, the paper's)")
    p.add_argument("--latency", action="store_true",
                   help="also measure CPU milliseconds per image (batch 1, median of 5 runs)")


def run(args: argparse.Namespace) -> int:
    from .tables import format_table1, format_zoo, table1_rows, zoo_rows

    progress = lambda n: print(f"counting {n} ...", file=sys.stderr, flush=True)  # noqa: E731
    if args.models is None and not args.all:
        print(format_table1(table1_rows(size=args.size, latency=args.latency, progress=progress)))
        print(f"\nThe involution paper's Table 1 (Li et al., CVPR 2021), in its order. GMACs: fvcore flops of a "
              f"(1, 3, {args.size}, {args.size}) input, one multiply-add = one flop, tokenmix ops included; "
              "'not built': tokenmix registers no such model (an --import that registers it counts it).")
        return 0
    names = None if args.all else [n.strip() for n in args.models.split(",") if n.strip()]
    rows = zoo_rows(names, size=args.size, latency=args.latency, progress=progress)
    print(format_zoo(rows))
    print(f"\nGMACs: fvcore flops of a (1, 3, {args.size}, {args.size}) input, one multiply-add = one flop, "
          "tokenmix ops included; 'ours / published' divides by the README value where there is one.")
    return 0


COMMAND = Command("the paper's Table 1 beside our params and GMACs, or any registered models", configure, run)

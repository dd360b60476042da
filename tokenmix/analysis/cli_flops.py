"""``tokenmix flops MODEL``: fvcore FLOP breakdown of one model by module and operator."""

from __future__ import annotations

import argparse
import sys

from ..cli import Command


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a registered model name (e.g. rednet50)")
    p.add_argument("--size", type=int, default=224, help="input side length (default 224)")
    p.add_argument("--depth", type=int, default=2, help="module depth of the breakdown (default 2)")
    p.add_argument("--params", action="store_true", help="also print fvcore's parameter table")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..models import create_model, list_models
    from .flops import count_flops, module_hook_flops, torch_flops
    from .params import count_params, param_table
    from .._args import check_int

    try:
        if args.model not in list_models():
            raise ValueError(f"unknown model {args.model!r}; known: {', '.join(list_models())}")
        size = check_int("size", args.size, 32, "the backbones downsample by 32")
        if args.depth < 1:
            raise ValueError(f"--depth must be >= 1, got {args.depth}")
    except (ValueError, TypeError) as e:
        print(f"tokenmix flops: error: {e}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    model = create_model(args.model).eval()
    x = torch.randn(1, 3, size, size)
    r = count_flops(model, x)
    print(f"{args.model} @ {size}x{size}: {count_params(model) / 1e6:.3f} M params, "
          f"{r.total / 1e9:.4f} GMACs (fvcore, 1 flop = 1 multiply-add), of which "
          f"{r.macs / 1e9:.4f} G in multiply-add operators")
    print(f"torch FlopCounterMode: {torch_flops(model, x) / 1e9:.4f} GFLOPs (2 per multiply-add)")
    print(f"mmcv-style module hooks: {module_hook_flops(model, x) / 1e9:.4f} G (blind to the tokenmix ops: "
          f"they are functional calls, not modules)")
    print("\nby operator (GMACs):")
    for k, v in sorted(r.by_operator.items(), key=lambda kv: -kv[1]):
        print(f"  {k:<30} {v / 1e9:10.4f}  {100 * v / r.total:5.1f}%")
    print(f"\nby module, depth <= {args.depth} (GMACs):")
    for name, v in r.by_module.items():
        depth = 0 if name == "" else name.count(".") + 1
        if depth <= args.depth and v > 0:
            print(f"  {'  ' * depth}{name or args.model:<{40 - 2 * depth}} {v / 1e9:10.4f}  {100 * v / r.total:5.1f}%")
    if args.params:
        print()
        print(param_table(model, max_depth=args.depth))
    return 0


COMMAND = Command("FLOP breakdown of one model by module", configure, run)

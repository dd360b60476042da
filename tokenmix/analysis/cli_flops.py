"""``tokenmix flops MODEL`` or ``tokenmix flops --checkpoint FILE``: fvcore FLOP breakdown of
one model (a registered name, or the model a weights file describes) by module and operator."""

from __future__ import annotations

import argparse

from ..cli import Command


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help="a registered model name (e.g. rednet50)")
    p.add_argument("--checkpoint", default=None,
                   help="instead of MODEL: a safetensors file with a model config in its metadata (tokenmix "
                        "train's model.safetensors); the model is built from it")
    p.add_argument("--size", type=int, default=None,
                   help="input side length (default 224; 8 for a small:MIXER network, the digits' size)")
    p.add_argument("--depth", type=int, default=2, help="module depth of the breakdown (default 2)")
    p.add_argument("--params", action="store_true", help="also print fvcore's parameter table")


def run(args: argparse.Namespace) -> int:
    import torch

    from .._args import check_int
    from ..models import create_model, list_models, model_from_weights
    from ..small_net import SmallNet
    from .flops import count_flops, module_hook_flops, torch_flops
    from .params import count_params, param_table

    if (args.model is None) == (args.checkpoint is None):
        raise ValueError("give a MODEL name or --checkpoint FILE (one of them)")
    if args.model is not None and args.model not in list_models():
        raise ValueError(f"unknown model {args.model!r}; known: {', '.join(list_models())}")
    if args.depth < 1:
        raise ValueError(f"--depth must be >= 1, got {args.depth}")
    torch.manual_seed(0)
    if args.checkpoint is not None:
        model = model_from_weights(args.checkpoint).float().eval()
        name = model.config.name
    else:
        model, name = create_model(args.model).eval(), args.model
    if isinstance(model, SmallNet):
        size = check_int("--size", 8 if args.size is None else args.size)
    else:
        size = check_int("--size", 224 if args.size is None else args.size, 32, "the backbones downsample by 32")
    in_chans = getattr(model.config, "in_chans", getattr(model.config, "in_channels", 3))
    x = torch.randn(1, in_chans, size, size)
    r = count_flops(model, x)
    print(f"{name} @ {size}x{size}: {count_params(model) / 1e6:.3f} M params, "
          f"{r.total / 1e9:.4f} GMACs (fvcore, 1 flop = 1 multiply-add), of which "
          f"{r.macs / 1e9:.4f} G in multiply-add operators")
    print(f"torch FlopCounterMode: {torch_flops(model, x) / 1e9:.4f} GFLOPs (2 per multiply-add)")
    print(f"mmcv-style module hooks: {module_hook_flops(model, x) / 1e9:.4f} G (blind to the tokenmix ops: "
          f"they are functional calls, not modules)")
    print("\nby operator (GMACs):")
    for k, v in sorted(r.by_operator.items(), key=lambda kv: -kv[1]):
        print(f"  {k:<30} {v / 1e9:10.4f}  {100 * v / r.total:5.1f}%")
    print(f"\nby module, depth <= {args.depth} (GMACs):")
    for mod, v in r.by_module.items():
        depth = 0 if mod == "" else mod.count(".") + 1
        if depth <= args.depth and v > 0:
            print(f"  {'  ' * depth}{mod or name:<{40 - 2 * depth}} {v / 1e9:10.4f}  {100 * v / r.total:5.1f}%")
    if args.params:
        print()
        print(param_table(model, max_depth=args.depth))
    return 0


COMMAND = Command("FLOP breakdown of one model by module", configure, run)

"""``tokenmix viz``: kernel heat maps (paper figure 3) of a mixer preset or a model layer.

Two sources of the kernel:

- ``--mixer NAME``: a fresh preset (random init, ``--seed``) applied to the image as a
  first layer would see it: the normalised image, average-pooled by 4 and lifted to
  ``--dim`` channels by a fixed random 1x1 convolution (same seed).
- ``--model NAME [--layer L]``: the input that layer ``L`` (default: the first
  kernel-generating layer) receives when the model runs on the normalised image, random
  weights; ``--checkpoint FILE [--layer L]``: the same for the model a safetensors file
  describes (written by ``tokenmix train`` or ``tokenmix.models.save_weights``: the model
  config is in its metadata), with its weights.
"""

from __future__ import annotations

import argparse
import sys

from ..cli import Command


def configure(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--mixer", help="a mixer preset name (fresh, random init)")
    src.add_argument("--model", help="a registered model name (random weights unless --checkpoint); see --layer")
    p.add_argument("--checkpoint", default=None,
                   help="a safetensors file with a model config in its metadata (tokenmix train's "
                        "model.safetensors, tokenmix.models.save_weights); the model is built from it "
                        "(--model, if given, must be its name)")
    p.add_argument("--layer", default=None, help="model submodule to show (default: first mixer layer)")
    p.add_argument("--image", default=None, help="image file (default: scikit-learn's bundled china.jpg)")
    p.add_argument("--size", type=int, default=224, help="image side length after centre crop (default 224)")
    p.add_argument("--dim", type=int, default=64, help="channels of the fresh --mixer (default 64)")
    p.add_argument("--kernel-size", type=int, default=7, help="K of the fresh --mixer (default 7)")
    p.add_argument("--reduce", default="sum", choices=("sum", "max", "center"),
                   help="reduction over the K*K taps (default sum, the paper's; softmax kernels "
                        "sum to 1, use max for them)")
    p.add_argument("--groups", type=int, default=16, help="draw at most this many groups (default 16)")
    p.add_argument("--seed", type=int, default=0, help="random seed of fresh weights (default 0)")
    p.add_argument("--out", required=True, help="output PNG path")


def _fail(msg: str) -> int:
    print(f"tokenmix viz: error: {msg}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    import torch
    import torch.nn.functional as F

    from .heatmap import kernel_maps, layer_input, load_image, mixer_layers, normalize, plot_heatmaps

    if args.mixer is None and args.model is None and args.checkpoint is None:
        return _fail("give --mixer NAME, --model NAME or --checkpoint FILE")
    if args.mixer is not None and args.checkpoint is not None:
        return _fail("--checkpoint holds a model; use it without --mixer")
    if args.size < 32:
        return _fail(f"--size must be >= 32, got {args.size}")
    if args.groups < 1:
        return _fail(f"--groups must be >= 1, got {args.groups}")
    try:
        image = load_image(args.image, args.size)
    except ValueError as e:
        return _fail(str(e))
    torch.manual_seed(args.seed)
    x_img = normalize(image)
    try:
        if args.mixer is not None:
            from ..mixers import create_mixer

            mixer = create_mixer(args.mixer, args.dim, kernel_size=args.kernel_size)
            if not hasattr(mixer, "generator"):
                return _fail(f"mixer {args.mixer!r} is a plain nn.Conv2d with no generated kernel; "
                             "choose a kernel-generating preset")
            lift = torch.nn.Conv2d(3, args.dim, 1)
            with torch.no_grad():
                x = lift(F.avg_pool2d(x_img, 4))
            what = (f"fresh {args.mixer} (dim {args.dim}, K {args.kernel_size}, seed {args.seed}) on the image "
                    f"pooled by 4 and lifted by a random 1x1 conv")
        else:
            from ..models import create_model, list_models, model_from_weights

            if args.checkpoint is not None:
                model = model_from_weights(args.checkpoint).float()
                name = model.config.name
                if args.model is not None and args.model != name:
                    return _fail(f"--checkpoint {args.checkpoint!r} holds a {name!r} model, not --model {args.model!r}")
                in_chans = getattr(model.config, "in_chans", getattr(model.config, "in_channels", 3))
                if in_chans != 3:  # a grayscale network: the image's mean over RGB
                    x_img = x_img.mean(1, keepdim=True).expand(-1, in_chans, -1, -1)
            elif args.model not in list_models():
                return _fail(f"unknown model {args.model!r}; known: {', '.join(list_models())}")
            else:
                model, name = create_model(args.model), args.model
            layers = mixer_layers(model)
            if not layers:
                return _fail(f"model {name!r} has no kernel-generating layer (plain convolutions only)")
            layer = args.layer if args.layer is not None else layers[0]
            if layer not in layers:
                return _fail(f"--layer {layer!r} of {name} generates no kernel; choose one of: {', '.join(layers)}")
            mixer, x = layer_input(model, layer, x_img)
            weights = args.checkpoint if args.checkpoint else f"random weights, seed {args.seed}"
            what = f"{name}.{layer} ({weights})"
        maps = kernel_maps(mixer, x, reduce=args.reduce)
    except (ValueError, TypeError) as e:
        return _fail(str(e))
    G = maps.shape[1]
    title = f"{what}: {args.reduce} over K*K taps, {min(G, args.groups)} of {G} groups"
    path = plot_heatmaps(image, maps, args.out, title=title, max_groups=args.groups)
    print(f"wrote {path}: {title}")
    return 0


COMMAND = Command("kernel heat maps of a mixer (paper figure 3)", configure, run)

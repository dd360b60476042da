"""``tokenmix compare``: train the same small backbone (:class:`tokenmix.small_net.SmallNet`)
per spatial mixer from several seeds on built-in data, with a held-out split, and compare::

    tokenmix compare --mixers conv,dwconv,involution,local_attention,positional_attention,patch_involution

Every mixer is trained from each of ``--seeds N`` seeds (``--seed``, ``--seed + 1``, ...: the
seed sets the initialisation and the data order; every mixer gets the same seeds, and the
train/test split is the one of ``--seed`` for all runs). Prints a table (parameters,
multiply-adds per image, time per epoch, test accuracy as mean and standard deviation over
the seeds, and its range) and writes into ``--out`` (default ``runs/compare``):

- ``compare.json``: the configuration and, per mixer, the mean/std, every seed's numbers and
  per-epoch history, and the per-epoch mean/std curves;
- ``compare.md``: the table;
- ``curves.png``: test accuracy and train loss per epoch, mean over the seeds with a band of
  one standard deviation, every mixer on one figure;
- ``kernels_<mixer>.png``: heat maps of the generated kernels of the trained mixer (first
  seed) on test images (for mixers whose kernel depends on the input: involution, attention, ...).

``--backbone metaformer`` trains a two-stage MetaFormer of the same widths instead of
``SmallNet``. Training runs :class:`tokenmix.training.Loop`, the loop of ``tokenmix train``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

from .cli import Command

DEFAULT_MIXERS = "conv,dwconv,involution,local_attention,positional_attention,patch_involution"
DEFAULT_EPOCHS = 10
DEFAULT_SEEDS = 3


def _parse_mixers(text: str) -> List[str]:
    from .mixers import list_mixers

    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError(f"--mixers must name at least one mixer, got {text!r}")
    unknown = [n for n in names if n not in list_mixers()]
    if unknown:
        raise ValueError(f"--mixers: unknown mixer(s) {', '.join(map(repr, unknown))}; known: {', '.join(list_mixers())}")
    return names


BACKBONES = ("small", "metaformer")


def build_backbone(backbone: str, mixer: str, num_classes: int, in_channels: int, width: int, depth: int,
                   kernel_size: int) -> nn.Module:
    """``"small"``: :class:`~tokenmix.small_net.SmallNet`; ``"metaformer"``: the two-stage
    MetaFormer of :func:`~tokenmix.models.metaformer_config.tiny_metaformer_config` (the same
    resolutions and widths, the mixer inside ``norm -> mixer -> + ; norm -> MLP -> +`` blocks)."""
    if backbone == "metaformer":
        from .models import create_model
        from .models.metaformer_config import tiny_metaformer_config

        return create_model(tiny_metaformer_config(mixer, num_classes, in_channels, width, depth, kernel_size))
    if backbone != "small":
        raise ValueError(f"backbone={backbone!r} is not known; known: {', '.join(BACKBONES)}")
    from .small_net import SmallNet

    return SmallNet(mixer, num_classes=num_classes, in_channels=in_channels, width=width, depth=depth,
                    kernel_size=kernel_size)


def train_one(mixer: str, split, *, epochs: int, batch_size: int, lr: float, weight_decay: float, seed: int,
              width: int, depth: int, kernel_size: int, progress: Optional[bool],
              backbone: str = "small") -> Dict[str, Any]:
    """Train ``backbone`` (see :func:`build_backbone`) with ``mixer`` on ``split`` from ``seed``
    in this process (the loop of ``tokenmix train``: AdamW, half an epoch of warm-up, cosine
    decay); returns numbers, history and the trained model (key ``"model"``)."""
    from .training import Loop, TrainConfig, count_macs

    config = TrainConfig(model=f"small:{mixer}", epochs=epochs, batch_size=batch_size, lr=lr,
                         weight_decay=weight_decay, seed=seed, progress=progress, warmup_epochs=min(0.5, epochs))
    config.check()
    torch.manual_seed(seed)
    model = build_backbone(backbone, mixer, split.num_classes, split.in_channels, width, depth, kernel_size)
    params = sum(p.numel() for p in model.parameters())
    macs = count_macs(model, split.test.tensors[0][:1])

    def report(loop, m):
        print(f"{mixer:>22s} seed {seed} epoch {m['epoch']:2d}/{epochs}  train loss {m['train_loss']:.4f}  "
              f"test acc {m['test_acc']:.4f}  {m['time_s']:.1f}s", file=sys.stderr)

    history = Loop(model, split, config, eval_batch_size=256, label=f"{mixer} seed {seed} ").run(0, report)
    history = [{k: h[k] for k in ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "time_s")}
               for h in history]
    train_time = sum(h["time_s"] for h in history)
    return {"mixer": mixer, "seed": seed, "params": params, "macs": macs["macs"], "macs_counter": macs["counter"],
            "train_time_s": train_time, "time_per_epoch_s": train_time / epochs,
            "test_acc": history[-1]["test_acc"], "test_loss": history[-1]["test_loss"],
            "history": history, "model": model}


def _mean_std(values: Sequence[float]) -> Dict[str, float]:
    """Mean and sample standard deviation (0.0 for a single value)."""
    values = list(values)
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarize(runs: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """One mixer's runs (one per seed, as :func:`train_one` returns them without the model)
    -> mean/std of the test accuracy, loss and times, and per-epoch mean/std curves."""
    first = runs[0]
    acc = [r["test_acc"] for r in runs]
    curves = []
    for i, h in enumerate(first["history"]):
        curves.append({"epoch": h["epoch"],
                       **{f"{k}_{stat}": v for k in ("test_acc", "train_loss")
                          for stat, v in _mean_std([r["history"][i][k] for r in runs]).items()}})
    return {"mixer": first["mixer"], "params": first["params"], "macs": first["macs"],
            "macs_counter": first["macs_counter"], "seeds": [r["seed"] for r in runs],
            "test_acc_mean": _mean_std(acc)["mean"], "test_acc_std": _mean_std(acc)["std"],
            "test_acc_min": min(acc), "test_acc_max": max(acc),
            "test_loss_mean": _mean_std([r["test_loss"] for r in runs])["mean"],
            "train_time_s": _mean_std([r["train_time_s"] for r in runs])["mean"],
            "time_per_epoch_s": _mean_std([r["time_per_epoch_s"] for r in runs])["mean"],
            "curves": curves, "runs": list(runs)}


def format_table(results: Sequence[Dict[str, Any]]) -> str:
    """Markdown table of :func:`summarize` results: mixer, params, MACs per image, time per
    epoch, test accuracy (mean ± std over the seeds, min-max, number of seeds)."""
    rows = ["| mixer | params | MACs/image | time/epoch (s) | test acc (%), mean ± std | min - max | seeds |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        rows.append(f"| {r['mixer']} | {r['params']:,} | {r['macs'] / 1e6:.2f} M | {r['time_per_epoch_s']:.2f} | "
                    f"{100 * r['test_acc_mean']:.2f} ± {100 * r['test_acc_std']:.2f} | "
                    f"{100 * r['test_acc_min']:.2f} - {100 * r['test_acc_max']:.2f} | {len(r['seeds'])} |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------- plots


def _figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas (no global backend switch, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def plot_curves(results: Sequence[Dict[str, Any]], path: Path) -> None:
    """Test accuracy and train loss per epoch of every mixer (:func:`summarize` results): the
    mean over the seeds, with a band of one standard deviation either side."""
    fig = _figure(11, 4.2)
    ax_acc, ax_loss = fig.subplots(1, 2)
    for r in results:
        ep = [c["epoch"] for c in r["curves"]]
        for ax, key, scale in ((ax_acc, "test_acc", 100.0), (ax_loss, "train_loss", 1.0)):
            mean = [scale * c[f"{key}_mean"] for c in r["curves"]]
            std = [scale * c[f"{key}_std"] for c in r["curves"]]
            line, = ax.plot(ep, mean, marker="o", ms=3, label=r["mixer"])
            ax.fill_between(ep, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color=line.get_color(), alpha=0.2, linewidth=0)
    n = len(results[0]["seeds"]) if results else 0
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title=f"held-out accuracy (mean ± std, {n} seeds)")
    ax_loss.set(xlabel="epoch", ylabel="train loss (cross-entropy)", title="training loss", yscale="log")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
    ax_acc.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def choose_reduction(w: torch.Tensor, batch: int) -> Optional[str]:
    """How to draw a generated kernel ``w: (B|1, G, K*K, Ho|1, Wo|1)`` as a heat map.

    None: the kernel does not depend on the input (batch 1 for a batch of ``batch`` > 1
    inputs: convolution-like, or pooling's border-aware static kernel), nothing to draw. ``"max"``: the taps sum to 1 at
    every pixel (softmax attention), so the paper's tap sum would be a flat map; the largest
    tap weight shows how peaked the attention is. ``"sum"`` otherwise (paper figure 3).
    """
    if batch > 1 and w.shape[0] == 1:
        return None
    s = w.sum(2)
    if torch.allclose(s, torch.ones_like(s), atol=1e-4):
        return "max"
    return "sum"


REDUCTION_LABELS = {"sum": "sum over the K*K taps", "max": "largest tap weight (kernels sum to 1)"}


def plot_kernels(mixer_name: str, model: nn.Module, images: torch.Tensor, path: Path,
                 max_groups: int = 4) -> Optional[str]:
    """Heat maps of the first block's generated kernel on ``images: (N, C, H, W)`` (N small,
    normalised as the model saw them), one panel per group with the image's outline (a white
    contour at half its intensity range) drawn over the map. The maps come from
    :func:`tokenmix.analysis.heatmap.kernel_maps`. Returns the reduction drawn (see
    :func:`choose_reduction`), or None (and writes nothing) when the mixer generates no kernel
    or a static one."""
    from .analysis.heatmap import kernel_maps, layer_input

    mixer = model.mixers()[0]
    if not (hasattr(mixer, "generator") and hasattr(mixer, "window")):
        return None
    name = next(n for n, m in model.named_modules() if m is mixer)
    _, x = layer_input(model, name, images)
    was = mixer.training
    mixer.eval()
    try:
        with torch.no_grad():
            reduce = choose_reduction(mixer.generator(x, mixer.window), x.shape[0])
    finally:
        mixer.train(was)
    if reduce is None:
        return None
    maps = kernel_maps(mixer, x, reduce=reduce)  # (N, G, Ho, Wo)
    G = min(maps.shape[1], max_groups)
    N = images.shape[0]
    H, W = images.shape[-2:]
    fig = _figure(1.9 * (G + 1), 1.9 * N + 0.5)
    axes = fig.subplots(N, G + 1, squeeze=False)
    for n in range(N):
        img = images[n].float().mean(0).numpy()
        axes[n, 0].imshow(img, cmap="gray")
        axes[n, 0].set_title("input" if n == 0 else "", fontsize=8)
        for g in range(G):
            m = torch.nn.functional.interpolate(maps[n, g][None, None], size=(H, W), mode="nearest")[0, 0]
            ax = axes[n, g + 1]
            ax.imshow(m.numpy(), cmap="viridis")
            ax.contour(img, levels=[0.5 * (float(img.min()) + float(img.max()))], colors="white", linewidths=0.8)
            if n == 0:
                ax.set_title(f"group {g}", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{mixer_name}: {REDUCTION_LABELS[reduce]}\n(first block, {G} of {maps.shape[1]} groups; white: digit outline)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return reduce


def _sample_images(split, n: int = 4) -> torch.Tensor:
    """One test image of each of the first ``n`` classes: (n, C, H, W)."""
    x, y = split.test.tensors
    picks = [int((y == c).nonzero()[0]) for c in range(min(n, split.num_classes)) if (y == c).any()]
    return x[picks]


# ----------------------------------------------------------------------------- CLI


def configure(p: argparse.ArgumentParser) -> None:
    from .training import TrainConfig, add_config_arguments

    p.add_argument("--mixers", default=DEFAULT_MIXERS, help=f"comma-separated mixer presets (default {DEFAULT_MIXERS})")
    p.add_argument("--seeds", type=int, default=DEFAULT_SEEDS,
                   help=f"seeds per mixer: --seed, --seed + 1, ... (default {DEFAULT_SEEDS})")
    add_config_arguments(p, TrainConfig, include=("data", "size", "epochs", "batch_size", "lr", "weight_decay", "seed",
                                                  "threads", "progress"),
                         defaults={"epochs": DEFAULT_EPOCHS, "threads": 1})
    p.add_argument("--width", type=int, default=32, help="channels of stage 1 (stage 2: twice)")
    p.add_argument("--depth", type=int, default=1, help="blocks per stage")
    p.add_argument("--kernel-size", type=int, default=3, help="K of every mixer")
    p.add_argument("--backbone", choices=BACKBONES, default="small",
                   help="small: the residual SmallNet (default); metaformer: a two-stage MetaFormer of the same widths")
    p.add_argument("--out", default="runs/compare", help="output directory (default runs/compare)")


def run(args: argparse.Namespace) -> int:
    from ._args import check_int
    from .training import TrainConfig, config_from_args

    for name in ("seeds", "width", "depth", "kernel_size"):
        check_int(f"--{name.replace('_', '-')}", getattr(args, name))
    config_from_args(args, TrainConfig, warmup_epochs=min(0.5, args.epochs) if args.epochs > 0 else 0).check()
    mixers = _parse_mixers(args.mixers)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args, mixers)
    finally:
        torch.set_num_threads(threads_before)


def _run(args: argparse.Namespace, mixers: List[str]) -> int:
    from .data import load_data

    split = load_data(args.data, size=args.size, seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [args.seed + i for i in range(args.seeds)]
    print(f"data {args.data!r}: {len(split.train)} train / {len(split.test)} test images "
          f"{split.in_channels}x{split.image_size[0]}x{split.image_size[1]}, {split.num_classes} classes; "
          f"{args.epochs} epochs per mixer and seed, seeds {seeds}", file=sys.stderr)
    results, models = [], {}
    for mixer in mixers:
        runs = []
        for seed in seeds:
            r = train_one(mixer, split, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                          weight_decay=args.weight_decay, seed=seed, width=args.width, depth=args.depth,
                          kernel_size=args.kernel_size, progress=args.progress, backbone=args.backbone)
            models.setdefault(mixer, r.pop("model"))
            r.pop("model", None)
            runs.append(r)
        results.append(summarize(runs))
    table = format_table(results)
    print(table)
    (out / "compare.md").write_text(table + "\n")
    plot_curves(results, out / "curves.png")
    images = _sample_images(split)
    heatmaps = {}
    for mixer, model in models.items():
        path = out / f"kernels_{mixer}.png"
        reduce = plot_kernels(mixer, model, images, path)
        if reduce is not None:
            heatmaps[mixer] = {"file": path.name, "reduce": reduce}
    config = {k: v for k, v in vars(args).items() if not k.startswith("_") and k not in ("command", "imports")}
    config.update(mixers=mixers, seed_list=seeds, train_size=len(split.train), test_size=len(split.test),
                  torch=torch.__version__)
    payload = {"config": config, "results": results, "table": table, "plots": {"curves": "curves.png",
                                                                                   "kernels": heatmaps}}
    (out / "compare.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out / 'compare.json'}, {out / 'compare.md'}, {out / 'curves.png'}"
          + "".join(f", {out / h['file']}" for h in heatmaps.values()), file=sys.stderr)
    return 0


COMMAND = Command(help="train one small backbone per mixer and seed on built-in data and compare",
                  configure=configure, run=run)

__all__ = ["COMMAND", "build_backbone", "train_one", "summarize", "format_table", "plot_curves", "plot_kernels",
           "choose_reduction"]

"""Kernel heat maps (the involution paper's figure 3): for an image and a mixer, the
generated kernel ``w: (B|1, G, K*K, Ho|1, Wo|1)`` reduced over its K*K taps, one map per
group, drawn over the image as a PNG grid.

``reduce="sum"`` is the paper's map. Softmax generators (``query_key``, ``positional``) give
kernels whose taps sum to 1 at every pixel, so their "sum" map is flat by construction;
``reduce="max"`` (the largest tap weight: how peaked the attention is) is the informative
view for them. A ``static`` generator (depthwise conv) is spatially constant: flat maps too.

Drawn with matplotlib's object API (``Figure`` + the Agg canvas), so no global backend is
switched and no display is needed.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .._args import check_int

__all__ = [
    "REDUCTIONS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "kernel_maps",
    "layer_input",
    "mixer_layers",
    "load_image",
    "plot_heatmaps",
]

REDUCTIONS = ("sum", "max", "center")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _check_mixer(mixer: nn.Module) -> None:
    if not (hasattr(mixer, "generator") and hasattr(mixer, "window")):
        raise TypeError(
            f"mixer must generate a kernel (a tokenmix Mixer with .generator and .window), got "
            f"{type(mixer).__name__}; the 'conv' preset is a plain nn.Conv2d with no generated kernel"
        )


@torch.no_grad()
def kernel_maps(mixer: nn.Module, x: torch.Tensor, reduce: str = "sum") -> torch.Tensor:
    """Per-group maps of the kernel ``mixer`` generates for ``x``.

    Args:
        mixer: a tokenmix Mixer (``generator(x, window) -> w: (B|1, G, K*K, Ho|1, Wo|1)``).
        x: (B, C, H, W), the mixer's input.
        reduce: over the K*K taps: "sum" (paper figure 3), "max", or "center" (the centre tap).

    Returns:
        (B, G, Ho, Wo), ``(Ho, Wo) = mixer.window.output_size(H, W)`` (broadcast kernels
        expanded).
    """
    _check_mixer(mixer)
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {', '.join(REDUCTIONS)}, got {reduce!r}")
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a (B, C, H, W) tensor, got {getattr(x, 'shape', type(x).__name__)}")
    was_training = mixer.training
    mixer.eval()
    try:
        w = mixer.generator(x, mixer.window)
    finally:
        mixer.train(was_training)
    if reduce == "sum":
        m = w.sum(2)
    elif reduce == "max":
        m = w.amax(2)
    else:
        m = w[:, :, w.shape[2] // 2]
    Ho, Wo = mixer.window.output_size(x.shape[2], x.shape[3])
    return m.expand(x.shape[0], m.shape[1], Ho, Wo).float()


def mixer_layers(model: nn.Module):
    """Names of the submodules of ``model`` that generate kernels (tokenmix Mixers)."""
    return [n for n, m in model.named_modules() if hasattr(m, "generator") and hasattr(m, "window")]


@torch.no_grad()
def layer_input(model: nn.Module, layer: str, image: torch.Tensor) -> Tuple[nn.Module, torch.Tensor]:
    """Run ``model(image)`` in eval mode and capture the input of submodule ``layer``.

    Returns:
        (the submodule, its input x: (B, C, H, W)).
    """
    modules = dict(model.named_modules())
    if layer not in modules:
        raise ValueError(f"layer {layer!r} is not a submodule of {type(model).__name__}; "
                         f"kernel-generating layers: {', '.join(mixer_layers(model)) or 'none'}")
    target = modules[layer]
    captured = []

    def hook(module, args):
        captured.append(args[0])

    handle = target.register_forward_pre_hook(hook)
    was_training = model.training
    model.eval()
    try:
        model(image)
    finally:
        handle.remove()
        model.train(was_training)
    if not captured:
        raise ValueError(f"layer {layer!r} was not called by {type(model).__name__}.forward")
    return target, captured[0]


def load_image(path: Optional[Union[str, os.PathLike]] = None, size: int = 224) -> torch.Tensor:
    """An RGB image as (1, 3, size, size) in [0, 1].

    Args:
        path: an image file (anything PIL reads); None: scikit-learn's bundled
            ``china.jpg`` (``sklearn.datasets.load_sample_image``), centre-cropped.
        size: output side length.
    """
    import numpy as np
    from PIL import Image

    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise ValueError(f"size must be an int >= 8, got {size!r}")
    if path is None:
        from sklearn.datasets import load_sample_image

        img = Image.fromarray(load_sample_image("china.jpg"))
    else:
        if not os.path.isfile(path):
            raise ValueError(f"image path {str(path)!r} is not a file")
        from ..data import read_rgb_image

        img = read_rgb_image(path)
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    img = img.resize((size, size), Image.BILINEAR)
    arr = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)
    return arr.permute(2, 0, 1).unsqueeze(0).contiguous()


def normalize(image: torch.Tensor) -> torch.Tensor:
    """ImageNet mean/std normalisation of a (B, 3, H, W) image in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (image - mean) / std


def plot_heatmaps(image: torch.Tensor, maps: torch.Tensor, out: Union[str, os.PathLike], *,
                  title: str = "", max_groups: int = 16, cols: int = 6, alpha: float = 0.6,
                  dpi: int = 100) -> str:
    """Draw the image, then one panel per group with its map upsampled over the image.

    Args:
        image: (3, H, W) or (1, 3, H, W) in [0, 1].
        maps: (G, Ho, Wo) or (1, G, Ho, Wo), e.g. from :func:`kernel_maps`.
        out: PNG path (parent folders are created).
        max_groups: draw at most this many groups (the first ones).

    Returns:
        the path written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if image.dim() == 4:
        image = image[0]
    if maps.dim() == 4:
        maps = maps[0]
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be (3, H, W), got {tuple(image.shape)}")
    if maps.dim() != 3:
        raise ValueError(f"maps must be (G, Ho, Wo), got {tuple(maps.shape)}")
    check_int("max_groups", max_groups)
    H, W = image.shape[1:]
    G = min(maps.shape[0], max_groups)
    up = F.interpolate(maps[:G].unsqueeze(0).float(), size=(H, W), mode="nearest")[0]
    n = G + 1
    cols = max(1, min(cols, n))
    rows = (n + cols - 1) // cols
    fig = Figure(figsize=(2.2 * cols, 2.3 * rows + (0.4 if title else 0)), dpi=dpi)
    FigureCanvasAgg(fig)
    img = image.permute(1, 2, 0).clamp(0, 1).numpy()
    ax = fig.add_subplot(rows, cols, 1)
    ax.imshow(img)
    ax.set_title("image", fontsize=8)
    ax.axis("off")
    for g in range(G):
        ax = fig.add_subplot(rows, cols, g + 2)
        ax.imshow(img)
        m = up[g].numpy()
        ax.imshow(m, cmap="jet", alpha=alpha)
        lo, hi = float(m.min()), float(m.max())
        ax.set_title(f"group {g}  [{lo:.2g}, {hi:.2g}]", fontsize=7)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out = os.fspath(out)
    parent = os.path.dirname(out)
    if parent:
        os.makedirs(parent, exist_ok=True)
    fig.savefig(out, format="png")
    return out

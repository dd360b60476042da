"""Datasets for ``tokenmix compare`` and ``tokenmix train``.

A dataset is named by a spec string:

- ``digits``: scikit-learn's bundled handwritten digits (1797 grayscale 8x8 images, 10
  classes; no download).
- ``folder:PATH``: an image folder with one sub-folder per class (sorted sub-folder names
  are the class names); every image is read with Pillow, converted to RGB and resized to
  ``size`` x ``size``.

Both are held in memory as float32 tensors ``x: (N, C, H, W)`` normalised per channel with
the training split's mean and std, and are split into train and test with a deterministic
stratified split (the same ``seed`` gives the same split on every machine and every rank).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import TensorDataset

from ._args import check_int

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


@dataclass
class DataSplit:
    """A dataset split in two, in memory.

    ``train`` and ``test`` are TensorDatasets of ``(x: (N, C, H, W) float32, y: (N,) int64)``.
    """

    name: str
    train: TensorDataset
    test: TensorDataset
    classes: List[str]
    in_channels: int
    image_size: Tuple[int, int]
    mean: List[float] = field(default_factory=list)
    std: List[float] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split: for each class (in label order), shuffle its indices
    with ``numpy.random.default_rng(seed)`` and put ``round(n * test_fraction)`` of them
    (at least 1 when the class has 2 or more samples) in the test split.

    Returns sorted ``(train_indices, test_indices)``.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction!r}")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n_test = int(round(len(idx) * test_fraction))
        if test_fraction > 0 and len(idx) >= 2:
            n_test = min(max(n_test, 1), len(idx) - 1)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _resize(x: torch.Tensor, size: Optional[int]) -> torch.Tensor:
    """x: (N, C, H, W) -> (N, C, size, size) by bilinear interpolation (no-op for None)."""
    if size is None or tuple(x.shape[-2:]) == (size, size):
        return x
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def _load_digits() -> Tuple[torch.Tensor, np.ndarray, List[str]]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)  # (1797, 1, 8, 8)
    return x, bunch.target.astype(np.int64), [str(c) for c in bunch.target_names]


def read_rgb_image(path):
    """The image at ``path`` decoded and converted to RGB; ValueError naming the file for
    anything Pillow cannot decode (not an image, truncated, a decompression bomb: more pixels
    than twice ``PIL.Image.MAX_IMAGE_PIXELS``, ...)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as e:  # UnidentifiedImageError, OSError, DecompressionBombError, SyntaxError, ...
        raise ValueError(f"cannot read image {str(path)!r}: {type(e).__name__}: {e}") from e


def _load_folder(path_text: str, size: int) -> Tuple[torch.Tensor, np.ndarray, List[str]]:
    from PIL import Image

    root = Path(path_text).expanduser()
    if not path_text:
        raise ValueError("data 'folder:' needs a path, e.g. folder:/data/flowers")
    if not root.exists():
        raise ValueError(f"data folder {str(root)!r} does not exist")
    if not root.is_dir():
        raise ValueError(f"data folder {str(root)!r} is not a directory")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise ValueError(f"data folder {str(root)!r} has no class sub-folders (expected one sub-folder per class)")
    if len(class_dirs) < 2:
        raise ValueError(f"data folder {str(root)!r} has only one class sub-folder ({class_dirs[0].name!r}); "
                         "classification needs at least 2")
    images, labels = [], []
    for label, d in enumerate(class_dirs):
        files = sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"class folder {str(d)!r} has no images (looked for {', '.join(IMAGE_SUFFIXES)})")
        for f in files:
            im = read_rgb_image(f).resize((size, size), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.float32) / 255.0
            images.append(torch.from_numpy(arr).permute(2, 0, 1))
            labels.append(label)
    return torch.stack(images), np.asarray(labels, dtype=np.int64), [d.name for d in class_dirs]


def load_data(spec: str, *, size: Optional[int] = None, test_fraction: float = 0.2, seed: int = 0) -> DataSplit:
    """Load a dataset by spec (``digits`` or ``folder:PATH``), split and normalise it.

    Args:
        spec: dataset spec.
        size: resize images to ``size`` x ``size`` (default: 8 for digits, 32 for folders).
        test_fraction: fraction of each class held out for testing.
        seed: seed of the split.

    Returns:
        :class:`DataSplit` whose tensors are ``x: (N, C, size, size)``, ``y: (N,)``.

    Raises:
        ValueError: unknown spec, missing/non-directory path, no class folders, an empty class
            folder or an unreadable image (the message names the path), or a split that leaves a
            class without test images (the message names the class).
    """
    if not isinstance(spec, str):
        raise TypeError(f"data must be a string such as 'digits' or 'folder:PATH', got {spec!r}")
    if size is not None:
        check_int("size", size)
    if spec == "digits":
        x, y, classes = _load_digits()
        x = _resize(x, size)
    elif spec.startswith("folder:"):
        x, y, classes = _load_folder(spec[len("folder:"):], size or 32)
    else:
        raise ValueError(f"unknown data {spec!r}; known: 'digits', 'folder:PATH'")
    train_idx, test_idx = stratified_split(y, test_fraction, seed)
    counts = np.bincount(y[test_idx], minlength=len(classes))
    empty = [classes[c] for c in range(len(classes)) if counts[c] == 0]
    if empty:
        n = np.bincount(y, minlength=len(classes))
        raise ValueError(f"test_fraction={test_fraction} leaves class(es) without a test image: "
                         + ", ".join(f"{c!r} ({n[classes.index(c)]} image(s))" for c in empty)
                         + "; add images (a class needs at least 2) or raise --test-fraction")
    xt = x[torch.from_numpy(train_idx)]
    mean = xt.mean(dim=(0, 2, 3))
    std = xt.std(dim=(0, 2, 3)).clamp_min(1e-6)
    x = (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    yt = torch.from_numpy(y)

    def subset(idx: np.ndarray) -> TensorDataset:
        i = torch.from_numpy(idx)
        return TensorDataset(x[i].contiguous(), yt[i].contiguous())

    return DataSplit(name=spec, train=subset(train_idx), test=subset(test_idx), classes=classes,
                     in_channels=int(x.shape[1]), image_size=(int(x.shape[2]), int(x.shape[3])),
                     mean=mean.tolist(), std=std.tolist())


__all__ = ["DataSplit", "load_data", "stratified_split", "read_rgb_image", "IMAGE_SUFFIXES"]

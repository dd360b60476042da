"""Registry of mixer presets: ``register_mixer``, ``create_mixer``, ``list_mixers``."""

from __future__ import annotations

from typing import List

from torch import nn

from .._registry import Registry
from .._args import check_int

_MIXERS = Registry("mixer")


def register_mixer(name: str, *, overwrite: bool = False):
    """Decorator registering a builder ``fn(dim, *, kernel_size, stride, **kw) -> nn.Module``
    under ``name``. The builder must map (B, dim, H, W) to (B, dim, ceil(H/s), ceil(W/s))
    and accept ``device=``/``dtype=``."""
    return _MIXERS.register(name, overwrite=overwrite)


def list_mixers() -> List[str]:
    """Names of the registered mixer presets, in registration order."""
    return _MIXERS.names()


def create_mixer(name: str, dim: int, *, kernel_size=7, stride: int = 1, **kwargs) -> nn.Module:
    """Build the mixer preset ``name``.

    Args:
        name: one of :func:`list_mixers`.
        dim: C, channels in and out.
        kernel_size: K (odd).
        stride: s; the output is ``(B, C, ceil(H/s), ceil(W/s))``.
        **kwargs: the preset's own arguments (``heads``, ``group_channels``, ...) and the
            factory kwargs ``device``/``dtype``.

    Shapes: ``x: (B, dim, H, W) -> (B, dim, ceil(H/s), ceil(W/s))``.
    """
    builder = _MIXERS.lookup(name)
    dim = check_int("dim", dim)
    stride = check_int("stride", stride)
    return builder(dim, kernel_size=kernel_size, stride=stride, **kwargs)


__all__ = ["register_mixer", "create_mixer", "list_mixers"]

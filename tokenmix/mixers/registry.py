"""Registry of mixer presets: ``register_mixer``, ``create_mixer``, ``list_mixers``."""

from __future__ import annotations

from typing import Callable, Dict, List

from torch import nn

from ..kernel_gen.base import check_int

_MIXERS: Dict[str, Callable[..., nn.Module]] = {}


def register_mixer(name: str):
    """Decorator registering a builder ``fn(dim, *, kernel_size, stride, **kw) -> nn.Module``
    under ``name``. The builder must map (B, dim, H, W) to (B, dim, ceil(H/s), ceil(W/s))
    and accept ``device=``/``dtype=``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"mixer name must be a non-empty str, got {name!r}")

    def deco(fn):
        if name in _MIXERS and _MIXERS[name] is not fn:
            raise ValueError(f"mixer {name!r} is already registered to {_MIXERS[name]!r}")
        _MIXERS[name] = fn
        return fn

    return deco


def list_mixers() -> List[str]:
    """Names of the registered mixer presets, in registration order."""
    return list(_MIXERS)


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
    if name not in _MIXERS:
        raise ValueError(f"unknown mixer {name!r}; known: {', '.join(list_mixers())}")
    dim = check_int("dim", dim)
    stride = check_int("stride", stride)
    return _MIXERS[name](dim, kernel_size=kernel_size, stride=stride, **kwargs)


__all__ = ["register_mixer", "create_mixer", "list_mixers"]

"""Registry of kernel generators: ``register_kernel_gen``, ``create_kernel_gen``,
``list_kernel_gens``. A generator is an ``nn.Module`` whose constructor takes ``channels``
first and whose ``forward(x, window)`` returns the kernel ``w: (B|1, G, K*K, Ho|1, Wo|1)``."""

from __future__ import annotations

from typing import Callable, List

from torch import nn

from .._registry import Registry

_KERNEL_GENS = Registry("kernel generator")


def register_kernel_gen(name: str, *, overwrite: bool = False):
    """Class (or factory) decorator that registers a generator under ``name``.

    >>> @register_kernel_gen("my_gen")          # doctest: +SKIP
    ... class MyGen(nn.Module): ...
    """
    return _KERNEL_GENS.register(name, overwrite=overwrite)


def list_kernel_gens() -> List[str]:
    """Names of the registered kernel generators, in registration order."""
    return _KERNEL_GENS.names()


def get_kernel_gen(name: str) -> Callable[..., nn.Module]:
    """The class registered under ``name``; ValueError listing the known names otherwise."""
    return _KERNEL_GENS.lookup(name)


def create_kernel_gen(name: str, channels: int, **kwargs) -> nn.Module:
    """Build the generator registered under ``name`` for ``channels`` input channels.

    Args:
        name: a name from :func:`list_kernel_gens`.
        channels: C, the channels of the input ``x: (B, C, H, W)``.
        **kwargs: the generator's own arguments (``kernel_size``, ``stride``, ``groups`` ...,
            ``device``, ``dtype``).
    """
    return get_kernel_gen(name)(channels, **kwargs)


__all__ = ["register_kernel_gen", "create_kernel_gen", "list_kernel_gens", "get_kernel_gen"]

"""Mixers (``docs/design.md``, "Around the op"): ``Mixer`` = kernel generator + shared
aggregation op, and the named presets through ``create_mixer(name, dim, kernel_size=7,
stride=1, **kw)``."""

from .mixer import Mixer
from .registry import create_mixer, list_mixers, register_mixer
from . import presets  # noqa: F401  (registers the presets)

__all__ = ["Mixer", "create_mixer", "register_mixer", "list_mixers"]

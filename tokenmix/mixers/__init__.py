"""Mixers (``docs/design.md``, "Around the op"): ``Mixer`` = kernel generator + shared
aggregation op, and the named presets through ``create_mixer(name, dim, kernel_size=7,
stride=1, **kw)``."""

from .mixer import Mixer
from .attention import AttentionMixer
from .layers import PointwiseLinear, StarReLU
from .registry import create_mixer, list_mixers, register_mixer
from . import presets  # noqa: F401  (registers the presets)
from . import metaformer_presets  # noqa: F401  (registers pooling and sepconv)
from . import san_presets  # noqa: F401  (registers san_pairwise and san_patchwise)

__all__ = ["Mixer", "AttentionMixer", "PointwiseLinear", "StarReLU", "create_mixer", "register_mixer", "list_mixers"]

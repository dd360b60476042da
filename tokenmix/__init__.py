"""tokenmix: convolution-like mixing, involution and local self-attention as configured
variants of one aggregation operator."""

from .kernel_gen import create_kernel_gen, list_kernel_gens, register_kernel_gen
from .mixers import Mixer, create_mixer, list_mixers, register_mixer
from .models import create_model, list_models, register_model
from .ops import Window, aggregate, aggregate_transpose, correlate

__version__ = "0.1.0"

__all__ = [
    "Window", "aggregate", "correlate", "aggregate_transpose",
    "create_kernel_gen", "list_kernel_gens", "register_kernel_gen",
    "Mixer", "create_mixer", "list_mixers", "register_mixer",
    "create_model", "list_models", "register_model",
    "__version__",
]

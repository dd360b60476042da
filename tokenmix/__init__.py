"""tokenmix: convolution-like mixing, involution and local self-attention as configured
variants of one aggregation operator."""

from .ops import Window, aggregate, aggregate_transpose, correlate

__version__ = "0.1.0"

__all__ = ["Window", "aggregate", "correlate", "aggregate_transpose", "__version__"]

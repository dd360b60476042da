"""FLOP and parameter counting (fvcore and torch's FlopCounterMode), the model-zoo and mixer
tables beside the paper's numbers, and kernel heat maps (paper figure 3)."""

from .flops import FlopCount, UnsupportedOpError, count_flops, flop_analysis, torch_flops
from .params import count_params, param_table

__all__ = [
    "FlopCount",
    "UnsupportedOpError",
    "count_flops",
    "flop_analysis",
    "torch_flops",
    "count_params",
    "param_table",
]

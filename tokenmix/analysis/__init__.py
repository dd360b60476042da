"""FLOP and parameter counting (fvcore and torch's FlopCounterMode), the model-zoo and mixer
tables beside the paper's numbers, and kernel heat maps (paper figure 3).

Importing this package imports neither fvcore nor matplotlib; they load on first use."""

from .flops import FlopCount, UnsupportedOpError, count_flops, flop_analysis, module_hook_flops, torch_flops
from .heatmap import kernel_maps, layer_input, load_image, mixer_layers, plot_heatmaps
from .params import count_params, param_table
from .tables import (PAPER_TABLE1, PUBLISHED, PUBLISHED_METAFORMER, TABLE1_ROWS, PaperEntry, format_mixers,
                     format_table1, format_zoo, mixer_rows, table1_rows, zoo_rows)

__all__ = [
    "FlopCount",
    "UnsupportedOpError",
    "count_flops",
    "flop_analysis",
    "module_hook_flops",
    "torch_flops",
    "count_params",
    "param_table",
    "PAPER_TABLE1",
    "PUBLISHED",
    "PUBLISHED_METAFORMER",
    "PaperEntry",
    "zoo_rows",
    "TABLE1_ROWS",
    "table1_rows",
    "format_table1",
    "format_zoo",
    "mixer_rows",
    "format_mixers",
    "kernel_maps",
    "layer_input",
    "load_image",
    "mixer_layers",
    "plot_heatmaps",
]

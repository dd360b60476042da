"""Parameter counts (fvcore's ``parameter_count`` / ``parameter_count_table``)."""

from __future__ import annotations

from torch import nn

from .._args import check_int

__all__ = ["count_params", "param_table"]


def count_params(model: nn.Module) -> int:
    """Number of parameter elements of ``model`` (shared parameters counted once;
    buffers such as BN running statistics are not parameters)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    from fvcore.nn import parameter_count

    return int(parameter_count(model)[""])


def param_table(model: nn.Module, max_depth: int = 2) -> str:
    """fvcore's markdown table of parameter counts by submodule, ``max_depth`` levels deep."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_int("max_depth", max_depth)
    from fvcore.nn import parameter_count_table

    return parameter_count_table(model, max_depth=max_depth)

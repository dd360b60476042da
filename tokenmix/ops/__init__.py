"""The shared aggregation op: window geometry, functional API (the three primitives and the
fused ``aggregate_linear``), custom ops and backends."""

from .functional import aggregate, aggregate_linear, aggregate_transpose, correlate, local_attention
from .backends import Backend, get_backend, list_backends, register_backend, select_backend
from .window import Window

__all__ = [
    "Window",
    "aggregate",
    "correlate",
    "aggregate_transpose",
    "local_attention",
    "aggregate_linear",
    "Backend",
    "register_backend",
    "get_backend",
    "list_backends",
    "select_backend",
]

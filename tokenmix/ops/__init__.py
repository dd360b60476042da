"""The shared aggregation op: window geometry, functional API, custom ops and backends."""

from .functional import aggregate, aggregate_transpose, correlate, local_attention
from .backends import Backend, get_backend, list_backends, register_backend, select_backend
from .window import Window

__all__ = [
    "Window",
    "aggregate",
    "correlate",
    "aggregate_transpose",
    "local_attention",
    "Backend",
    "register_backend",
    "get_backend",
    "list_backends",
    "select_backend",
]

"""Triton GPU backend (placeholder until the kernels land)."""

from __future__ import annotations

import torch

from .registry import Backend


class TritonBackend(Backend):
    name = "triton"
    devices = frozenset({"cuda"})
    dtypes = frozenset({torch.float16, torch.bfloat16, torch.float32})

    def unavailable_reason(self):
        return "the Triton kernels are not implemented yet"

"""Native CPU backend (placeholder until the C++ kernels land)."""

from __future__ import annotations

import torch

from .registry import Backend


class CpuBackend(Backend):
    name = "cpu"
    devices = frozenset({"cpu"})
    dtypes = frozenset({torch.float32, torch.float64, torch.bfloat16})

    def unavailable_reason(self):
        return "the C++ kernels are not implemented yet"

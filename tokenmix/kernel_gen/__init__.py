"""Kernel generators (``docs/design.md``, "Around the op" and "Extending"): ``nn.Module``s with
channels first in the constructor and ``forward(x, window) -> w: (B|1, G, K*K, Ho|1, Wo|1)``,
registered by name."""

from .registry import create_kernel_gen, get_kernel_gen, list_kernel_gens, register_kernel_gen
from .base import KernelGenerator
from .static import StaticKernel
from .bottleneck import BottleneckKernel
from .query_key import QueryKeyKernel
from .positional import PositionalKernel
from .patch import PatchKernel
from .pool import PoolKernel
from .san import PairwiseKernel, PatchwiseKernel
from .local_relation import LocalRelationKernel
from .relative_attention import RelativeAttentionKernel
from .axial import AxialKernel

__all__ = [
    "register_kernel_gen",
    "create_kernel_gen",
    "list_kernel_gens",
    "get_kernel_gen",
    "KernelGenerator",
    "StaticKernel",
    "BottleneckKernel",
    "QueryKeyKernel",
    "PositionalKernel",
    "PatchKernel",
    "PoolKernel",
    "PairwiseKernel",
    "PatchwiseKernel",
    "LocalRelationKernel",
    "RelativeAttentionKernel",
    "AxialKernel",
]

"""Process-group set-up under torchrun and the collective helpers of the training loop."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Dist:
    """Process-group facts of this process (world 1, rank 0 when not under torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto") -> Dist:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1 in the
    environment): NCCL and ``cuda:LOCAL_RANK`` on GPU, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but torch.cuda.is_available() is False")
    dev = torch.device("cuda", local % max(torch.cuda.device_count(), 1)) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Dist(rank=rank, world=world, local_rank=local, device=dev)


def all_reduce(values: List[float], info: Dist, op=None) -> List[float]:
    """Sum (or ``op``) of ``values`` over the ranks (``values`` itself for one process)."""
    if not info.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t.tolist()


def param_spread(model: nn.Module, info: Dist) -> float:
    """max over parameter elements of (max over ranks - min over ranks); 0.0 when every rank
    holds bitwise-identical parameters (always 0.0 for one process)."""
    if not info.enabled:
        return 0.0
    flat = torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])
    hi, lo = flat.clone(), flat.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    return float((hi - lo).max())


def broadcast_buffers(model: nn.Module, info: Dist) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics), so evaluation on
    each rank uses the model that rank 0 saves."""
    if info.enabled:
        for b in model.buffers():
            dist.broadcast(b, src=0)


def barrier(info: Dist) -> None:
    if info.enabled:
        dist.barrier()


def teardown(info: Dist) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


__all__ = ["Dist", "setup_distributed", "all_reduce", "param_spread", "broadcast_buffers", "barrier", "teardown"]

"""The training loop shared by ``tokenmix train`` and ``tokenmix compare``: optimizer, LR
schedule, the data-parallel loader, one epoch, evaluation, and :class:`Loop`, which runs the
epochs and hands each epoch's metrics to a callback (``train`` writes its checkpoint there)."""

from __future__ import annotations

import math
import sys
import time
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from .config import OPTIMIZERS, TrainConfig
from .distributed import Dist, all_reduce, barrier, broadcast_buffers, param_spread


class Interrupted(Exception):
    """Raised by ``--stop-after-steps`` to simulate a crash inside an epoch."""


def make_optimizer(model: nn.Module, kind: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW or SGD (momentum 0.9, nesterov); no weight decay on biases and norm weights."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
    raise ValueError(f"--optimizer must be one of {OPTIMIZERS}, got {kind!r}")


def make_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int):
    """Linear warm-up for ``warmup_steps``, then cosine decay to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_train_loader(dataset: Dataset, global_batch: int, info: Dist, seed: int) -> DataLoader:
    """Loader of this rank's share of each global batch.

    ``DistributedSampler(shuffle=True, drop_last=True)`` gives rank r the positions
    ``r, r+N, r+2N, ...`` of the epoch's permutation; with ``global_batch / N`` samples per
    rank and the partial last batch dropped, global step k covers exactly the positions
    ``[k*global_batch, (k+1)*global_batch)`` of the permutation for every N.
    """
    if global_batch % info.world:
        raise ValueError(f"--batch-size {global_batch} (global) must be divisible by the world size {info.world}")
    sampler = DistributedSampler(dataset, num_replicas=info.world, rank=info.rank, shuffle=True, seed=seed,
                                 drop_last=True)
    return DataLoader(dataset, batch_size=global_batch // info.world, sampler=sampler, drop_last=True)


def _progress(iterable, enabled: Optional[bool], desc: str, total: int):
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, disable=None if enabled is None else not enabled,
                dynamic_ncols=True, file=sys.stderr)


def train_epoch(model: nn.Module, loader: DataLoader, optimizer, scheduler, info: Dist, *, desc: str = "",
                progress: Optional[bool] = None, stop_after_steps: Optional[int] = None,
                steps_done: int = 0) -> Dict[str, float]:
    """One pass over ``loader`` (batches ``x: (B, C, H, W)``, ``y: (B,)``); returns the epoch's
    mean train loss and accuracy over all ranks.

    ``stop_after_steps``: raise :class:`Interrupted` once the run's total optimizer steps reach it.
    """
    model.train()
    loss_sum = correct = count = 0.0
    bar = _progress(loader, progress if info.main else False, desc, len(loader))
    for x, y in bar:
        x, y = x.to(info.device, non_blocking=True), y.to(info.device, non_blocking=True)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        steps_done += 1
        n = y.numel()
        loss_sum += float(loss.detach()) * n
        correct += float((logits.detach().argmax(1) == y).sum())
        count += n
        bar.set_postfix(loss=f"{loss_sum / count:.3f}", acc=f"{correct / count:.3f}")
        if stop_after_steps is not None and steps_done >= stop_after_steps:
            bar.close()
            raise Interrupted(steps_done)
    bar.close()
    loss_sum, correct, count = all_reduce([loss_sum, correct, count], info)
    return {"train_loss": loss_sum / max(count, 1), "train_acc": correct / max(count, 1)}


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, batch_size: int, info: Dist) -> Dict[str, float]:
    """Loss and accuracy on ``dataset`` (``x: (N, C, H, W)``, ``y: (N,)``); rank r evaluates
    samples ``r, r+N, ...`` and the sums are all-reduced, so every sample counts once.
    ``model`` is the unwrapped module."""
    if len(dataset) == 0:
        raise ValueError("the test split is empty: nothing to evaluate (check --test-fraction)")
    was = model.training
    model.eval()
    part = Subset(dataset, range(info.rank, len(dataset), info.world))
    loss_sum = correct = 0.0
    for x, y in DataLoader(part, batch_size=batch_size):
        x, y = x.to(info.device), y.to(info.device)
        logits = model(x)
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += float((logits.argmax(1) == y).sum())
    loss_sum, correct = all_reduce([loss_sum, correct], info)
    model.train(was)
    n = len(dataset)
    return {"test_loss": loss_sum / n, "test_acc": correct / n}


EpochCallback = Callable[["Loop", Dict[str, Any]], None]


class Loop:
    """The epochs of one run of ``model`` on ``split`` (a :class:`tokenmix.data.DataSplit`)
    under ``config`` (batch size, optimizer, learning rate, warm-up, epochs, seed, progress).

    The optimizer, the schedule and the loader are built here; restore a checkpoint into
    ``loop.model`` / ``loop.optimizer`` / ``loop.scheduler`` before :meth:`run`. ``net`` is
    what the forward runs (the DistributedDataParallel wrapper under torchrun), ``model`` the
    module that is evaluated and saved. Determinism: epoch e's data order is a function of
    ``(config.seed, e)`` only, so running epochs ``[start, epochs)`` after restoring the
    state of epoch ``start`` replays exactly what an uninterrupted run does.
    """

    def __init__(self, model: nn.Module, split, config: TrainConfig, info: Optional[Dist] = None,
                 net: Optional[nn.Module] = None, eval_batch_size: Optional[int] = None, label: str = ""):
        info = info or Dist()
        self.model, self.net, self.split, self.config, self.info = model, net or model, split, config, info
        self.eval_batch_size = eval_batch_size or config.batch_size
        self.label = label
        self.loader = make_train_loader(split.train, config.batch_size, info, config.seed)
        self.steps_per_epoch = len(self.loader)
        if self.steps_per_epoch == 0:
            raise ValueError(f"--batch-size {config.batch_size} is larger than the training split "
                             f"({len(split.train)} samples of {config.data!r})")
        self.optimizer = make_optimizer(model, config.optimizer, config.lr, config.weight_decay)
        self.scheduler = make_scheduler(self.optimizer, config.epochs * self.steps_per_epoch,
                                        int(round(config.warmup_epochs * self.steps_per_epoch)))

    def run(self, start: int = 0, on_epoch: Optional[EpochCallback] = None) -> List[Dict[str, Any]]:
        """Train epochs ``start .. config.epochs - 1``; after each, ``on_epoch(self, metrics)``
        (every rank). Returns the metrics of the epochs run (one dict per epoch)."""
        cfg, info = self.config, self.info
        history = []
        steps = start * self.steps_per_epoch
        for epoch in range(start, cfg.epochs):
            self.loader.sampler.set_epoch(epoch)
            t0 = time.perf_counter()
            m = train_epoch(self.net, self.loader, self.optimizer, self.scheduler, info,
                            desc=f"{self.label}epoch {epoch + 1}/{cfg.epochs}", progress=cfg.progress,
                            stop_after_steps=cfg.stop_after_steps, steps_done=steps)
            steps += self.steps_per_epoch
            train_time = time.perf_counter() - t0
            broadcast_buffers(self.model, info)
            m.update(evaluate(self.model, self.split.test, self.eval_batch_size, info))
            m = {"epoch": epoch + 1, **m, "lr": self.optimizer.param_groups[0]["lr"], "time_s": train_time,
                 "world_size": info.world, "param_spread": param_spread(self.model, info)}
            history.append(m)
            if on_epoch is not None:
                on_epoch(self, m)
            barrier(info)
        return history


__all__ = ["Loop", "Interrupted", "make_optimizer", "make_scheduler", "make_train_loader", "train_epoch", "evaluate"]

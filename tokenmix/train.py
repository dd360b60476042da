"""``tokenmix train``: train a registered model (or ``small:MIXER``) on ``digits`` or an image
folder, with a checkpoint every epoch, ``--resume``, JSON-lines metrics, and data-parallel
training through PyTorch's own distributed stack::

    tokenmix train --model small:involution --data digits --epochs 10 --out runs/inv
    torchrun --nproc_per_node=2 -m tokenmix.train --model small:involution --data digits

Under torchrun (``RANK``/``WORLD_SIZE`` in the environment) the model is wrapped in
``DistributedDataParallel`` (gloo on CPU, NCCL on GPU); every rank reads its share of each
global batch through a ``DistributedSampler``; only rank 0 writes files.

Files in ``--out``:

- ``model.safetensors``: the weights after the last finished epoch (metadata: epoch, model).
- ``train_state.pt``: optimizer + LR schedule state, epoch, RNG state (``torch.save``; read
  back with ``torch.load(weights_only=True)``).
- ``metrics.jsonl``: one JSON object per epoch.
- ``config.json``: the run's arguments.

Determinism: the data order of epoch e is a function of ``(seed, e)`` only (the
sampler's permutation), and the split of each global batch over ranks takes consecutive
positions of that permutation, so a run with N processes sees the same global batches as a
run with 1 process and ``--resume`` replays exactly the epochs that were not finished.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from ._args import check_int
from .cli import Command

OPTIMIZERS = ("adamw", "sgd")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


# ----------------------------------------------------------------------------- config


@dataclass
class TrainConfig:
    """Arguments of one training run (``tokenmix train --help`` documents each)."""

    model: str = "small:conv"
    data: str = "digits"
    epochs: int = 10
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.01
    optimizer: str = "adamw"
    warmup_epochs: float = 0.5
    out: str = "runs/train"
    resume: bool = False
    size: Optional[int] = None
    seed: int = 0
    test_fraction: float = 0.2
    device: str = "auto"
    threads: Optional[int] = None
    dtype: str = "float32"
    sync_bn: bool = False
    model_args: Dict[str, Any] = field(default_factory=dict)
    progress: Optional[bool] = None
    stop_after_steps: Optional[int] = None

    def check(self) -> None:
        for name in ("epochs", "batch_size"):
            check_int(name, getattr(self, name))
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"threads must be a positive int or None, got {self.threads!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")


# ----------------------------------------------------------------------------- model


def build_model(name: str, num_classes: int, in_channels: int, **overrides) -> nn.Module:
    """``small:MIXER`` -> :class:`tokenmix.small_net.SmallNet`; any other name ->
    ``tokenmix.models.create_model(name, num_classes=..., **overrides)``."""
    from .small_net import SmallNet, parse_small_model

    mixer = parse_small_model(name)
    if mixer is not None:
        return SmallNet(mixer, num_classes=num_classes, in_channels=in_channels, **overrides)
    try:
        from .models import create_model
    except ImportError as e:  # pragma: no cover - depends on the models package being present
        raise ValueError(f"model {name!r}: tokenmix.models is not available ({e}); use small:MIXER") from e
    overrides.setdefault("in_chans", in_channels)
    return create_model(name, num_classes=num_classes, **overrides)


def model_in_channels(model: nn.Module) -> Optional[int]:
    """Input channels of the first Conv2d (None when the model has none)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    return None


def count_macs(model: nn.Module, x: torch.Tensor) -> Dict[str, Any]:
    """Multiply-adds of one forward of ``model`` on ``x`` (model in eval mode).

    Uses ``tokenmix.analysis.count_flops`` (fvcore, 1 flop = 1 multiply-add) when present,
    else torch's FlopCounterMode divided by 2 (it counts 2 flops per multiply-add).
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            try:
                from .analysis import count_flops  # type: ignore[attr-defined]
            except ImportError:
                count_flops = None
            if count_flops is not None:
                counted = count_flops(model, x, strict=False)
                return {"macs": int(counted.total), "counter": "fvcore via tokenmix.analysis.count_flops",
                        "unsupported_ops": dict(counted.unsupported)}
            from torch.utils.flop_counter import FlopCounterMode

            with FlopCounterMode(display=False) as fc:
                model(x)
            return {"macs": int(fc.get_total_flops()) // 2, "counter": "torch FlopCounterMode / 2"}
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------- distributed


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
        raise ValueError("device='cuda' but torch.cuda.is_available() is False")
    dev = torch.device("cuda", local % max(torch.cuda.device_count(), 1)) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Dist(rank=rank, world=world, local_rank=local, device=dev)


def _all_reduce(values: List[float], info: Dist, op=None) -> List[float]:
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


# ----------------------------------------------------------------------------- loops


class _Interrupted(Exception):
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
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {kind!r}")


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
        raise ValueError(f"batch_size={global_batch} (global) must be divisible by the world size {info.world}")
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
    """One pass over ``loader``; returns the epoch's mean train loss and accuracy over all ranks.

    ``stop_after_steps``: raise ``_Interrupted`` once the run's total optimizer steps reach it.
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
            raise _Interrupted(steps_done)
    bar.close()
    loss_sum, correct, count = _all_reduce([loss_sum, correct, count], info)
    return {"train_loss": loss_sum / max(count, 1), "train_acc": correct / max(count, 1)}


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, batch_size: int, info: Dist) -> Dict[str, float]:
    """Loss and accuracy on ``dataset``; rank r evaluates samples ``r, r+N, ...`` and the sums
    are all-reduced, so every sample counts once. ``model`` is the unwrapped module."""
    was = model.training
    model.eval()
    part = Subset(dataset, range(info.rank, len(dataset), info.world))
    loss_sum = correct = 0.0
    for x, y in DataLoader(part, batch_size=batch_size):
        x, y = x.to(info.device), y.to(info.device)
        logits = model(x)
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += float((logits.argmax(1) == y).sum())
    loss_sum, correct = _all_reduce([loss_sum, correct], info)
    model.train(was)
    n = len(dataset)
    return {"test_loss": loss_sum / max(n, 1), "test_acc": correct / max(n, 1)}


# ----------------------------------------------------------------------------- checkpoints


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_checkpoint(out: Path, model: nn.Module, optimizer, scheduler, epoch: int, config: TrainConfig) -> None:
    """Write ``model.safetensors`` then ``train_state.pt`` (each atomically) for ``epoch``
    finished epochs."""
    from safetensors.torch import save_model

    meta = {"epoch": str(epoch), "model": config.model, "format": "pt"}
    _atomic(out / "model.safetensors", lambda p: save_model(model, str(p), metadata=meta))
    state = {"epoch": epoch, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "rng_cpu": torch.get_rng_state(), "model": config.model, "data": config.data,
             "batch_size": config.batch_size, "seed": config.seed}
    _atomic(out / "train_state.pt", lambda p: torch.save(state, p))


def load_checkpoint(out: Path, model: nn.Module, optimizer, scheduler, config: TrainConfig, device) -> int:
    """Restore weights, optimizer, schedule and RNG from ``out``; returns the finished epochs."""
    from safetensors import safe_open
    from safetensors.torch import load_model

    state = torch.load(out / "train_state.pt", map_location="cpu", weights_only=True)
    for key in ("model", "data", "batch_size", "seed"):
        if state[key] != getattr(config, key):
            raise ValueError(f"--resume: checkpoint in {str(out)!r} has {key}={state[key]!r}, "
                             f"this run has {key}={getattr(config, key)!r}")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        weights_epoch = int((f.metadata() or {}).get("epoch", -1))
    if weights_epoch != state["epoch"]:
        raise ValueError(f"--resume: {str(out / 'model.safetensors')!r} is from epoch {weights_epoch} but "
                         f"train_state.pt from epoch {state['epoch']}; the checkpoint is inconsistent")
    load_model(model, str(out / "model.safetensors"), strict=True, device=str(device))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng_cpu"])
    return int(state["epoch"])


# ----------------------------------------------------------------------------- main loop


def train(config: TrainConfig) -> Dict[str, Any]:
    """Run one training (distributed when launched by torchrun). Returns the last epoch's
    metrics (on every rank). ``config.threads`` applies for the duration of the call."""
    config.check()
    threads_before = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        return _train(config)
    finally:
        torch.set_num_threads(threads_before)


def _train(config: TrainConfig) -> Dict[str, Any]:
    info = setup_distributed(config.device)
    try:
        return _train_in_group(config, info)
    finally:
        if info.enabled and dist.is_initialized():
            dist.destroy_process_group()


def _train_in_group(config: TrainConfig, info: Dist) -> Dict[str, Any]:
    from .data import load_data

    out = Path(config.out)
    if config.stop_after_steps is not None and config.stop_after_steps < 1:
        raise ValueError(f"stop_after_steps must be >= 1, got {config.stop_after_steps!r}")
    has_ckpt = (out / "train_state.pt").exists()
    if has_ckpt and not config.resume:
        raise ValueError(f"out directory {str(out)!r} already holds a checkpoint; pass --resume to continue it "
                         "or choose another --out")

    split = load_data(config.data, size=config.size, test_fraction=config.test_fraction, seed=config.seed)
    torch.manual_seed(config.seed)
    model = build_model(config.model, split.num_classes, split.in_channels, **config.model_args)
    want = model_in_channels(model)
    if want is not None and want != split.in_channels:
        if split.in_channels == 1:  # grayscale into an RGB model: repeat the channel
            for ds in (split.train, split.test):
                ds.tensors = (ds.tensors[0].expand(-1, want, -1, -1).contiguous(), ds.tensors[1])
        else:
            raise ValueError(f"model {config.model!r} expects {want} input channels, data {config.data!r} has "
                             f"{split.in_channels}")
    dtype = DTYPES[config.dtype]
    if dtype != torch.float32:
        for ds in (split.train, split.test):
            ds.tensors = (ds.tensors[0].to(dtype), ds.tensors[1])
    model.to(device=info.device, dtype=dtype)
    if config.sync_bn:
        if info.device.type != "cuda":
            raise ValueError("--sync-bn needs GPUs (torch's SyncBatchNorm does not run on CPU); on CPU use a "
                             "model without BatchNorm, e.g. --model small:MIXER --model-arg norm=group")
        if info.enabled:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    loader = make_train_loader(split.train, config.batch_size, info, config.seed)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size={config.batch_size} is larger than the training split "
                         f"({len(split.train)} samples of {config.data!r})")
    optimizer = make_optimizer(model, config.optimizer, config.lr, config.weight_decay)
    scheduler = make_scheduler(optimizer, config.epochs * steps_per_epoch,
                               int(round(config.warmup_epochs * steps_per_epoch)))
    start = 0
    if config.resume and has_ckpt:
        start = load_checkpoint(out, model, optimizer, scheduler, config, info.device)
        if info.main:
            print(f"resuming {str(out)!r} after epoch {start}", file=sys.stderr)
    elif config.resume and info.main:
        print(f"--resume: no checkpoint in {str(out)!r}, starting from scratch", file=sys.stderr)

    if info.main:
        out.mkdir(parents=True, exist_ok=True)
        cfg = asdict(config)
        cfg.update(world_size=info.world, num_classes=split.num_classes, classes=split.classes,
                   train_size=len(split.train), test_size=len(split.test))
        (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        metrics_path = out / "metrics.jsonl"
        if metrics_path.exists():  # drop lines of epochs the checkpoint does not hold
            keep = [ln for ln in metrics_path.read_text().splitlines() if ln.strip()
                    and json.loads(ln).get("epoch", 0) <= start]
            metrics_path.write_text("".join(k + "\n" for k in keep))

    net = model
    if info.enabled:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == "cuda" else None)

    last: Dict[str, Any] = {}
    steps = start * steps_per_epoch
    for epoch in range(start, config.epochs):
        loader.sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        m = train_epoch(net, loader, optimizer, scheduler, info, desc=f"epoch {epoch + 1}/{config.epochs}",
                        progress=config.progress, stop_after_steps=config.stop_after_steps, steps_done=steps)
        steps += steps_per_epoch
        train_time = time.perf_counter() - t0
        broadcast_buffers(model, info)
        m.update(evaluate(model, split.test, config.batch_size, info))
        last = {"epoch": epoch + 1, **m, "lr": optimizer.param_groups[0]["lr"], "time_s": train_time,
                "world_size": info.world, "param_spread": param_spread(model, info)}
        if info.main:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(last) + "\n")
            save_checkpoint(out, model, optimizer, scheduler, epoch + 1, config)
            print(f"epoch {epoch + 1}/{config.epochs}  train loss {m['train_loss']:.4f} acc {m['train_acc']:.4f}"
                  f"  test loss {m['test_loss']:.4f} acc {m['test_acc']:.4f}  {train_time:.1f}s", file=sys.stderr)
        if info.enabled:
            dist.barrier()
    return last


# ----------------------------------------------------------------------------- CLI


def _model_arg(text: str):
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--model-arg expects KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        pass  # a bare string such as norm=group
    return key, value


def configure(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    p.add_argument("--model", default=d.model,
                   help="a name from tokenmix.models.list_models(), or small:MIXER for the small compare "
                        f"backbone with that mixer (default {d.model})")
    p.add_argument("--model-arg", action="append", type=_model_arg, default=[], metavar="KEY=VALUE",
                   help="model constructor override, repeatable (e.g. width=64, norm=group)")
    p.add_argument("--data", default=d.data, help="digits | folder:PATH (one sub-folder per class)")
    p.add_argument("--size", type=int, default=d.size, help="resize images to SIZE x SIZE "
                   "(default: 8 for digits, 32 for folders)")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch (split over processes)")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer)
    p.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--test-fraction", type=float, default=d.test_fraction)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=d.device)
    p.add_argument("--threads", type=int, default=d.threads,
                   help="torch intra-op threads per process (default: torch's choice; tiny models on a "
                        "busy CPU run much faster with 1)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=d.dtype,
                   help="parameter and data dtype (float64 for exactness checks)")
    p.add_argument("--sync-bn", action="store_true",
                   help="GPU only: BatchNorm statistics over the global batch (SyncBatchNorm) under torchrun")
    p.add_argument("--out", default=d.out, help=f"output directory (default {d.out})")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out if there is one")
    p.add_argument("--progress", dest="progress", action="store_true", default=None,
                   help="always show progress bars (default: only on a terminal)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--stop-after-steps", type=int, default=None,
                   help="testing aid: stop (as if killed) after this many optimizer steps in total")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(model=args.model, data=args.data, epochs=args.epochs, batch_size=args.batch_size,
                       lr=args.lr, weight_decay=args.weight_decay, optimizer=args.optimizer,
                       warmup_epochs=args.warmup_epochs, out=args.out, resume=args.resume, size=args.size,
                       seed=args.seed, test_fraction=args.test_fraction, device=args.device, threads=args.threads,
                       dtype=args.dtype, sync_bn=args.sync_bn,
                       model_args=dict(args.model_arg), progress=args.progress,
                       stop_after_steps=args.stop_after_steps)


def run(args: argparse.Namespace) -> int:
    try:
        last = train(config_from_args(args))
    except _Interrupted as e:
        print(f"stopped after {e.args[0]} optimizer steps (--stop-after-steps); rerun with --resume",
              file=sys.stderr)
        return 3
    if last and int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(last))
    return 0


COMMAND = Command(help="train a registered model (torchrun for several processes)", configure=configure, run=run)


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m tokenmix.train ...`` / ``torchrun -m tokenmix.train ...``."""
    parser = argparse.ArgumentParser(prog="tokenmix.train", description=__doc__.splitlines()[0])
    configure(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

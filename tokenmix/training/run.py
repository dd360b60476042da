"""One training run end to end: data, model, optional resume, the loop, and the files in
``--out`` (metrics, config, checkpoints); distributed when launched by torchrun."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from torch import nn

from .checkpoint import existing_run_files, load_checkpoint, save_checkpoint, write_file_atomically
from .config import DTYPES, TrainConfig
from .distributed import Dist, setup_distributed, teardown
from .loop import Loop


def build_model(name: str, num_classes: int, in_channels: int, **overrides) -> nn.Module:
    """``small:MIXER`` -> :class:`tokenmix.small_net.SmallNet`; any other name ->
    ``tokenmix.models.create_model(name, num_classes=..., **overrides)``."""
    from ..models import create_model
    from ..small_net import SmallNet, parse_small_model

    mixer = parse_small_model(name)
    if mixer is not None:
        return SmallNet(mixer, num_classes=num_classes, in_channels=in_channels, **overrides)
    overrides.setdefault("in_chans", in_channels)
    return create_model(name, num_classes=num_classes, **overrides)


def model_in_channels(model: nn.Module) -> Optional[int]:
    """Input channels of the first Conv2d (None when the model has none)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    return None


def count_macs(model: nn.Module, x: torch.Tensor) -> Dict[str, Any]:
    """Multiply-adds of one forward of ``model`` on ``x: (1, C, H, W)`` (model in eval mode),
    counted by ``tokenmix.analysis.count_flops`` (fvcore, 1 flop = 1 multiply-add)."""
    from ..analysis import count_flops

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            counted = count_flops(model, x, strict=False)
    finally:
        model.train(was_training)
    return {"macs": int(counted.total), "counter": "fvcore via tokenmix.analysis.count_flops",
            "unsupported_ops": dict(counted.unsupported)}


def train(config: TrainConfig) -> Dict[str, Any]:
    """Run one training (distributed when launched by torchrun). Returns the last epoch's
    metrics (on every rank; empty when a resumed run had no epoch left). ``config.threads``
    applies for the duration of the call."""
    config.check()
    threads_before = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    info = setup_distributed(config.device)
    try:
        return _train(config, info)
    finally:
        teardown(info)
        torch.set_num_threads(threads_before)


def _fit_channels(split, model: nn.Module, config: TrainConfig) -> None:
    """Repeat grayscale data to the model's input channels; cast the data to the run's dtype."""
    want = model_in_channels(model)
    if want is not None and want != split.in_channels:
        if split.in_channels != 1:
            raise ValueError(f"--model {config.model!r} expects {want} input channels, --data {config.data!r} has "
                             f"{split.in_channels}")
        for ds in (split.train, split.test):
            ds.tensors = (ds.tensors[0].expand(-1, want, -1, -1).contiguous(), ds.tensors[1])
    dtype = DTYPES[config.dtype]
    if dtype != torch.float32:
        for ds in (split.train, split.test):
            ds.tensors = (ds.tensors[0].to(dtype), ds.tensors[1])


def _trim_metrics(path: Path, epochs: int) -> None:
    """Keep the lines of epochs ``<= epochs`` (the ones the checkpoint holds); a line a kill
    cut short is dropped."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("epoch", 0) <= epochs:
                keep.append(line)
        except ValueError:
            continue
    write_file_atomically(path, lambda p: p.write_text("".join(k + "\n" for k in keep)))


def _train(config: TrainConfig, info: Dist) -> Dict[str, Any]:
    from ..data import load_data

    out = Path(config.out)
    found = existing_run_files(out) if out.is_dir() else []
    if found and not config.resume:
        raise ValueError(f"--out {str(out)!r} already holds a run ({', '.join(found)}); pass --resume to continue "
                         "it or choose another --out")
    split = load_data(config.data, size=config.size, test_fraction=config.test_fraction, seed=config.seed)
    torch.manual_seed(config.seed)
    try:
        model = build_model(config.model, split.num_classes, split.in_channels, **config.model_args)
    except (ValueError, TypeError) as e:
        args = "".join(f" --model-arg {k}={v!r}" for k, v in config.model_args.items())
        raise ValueError(f"--model {config.model!r}{args}: {e}") from e
    _fit_channels(split, model, config)
    model.to(device=info.device, dtype=DTYPES[config.dtype])
    if config.sync_bn:
        if info.device.type != "cuda":
            raise ValueError("--sync-bn needs GPUs (torch's SyncBatchNorm does not run on CPU); on CPU use a "
                             "model without BatchNorm, e.g. --model small:MIXER --model-arg norm=group")
        if info.enabled:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    net = model
    if info.enabled:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    loop = Loop(model, split, config, info, net=net)
    start = 0
    if config.resume:
        done = load_checkpoint(out, model, loop.optimizer, loop.scheduler, config, info.device)
        start = done or 0
        if info.main:
            print(f"resuming {str(out)!r} after epoch {start}" if done is not None
                  else f"--resume: no checkpoint in {str(out)!r}, starting from scratch", file=sys.stderr)
    if info.main:
        out.mkdir(parents=True, exist_ok=True)
        cfg = asdict(config)
        cfg.update(world_size=info.world, num_classes=split.num_classes, classes=split.classes,
                   train_size=len(split.train), test_size=len(split.test))
        write_file_atomically(out / "config.json", lambda p: p.write_text(json.dumps(cfg, indent=2) + "\n"))
        _trim_metrics(out / "metrics.jsonl", start)

    def on_epoch(loop: Loop, m: Dict[str, Any]) -> None:
        if not info.main:
            return
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(m) + "\n")
        save_checkpoint(out, model, loop.optimizer, loop.scheduler, m["epoch"], config)
        print(f"epoch {m['epoch']}/{config.epochs}  train loss {m['train_loss']:.4f} acc {m['train_acc']:.4f}"
              f"  test loss {m['test_loss']:.4f} acc {m['test_acc']:.4f}  {m['time_s']:.1f}s", file=sys.stderr)

    if start >= config.epochs and info.main:
        print(f"{str(out)!r} has finished its {config.epochs} epochs; nothing to do", file=sys.stderr)
    history = loop.run(start, on_epoch)
    return history[-1] if history else {}


__all__ = ["train", "build_model", "count_macs", "model_in_channels"]

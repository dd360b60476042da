"""Checkpoints of ``tokenmix train``, each written as a unit.

Layout of an output directory::

    checkpoints/epoch-0003/model.safetensors   weights + model config (metadata) after epoch 3
    checkpoints/epoch-0003/train_state.pt      optimizer, schedule, RNG, epoch, run arguments
    model.safetensors                          a copy of the last checkpoint's weights
    metrics.jsonl, config.json

A checkpoint directory is written under a temporary name (``.epoch-0003.tmp``), each file is
fsynced, the directory is fsynced and then renamed, and the parent directory is fsynced: a
directory named ``epoch-NNNN`` is always complete. Older checkpoint directories are removed
only after the new one is in place, and ``model.safetensors`` is replaced by
write-fsync-rename as well, so a SIGKILL (or a power cut, on file systems that honour
fsync) at any moment leaves the last complete epoch resumable and every file whole.

The weights' metadata carries the model config (``tokenmix.config``, see
:func:`tokenmix.models.config_from_weights`), so ``viz``, ``flops`` and ``train --resume``
rebuild the model from the file alone.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from .config import TrainConfig

CHECKPOINTS = "checkpoints"
WEIGHTS = "model.safetensors"
STATE = "train_state.pt"
RUN_FILES = ("config.json", "metrics.jsonl", WEIGHTS, STATE, CHECKPOINTS)
_EPOCH_DIR = re.compile(r"^epoch-(\d+)$")
# Testing aid: seconds to sleep between the steps of a checkpoint write, so that a test can
# kill a run in the middle of one. 0 (no pause) unless the environment sets it.
_PAUSE_ENV = "TOKENMIX_CHECKPOINT_PAUSE"


def _pause() -> None:
    seconds = float(os.environ.get(_PAUSE_ENV, "0") or 0)
    if seconds > 0:
        time.sleep(seconds)


def fsync_dir(path: Path) -> None:
    """fsync a directory, so the renames and creations inside it are durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def write_file_atomically(path: Path, write) -> None:
    """``write(tmp_path)``, fsync, rename over ``path``, fsync the directory: readers see the
    old file or the new one, never a part."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    _fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def existing_run_files(out: Path) -> List[str]:
    """Names of the files and directories a training run writes that ``out`` already holds."""
    return [name for name in RUN_FILES if (out / name).exists()]


def checkpoint_epochs(out: Path) -> List[int]:
    """Epochs of the complete checkpoints in ``out``, ascending."""
    root = out / CHECKPOINTS
    if not root.is_dir():
        return []
    epochs = []
    for p in root.iterdir():
        m = _EPOCH_DIR.match(p.name)
        if m and p.is_dir():
            epochs.append(int(m.group(1)))
    return sorted(epochs)


def checkpoint_dir(out: Path, epoch: int) -> Path:
    return out / CHECKPOINTS / f"epoch-{epoch:04d}"


def save_checkpoint(out: Path, model: nn.Module, optimizer, scheduler, epoch: int, config: TrainConfig) -> Path:
    """Write the checkpoint of ``epoch`` finished epochs as a unit (see the module docstring),
    drop the older ones and refresh ``out/model.safetensors``. Returns its directory."""
    from ..models.weights import save_weights

    root = out / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir(out, epoch)
    tmp = root / f".{final.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    meta = {"epoch": str(epoch), "model": config.model}
    save_weights(model, tmp / WEIGHTS, metadata=meta)
    _fsync_file(tmp / WEIGHTS)
    _pause()
    state = {"epoch": epoch, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "rng_cpu": torch.get_rng_state(), "model": config.model, "run": json.dumps(config.run_fields())}
    torch.save(state, tmp / STATE)
    _fsync_file(tmp / STATE)
    fsync_dir(tmp)
    _pause()
    if final.exists():  # a leftover of a run killed after this rename (resume replays the epoch)
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_dir(root)
    _pause()
    for e in checkpoint_epochs(out):
        if e < epoch:
            shutil.rmtree(checkpoint_dir(out, e))
    _pause()
    write_file_atomically(out / WEIGHTS, lambda p: shutil.copyfile(final / WEIGHTS, p))
    return final


def _differences(saved: Dict[str, Any], now: Dict[str, Any]) -> List[str]:
    keys = sorted(set(saved) | set(now), key=str)
    return [f"{k}: checkpoint {saved.get(k)!r}, this run {now.get(k)!r}" for k in keys if saved.get(k) != now.get(k)]


def _flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        elif isinstance(v, (list, tuple)) and v and all(isinstance(x, dict) for x in v):
            for i, x in enumerate(v):
                flat.update(_flatten(x, f"{prefix}{k}.{i}."))
        else:
            flat[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return flat


def load_checkpoint(out: Path, model: nn.Module, optimizer, scheduler, config: TrainConfig, device) -> Optional[int]:
    """Restore weights, optimizer, schedule and RNG from the last complete checkpoint in
    ``out``; returns its epoch, or None when there is none. ValueError naming the file when
    a file is corrupt, and naming every difference when the checkpoint's model config or run
    arguments (:data:`tokenmix.training.config.RUN_FIELDS`) differ from this run's."""
    from ..models.weights import config_from_metadata, load_state_dict_strict, read_weights

    root = out / CHECKPOINTS
    if root.is_dir():
        for p in root.glob(".*.tmp"):  # a write a kill interrupted
            shutil.rmtree(p, ignore_errors=True)
    epochs = checkpoint_epochs(out)
    if not epochs:
        return None
    where = checkpoint_dir(out, epochs[-1])
    tensors, meta = read_weights(where / WEIGHTS, device=str(device))
    saved_model = config_from_metadata(meta, f"weights file {str(where / WEIGHTS)!r}")
    now_model = getattr(model, "config", None)
    if now_model is not None:
        diff = _differences(_flatten(saved_model.to_dict()), _flatten(now_model.to_dict()))
        if diff:
            raise ValueError(f"--resume: the model in {str(where)!r} differs from this run's "
                             f"(--model/--model-arg): {'; '.join(diff)}")
    try:
        state = torch.load(where / STATE, map_location="cpu", weights_only=True)
        run = json.loads(state["run"])
    except Exception as e:
        raise ValueError(f"checkpoint file {str(where / STATE)!r} is not readable: {e}") from e
    diff = _differences(run, json.loads(json.dumps(config.run_fields())))
    if diff:
        hint = (" (the schedule is fixed by --epochs when a run starts: to train longer, start a new run)"
                if "epochs" in run and run["epochs"] != config.epochs else "")
        raise ValueError(f"--resume: the run in {str(out)!r} was started with other arguments: "
                         f"{'; '.join(diff)}{hint}")
    load_state_dict_strict(model, tensors, what=f"weights file {str(where / WEIGHTS)!r}")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng_cpu"])
    return int(state["epoch"])


__all__ = ["save_checkpoint", "load_checkpoint", "checkpoint_epochs", "checkpoint_dir", "existing_run_files",
           "write_file_atomically", "fsync_dir", "CHECKPOINTS", "WEIGHTS", "STATE"]

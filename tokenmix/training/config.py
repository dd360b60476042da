"""The arguments of one training run as a dataclass, their checks, and the command-line
options derived from its fields (help text and choices live in each field's metadata)."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Optional

import torch

from .._args import check_int

OPTIMIZERS = ("adamw", "sgd")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
DEVICES = ("auto", "cpu", "cuda")

# Fields a --resume must agree on with the run that wrote the checkpoint: they fix the data,
# its order and the schedule. The model itself is compared through its config.
RUN_FIELDS = ("data", "size", "test_fraction", "seed", "batch_size", "epochs", "lr", "weight_decay", "optimizer",
              "warmup_epochs", "dtype")


def _help(text: str, **argparse_kwargs) -> Dict[str, Any]:
    return {"help": text, **argparse_kwargs}


@dataclass
class TrainConfig:
    """Arguments of one training run; each becomes the option ``--name-with-dashes``."""

    model: str = field(default="small:conv", metadata=_help(
        "a name from tokenmix.models.list_models(), or small:MIXER for the small compare backbone with that mixer"))
    data: str = field(default="digits", metadata=_help("digits | folder:PATH (one sub-folder per class)"))
    epochs: int = field(default=10, metadata=_help(
        "epochs of the run; the cosine schedule ends at the last one, so --resume needs the same value"))
    batch_size: int = field(default=64, metadata=_help("global batch (split over processes)"))
    lr: float = field(default=3e-3, metadata=_help("peak learning rate (finite, > 0)"))
    weight_decay: float = field(default=0.01, metadata=_help("decoupled weight decay of the weights (>= 0)"))
    optimizer: str = field(default="adamw", metadata=_help("optimizer", choices=OPTIMIZERS))
    warmup_epochs: float = field(default=0.5, metadata=_help(
        "linear warm-up length in epochs (0 <= warm-up <= epochs), then cosine decay to 0"))
    out: str = field(default="runs/train", metadata=_help("output directory"))
    resume: bool = field(default=False, metadata=_help(
        "continue from the last complete epoch in --out (without it, an --out holding a run is refused)"))
    size: Optional[int] = field(default=None, metadata=_help(
        "resize images to SIZE x SIZE (default: 8 for digits, 32 for folders)"))
    seed: int = field(default=0, metadata=_help("seed of the initialisation, the data order and the split"))
    test_fraction: float = field(default=0.2, metadata=_help("fraction of each class held out for testing"))
    device: str = field(default="auto", metadata=_help("device", choices=DEVICES))
    threads: Optional[int] = field(default=None, metadata=_help(
        "torch intra-op threads per process (default: torch's choice; tiny models on a busy CPU run much "
        "faster with 1)"))
    dtype: str = field(default="float32", metadata=_help(
        "parameter and data dtype (float64 for exactness checks)", choices=tuple(DTYPES)))
    sync_bn: bool = field(default=False, metadata=_help(
        "GPU only: BatchNorm statistics over the global batch (SyncBatchNorm) under torchrun"))
    model_args: Dict[str, Any] = field(default_factory=dict, metadata=_help(
        "model constructor override KEY=VALUE, repeatable (e.g. width=64, norm=group)", flag="--model-arg"))
    progress: Optional[bool] = field(default=None, metadata=_help(
        "always show progress bars (--no-progress: never; default: only on a terminal)"))
    stop_after_steps: Optional[int] = field(default=None, metadata=_help(
        "testing aid: stop (as if killed) after this many optimizer steps in total"))

    def check(self) -> None:
        """ValueError naming the option of the first bad value."""
        for name in ("epochs", "batch_size"):
            check_int(f"--{_dash(name)}", getattr(self, name))
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"--lr must be a finite number > 0, got {self.lr!r}")
        if not (isinstance(self.weight_decay, (int, float)) and math.isfinite(self.weight_decay)
                and self.weight_decay >= 0):
            raise ValueError(f"--weight-decay must be a finite number >= 0, got {self.weight_decay!r}")
        if not (isinstance(self.warmup_epochs, (int, float)) and 0 <= self.warmup_epochs <= self.epochs):
            raise ValueError(f"--warmup-epochs must be within the run (0 <= warm-up <= --epochs {self.epochs}), "
                             f"got {self.warmup_epochs!r}")
        if not (isinstance(self.test_fraction, (int, float)) and 0 < self.test_fraction < 1):
            raise ValueError(f"--test-fraction must be in (0, 1), got {self.test_fraction!r}")
        for name, allowed in (("optimizer", OPTIMIZERS), ("dtype", tuple(DTYPES)), ("device", DEVICES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("threads", "size", "stop_after_steps"):
            if getattr(self, name) is not None:
                check_int(f"--{_dash(name)}", getattr(self, name))

    def run_fields(self) -> Dict[str, Any]:
        """The fields a ``--resume`` must repeat (:data:`RUN_FIELDS`)."""
        return {k: getattr(self, k) for k in RUN_FIELDS}


def _dash(name: str) -> str:
    return name.replace("_", "-")


def _model_arg(text: str):
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expects KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        pass  # a bare string such as norm=group
    return key, value


def add_config_arguments(parser: argparse.ArgumentParser, cls=TrainConfig, *, include: Optional[Iterable[str]] = None,
                         defaults: Optional[Dict[str, Any]] = None) -> None:
    """Add one option per field of the dataclass ``cls`` (``include``: only those fields, in
    that order; ``defaults``: other defaults than the dataclass's). The type comes from the
    annotation (``Optional[int]``: an int option defaulting to None; ``bool``: a flag;
    ``Optional[bool]``: ``--x`` / ``--no-x``; a dict: repeatable ``KEY=VALUE``); help and
    choices from the field's metadata."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = list(include) if include is not None else list(fields)
    defaults = defaults or {}
    for name in names:
        f = fields[name]
        meta = dict(f.metadata)
        flag = meta.pop("flag", f"--{_dash(name)}")
        if name in defaults:
            default = defaults[name]
        elif f.default is not dataclasses.MISSING:
            default = f.default
        else:
            default = f.default_factory()
        kind = hints[name]
        args = typing.get_args(kind)
        base = next((a for a in args if a is not type(None)), kind) if typing.get_origin(kind) is typing.Union else kind
        if default is not None and "help" in meta and not isinstance(default, (bool, dict)):
            meta["help"] += f" (default {default})"
        if base is bool and kind is not bool:  # Optional[bool]: tri-state
            parser.add_argument(flag, dest=name, action="store_true", default=default, help=meta["help"])
            parser.add_argument(f"--no-{flag[2:]}", dest=name, action="store_false")
        elif base is bool:
            parser.add_argument(flag, dest=name, action="store_true", default=default, help=meta["help"])
        elif typing.get_origin(base) in (dict, Dict) or base is dict:
            parser.add_argument(flag, dest=name, action="append", type=_model_arg, default=[], metavar="KEY=VALUE",
                                help=meta["help"])
        else:
            parser.add_argument(flag, dest=name, type=base, default=default, **meta)


def config_from_args(args: argparse.Namespace, cls=TrainConfig, **extra: Any):
    """An instance of ``cls`` from the options :func:`add_config_arguments` added (fields
    without an option keep their defaults; ``extra`` overrides)."""
    values = {}
    for f in dataclasses.fields(cls):
        if hasattr(args, f.name):
            v = getattr(args, f.name)
            values[f.name] = dict(v) if isinstance(v, list) else v
    values.update(extra)
    return cls(**values)


__all__ = ["TrainConfig", "OPTIMIZERS", "DTYPES", "RUN_FIELDS", "add_config_arguments", "config_from_args"]

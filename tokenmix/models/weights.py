"""Weights on disk as safetensors, and strict state-dict loading with a readable error."""

from __future__ import annotations

import json
import os
from typing import Dict, Mapping, Optional, Union

import torch
from torch import nn

PathLike = Union[str, "os.PathLike[str]"]

CONFIG_KEY = "tokenmix.config"
CONFIG_CLASS_KEY = "tokenmix.config_class"  # "ModelConfig" (also when absent) or "MetaFormerConfig"


def check_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str = "state_dict") -> None:
    """Raise ValueError listing missing keys, unexpected keys and shape mismatches of
    ``state_dict`` against ``model.state_dict()``; return None if they match exactly."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    shapes = sorted(f"{k}: got {tuple(state_dict[k].shape)}, expected {tuple(v.shape)}"
                    for k, v in expected.items() if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape))
    if missing or unexpected or shapes:
        lines = [f"{what} does not match the model ({type(model).__name__}"
                 f"{' ' + repr(model.config.name) if hasattr(model, 'config') else ''}):"]
        lines.append(f"missing keys ({len(missing)}): {missing}")
        lines.append(f"unexpected keys ({len(unexpected)}): {unexpected}")
        if shapes:
            lines.append(f"shape mismatches ({len(shapes)}): {shapes}")
        raise ValueError("\n".join(lines))


def load_state_dict_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str = "state_dict") -> nn.Module:
    """``model.load_state_dict(state_dict, strict=True)`` after :func:`check_state_dict`."""
    check_state_dict(model, state_dict, what)
    model.load_state_dict(dict(state_dict), strict=True)
    return model


def save_weights(model: nn.Module, path: PathLike, metadata: Optional[Dict[str, str]] = None) -> None:
    """Write ``model.state_dict()`` (parameters and buffers) to ``path`` as safetensors.
    A tokenmix backbone's config is stored in the metadata (key ``tokenmix.config``, JSON)."""
    from safetensors.torch import save_file

    meta = dict(metadata or {})
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        meta.setdefault(CONFIG_KEY, json.dumps(config.to_dict()))
        meta.setdefault(CONFIG_CLASS_KEY, type(config).__name__)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(tensors, os.fspath(path), metadata=meta)


def read_weights(path: PathLike, device: Union[str, torch.device] = "cpu"):
    """(state_dict, metadata) of a safetensors file."""
    from safetensors import safe_open

    tensors = {}
    with safe_open(os.fspath(path), framework="pt", device=str(device)) as f:
        meta = f.metadata() or {}
        for k in f.keys():
            tensors[k] = f.get_tensor(k)
    return tensors, meta


def load_weights(model: nn.Module, path: PathLike) -> nn.Module:
    """Load a safetensors file written by :func:`save_weights` into ``model`` strictly (error
    lists missing/unexpected keys and shape mismatches). Returns the model."""
    device = next(iter(model.state_dict().values())).device if len(model.state_dict()) else "cpu"
    tensors, _ = read_weights(path, device)
    return load_state_dict_strict(model, tensors, what=f"weights file {os.fspath(path)!r}")


def config_from_weights(path: PathLike):
    """The :class:`ModelConfig` stored in a safetensors file by :func:`save_weights`."""
    from safetensors import safe_open

    from .config import ModelConfig
    from .metaformer_config import MetaFormerConfig

    with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
    if CONFIG_KEY not in meta:
        raise ValueError(f"weights file {os.fspath(path)!r} has no {CONFIG_KEY!r} metadata")
    classes = {"ModelConfig": ModelConfig, "MetaFormerConfig": MetaFormerConfig}
    name = meta.get(CONFIG_CLASS_KEY, "ModelConfig")
    if name not in classes:
        raise ValueError(f"weights file {os.fspath(path)!r}: unknown config class {name!r}; known: {', '.join(classes)}")
    return classes[name].from_dict(json.loads(meta[CONFIG_KEY]))

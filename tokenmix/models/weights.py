"""Weights on disk as safetensors, and strict state-dict loading with a readable error."""

from __future__ import annotations

import json
import os
from typing import Dict, Mapping, Optional, Union

import torch
from torch import nn

PathLike = Union[str, "os.PathLike[str]"]

CONFIG_KEY = "tokenmix.config"
CONFIG_CLASS_KEY = "tokenmix.config_class"  # the config's class name; absent: a ModelConfig


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
    meta.update(config_metadata(model))
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(tensors, os.fspath(path), metadata=meta)


def config_metadata(model: nn.Module) -> Dict[str, str]:
    """The metadata entries that describe ``model``'s config (empty for a model without one):
    ``tokenmix.config`` (JSON) and ``tokenmix.config_class`` (the config class name)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return {}
    return {CONFIG_KEY: json.dumps(config.to_dict()), CONFIG_CLASS_KEY: type(config).__name__}


def read_weights(path: PathLike, device: Union[str, torch.device] = "cpu"):
    """(state_dict, metadata) of a safetensors file; ValueError naming the file if it is
    missing, truncated or not safetensors."""
    from safetensors import safe_open

    tensors = {}
    try:
        with safe_open(os.fspath(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    except FileNotFoundError as e:
        raise ValueError(f"weights file {os.fspath(path)!r} does not exist") from e
    except Exception as e:  # safetensors' own error types differ across versions
        raise ValueError(f"weights file {os.fspath(path)!r} is not a readable safetensors file: {e}") from e
    return tensors, meta


def load_weights(model: nn.Module, path: PathLike) -> nn.Module:
    """Load a safetensors file written by :func:`save_weights` into ``model`` strictly (error
    lists missing/unexpected keys and shape mismatches). Returns the model."""
    device = next(iter(model.state_dict().values())).device if len(model.state_dict()) else "cpu"
    tensors, _ = read_weights(path, device)
    return load_state_dict_strict(model, tensors, what=f"weights file {os.fspath(path)!r}")


def _config_types() -> Dict[str, type]:
    from ..small_net import SmallNetConfig
    from .config import ModelConfig
    from .metaformer_config import MetaFormerConfig
    from .san import SANConfig

    return {"ModelConfig": ModelConfig, "MetaFormerConfig": MetaFormerConfig, "SmallNetConfig": SmallNetConfig,
            "SANConfig": SANConfig}


def config_from_metadata(meta: Mapping[str, str], what: str):
    """The model config described by safetensors metadata (see :func:`config_metadata`);
    ValueError naming ``what`` when it has none or it cannot be read."""
    if CONFIG_KEY not in meta:
        raise ValueError(f"{what} has no {CONFIG_KEY!r} metadata (it was not written by tokenmix's "
                         "save_weights or tokenmix train); build the model by name and load it with load_weights")
    kind = meta.get(CONFIG_CLASS_KEY, "ModelConfig")
    types = _config_types()
    if kind not in types:
        raise ValueError(f"{what}: unknown config type {kind!r}; known: {', '.join(types)}")
    try:
        return types[kind].from_dict(json.loads(meta[CONFIG_KEY]))
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{what}: cannot read its {CONFIG_KEY!r} metadata: {e}") from e


def config_from_weights(path: PathLike):
    """The model config (a :class:`ModelConfig`, a :class:`MetaFormerConfig`, or a
    :class:`tokenmix.small_net.SmallNetConfig` for ``small:MIXER`` networks) stored in a safetensors file by :func:`save_weights` or
    ``tokenmix train``."""
    from safetensors import safe_open

    try:
        with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
    except FileNotFoundError as e:
        raise ValueError(f"weights file {os.fspath(path)!r} does not exist") from e
    except Exception as e:
        raise ValueError(f"weights file {os.fspath(path)!r} is not a readable safetensors file: {e}") from e
    return config_from_metadata(meta, f"weights file {os.fspath(path)!r}")


def model_from_config(config) -> nn.Module:
    """A fresh model (random weights) built from a config :func:`config_from_weights` returns."""
    from ..small_net import SmallNet, SmallNetConfig
    from .registry import create_model

    if isinstance(config, SmallNetConfig):
        return SmallNet.from_config(config)
    return create_model(config)


def model_from_weights(path: PathLike) -> nn.Module:
    """The model a safetensors file describes (:func:`config_from_weights`), with its weights
    loaded (in the file's dtype). Needs the mixers it names to be registered (``--import``)."""
    model = model_from_config(config_from_weights(path))
    tensors, _ = read_weights(path)
    dtypes = {v.dtype for v in tensors.values() if v.is_floating_point()}
    if len(dtypes) == 1:
        model.to(dtypes.pop())
    return load_state_dict_strict(model, tensors, what=f"weights file {os.fspath(path)!r}")

"""Converter from the official SAN checkpoints (hszhao/SAN, ``model/san.py``) to tokenmix's
``san{10,15,19}_{pairwise,patchwise}``.

Official names (after an optional ``state_dict`` wrapper and ``module.`` prefix, as the official
training script saves them) map one to one onto ours; every name outside a block's SAM is the
same. Inside block ``layer{k}.{j}`` (``X`` a parameter/buffer name):

=================================  ==========================================
``sam.conv1.X``                    ``mixer.generator.query.X``
``sam.conv2.X``                    ``mixer.generator.key.X``
``sam.conv3.X``                    ``mixer.value.X``            (permuted)
``sam.conv_p.X`` (pairwise)        ``mixer.generator.position.X``
``sam.conv_w.{i}.X``               ``mixer.generator.mlp.{i}.X``
``bn2.X``                          ``bn2.X``                    (permuted)
``conv.weight``                    ``conv.weight``              (input channels permuted)
=================================  ==========================================

The permutation: the official aggregation serves the SAM's output channel c with weight channel
``c % G`` (G = mid / share_planes, interleaved), tokenmix's with ``c // share_planes``
(contiguous). tokenmix channel ``c' = g*share_planes + j`` is official channel ``j*G + g``
(:func:`san_channel_permutation`); the rows of ``sam.conv3`` (weight and bias), the entries of
``bn2`` and the input columns of ``conv`` are taken in that order, so the converted model
computes the official function exactly.
"""

from __future__ import annotations

import os
import re
from typing import Dict, Mapping, Optional, Tuple, Union

import torch

from .convert import read_official
from .weights import load_state_dict_strict

_SAM_RULES = (("sam.conv1.", "mixer.generator.query."), ("sam.conv2.", "mixer.generator.key."),
              ("sam.conv3.", "mixer.value."), ("sam.conv_p.", "mixer.generator.position."),
              ("sam.conv_w.", "mixer.generator.mlp."))
_BLOCK = re.compile(r"(layer\d+\.\d+\.)(.*)\Z")
# tensors of a block whose mid-channel axis is permuted: name suffix -> axis
_PERMUTED = {"mixer.value.weight": 0, "mixer.value.bias": 0, "bn2.weight": 0, "bn2.bias": 0,
             "bn2.running_mean": 0, "bn2.running_var": 0, "conv.weight": 1}


def san_channel_permutation(mid: int, share_planes: int) -> torch.Tensor:
    """Index tensor p of length ``mid``: tokenmix channel c' holds official channel p[c'] =
    ``(c' % share_planes) * G + c' // share_planes`` with G = mid / share_planes."""
    if mid % share_planes:
        raise ValueError(f"mid={mid} is not divisible by share_planes={share_planes}")
    c = torch.arange(mid)
    return (c % share_planes) * (mid // share_planes) + c // share_planes


def _rename(key: str, to_ours: bool) -> str:
    """A block key renamed by the first rule of _SAM_RULES that fits, official -> ours (to_ours)
    or back; other keys unchanged."""
    m = _BLOCK.match(key)
    if not m:
        return key
    prefix, rest = m.groups()
    for off, ours in _SAM_RULES:
        old, new = (off, ours) if to_ours else (ours, off)
        if rest.startswith(old):
            return prefix + new + rest[len(old):]
    return key


def official_san_keys(model) -> Dict[str, Tuple[int, ...]]:
    """Official name -> shape of every tensor the tokenmix SAN ``model`` holds."""
    return {_rename(k, to_ours=False): tuple(v.shape) for k, v in model.state_dict().items()}


def _variant(variant: str):
    from .registry import get_config
    from .san import SANConfig

    names = [f"san{d}_{t}" for t in ("pairwise", "patchwise") for d in (10, 15, 19)]
    if variant not in names:
        raise ValueError(f"variant={variant!r} is not a SAN model; known: {', '.join(names)}")
    cfg = get_config(variant)
    assert isinstance(cfg, SANConfig)
    return cfg


def convert_official_san(state_dict: Mapping, variant: str) -> Dict[str, torch.Tensor]:
    """Official SAN state_dict (optionally under ``state_dict``, keys optionally ``module.``-
    prefixed) -> tokenmix ``variant`` state_dict: renamed, and permuted where the module
    docstring says. Does not check completeness (:func:`load_official_san` does)."""
    from .convert import _unwrap

    cfg = _variant(variant)
    sd = _unwrap(state_dict)
    out = {}
    for k, v in sd.items():
        new = _rename(k, to_ours=True)
        m = _BLOCK.match(new)
        if m and m.group(2) in _PERMUTED:
            axis = _PERMUTED[m.group(2)]
            if v.dim() <= axis or v.shape[axis] % cfg.share_planes:
                raise ValueError(f"official SAN key {k!r} has shape {tuple(v.shape)}; its axis {axis} must be the "
                                 f"SAM's output channels, a multiple of share_planes={cfg.share_planes}")
            v = v.index_select(axis, san_channel_permutation(v.shape[axis], cfg.share_planes))
        out[new] = v
    return out


def _one_line_mismatch(expected: Mapping[str, Tuple[int, ...]], sd: Mapping[str, torch.Tensor], what: str) -> None:
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    shapes = [f"{k}: got {tuple(sd[k].shape)}, expected {s}" for k, s in sorted(expected.items())
              if k in sd and tuple(sd[k].shape) != tuple(s)]
    parts = []
    if missing:
        parts.append(f"missing keys ({len(missing)}): {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        parts.append(f"unexpected keys ({len(unexpected)}): {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    if shapes:
        parts.append(f"shape mismatches ({len(shapes)}): {shapes[:8]}{' ...' if len(shapes) > 8 else ''}")
    if parts:
        raise ValueError(f"{what}: " + "; ".join(parts))


def load_official_san(path_or_state_dict: Union[str, "os.PathLike[str]", Mapping], variant: str,
                      num_classes: Optional[int] = None):
    """Build tokenmix ``variant`` (``"san10_pairwise"`` ... ``"san19_patchwise"``) and load an
    official SAN checkpoint into it strictly.

    ``path_or_state_dict``: a path (read with ``torch.load(weights_only=True)``) or a loaded
    dict, official names, optionally under ``state_dict`` and ``module.``-prefixed.
    ``num_classes`` defaults to the rows of ``fc.weight``. Every official tensor maps to
    exactly one of ours (renamed, the SAM's output channels permuted; module docstring); any
    missing or unexpected key or shape mismatch is a one-line ValueError naming the file or
    state_dict and the keys (official names). Returns the model in eval mode.
    """
    from .registry import create_model

    cfg = _variant(variant)
    sd, what = read_official(path_or_state_dict, "SAN")
    if num_classes is None:
        fc = sd.get("fc.weight")
        num_classes = int(fc.shape[0]) if isinstance(fc, torch.Tensor) and fc.dim() == 2 else cfg.num_classes
    model = create_model(variant, num_classes=num_classes)
    _one_line_mismatch(official_san_keys(model), sd,
                       f"{what} does not match tokenmix {variant} (num_classes={num_classes})")
    load_state_dict_strict(model, convert_official_san(sd, variant), what=what)
    return model.eval()


__all__ = ["load_official_san", "convert_official_san", "official_san_keys", "san_channel_permutation"]

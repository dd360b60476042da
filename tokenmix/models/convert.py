"""Converter from the official RedNet checkpoints (mmcls layout, d-li14/involution) to
tokenmix's ``rednet{26,38,50,101,152}``.

The official layout (``backbone.`` / ``head.`` prefixes, optionally inside a ``state_dict``
wrapper) maps onto ours one tensor to one tensor, no reshaping: the official involution's
``conv2`` output channel ``g*K*K + t`` is our kernel generator's span channel ``g*K*K + t``
(both unfold taps row-major), and its ``conv1`` (1x1 conv + BN + ReLU) is our generator's
reduce + norm. The rules, official -> tokenmix (``X`` a parameter/buffer name, L = 1..4):

=====================================  ========================================
``backbone.stem.0.conv.weight``        ``stem.conv1.weight``
``backbone.stem.0.bn.X``               ``stem.bn1.X``
``backbone.stem.1.conv1.conv.weight``  ``stem.mixer.generator.reduce.weight``
``backbone.stem.1.conv1.bn.X``         ``stem.mixer.generator.norm.X``
``backbone.stem.1.conv2.conv.X``       ``stem.mixer.generator.span.X``
``backbone.stem.2.X``                  ``stem.bn2.X``
``backbone.stem.4.conv.weight``        ``stem.conv2.weight``
``backbone.stem.4.bn.X``               ``stem.bn3.X``
``backbone.layerL.j.conv1.weight``     ``stages.(L-1).j.conv1.weight`` (same for bn1, bn2,
                                       conv3, bn3, downsample.0, downsample.1)
``backbone.layerL.j.conv2.conv1.conv``  ``stages.(L-1).j.mixer.generator.reduce``
``backbone.layerL.j.conv2.conv1.bn``    ``stages.(L-1).j.mixer.generator.norm``
``backbone.layerL.j.conv2.conv2.conv``  ``stages.(L-1).j.mixer.generator.span``
``head.fc.X``                          ``fc.X``
=====================================  ========================================
"""

from __future__ import annotations

import functools
import os
import re
from typing import Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch

from .weights import load_state_dict_strict

# Names inside a tokenmix involution mixer (the mixers package's contract).
_REDUCE, _NORM, _SPAN = "generator.reduce", "generator.norm", "generator.span"

# (official template, tokenmix template); {L} official stage 1..4, {S} = L - 1, {j} block,
# {p} parameter/buffer name. Official keys are without the "backbone."/"head." prefix handling
# (done below): backbone keys start at "stem"/"layer", the head at "head.".
_BLOCK_SAME = r"(?:conv1|bn1|bn2|conv3|bn3|downsample\.0|downsample\.1)"
_RULES: List[Tuple[str, str]] = [
    ("backbone.stem.0.conv.weight", "stem.conv1.weight"),
    ("backbone.stem.0.bn.{p}", "stem.bn1.{p}"),
    ("backbone.stem.1.conv1.conv.weight", f"stem.mixer.{_REDUCE}.weight"),
    ("backbone.stem.1.conv1.bn.{p}", f"stem.mixer.{_NORM}.{{p}}"),
    ("backbone.stem.1.conv2.conv.{p}", f"stem.mixer.{_SPAN}.{{p}}"),
    ("backbone.stem.2.{p}", "stem.bn2.{p}"),
    ("backbone.stem.4.conv.weight", "stem.conv2.weight"),
    ("backbone.stem.4.bn.{p}", "stem.bn3.{p}"),
    ("backbone.layer{L}.{j}.conv2.conv1.conv.{p}", f"stages.{{S}}.{{j}}.mixer.{_REDUCE}.{{p}}"),
    ("backbone.layer{L}.{j}.conv2.conv1.bn.{p}", f"stages.{{S}}.{{j}}.mixer.{_NORM}.{{p}}"),
    ("backbone.layer{L}.{j}.conv2.conv2.conv.{p}", f"stages.{{S}}.{{j}}.mixer.{_SPAN}.{{p}}"),
    ("backbone.layer{L}.{j}.{m}.{p}", "stages.{S}.{j}.{m}.{p}"),
    ("head.fc.{p}", "fc.{p}"),
]
_GROUPS = {"L": r"[1-9]\d*", "S": r"\d+", "j": r"\d+", "p": r"[A-Za-z_]+", "m": _BLOCK_SAME}


def _compile(template: str) -> "re.Pattern[str]":
    parts = re.split(r"(\{\w\})", template)
    rx = "".join(f"(?P<{p[1]}>{_GROUPS[p[1]]})" if re.fullmatch(r"\{\w\}", p) else re.escape(p) for p in parts)
    return re.compile(rx + r"\Z")


_COMPILED = [(_compile(o), _compile(t), o, t) for o, t in _RULES]


def _rename(key: str, to_ours: bool) -> Optional[str]:
    """``key`` renamed from the official layout to ours (``to_ours``) or back; None if no rule
    matches. The official layer index L counts from 1, our stage index S from 0."""
    for official_rx, ours_rx, official, ours in _COMPILED:
        m = (official_rx if to_ours else ours_rx).match(key)
        if m:
            g = m.groupdict()
            if to_ours and "L" in g:
                g["S"] = str(int(g["L"]) - 1)
            if not to_ours and "S" in g:
                g["L"] = str(int(g["S"]) + 1)
            return (ours if to_ours else official).format(**g)
    return None


def _unwrap(state_dict: Mapping) -> Dict[str, torch.Tensor]:
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of names to tensors, got {type(state_dict).__name__}")
    for wrapper in ("state_dict", "model"):  # mmcls / timm training checkpoints
        if wrapper in state_dict and isinstance(state_dict[wrapper], Mapping):
            state_dict = state_dict[wrapper]
            break
    out = {}
    for k, v in state_dict.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise TypeError(f"state_dict entry {k!r} is a {type(v).__name__}, expected a tensor under a str key")
        out[k[len("module."):] if k.startswith("module.") else k] = v
    return out


def convert_official_rednet(state_dict: Mapping) -> Dict[str, torch.Tensor]:
    """Official (mmcls) RedNet state_dict -> tokenmix ``rednet*`` state_dict (same tensors,
    renamed; see the module docstring for the rules). Accepts the checkpoint dict with a
    ``state_dict`` wrapper. Keys no rule knows raise ValueError listing them."""
    return rename_official(_unwrap(state_dict), functools.partial(_rename, to_ours=True), "RedNet")


def official_rednet_keys(model) -> Dict[str, Tuple[int, ...]]:
    """The official key names and shapes that the tokenmix ``model`` expects."""
    return expected_official_keys(model, functools.partial(_rename, to_ours=False), "RedNet",
                                  "a tokenmix rednet with involution mixers")


def rename_official(sd: Mapping[str, torch.Tensor], to_ours: Callable[[str], Optional[str]],
                    family: str) -> Dict[str, torch.Tensor]:
    """``{to_ours(k): v}`` for an official state dict; ValueError listing the keys that
    ``to_ours`` maps to None (no conversion rule)."""
    out, unknown = {}, []
    for k, v in sd.items():
        new = to_ours(k)
        if new is None:
            unknown.append(k)
        else:
            out[new] = v
    if unknown:
        raise ValueError(f"official {family} state_dict has keys no conversion rule knows "
                         f"(unexpected keys ({len(unknown)}): {sorted(unknown)})")
    return out


def expected_official_keys(model, to_official: Callable[[str], Optional[str]], family: str,
                           what: str) -> Dict[str, Tuple[int, ...]]:
    """Official name -> shape of every tensor of ``model.state_dict()``; ValueError for a key
    with no official counterpart (the model is not ``what``)."""
    out = {}
    for k, v in model.state_dict().items():
        off = to_official(k)
        if off is None:
            raise ValueError(f"model key {k!r} has no official {family} counterpart (is the model {what}?)")
        out[off] = tuple(v.shape)
    return out


def load_official_rednet(path_or_state_dict: Union[str, "os.PathLike[str]", Mapping], depth: int = 50,
                         num_classes: Optional[int] = None):
    """Build ``rednet{depth}`` and load an official checkpoint into it strictly.

    ``path_or_state_dict``: a path (read with ``torch.load(weights_only=True)``) or a loaded
    dict (official layout, optionally under ``state_dict``). ``num_classes`` defaults to the
    rows of ``head.fc.weight`` (1000 if absent, which is then reported missing; pass
    ``num_classes=0`` for a backbone-only checkpoint: no fc, ``forward`` returns the pooled
    features). A mismatch
    raises ValueError listing the missing and unexpected keys (official names) and shape
    mismatches. Returns the model in eval mode.
    """
    from .config import DEPTHS
    from .registry import create_model

    if depth not in DEPTHS:
        raise ValueError(f"depth={depth!r} is not a RedNet depth; known: {sorted(DEPTHS)}")
    sd, what = read_official(path_or_state_dict, "RedNet")
    if num_classes is None:
        fc = sd.get("head.fc.weight")
        num_classes = int(fc.shape[0]) if isinstance(fc, torch.Tensor) and fc.dim() == 2 else 1000
    model = create_model(f"rednet{depth}", num_classes=num_classes)
    check_official_keys(official_rednet_keys(model), sd, f"{what} does not match tokenmix rednet{depth} "
                        f"(num_classes={num_classes})")
    load_state_dict_strict(model, convert_official_rednet(sd), what=what)
    return model.eval()


def check_official_keys(expected: Mapping[str, Tuple[int, ...]], sd: Mapping[str, torch.Tensor], headline: str) -> None:
    """ValueError starting with ``headline`` and listing the missing keys, unexpected keys
    and shape mismatches of the official-layout ``sd`` against ``expected`` (name -> shape)."""
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    shapes = sorted(f"{k}: got {tuple(sd[k].shape)}, expected {s}" for k, s in expected.items()
                    if k in sd and tuple(sd[k].shape) != tuple(s))
    if missing or unexpected or shapes:
        lines = [headline + ":", f"missing keys ({len(missing)}): {missing}",
                 f"unexpected keys ({len(unexpected)}): {unexpected}"]
        if shapes:
            lines.append(f"shape mismatches ({len(shapes)}): {shapes}")
        raise ValueError("\n".join(lines))


def read_official(path_or_state_dict, family: str) -> Tuple[Dict[str, torch.Tensor], str]:
    """(unwrapped state dict, description for errors) of a checkpoint path (read with
    ``torch.load(weights_only=True)``) or an already loaded dict."""
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        loaded = torch.load(os.fspath(path_or_state_dict), map_location="cpu", weights_only=True)
        return _unwrap(loaded), f"official {family} checkpoint {os.fspath(path_or_state_dict)!r}"
    return _unwrap(path_or_state_dict), f"official {family} state_dict"

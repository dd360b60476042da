"""Converters from the official PoolFormer (sail-sg/poolformer) and NAT / DiNAT
(SHI-Labs/Neighborhood-Attention-Transformer, NATTEN < 0.20 layout) checkpoints to tokenmix's
``poolformer_*``, ``nat_*`` and ``dinat_*`` models.

Every official tensor maps to one tensor of ours with the same shape, renamed only: the 1x1
layers that are ``nn.Linear`` in the official channels-last code are ``nn.Linear``-shaped
here too (``PointwiseLinear``, and the fused ``qkv`` of the attention generator, whose output
channels are q | k | v with the heads contiguous in each, as NATTEN's reshape reads them), and
NATTEN's relative position bias ``rpb`` (heads, 2K-1, 2K-1) is our ``rel_pos`` table, indexed
the same way by the true key - query offset / dilation + K - 1. Rules, official -> tokenmix
(``p`` a parameter name, L a NAT level = our stage S, N = 2S and M = 2S + 1 PoolFormer's
``network`` indices of stage S and of the downsampling after it):

===========================================  ==========================================
PoolFormer
``patch_embed.proj.p``                       ``stem.conv.p``
``network.N.j.norm1.p`` (norm2, mlp.fc1/2)   ``stages.S.j.norm1.p`` (same)
``network.N.j.layer_scale_1`` (_2)           ``stages.S.j.ls1.scale`` (ls2)
``network.M.proj.p``                         ``downsamples.S.conv.p``
``norm.p``, ``head.p``                       ``norm.p``, ``head.p``
NAT / DiNAT
``patch_embed.proj.0.p`` (proj.1)            ``stem.conv1.p`` (conv2)
``patch_embed.norm.p``                       ``stem.norm.p``
``levels.L.blocks.j.norm1.p`` (norm2, mlp)   ``stages.S.j.norm1.p`` (same)
``levels.L.blocks.j.attn.qkv.p``             ``stages.S.j.mixer.generator.qkv.p``
``levels.L.blocks.j.attn.rpb``               ``stages.S.j.mixer.generator.rel_pos``
``levels.L.blocks.j.attn.proj.p``            ``stages.S.j.mixer.proj.p``
``levels.L.blocks.j.gamma1`` (gamma2)        ``stages.S.j.ls1.scale`` (ls2)
``levels.L.downsample.reduction.weight``     ``downsamples.S.conv.weight``
``levels.L.downsample.norm.p``               ``downsamples.S.norm.p``
``norm.p``, ``head.p``                       ``norm.p``, ``head.p``
===========================================  ==========================================
"""

from __future__ import annotations

import os
import re
from typing import Dict, List, Mapping, Optional, Tuple, Union

import torch

from .convert import check_official_keys, expected_official_keys, read_official, rename_official
from .weights import load_state_dict_strict

_FIELDS = {"S": r"\d+", "L": r"\d+", "N": r"\d*[02468]", "M": r"\d*[13579]", "j": r"\d+", "p": r"weight|bias",
           "f": r"[12]", "k": r"[12]", "n": r"norm[12]"}

_POOLFORMER = [
    ("patch_embed.proj.{p}", "stem.conv.{p}"),
    ("network.{N}.{j}.{n}.{p}", "stages.{S}.{j}.{n}.{p}"),
    ("network.{N}.{j}.mlp.fc{f}.{p}", "stages.{S}.{j}.mlp.fc{f}.{p}"),
    ("network.{N}.{j}.layer_scale_{k}", "stages.{S}.{j}.ls{k}.scale"),
    ("network.{M}.proj.{p}", "downsamples.{S}.conv.{p}"),
    ("norm.{p}", "norm.{p}"),
    ("head.{p}", "head.{p}"),
]
_NAT = [
    ("patch_embed.proj.0.{p}", "stem.conv1.{p}"),
    ("patch_embed.proj.1.{p}", "stem.conv2.{p}"),
    ("patch_embed.norm.{p}", "stem.norm.{p}"),
    ("levels.{L}.blocks.{j}.{n}.{p}", "stages.{S}.{j}.{n}.{p}"),
    ("levels.{L}.blocks.{j}.mlp.fc{f}.{p}", "stages.{S}.{j}.mlp.fc{f}.{p}"),
    ("levels.{L}.blocks.{j}.attn.qkv.{p}", "stages.{S}.{j}.mixer.generator.qkv.{p}"),
    ("levels.{L}.blocks.{j}.attn.rpb", "stages.{S}.{j}.mixer.generator.rel_pos"),
    ("levels.{L}.blocks.{j}.attn.proj.{p}", "stages.{S}.{j}.mixer.proj.{p}"),
    ("levels.{L}.blocks.{j}.gamma{k}", "stages.{S}.{j}.ls{k}.scale"),
    ("levels.{L}.downsample.reduction.weight", "downsamples.{S}.conv.weight"),
    ("levels.{L}.downsample.norm.{p}", "downsamples.{S}.norm.{p}"),
    ("norm.{p}", "norm.{p}"),
    ("head.{p}", "head.{p}"),
]


def _regex(template: str) -> "re.Pattern[str]":
    pieces = re.split(r"\{(\w)\}", template)  # odd entries are field names
    return re.compile("".join(f"(?P<{x}>{_FIELDS[x]})" if i % 2 else re.escape(x) for i, x in enumerate(pieces)) + r"\Z")


class RenameRules:
    """Two-way renaming between an official layout and ours by (official, ours) templates.
    Stage fields: official ``L`` (= S), ``N`` (= 2S) or ``M`` (= 2S + 1); ours ``S``."""

    def __init__(self, family: str, rules: List[Tuple[str, str]]):
        self.family = family
        self.rules = [(_regex(o), _regex(t), o, t) for o, t in rules]

    @staticmethod
    def _stage_fields(g: Dict[str, str], to_ours: bool) -> Dict[str, str]:
        g = dict(g)
        if to_ours:
            for name, stage in (("L", lambda v: v), ("N", lambda v: v // 2), ("M", lambda v: (v - 1) // 2)):
                if name in g:
                    g["S"] = str(stage(int(g[name])))
        elif "S" in g:
            s = int(g["S"])
            g.update(L=str(s), N=str(2 * s), M=str(2 * s + 1))
        return g

    def _rename(self, key: str, to_ours: bool) -> Optional[str]:
        for official, ours, official_t, ours_t in self.rules:
            m = (official if to_ours else ours).match(key)
            if m:
                return (ours_t if to_ours else official_t).format(**self._stage_fields(m.groupdict(), to_ours))
        return None

    def to_ours(self, key: str) -> Optional[str]:
        """Our name of an official key (None: no rule)."""
        return self._rename(key, True)

    def to_official(self, key: str) -> Optional[str]:
        """The official name of one of our keys (None: no rule)."""
        return self._rename(key, False)

    def convert(self, state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Official state dict -> ours (same tensors, renamed); ValueError listing unknown keys."""
        return rename_official(state_dict, self.to_ours, self.family)

    def official_keys(self, model) -> Dict[str, Tuple[int, ...]]:
        """Official names and shapes that the tokenmix ``model`` expects."""
        return expected_official_keys(model, self.to_official, self.family, "the tokenmix preset with its own mixers")


POOLFORMER_RULES = RenameRules("PoolFormer", _POOLFORMER)
NAT_RULES = RenameRules("NAT/DiNAT", _NAT)
POOLFORMER_VARIANTS = ("s12", "s24", "s36", "m36", "m48")
NAT_VARIANTS = tuple(f"{f}_{v}" for f in ("nat", "dinat") for v in ("mini", "tiny", "small", "base"))

PathOrDict = Union[str, "os.PathLike[str]", Mapping]


def _load(rules: RenameRules, name: str, path_or_state_dict: PathOrDict, num_classes: Optional[int]):
    from .registry import create_model

    sd, what = read_official(path_or_state_dict, rules.family)
    if num_classes is None:
        head = sd.get("head.weight")
        num_classes = int(head.shape[0]) if isinstance(head, torch.Tensor) and head.dim() == 2 else 1000
    model = create_model(name, num_classes=num_classes)
    check_official_keys(rules.official_keys(model), sd,
                        f"{what} does not match tokenmix {name} (num_classes={num_classes})")
    load_state_dict_strict(model, rules.convert(sd), what=what)
    return model.eval()


def load_official_poolformer(path_or_state_dict: PathOrDict, variant: str = "s12", num_classes: Optional[int] = None):
    """Build ``poolformer_{variant}`` (variant in s12, s24, s36, m36, m48) and load an official
    checkpoint (e.g. ``poolformer_s12.pth.tar``) into it strictly.

    ``path_or_state_dict``: a path (read with ``torch.load(weights_only=True)``) or a loaded
    dict (optionally under ``state_dict`` / ``model``). ``num_classes`` defaults to the rows of
    ``head.weight`` (``num_classes=0``: a checkpoint without head). Missing / unexpected keys
    (official names) and shape mismatches raise ValueError listing them. Returns the model in
    eval mode.
    """
    if variant not in POOLFORMER_VARIANTS:
        raise ValueError(f"variant={variant!r} is not a PoolFormer variant; known: {', '.join(POOLFORMER_VARIANTS)}")
    return _load(POOLFORMER_RULES, f"poolformer_{variant}", path_or_state_dict, num_classes)


def load_official_nat(path_or_state_dict: PathOrDict, variant: str = "nat_mini", num_classes: Optional[int] = None):
    """Build ``variant`` (``nat_{mini,tiny,small,base}`` or ``dinat_{mini,tiny,small,base}``)
    and load an official NAT / DiNAT checkpoint (the NATTEN < 0.20 layout, relative position
    bias included) into it strictly; as :func:`load_official_poolformer` otherwise.

    The converted model computes what the official model computed with NATTEN < 0.20: the bias
    is indexed by the true key - query offset also where the window is clamped at the border,
    and inputs smaller than a layer's window (7 x dilation) are zero-padded to it before the
    qkv projection and cropped after.
    """
    if variant not in NAT_VARIANTS:
        raise ValueError(f"variant={variant!r} is not a NAT/DiNAT variant; known: {', '.join(NAT_VARIANTS)}")
    return _load(NAT_RULES, variant, path_or_state_dict, num_classes)


def convert_official_poolformer(state_dict: Mapping) -> Dict[str, torch.Tensor]:
    """Official PoolFormer state dict -> tokenmix ``poolformer_*`` state dict (renamed only)."""
    return POOLFORMER_RULES.convert(read_official(state_dict, "PoolFormer")[0])


def convert_official_nat(state_dict: Mapping) -> Dict[str, torch.Tensor]:
    """Official NAT / DiNAT state dict -> tokenmix ``nat_*`` / ``dinat_*`` state dict (renamed only)."""
    return NAT_RULES.convert(read_official(state_dict, "NAT/DiNAT")[0])


__all__ = ["RenameRules", "POOLFORMER_RULES", "NAT_RULES", "load_official_poolformer", "load_official_nat",
           "convert_official_poolformer", "convert_official_nat"]

"""Dataclass configs of the MetaFormer backbones (PoolFormer, ConvFormer, NAT, DiNAT).

A model is a :class:`MetaFormerConfig`: a stem (stride 4), four stages of blocks
``x = rs1*x + ls1*mixer(norm1(x)); x = rs2*x + ls2*mlp(norm2(x))`` with a 3x3 stride-2
downsampling layer between two stages, a final norm and a head. The token mixer of every
stage is a mixer name + kwargs (``tokenmix.mixers.create_mixer``), always at stride 1 (the
downsampling layers carry the stride), so any mixer preset fits any stage::

    poolformer_s12 = stages mix with "pooling"                 (kernel_size=3)
    convformer_s18 = stages mix with "sepconv"                 (kernel_size=7)
    nat_mini       = stages mix with "neighborhood_attention"  (kernel_size=7, NAT's fused qkv + proj)
    dinat_mini     = nat_mini with every other layer's attention dilated (block_mixer_kwargs)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple

NORMS = ("group", "layer", "layer_nobias")
STEMS = ("patch", "conv3x2", "conv3")
STEM_STRIDE = {"patch": 4, "conv3x2": 4, "conv3": 1}
HEADS = ("linear", "mlp")
ACTS = ("gelu", "star_relu")
MLP_LAYERS = ("conv", "linear")


def _check_choice(name: str, value, choices, optional: bool = False) -> None:
    if optional and value is None:
        return
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not known; known: {', '.join(map(repr, choices))}"
                         + (" or None" if optional else ""))


def _check_positive(name: str, value, integer: bool = True, optional: bool = False) -> None:
    if optional and value is None:
        return
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive {'int' if integer else 'number'}"
                         + (" or None" if optional else ""))


@dataclass(frozen=True)
class MetaStageConfig:
    """One stage of ``depth`` MetaFormer blocks at ``dim`` channels.

    ``mixer``/``mixer_kwargs`` go to ``create_mixer(mixer, dim, stride=1, **mixer_kwargs)``;
    ``block_mixer_kwargs`` (empty, or one dict per block) are merged on top for single blocks
    (DiNAT's alternating dilations). ``mlp_ratio``: hidden width of the MLP / dim.
    ``layer_scale``: init value of a learned per-channel scale of each branch (None: none);
    ``res_scale``: the same on the residual path (ConvFormer's stages 3-4; None: none).
    """

    depth: int
    dim: int
    mixer: str = "pooling"
    mixer_kwargs: Mapping[str, Any] = field(default_factory=lambda: {"kernel_size": 3})
    block_mixer_kwargs: Tuple[Mapping[str, Any], ...] = ()
    mlp_ratio: float = 4.0
    layer_scale: Optional[float] = None
    res_scale: Optional[float] = None

    def __post_init__(self):
        _check_positive("stage depth", self.depth)
        _check_positive("stage dim", self.dim)
        _check_positive("stage mlp_ratio", self.mlp_ratio, integer=False)
        _check_positive("stage layer_scale", self.layer_scale, integer=False, optional=True)
        _check_positive("stage res_scale", self.res_scale, integer=False, optional=True)
        if not isinstance(self.mixer, str):
            raise TypeError(f"stage mixer={self.mixer!r} must be a mixer name (str)")
        if not isinstance(self.mixer_kwargs, Mapping):
            raise TypeError(f"stage mixer_kwargs={self.mixer_kwargs!r} must be a mapping")
        blocks = tuple(self.block_mixer_kwargs)
        if blocks and (len(blocks) != self.depth or not all(isinstance(b, Mapping) for b in blocks)):
            raise ValueError(f"stage block_mixer_kwargs must be empty or {self.depth} dicts (one per block), "
                             f"got {self.block_mixer_kwargs!r}")
        for kw in (self.mixer_kwargs, *blocks):
            if "stride" in kw:
                raise ValueError("MetaFormer mixers run at stride 1 (the downsampling layers carry the stride); "
                                 f"got mixer kwargs {dict(kw)!r}")
        object.__setattr__(self, "mixer_kwargs", dict(self.mixer_kwargs))
        object.__setattr__(self, "block_mixer_kwargs", tuple(dict(b) for b in blocks))

    def block_kwargs(self, j: int) -> Dict[str, Any]:
        """The mixer kwargs of block ``j``."""
        return {**self.mixer_kwargs, **(self.block_mixer_kwargs[j] if self.block_mixer_kwargs else {})}


@dataclass(frozen=True)
class MetaFormerConfig:
    """A MetaFormer backbone: stem -> [stage, downsample] x 4 -> final norm -> head.

    - ``stem``: ``"patch"`` (7x7 conv stride 4 padding 2 with bias: PoolFormer, MetaFormer
      baselines), ``"conv3x2"`` (two 3x3 stride-2 convs with bias, no activation: NAT's
      tokenizer) or ``"conv3"`` (one 3x3 conv, stride 1: tiny images); ``stem_norm`` after it
      (a norm name or None).
    - downsampling between stages: 3x3 conv stride 2 padding 1 (``down_bias``), with a norm
      ``down_norm`` before it (``down_norm_first``, ConvFormer) or after it (NAT), or none.
    - blocks: ``norm`` (``"group"``: GroupNorm with one group, PoolFormer; ``"layer"``: LayerNorm
      over channels; ``"layer_nobias"``: the same without bias, ConvFormer), eps ``norm_eps``;
      MLP ``fc1 -> act -> fc2`` with ``mlp_act`` (``"gelu"`` or ``"star_relu"``), ``mlp_bias``,
      and ``mlp_layer`` (``"conv"``: 1x1 Conv2d weights, PoolFormer; ``"linear"``: nn.Linear's
      weight layout, NAT and ConvFormer); stochastic depth rising linearly over the blocks from
      0 to ``drop_path_rate``.
    - head: ``head_norm`` on the last feature map (or, with ``head_norm_pooled``, on the pooled
      features, ConvFormer), global average pool, then ``"linear"`` or ``"mlp"`` (ConvFormer's
      fc (4x) -> SquaredReLU -> LayerNorm -> fc); ``num_classes=0``: no head.
    """

    name: str
    stages: Tuple[MetaStageConfig, ...]
    stem: str = "patch"
    stem_norm: Optional[str] = None
    down_bias: bool = True
    down_norm: Optional[str] = None
    down_norm_first: bool = False
    norm: str = "group"
    norm_eps: float = 1e-5
    mlp_act: str = "gelu"
    mlp_bias: bool = True
    mlp_layer: str = "conv"
    head_norm: str = "group"
    head_norm_pooled: bool = False
    head: str = "linear"
    drop_path_rate: float = 0.0
    num_classes: int = 1000
    in_chans: int = 3

    def __post_init__(self):
        stages = tuple(self.stages)
        if len(stages) == 0 or not all(isinstance(s, MetaStageConfig) for s in stages):
            raise TypeError(f"stages={self.stages!r} must be a non-empty sequence of MetaStageConfig")
        object.__setattr__(self, "stages", stages)
        _check_choice("stem", self.stem, STEMS)
        _check_choice("head", self.head, HEADS)
        _check_choice("mlp_act", self.mlp_act, ACTS)
        _check_choice("mlp_layer", self.mlp_layer, MLP_LAYERS)
        for name in ("norm", "head_norm"):
            _check_choice(name, getattr(self, name), NORMS)
        for name in ("stem_norm", "down_norm"):
            _check_choice(name, getattr(self, name), NORMS, optional=True)
        _check_positive("norm_eps", self.norm_eps, integer=False)
        _check_positive("in_chans", self.in_chans)
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ValueError(f"num_classes={self.num_classes!r} must be an int >= 0 (0: no head)")
        rate = self.drop_path_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
            raise ValueError(f"drop_path_rate={rate!r} must be a number in [0, 1)")

    @property
    def out_channels(self) -> Tuple[int, ...]:
        """Channels of each stage's output."""
        return tuple(s.dim for s in self.stages)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MetaFormerConfig":
        d = dict(d)
        d["stages"] = tuple(MetaStageConfig(**s) for s in d["stages"])
        return cls(**d)


# ------------------------------------------------------------------------------ presets
# (depths, dims, layer scale init) of the official models (sail-sg/poolformer, sail-sg/metaformer,
# SHI-Labs/Neighborhood-Attention-Transformer).

POOLFORMER = {
    "s12": ((2, 2, 6, 2), (64, 128, 320, 512), 1e-5),
    "s24": ((4, 4, 12, 4), (64, 128, 320, 512), 1e-5),
    "s36": ((6, 6, 18, 6), (64, 128, 320, 512), 1e-6),
    "m36": ((6, 6, 18, 6), (96, 192, 384, 768), 1e-6),
    "m48": ((8, 8, 24, 8), (96, 192, 384, 768), 1e-6),
}
# variant -> (depths, embed dim, heads, mlp ratio, layer scale of NAT, layer scale of DiNAT, drop path)
NAT = {
    "mini": ((3, 4, 6, 5), 64, (2, 4, 8, 16), 3.0, None, None, 0.2),
    "tiny": ((3, 4, 18, 5), 64, (2, 4, 8, 16), 3.0, None, None, 0.2),
    "small": ((3, 4, 18, 5), 96, (3, 6, 12, 24), 2.0, 1e-5, None, 0.3),
    "base": ((3, 4, 18, 5), 128, (4, 8, 16, 32), 2.0, 1e-5, 1e-5, 0.5),
}
# DiNAT at 224: every other layer dilated so that its window spans the stage (56/7, 28/7, 14/7)
DINAT_DILATIONS = (8, 4, 2, 1)


def poolformer_config(variant: str) -> MetaFormerConfig:
    """PoolFormer-``variant`` (Yu et al., CVPR 2022), official layout: 7x7/4 patch stem, 3x3/2
    downsampling convs, GroupNorm(1) blocks with 3x3 pooling, 1x1-conv MLP (ratio 4, GELU),
    layer scale, GroupNorm(1) + linear head."""
    depths, dims, ls = POOLFORMER[variant]
    stages = tuple(MetaStageConfig(d, c, "pooling", {"kernel_size": 3}, layer_scale=ls) for d, c in zip(depths, dims))
    return MetaFormerConfig(name=f"poolformer_{variant}", stages=stages)


def convformer_s18_config() -> MetaFormerConfig:
    """ConvFormer-S18 (Yu et al., MetaFormer baselines, 2022), official layout: separable 7x7
    conv mixer with StarReLU, LayerNorm without bias (eps 1e-6), Linear MLP (ratio 4, StarReLU,
    no bias), residual scale in stages 3-4, MLP head after a pooled LayerNorm."""
    stages = tuple(MetaStageConfig(d, c, "sepconv", {"kernel_size": 7}, res_scale=1.0 if i >= 2 else None)
                   for i, (d, c) in enumerate(zip((3, 3, 9, 3), (64, 128, 320, 512))))
    return MetaFormerConfig(name="convformer_s18", stages=stages, stem_norm="layer_nobias", down_norm="layer_nobias",
                            down_norm_first=True, norm="layer_nobias", norm_eps=1e-6, mlp_act="star_relu",
                            mlp_bias=False, mlp_layer="linear", head_norm="layer", head_norm_pooled=True, head="mlp")


def nat_config(variant: str, dilated: bool = False) -> MetaFormerConfig:
    """NAT-``variant`` (Hassani et al., CVPR 2023), or DiNAT-``variant`` with ``dilated``
    (Hassani & Shi 2022): two-conv tokenizer + LayerNorm, 7x7 neighborhood attention (fused
    qkv with bias, relative position bias, output projection; inputs smaller than the window
    padded as NATTEN < 0.20), Linear MLP with GELU, 3x3/2 downsampling conv (no bias) +
    LayerNorm, LayerNorm + linear head. DiNAT dilates the odd layers of stages 1-3 by 8, 4, 2."""
    depths, dim, heads, ratio, ls_nat, ls_dinat, dpr = NAT[variant]
    stages = []
    for i, (d, h) in enumerate(zip(depths, heads)):
        kw = {"kernel_size": 7, "heads": h, "qkv_bias": True, "fused_qkv": True, "proj": True, "pad_to_window": True}
        blocks = tuple({"dilation": DINAT_DILATIONS[i] if j % 2 else 1} for j in range(d)) if dilated else ()
        stages.append(MetaStageConfig(d, dim * 2 ** i, "neighborhood_attention", kw, blocks, mlp_ratio=ratio,
                                      layer_scale=ls_dinat if dilated else ls_nat))
    return MetaFormerConfig(name=f"{'dinat' if dilated else 'nat'}_{variant}", stages=tuple(stages), stem="conv3x2",
                            stem_norm="layer", down_bias=False, down_norm="layer", norm="layer", mlp_layer="linear",
                            head_norm="layer", drop_path_rate=dpr)


def tiny_metaformer_config(mixer: str, num_classes: int = 10, in_chans: int = 1, width: int = 32, depth: int = 1,
                           kernel_size: int = 3, mixer_kwargs: Optional[Mapping[str, Any]] = None) -> MetaFormerConfig:
    """A two-stage MetaFormer for tiny images (``tokenmix compare --backbone metaformer``): 3x3
    stride-1 stem, ``depth`` blocks at ``width`` channels and at full resolution, a 3x3 stride-2
    downsampling conv, ``depth`` blocks at 2 * width; GroupNorm(1) blocks (batch independent),
    MLP ratio 2, no layer scale; ``mixer`` with ``kernel_size`` in every block."""
    kw = {"kernel_size": kernel_size, **dict(mixer_kwargs or {})}
    stages = tuple(MetaStageConfig(depth, w, mixer, kw, mlp_ratio=2.0) for w in (width, 2 * width))
    return MetaFormerConfig(name=f"tiny_metaformer_{mixer}", stages=stages, stem="conv3", num_classes=num_classes,
                            in_chans=in_chans)


def apply_metaformer_overrides(cfg: MetaFormerConfig, **overrides: Any) -> MetaFormerConfig:
    """``cfg`` with overrides: any MetaFormerConfig field, and

    - ``mixer``: one mixer name for all stages, or one per stage. A stage whose mixer changes
      keeps only its ``kernel_size`` (and drops its per-block kwargs), as for the bottleneck
      family: ``mixer="involution"`` on poolformer_s12 gives 3x3 involutions.
    - ``mixer_kwargs``: a dict merged into every stage's mixer kwargs, or one dict per stage.
    - ``depths`` / ``dims``: one int per stage (a stage whose depth changes drops its
      per-block kwargs).
    Unknown names raise ValueError listing the accepted ones.
    """
    from .registry import _per_stage, replace_fields

    convenience = {"mixer": "mixer name for every stage (str) or one per stage",
                   "mixer_kwargs": "kwargs merged into every stage's mixer kwargs (dict) or one dict per stage",
                   "depths": "blocks per stage", "dims": "channels per stage"}
    cfg = replace_fields(cfg, overrides, convenience)
    stages = list(cfg.stages)
    n = len(stages)
    if "depths" in overrides:
        depths = _per_stage("depths", overrides["depths"], n, int)
        stages = [s if d == s.depth else dataclasses.replace(s, depth=d, block_mixer_kwargs=())
                  for s, d in zip(stages, depths)]
    if "dims" in overrides:
        stages = [dataclasses.replace(s, dim=c) for s, c in zip(stages, _per_stage("dims", overrides["dims"], n, int))]
    if "mixer" in overrides:
        mixers = _per_stage("mixer", overrides["mixer"], n, str)
        stages = [s if m == s.mixer else dataclasses.replace(
                  s, mixer=m, block_mixer_kwargs=(),
                  mixer_kwargs={k: v for k, v in s.mixer_kwargs.items() if k == "kernel_size"})
                  for s, m in zip(stages, mixers)]
    if "mixer_kwargs" in overrides:
        kws = _per_stage("mixer_kwargs", overrides["mixer_kwargs"], n, Mapping)
        stages = [dataclasses.replace(s, mixer_kwargs={**s.mixer_kwargs, **kw}) for s, kw in zip(stages, kws)]
    return dataclasses.replace(cfg, stages=tuple(stages))


def metaformer_configs() -> Dict[str, MetaFormerConfig]:
    """Every MetaFormer preset by name."""
    out = {f"poolformer_{v}": poolformer_config(v) for v in POOLFORMER}
    out["convformer_s18"] = convformer_s18_config()
    for dilated in (False, True):
        out.update({c.name: c for c in (nat_config(v, dilated) for v in NAT)})
    return out


__all__ = ["MetaStageConfig", "MetaFormerConfig", "poolformer_config", "convformer_s18_config", "nat_config",
           "tiny_metaformer_config",
           "apply_metaformer_overrides", "metaformer_configs", "NORMS", "POOLFORMER", "NAT", "DINAT_DILATIONS"]

"""Dataclass configs of the bottleneck backbones.

A model is a :class:`ModelConfig`: a stem, four stages of bottleneck blocks and a linear head.
The spatial mixer of every block is a mixer name + kwargs (``tokenmix.mixers.create_mixer``),
so ResNet, RedNet and a stand-alone-self-attention ResNet differ only in data::

    resnet50  = stages mix with "conv"              (kernel_size=3)
    rednet50  = stages mix with "involution"        (kernel_size=7), involution stem
    sasa_resnet50 = stages mix with "local_attention" (kernel_size=7, heads=8)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

# depth -> blocks per stage (He et al. 2016; 26 and 38 as in stand-alone self-attention / RedNet)
DEPTHS: Dict[int, Tuple[int, int, int, int]] = {
    26: (1, 2, 4, 1),
    38: (2, 3, 5, 2),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}

STEM_TYPES = ("conv7", "rednet")


@dataclass(frozen=True)
class StemConfig:
    """The stem: ``type`` is

    - ``"conv7"``: 7x7 conv stride 2 (in_chans -> channels, no bias) + BN + ReLU + 3x3 max-pool
      stride 2 (ResNet).
    - ``"rednet"``: the official RedNet stem: 3x3 conv stride 2 (in_chans -> channels/2) + BN +
      ReLU, ``mixer`` (channels/2, ``mixer_kwargs``; the official one is a 3x3 involution) + BN +
      ReLU, 3x3 conv (channels/2 -> channels) + BN + ReLU, 3x3 max-pool stride 2.

    Both reduce the resolution by 4 and output ``channels`` channels.
    """

    type: str = "conv7"
    channels: int = 64
    mixer: str = "involution"
    mixer_kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.type not in STEM_TYPES:
            raise ValueError(f"stem type={self.type!r} is not known; known: {', '.join(STEM_TYPES)}")
        if not isinstance(self.channels, int) or self.channels < 2 or self.channels % 2:
            raise ValueError(f"stem channels={self.channels!r} must be an even int >= 2")
        object.__setattr__(self, "mixer_kwargs", dict(self.mixer_kwargs))


@dataclass(frozen=True)
class StageConfig:
    """One stage of ``depth`` bottleneck blocks.

    ``width`` is the bottleneck (mixer) width; the stage outputs ``width * expansion`` channels.
    The first block has stride ``stride`` (on the mixer, as torchvision/mmcls "pytorch" style)
    and a 1x1-conv + BN shortcut. ``mixer_kwargs`` go to ``create_mixer(mixer, width,
    stride=..., **mixer_kwargs)`` (``kernel_size`` is one of them). ``out_channels``, when
    given, replaces ``width * expansion`` as the stage's output channels (bottlenecks whose
    width is not the output / expansion, as LR-Net's).
    """

    depth: int
    width: int
    stride: int
    mixer: str = "conv"
    mixer_kwargs: Mapping[str, Any] = field(default_factory=lambda: {"kernel_size": 3})
    out_channels: Optional[int] = None

    def __post_init__(self):
        for name in ("depth", "width", "stride"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"stage {name}={v!r} must be an int >= 1")
        v = self.out_channels
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ValueError(f"stage out_channels={v!r} must be None or an int >= 1")
        if not isinstance(self.mixer, str):
            raise TypeError(f"stage mixer={self.mixer!r} must be a mixer name (str)")
        if not isinstance(self.mixer_kwargs, Mapping):
            raise TypeError(f"stage mixer_kwargs={self.mixer_kwargs!r} must be a mapping")
        if "stride" in self.mixer_kwargs:
            raise ValueError("stage mixer_kwargs must not hold 'stride'; the stage's stride is the block's")
        object.__setattr__(self, "mixer_kwargs", dict(self.mixer_kwargs))


@dataclass(frozen=True)
class ModelConfig:
    """A bottleneck backbone: stem -> stages -> global average pool -> fc.

    ``zero_init_last_bn``: the last BN of every block starts at weight 0, so each residual block
    starts as the identity (Goyal et al. 2017; mmcls ``zero_init_residual``).

    ``checkpoint_mixer``: in training, recompute every mixer (blocks and stem) in the backward pass instead
    of keeping its internals (for involution the (B, G*K*K, H, W) kernel, 3x the mixer's input)
    for it; the same outputs and gradients, less activation memory, one more mixer forward per
    step. BN running statistics inside the mixer are updated once (not again on recompute).

    ``mixer_norm``: a BN after every block's mixer (True, ResNet); False leaves only the ReLU
    (Axial-ResNet, whose mixer ends in its own output norms).
    """

    name: str
    stages: Tuple[StageConfig, ...]
    stem: StemConfig = field(default_factory=StemConfig)
    expansion: int = 4
    num_classes: int = 1000
    in_chans: int = 3
    zero_init_last_bn: bool = True
    checkpoint_mixer: bool = False
    mixer_norm: bool = True

    def __post_init__(self):
        stages = tuple(self.stages)
        if len(stages) == 0 or not all(isinstance(s, StageConfig) for s in stages):
            raise TypeError(f"stages={self.stages!r} must be a non-empty sequence of StageConfig")
        object.__setattr__(self, "stages", stages)
        if not isinstance(self.stem, StemConfig):
            raise TypeError(f"stem={self.stem!r} must be a StemConfig")
        for name in ("expansion", "in_chans"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}={v!r} must be an int >= 1")
        if not isinstance(self.num_classes, int) or isinstance(self.num_classes, bool) or self.num_classes < 0:
            raise ValueError(f"num_classes={self.num_classes!r} must be an int >= 0 (0: no head)")

    @property
    def depth(self) -> int:
        """Number of weighted layers as counted by ResNet-N: 3 per block + stem + fc."""
        return 3 * sum(s.depth for s in self.stages) + 2

    @property
    def out_channels(self) -> Tuple[int, ...]:
        """Channels of each stage's output."""
        return tuple(s.width * self.expansion if s.out_channels is None else s.out_channels for s in self.stages)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        d = dict(d)
        d["stages"] = tuple(StageConfig(**s) for s in d["stages"])
        d["stem"] = StemConfig(**d["stem"])
        return cls(**d)


def make_stages(depths: Sequence[int], mixer: str, mixer_kwargs: Mapping[str, Any],
                widths: Sequence[int] = (64, 128, 256, 512)) -> Tuple[StageConfig, ...]:
    """Four stages with strides 1, 2, 2, 2 (overall 4, 8, 16, 32 with the stem)."""
    if len(depths) != len(widths):
        raise ValueError(f"depths={tuple(depths)!r} and widths={tuple(widths)!r} must have the same length")
    return tuple(
        StageConfig(depth=d, width=w, stride=1 if i == 0 else 2, mixer=mixer, mixer_kwargs=dict(mixer_kwargs))
        for i, (d, w) in enumerate(zip(depths, widths))
    )


def resnet_config(depth: int) -> ModelConfig:
    """ResNet-``depth`` (v1.5: the stride on the 3x3 conv), as torchvision's."""
    return ModelConfig(name=f"resnet{depth}", stem=StemConfig("conv7"),
                       stages=make_stages(DEPTHS[depth], "conv", {"kernel_size": 3}))


def rednet_config(depth: int) -> ModelConfig:
    """RedNet-``depth`` as the official mmcls code: involution stem, 7x7 involutions (16
    channels per group, reduction 4) in place of every bottleneck 3x3 conv."""
    return ModelConfig(
        name=f"rednet{depth}",
        stem=StemConfig("rednet", 64, "involution", {"kernel_size": 3, "group_channels": 16, "reduction": 4}),
        stages=make_stages(DEPTHS[depth], "involution", {"kernel_size": 7, "group_channels": 16, "reduction": 4}),
    )


def sasa_resnet_config(depth: int) -> ModelConfig:
    """Stand-alone self-attention ResNet-``depth`` (Ramachandran et al. 2019, "conv-stem +
    attention"): every bottleneck 3x3 conv replaced by 7x7 local self-attention with 8 heads and
    relative position; the ResNet 7x7 conv stem is kept."""
    return ModelConfig(
        name=f"sasa_resnet{depth}", stem=StemConfig("conv7"),
        stages=make_stages(DEPTHS[depth], "local_attention", {"kernel_size": 7, "heads": 8, "rel_pos": True}),
    )


# LR-Net bottleneck widths per depth: fitted so that params and fvcore GMACs at 224x224 land
# within 2% of the published 14.7 M / 2.6 G (LR-Net-26) and 23.3 M / 4.3 G (LR-Net-50); the
# stage outputs stay ResNet's 256, 512, 1024, 2048 (docs/models.md, "LR-Net").
LRNET_WIDTHS: Dict[int, Tuple[int, int, int, int]] = {
    26: (112, 224, 448, 1664),
    50: (144, 240, 480, 960),
}


def lrnet_config(depth: int) -> ModelConfig:
    """LR-Net-``depth`` (Hu et al., ICCV 2019): ResNet-``depth`` with every bottleneck 3x3 conv
    replaced by a 7x7 local relation layer (m = 8 channels per aggregation group), the ResNet
    7x7 conv stem, bottleneck widths :data:`LRNET_WIDTHS` and ResNet's stage outputs."""
    widths = LRNET_WIDTHS[depth]
    stages = tuple(
        StageConfig(depth=d, width=w, stride=1 if i == 0 else 2, mixer="local_relation",
                    mixer_kwargs={"kernel_size": 7, "group_channels": 8}, out_channels=256 * 2 ** i)
        for i, (d, w) in enumerate(zip(DEPTHS[depth], widths)))
    return ModelConfig(name=f"lrnet{depth}", stem=StemConfig("conv7"), stages=stages)


def aa_resnet_config(depth: int, stages: Sequence[int] = (1, 2, 3)) -> ModelConfig:
    """AA-ResNet-``depth`` (Bello et al., ICCV 2019): ResNet-``depth`` whose bottleneck 3x3
    convs in ``stages`` (default the last three, at 28x28, 14x14 and 7x7 for a 224 input) are
    attention-augmented convolutions (``attention_augmented``: 8 heads, dv = 0.1 C, dk = 0.2 C
    with at least 20 dimensions per head, 2-D relative logits, global attention; ``span`` =
    the stage's side at 224 x 224)."""
    base = make_stages(DEPTHS[depth], "conv", {"kernel_size": 3})
    out = []
    for i, s in enumerate(base):
        if i in stages:
            s = dataclasses.replace(s, mixer="attention_augmented",
                                    mixer_kwargs={"kernel_size": 3, "heads": 8, "span": 56 // 2 ** i})
        out.append(s)
    return ModelConfig(name=f"aa_resnet{depth}", stem=StemConfig("conv7"), stages=tuple(out))


def axial_resnet_config(depth: int = 50, s: float = 0.5) -> ModelConfig:
    """Axial-ResNet (Wang et al., ECCV 2020; the official ``axial50s`` for depth 50 and s = 0.5):
    a 7x7 conv stem to 64*s channels, bottlenecks of width 128*s * 2**i and expansion 2 whose
    mixer is ``axial_attention`` (8 groups, span = the stage's side at 224 x 224: 56, 28, 14,
    7; the stride-2 blocks pool after the width axis) with no BN after it (the axial blocks end
    in their own output norms)."""
    widths = tuple(int(128 * s) * 2 ** i for i in range(4))
    stages = tuple(
        StageConfig(depth=d, width=w, stride=1 if i == 0 else 2, mixer="axial_attention",
                    mixer_kwargs={"kernel_size": 7, "heads": 8, "span": 56 // 2 ** i})
        for i, (d, w) in enumerate(zip(DEPTHS[depth], widths)))
    return ModelConfig(name="axial_resnet_s", stem=StemConfig("conv7", int(64 * s)), stages=stages, expansion=2,
                       mixer_norm=False)

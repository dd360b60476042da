"""SAN, the self-attention networks of Zhao, Jia and Koltun ("Exploring Self-attention for
Image Recognition", CVPR 2020; official code hszhao/SAN), built on the shared aggregation op.

SAN is not a :class:`~tokenmix.models.Backbone`: its stem is a 1x1 convolution at full
resolution, every stage starts with a 2x2 max-pool and a 1x1 transition convolution, and its
pre-activation block is ``x + conv(relu(bn2(SAM(relu(bn1(x))))))``. It is therefore its own
small module, :class:`SAN`, built from a :class:`SANConfig`; its module names are the official
ones except inside the SAM, which is a :class:`~tokenmix.mixers.Mixer`::

    conv_in, bn_in                    1x1 conv 3 -> 64 (no bias), BN, ReLU
    stage k = 0..4:  pool (2x2 max), conv{k} 1x1 (no bias), layer{k} (blocks), bn{k}, ReLU
    layer{k}.{j}:    bn1, mixer, bn2, conv (1x1, bias)   widths: c, c/4 (mixer output), c
    avgpool, fc

with c = 64, 256, 512, 1024, 2048 and kernel sizes (3, 7, 7, 7, 7). The mixer of a block maps
c -> c/4: its ``generator`` is ``pairwise`` or ``patchwise`` (relation width c/16, G = c/4/8
weight channels: ``share_planes = 8``), its ``value`` the 1x1 conv c -> c/4 with bias, its window
K x K, stride 1, ``border="reflect"``.

Weight sharing. tokenmix's aggregation serves value channel c with weight channel
``c // share_planes`` (contiguous groups); the official one with ``c % G`` (interleaved). The
models use tokenmix's order; :func:`tokenmix.models.convert_san.load_official_san` folds the
permutation into the weights: official mixer channel ``c = j*G + g`` becomes tokenmix channel
``g*share_planes + j``, i.e. the rows of the value conv (``sam.conv3``), the block's ``bn2``
and the columns of its ``conv`` are permuted. The model computes exactly the official function.

The input must be large enough for the reflect border of the last stage: each stage's side
(``floor(H / 2**(k+1))``) must exceed its window's padding K // 2 (for the default kernels,
H and W >= 128).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Tuple

import torch
from torch import nn

from ..kernel_gen.san import PairwiseKernel, PatchwiseKernel
from ..mixers.mixer import Mixer
from ..ops.window import Window

SA_TYPES = ("pairwise", "patchwise")

# name -> (sa_type, layers); kernels (3, 7, 7, 7, 7) for all (official config/imagenet/*.yaml)
SAN_LAYERS: Dict[int, Tuple[int, int, int, int, int]] = {10: (2, 1, 2, 4, 1), 15: (3, 2, 3, 5, 2), 19: (3, 3, 4, 6, 3)}


def _positive(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name}={v!r} must be an int >= 1")


@dataclass(frozen=True)
class SANConfig:
    """A SAN: ``sa_type`` ("pairwise" or "patchwise"), ``layers`` (blocks in each of the five
    stages), ``kernels`` (window size per stage, odd), ``width`` (channels of stage 0; later
    stages have 4, 8, 16, 32 times it), ``share_planes`` (value channels per weight channel),
    ``rel_reduction`` (relation width = stage width / it), ``mid_reduction`` (the mixer's
    output width = stage width / it), ``border`` (the windows' border: ``"reflect"``, the
    official ``pad_mode=1``, or ``"zero"``, its ``pad_mode=0``)."""

    sa_type: str = "pairwise"
    layers: Tuple[int, ...] = SAN_LAYERS[10]
    kernels: Tuple[int, ...] = (3, 7, 7, 7, 7)
    num_classes: int = 1000
    in_chans: int = 3
    width: int = 64
    share_planes: int = 8
    rel_reduction: int = 16
    mid_reduction: int = 4
    border: str = "reflect"
    name: str = ""

    def __post_init__(self):
        if self.sa_type not in SA_TYPES:
            raise ValueError(f"sa_type={self.sa_type!r} is not known; known: {', '.join(map(repr, SA_TYPES))}")
        if self.border not in ("reflect", "zero"):
            raise ValueError(f"border={self.border!r} must be 'reflect' or 'zero'")
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "kernels", tuple(self.kernels))
        if len(self.layers) != 5 or len(self.kernels) != 5:
            raise ValueError(f"layers={self.layers!r} and kernels={self.kernels!r} must have 5 entries (one per stage)")
        for i, (d, k) in enumerate(zip(self.layers, self.kernels)):
            _positive(f"layers[{i}]", d)
            _positive(f"kernels[{i}]", k)
            if k % 2 == 0:
                raise ValueError(f"kernels[{i}]={k} must be odd (the relation needs a centre tap)")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ValueError(f"num_classes={self.num_classes!r} must be an int >= 0")
        for name in ("in_chans", "width", "share_planes", "rel_reduction", "mid_reduction"):
            _positive(name, getattr(self, name))
        for i in range(5):
            c = self.stage_width(i)
            if c % self.rel_reduction or c % self.mid_reduction or (c // self.mid_reduction) % self.share_planes:
                raise ValueError(f"stage {i} width {c} must be divisible by rel_reduction={self.rel_reduction} "
                                 f"and mid_reduction={self.mid_reduction}, and width/mid_reduction="
                                 f"{c // self.mid_reduction} by share_planes={self.share_planes}")

    def stage_width(self, i: int) -> int:
        """Channels of stage i: width * (1, 4, 8, 16, 32)[i]."""
        return self.width * (1, 4, 8, 16, 32)[i]

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SANConfig":
        return cls(**dict(d))


def san_config(depth: int, sa_type: str) -> SANConfig:
    """The official SAN{10,15,19} pairwise/patchwise configuration."""
    if depth not in SAN_LAYERS:
        raise ValueError(f"depth={depth!r} is not a SAN depth; known: {sorted(SAN_LAYERS)}")
    return SANConfig(sa_type=sa_type, layers=SAN_LAYERS[depth], name=f"san{depth}_{sa_type}")


def san_mixer(sa_type: str, dim: int, out_dim: int, rel_channels: int, share_planes: int, kernel_size: int,
              stride: int = 1, border: str = "reflect", device=None, dtype=None) -> Mixer:
    """SAN's SAM as a :class:`~tokenmix.mixers.Mixer`: (B, dim, H, W) -> (B, out_dim, Ho, Wo);
    generator ``pairwise``/``patchwise`` with G = out_dim / share_planes, value a 1x1 conv
    dim -> out_dim with bias, K x K window with ``border`` (SAN's: reflect)."""
    if sa_type not in SA_TYPES:
        raise ValueError(f"sa_type={sa_type!r} is not known; known: {', '.join(map(repr, SA_TYPES))}")
    if out_dim % share_planes:
        raise ValueError(f"out_dim={out_dim} is not divisible by share_planes={share_planes}")
    fk = dict(device=device, dtype=dtype)
    gen_cls = PairwiseKernel if sa_type == "pairwise" else PatchwiseKernel
    gen = gen_cls(dim, kernel_size, stride=stride, groups=out_dim // share_planes, rel_channels=rel_channels, **fk)
    window = Window(kernel_size, stride=stride, border=border)
    return Mixer(dim, gen, window, value=nn.Conv2d(dim, out_dim, 1, **fk), **fk)


class SANBlock(nn.Module):
    """``x + conv(relu(bn2(mixer(relu(bn1(x))))))``; x: (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, sa_type: str, planes: int, rel_planes: int, mid_planes: int, share_planes: int,
                 kernel_size: int, border: str = "reflect"):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(planes)
        self.mixer = san_mixer(sa_type, planes, mid_planes, rel_planes, share_planes, kernel_size,
                               border=border)
        self.bn2 = nn.BatchNorm2d(mid_planes)
        self.conv = nn.Conv2d(mid_planes, planes, 1)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn2(self.mixer(self.relu(self.bn1(x)))))
        return x + self.conv(out)


class SAN(nn.Module):
    """SAN from a :class:`SANConfig` (module layout in the module docstring).

    - ``forward(x)``: (B, in_chans, H, W) -> (B, num_classes) (pooled features (B, 32*width)
      when num_classes == 0).
    - ``forward_stages(x)``: the five stage outputs, strides 2, 4, 8, 16, 32.
    - ``forward_features(x)``: the last one, (B, 32*width, H//32, W//32).

    Sides halve (rounding down, ``MaxPool2d(2, 2)``) before every stage.
    """

    def __init__(self, config: SANConfig):
        super().__init__()
        if not isinstance(config, SANConfig):
            raise TypeError(f"config={config!r} must be a SANConfig")
        self.config = config
        c = config.width
        self.conv_in, self.bn_in = nn.Conv2d(config.in_chans, c, 1, bias=False), nn.BatchNorm2d(c)
        prev = c
        self.feature_info = []
        for i in range(5):
            c = config.stage_width(i)
            setattr(self, f"conv{i}", nn.Conv2d(prev, c, 1, bias=False))
            setattr(self, f"bn{i}", nn.BatchNorm2d(c))
            blocks = [SANBlock(config.sa_type, c, c // config.rel_reduction, c // config.mid_reduction,
                               config.share_planes, config.kernels[i], config.border) for _ in range(config.layers[i])]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            self.feature_info.append({"stage": i, "channels": c, "reduction": 2 ** (i + 1)})
            prev = c
        self.num_features = c
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(c, config.num_classes) if config.num_classes > 0 else nn.Identity()

    def min_input_size(self) -> int:
        """The smallest side the reflect windows of every stage accept."""
        return max((k // 2 + 1) * 2 ** (i + 1) for i, k in enumerate(self.config.kernels))

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.config.in_chans:
            raise ValueError(f"SAN expects x of shape (B, {self.config.in_chans}, H, W), got {tuple(x.shape)}")
        if self.config.border == "reflect" and min(x.shape[2], x.shape[3]) < self.min_input_size():
            raise ValueError(f"SAN needs H and W >= {self.min_input_size()} (every stage's side must exceed its "
                             f"reflect padding), got x of shape {tuple(x.shape)}")

    def forward_stages(self, x: torch.Tensor):
        """x: (B, in_chans, H, W) -> [5 stage outputs], stage i at stride 2**(i+1)."""
        self._check_input(x)
        x = self.relu(self.bn_in(self.conv_in(x)))
        outs = []
        for i in range(5):
            conv, layer, bn = getattr(self, f"conv{i}"), getattr(self, f"layer{i}"), getattr(self, f"bn{i}")
            x = self.relu(bn(layer(conv(self.pool(x)))))
            outs.append(x)
        return outs

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, in_chans, H, W) -> (B, num_features, H//32, W//32)."""
        return self.forward_stages(x)[-1]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, num_features, h, w) -> (B, num_classes) (or (B, num_features) if pre_logits)."""
        x = torch.flatten(self.avgpool(x), 1)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, in_chans, H, W) -> (B, num_classes)."""
        return self.forward_head(self.forward_features(x))

    def extra_repr(self) -> str:
        return f"name={self.config.name!r}"


__all__ = ["SANConfig", "SAN", "SANBlock", "san_config", "san_mixer", "SAN_LAYERS"]

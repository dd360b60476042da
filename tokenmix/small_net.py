"""``SmallNet``: the small residual backbone of ``tokenmix compare``, with the spatial mixer of
every block chosen by name (any :func:`tokenmix.mixers.list_mixers` preset).

Layout for an input ``x: (B, in_channels, H, W)`` (8x8 digits by default)::

    stem    3x3 conv in_channels -> width, norm, ReLU                       (B, w, H, W)
    stage 1 ``depth`` blocks at width w                                     (B, w, H, W)
    down    2x2 avg-pool, 1x1 conv w -> 2w, norm                            (B, 2w, H/2, W/2)
    stage 2 ``depth`` blocks at width 2w                                    (B, 2w, H/2, W/2)
    head    global average pool, linear 2w -> num_classes                   (B, num_classes)

Block (RedNet-style bottleneck without reduction; the mixer is the only spatial operation)::

    y = ReLU(x + norm(conv1x1(ReLU(norm(mixer(ReLU(norm(conv1x1(x)))))))))

Only the mixer differs between two ``SmallNet``s of the same width and depth, so a
comparison measures the mixer. ``norm="batch"`` (default), ``"group"`` (GroupNorm, batch
independent: what a data-parallel equivalence test needs) or ``"none"``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional

import torch
from torch import nn

from ._args import check_int

NORMS = ("batch", "group", "none")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    return nn.Identity()


class MixerBlock(nn.Module):
    """Residual block around one spatial mixer. x: (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, dim: int, mixer: str, kernel_size: int, norm: str, mixer_kwargs: Dict[str, Any]):
        super().__init__()
        from .mixers import create_mixer

        self.reduce = nn.Sequential(nn.Conv2d(dim, dim, 1, bias=False), _norm(norm, dim), nn.ReLU(inplace=True))
        self.mixer = create_mixer(mixer, dim, kernel_size=kernel_size, **mixer_kwargs)
        self.mix_post = nn.Sequential(_norm(norm, dim), nn.ReLU(inplace=True))
        self.expand = nn.Sequential(nn.Conv2d(dim, dim, 1, bias=False), _norm(norm, dim))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)."""
        y = self.expand(self.mix_post(self.mixer(self.reduce(x))))
        return self.act(x + y)


@dataclass(frozen=True)
class SmallNetConfig:
    """Everything :class:`SmallNet` is built from (its constructor arguments), so a weights
    file can carry it (``tokenmix.models.save_weights``) and rebuild the network."""

    mixer: str = "conv"
    num_classes: int = 10
    in_channels: int = 1
    width: int = 32
    depth: int = 1
    kernel_size: int = 3
    norm: str = "batch"
    mixer_kwargs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"small:{self.mixer}"

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["mixer_kwargs"] = dict(self.mixer_kwargs)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SmallNetConfig":
        return cls(**d)


class SmallNet(nn.Module):
    """Small two-stage residual classifier; see the module docstring for the layout.

    Args:
        mixer: mixer preset name for every block (``conv``, ``dwconv``, ``involution``, ...).
        num_classes: output classes.
        in_channels: input channels (1 for digits, 3 for RGB folders).
        width: channels of stage 1 (stage 2 has twice as many).
        depth: blocks per stage.
        kernel_size: K of every mixer (3 suits 8x8 inputs).
        norm: ``"batch"``, ``"group"`` or ``"none"``.
        mixer_kwargs: extra preset arguments (``heads=``, ``group_channels=``, ...).

    Shapes: ``x: (B, in_channels, H, W) -> (B, num_classes)``.
    """

    def __init__(self, mixer: str = "conv", num_classes: int = 10, in_channels: int = 1, width: int = 32,
                 depth: int = 1, kernel_size: int = 3, norm: str = "batch",
                 mixer_kwargs: Optional[Dict[str, Any]] = None):
        super().__init__()
        for name, value in (("num_classes", num_classes), ("in_channels", in_channels), ("width", width),
                            ("depth", depth)):
            check_int(name, value)
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        kw = dict(mixer_kwargs or {})
        self.mixer_name = mixer
        self.config = SmallNetConfig(mixer, num_classes, in_channels, width, depth, kernel_size, norm, kw)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), _norm(norm, width),
                                  nn.ReLU(inplace=True))
        self.stage1 = nn.Sequential(*[MixerBlock(width, mixer, kernel_size, norm, kw) for _ in range(depth)])
        self.down = nn.Sequential(nn.AvgPool2d(2, ceil_mode=True), nn.Conv2d(width, 2 * width, 1, bias=False),
                                  _norm(norm, 2 * width))
        self.stage2 = nn.Sequential(*[MixerBlock(2 * width, mixer, kernel_size, norm, kw) for _ in range(depth)])
        self.head = nn.Linear(2 * width, num_classes)

    @classmethod
    def from_config(cls, config: SmallNetConfig) -> "SmallNet":
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(config)})

    def mixers(self):
        """The spatial mixers of all blocks, input side first."""
        return [b.mixer for b in list(self.stage1) + list(self.stage2)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, in_channels, H, W) -> logits (B, num_classes)."""
        x = self.stage2(self.down(self.stage1(self.stem(x))))
        return self.head(x.mean(dim=(2, 3)))


def parse_small_model(name: str) -> Optional[str]:
    """``"small:MIXER"`` -> ``"MIXER"``; any other name -> None."""
    if isinstance(name, str) and name.startswith("small:"):
        return name[len("small:"):]
    return None


__all__ = ["SmallNet", "SmallNetConfig", "MixerBlock", "parse_small_model", "NORMS"]

"""The configurable bottleneck backbone (ResNet / RedNet / SASA-ResNet from one class)."""

from __future__ import annotations

import contextlib
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig, StageConfig, StemConfig


def _mixer(name: str, dim: int, stride: int, kwargs: Mapping[str, Any], where: str) -> nn.Module:
    """``create_mixer`` with the failing place named in the error."""
    from tokenmix.mixers import create_mixer  # the mixers package is the one owner of mixer names

    try:
        return create_mixer(name, dim, stride=stride, **dict(kwargs))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: create_mixer({name!r}, {dim}, stride={stride}, **{dict(kwargs)!r}) "
                         f"failed: {e}") from e


@contextlib.contextmanager
def _frozen_bn_stats(module: nn.Module):
    """Run ``module`` without changing its BN running statistics (for the recompute pass of
    activation checkpointing: the forward pass already updated them once)."""
    saved = []
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            saved.append((m, m.momentum, m.num_batches_tracked.clone()))
            m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum, n in saved:
            m.momentum = momentum
            m.num_batches_tracked.copy_(n)


def run_mixer(mixer: nn.Module, x: torch.Tensor, checkpointed: bool) -> torch.Tensor:
    """``mixer(x)``; with ``checkpointed`` (and grad enabled) its internals are not kept for
    backward but recomputed there (activation checkpointing, BN statistics updated once)."""
    if checkpointed and torch.is_grad_enabled():
        return checkpoint(mixer, x, use_reentrant=False,
                          context_fn=lambda: (contextlib.nullcontext(), _frozen_bn_stats(mixer)))
    return mixer(x)


class ConvStem(nn.Module):
    """ResNet stem (no mixer: ``checkpoint_mixer`` is accepted for a uniform signature).

    x: (B, in_chans, H, W) -> (B, channels, ceil(H/4), ceil(W/4)).
    """

    def __init__(self, in_chans: int, cfg: StemConfig, checkpoint_mixer: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, cfg.channels, 7, 2, 3, bias=False)
        self.bn = nn.BatchNorm2d(cfg.channels)
        self.act = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.act(self.bn(self.conv(x))))


class RedNetStem(nn.Module):
    """Official RedNet stem (mmcls ``deep_stem``, with an involution in the middle).

    x: (B, in_chans, H, W) -> (B, channels, ceil(H/4), ceil(W/4)).
    """

    def __init__(self, in_chans: int, cfg: StemConfig, checkpoint_mixer: bool = False):
        super().__init__()
        self.checkpoint_mixer = bool(checkpoint_mixer)
        half = cfg.channels // 2
        self.conv1 = nn.Conv2d(in_chans, half, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.mixer = _mixer(cfg.mixer, half, 1, cfg.mixer_kwargs, "stem")
        self.bn2 = nn.BatchNorm2d(half)
        self.conv2 = nn.Conv2d(half, cfg.channels, 3, 1, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cfg.channels)
        self.act = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn1(self.conv1(x)))
        x = self.act(self.bn2(run_mixer(self.mixer, x, self.checkpoint_mixer and self.training)))
        x = self.act(self.bn3(self.conv2(x)))
        return self.pool(x)


STEMS = {"conv7": ConvStem, "rednet": RedNetStem}


class Bottleneck(nn.Module):
    """1x1 conv + BN + ReLU -> mixer (stride here) + BN + ReLU -> 1x1 conv + BN, plus the
    shortcut (identity, or 1x1 conv with the stride + BN), then ReLU. ``mixer_norm=False``
    leaves out the BN after the mixer (``bn2`` is then an identity).

    x: (B, in_dim, H, W) -> (B, out_dim, ceil(H/stride), ceil(W/stride)), out_dim =
    ``out_channels`` or ``width * expansion``.
    """

    def __init__(self, in_dim: int, width: int, stride: int, expansion: int, mixer: str,
                 mixer_kwargs: Mapping[str, Any], where: str = "block", checkpoint_mixer: bool = False,
                 out_channels: Optional[int] = None, mixer_norm: bool = True):
        super().__init__()
        self.checkpoint_mixer = bool(checkpoint_mixer)
        out_dim = width * expansion if out_channels is None else out_channels
        self.conv1 = nn.Conv2d(in_dim, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.mixer = _mixer(mixer, width, stride, mixer_kwargs, where)
        self.bn2 = nn.BatchNorm2d(width) if mixer_norm else nn.Identity()
        self.conv3 = nn.Conv2d(width, out_dim, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_dim)
        self.act = nn.ReLU(inplace=True)
        self.downsample: Optional[nn.Module] = None
        if stride != 1 or in_dim != out_dim:
            self.downsample = nn.Sequential(nn.Conv2d(in_dim, out_dim, 1, stride, bias=False),
                                            nn.BatchNorm2d(out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.act(self.bn1(self.conv1(x)))
        y = self.act(self.bn2(run_mixer(self.mixer, y, self.checkpoint_mixer and self.training)))
        y = self.bn3(self.conv3(y))
        return self.act(y + shortcut)


class Backbone(nn.Module):
    """Bottleneck backbone built from a :class:`ModelConfig`.

    - ``forward(x)``: x (B, in_chans, H, W) -> logits (B, num_classes) (or pooled features
      (B, C) when num_classes == 0).
    - ``forward_features(x)``: -> last feature map (B, C4, H/32, W/32).
    - ``forward_stages(x, indices=None)``: -> list of stage outputs, strides 4, 8, 16, 32
      (for detection/segmentation necks); ``feature_info`` gives their channels and strides.
    - ``forward_head(features)``: (B, C4, h, w) -> logits.

    Spatial sizes round up at every stride (odd inputs work): stage i has ceil(H/2**(i+2)) rows
    after the 2x2 stem reductions (each itself a ceil).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config={config!r} must be a ModelConfig")
        self.config = config
        self.stem = STEMS[config.stem.type](config.in_chans, config.stem, checkpoint_mixer=config.checkpoint_mixer)
        stages: List[nn.Module] = []
        in_dim = config.stem.channels
        reduction = 4
        self.feature_info: List[Dict[str, int]] = []
        for i, s in enumerate(config.stages):
            blocks = []
            for j in range(s.depth):
                blocks.append(Bottleneck(in_dim, s.width, s.stride if j == 0 else 1, config.expansion,
                                         s.mixer, s.mixer_kwargs, where=f"stage {i} block {j}",
                                         checkpoint_mixer=config.checkpoint_mixer, out_channels=s.out_channels,
                                         mixer_norm=config.mixer_norm))
                in_dim = config.out_channels[i]
            stages.append(nn.Sequential(*blocks))
            reduction *= s.stride
            self.feature_info.append({"stage": i, "channels": in_dim, "reduction": reduction})
        self.stages = nn.ModuleList(stages)
        self.num_features = in_dim
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_dim, config.num_classes) if config.num_classes > 0 else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-normal (fan_out) for every Conv2d, BN weight 1 / bias 0 (as the official
        mmcls init of ResNet and RedNet), then zero the last BN of each block if configured.
        Mixer-specific parameters other than Conv2d/BN keep the mixer's own init."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if self.config.zero_init_last_bn:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)

    def forward_stages(self, x: torch.Tensor, indices: Optional[Sequence[int]] = None) -> List[torch.Tensor]:
        """x: (B, in_chans, H, W) -> [stage outputs]; stage i: (B, C_i, H/s_i, W/s_i) with
        s_i = 4, 8, 16, 32. ``indices`` picks stages (default: all)."""
        n = len(self.stages)
        if indices is None:
            indices = range(n)
        indices = list(indices)
        bad = [i for i in indices if not isinstance(i, int) or not -n <= i < n]
        if bad:
            raise ValueError(f"indices={indices!r} holds {bad!r}; stage indices are in [0, {n})")
        wanted = {i % n for i in indices}
        last = max(wanted) if wanted else -1
        outs: Dict[int, torch.Tensor] = {}
        x = self.stem(x)
        for i, stage in enumerate(self.stages):
            if i > last:
                break
            x = stage(x)
            if i in wanted:
                outs[i] = x
        return [outs[i % n] for i in indices]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, in_chans, H, W) -> (B, num_features, ceil(H/32), ceil(W/32))."""
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """x: (B, num_features, h, w) -> (B, num_classes) (or (B, num_features) if pre_logits)."""
        x = torch.flatten(self.pool(x), 1)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, in_chans, H, W) -> (B, num_classes)."""
        return self.forward_head(self.forward_features(x))

    def extra_repr(self) -> str:
        return f"name={self.config.name!r}"

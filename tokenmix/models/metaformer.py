"""The configurable MetaFormer backbone (PoolFormer / ConvFormer / NAT / DiNAT from one class).

Every tensor is channels-first, ``(B, C, H, W)``, inside the blocks too: the mixers take
that layout, the MLP's 1x1 layers are convolutions (with ``nn.Linear``'s weight layout where
the official model is channels-last) and LayerNorm normalises over the channels.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import _mixer
from .metaformer_config import STEM_STRIDE, MetaFormerConfig, MetaStageConfig


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a (B, C, H, W) map (each pixel normalised on its own),
    ``bias=False`` as the MetaFormer baselines' LayerNormWithoutBias. Shapes: same in and out."""

    def __init__(self, channels: int, eps: float = 1e-5, bias: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps).permute(0, 3, 1, 2)


def make_norm(kind: Optional[str], channels: int, eps: float) -> nn.Module:
    """``"group"``: GroupNorm(1, C) (PoolFormer); ``"layer"``/``"layer_nobias"``: LayerNorm2d;
    None: identity."""
    if kind is None:
        return nn.Identity()
    if kind == "group":
        return nn.GroupNorm(1, channels, eps=eps)
    return LayerNorm2d(channels, eps, bias=kind == "layer")


class Scale(nn.Module):
    """Learned per-channel scale of a (B, C, H, W) map, ``scale`` initialised to ``init``."""

    def __init__(self, channels: int, init: float):
        super().__init__()
        self.init = float(init)
        self.scale = nn.Parameter(torch.full((channels,), self.init))

    def reset_parameters(self) -> None:
        nn.init.constant_(self.scale, self.init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.view(1, -1, 1, 1)


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a sample's branch with probability ``p`` and scale
    the kept ones by 1/(1-p); identity in eval."""

    def __init__(self, p: float):
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.rand(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype) >= self.p
        return x * keep.to(x.dtype) / (1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Mlp(nn.Module):
    """``fc2(act(fc1(x)))`` over the channels: (B, dim, H, W) -> (B, dim, H, W). ``layer``:
    ``"conv"`` (1x1 nn.Conv2d, PoolFormer) or ``"linear"`` (nn.Linear's weight layout)."""

    def __init__(self, dim: int, hidden: int, act: str = "gelu", bias: bool = True, layer: str = "conv"):
        super().__init__()
        from tokenmix.mixers import PointwiseLinear, StarReLU

        def pw(i, o):
            return nn.Conv2d(i, o, 1, bias=bias) if layer == "conv" else PointwiseLinear(i, o, bias=bias)

        self.fc1 = pw(dim, hidden)
        self.act = nn.GELU() if act == "gelu" else StarReLU()
        self.fc2 = pw(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class MetaFormerBlock(nn.Module):
    """``x = rs1(x) + drop(ls1(mixer(norm1(x))))``, ``x = rs2(x) + drop(ls2(mlp(norm2(x))))``;
    ``ls``/``rs`` are :class:`Scale` or identity. x: (B, dim, H, W) -> (B, dim, H, W)."""

    def __init__(self, cfg: MetaFormerConfig, stage: MetaStageConfig, j: int, drop_path: float, where: str):
        super().__init__()
        dim = stage.dim
        self.norm1 = make_norm(cfg.norm, dim, cfg.norm_eps)
        self.mixer = _mixer(stage.mixer, dim, 1, stage.block_kwargs(j), where)
        self.norm2 = make_norm(cfg.norm, dim, cfg.norm_eps)
        self.mlp = Mlp(dim, int(dim * stage.mlp_ratio), cfg.mlp_act, cfg.mlp_bias, cfg.mlp_layer)
        for i in (1, 2):
            setattr(self, f"ls{i}", Scale(dim, stage.layer_scale) if stage.layer_scale is not None else nn.Identity())
            setattr(self, f"rs{i}", Scale(dim, stage.res_scale) if stage.res_scale is not None else nn.Identity())
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.rs1(x) + self.drop_path(self.ls1(self.mixer(self.norm1(x))))
        return self.rs2(x) + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


class Stem(nn.Module):
    """``"patch"``: 7x7 conv stride 4 padding 2 (``conv``); ``"conv3x2"``: 3x3 conv stride 2
    to dim/2 (``conv1``), 3x3 conv stride 2 to dim (``conv2``); ``"conv3"``: 3x3 conv stride 1
    (``conv``); then ``norm``. x: (B, in_chans, H, W) -> (B, dim, ~H/4, ~W/4) (stride 1: H, W)."""

    def __init__(self, kind: str, in_chans: int, dim: int, norm: Optional[str], eps: float):
        super().__init__()
        if kind == "patch":
            self.conv = nn.Conv2d(in_chans, dim, 7, 4, 2)
        elif kind == "conv3":
            self.conv = nn.Conv2d(in_chans, dim, 3, 1, 1)
        else:
            self.conv1 = nn.Conv2d(in_chans, dim // 2, 3, 2, 1)
            self.conv2 = nn.Conv2d(dim // 2, dim, 3, 2, 1)
        self.norm = make_norm(norm, dim, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x) if hasattr(self, "conv") else self.conv2(self.conv1(x))
        return self.norm(x)


class Downsample(nn.Module):
    """3x3 conv stride 2 padding 1 (``conv``) with ``norm`` before (``norm_first``) or after it.
    x: (B, in_dim, H, W) -> (B, out_dim, ceil(H/2), ceil(W/2))."""

    def __init__(self, in_dim: int, out_dim: int, bias: bool, norm: Optional[str], norm_first: bool, eps: float):
        super().__init__()
        self.norm_first = bool(norm_first)
        self.norm = make_norm(norm, in_dim if norm_first else out_dim, eps)
        self.conv = nn.Conv2d(in_dim, out_dim, 3, 2, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.norm(x)) if self.norm_first else self.norm(self.conv(x))


class MlpHead(nn.Module):
    """ConvFormer's head: ``fc2(norm(SquaredReLU(fc1(x))))``, fc1 to 4x, LayerNorm eps 1e-5.
    x: (B, dim) -> (B, num_classes)."""

    def __init__(self, dim: int, num_classes: int, ratio: int = 4):
        super().__init__()
        self.fc1 = nn.Linear(dim, ratio * dim)
        self.norm = nn.LayerNorm(ratio * dim)
        self.fc2 = nn.Linear(ratio * dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(F.relu(self.fc1(x)).square()))


class MetaFormer(nn.Module):
    """MetaFormer backbone built from a :class:`MetaFormerConfig`.

    - ``forward(x)``: x (B, in_chans, H, W) -> logits (B, num_classes) (or the normalised
      pooled features (B, C) when num_classes == 0).
    - ``forward_features(x)``: -> last stage output (B, C4, ~H/32, ~W/32).
    - ``forward_stages(x, indices=None)``: -> list of stage outputs, strides 4, 8, 16, 32
      (``feature_info`` gives their channels and strides).
    - ``forward_head(features, pre_logits=False)``: (B, C4, h, w) -> final norm, pool, head.
    """

    def __init__(self, config: MetaFormerConfig):
        super().__init__()
        if not isinstance(config, MetaFormerConfig):
            raise TypeError(f"config={config!r} must be a MetaFormerConfig")
        self.config = cfg = config
        dims = cfg.out_channels
        self.stem = Stem(cfg.stem, cfg.in_chans, dims[0], cfg.stem_norm, cfg.norm_eps)
        self.downsamples = nn.ModuleList(
            Downsample(dims[i], dims[i + 1], cfg.down_bias, cfg.down_norm, cfg.down_norm_first, cfg.norm_eps)
            for i in range(len(dims) - 1))
        total = sum(s.depth for s in cfg.stages)
        rates = [cfg.drop_path_rate * k / max(total - 1, 1) for k in range(total)]
        stages, k = [], 0
        self.feature_info: List[Dict[str, int]] = []
        for i, s in enumerate(cfg.stages):
            stages.append(nn.Sequential(*(MetaFormerBlock(cfg, s, j, rates[k + j], f"stage {i} block {j}")
                                          for j in range(s.depth))))
            k += s.depth
            self.feature_info.append({"stage": i, "channels": s.dim, "reduction": STEM_STRIDE[cfg.stem] * 2 ** i})
        self.stages = nn.ModuleList(stages)
        self.num_features = dims[-1]
        self.norm = (nn.LayerNorm(dims[-1], eps=cfg.norm_eps, bias=cfg.head_norm == "layer")
                     if cfg.head_norm_pooled else make_norm(cfg.head_norm, dims[-1], cfg.norm_eps))
        if cfg.num_classes == 0:
            self.head = nn.Identity()
        else:
            self.head = nn.Linear(dims[-1], cfg.num_classes) if cfg.head == "linear" else MlpHead(dims[-1], cfg.num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official init: every nn.Linear (1x1 PointwiseLinear layers included) and the MLPs'
        1x1 convs ~ truncated N(0, 0.02), bias 0; norms weight 1 / bias 0; scales at their
        init value; convs of stem and downsampling and the mixers' own parameters keep their
        PyTorch / mixer defaults."""
        mlp_convs = {id(m) for b in self.modules() if isinstance(b, Mlp) for m in (b.fc1, b.fc2)}
        for m in self.modules():
            if isinstance(m, nn.Linear) or id(m) in mlp_convs:
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, nn.GroupNorm, LayerNorm2d, Scale)):
                m.reset_parameters()

    def mixers(self) -> List[nn.Module]:
        """The token mixers of all blocks, input side first."""
        return [block.mixer for stage in self.stages for block in stage]

    def _stage_input(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return self.stem(x) if i == 0 else self.downsamples[i - 1](x)

    def forward_stages(self, x: torch.Tensor, indices: Optional[Sequence[int]] = None) -> List[torch.Tensor]:
        """x: (B, in_chans, H, W) -> [stage outputs]; stage i: (B, C_i, ~H/s_i, ~W/s_i) with
        s_i = 4, 8, 16, 32. ``indices`` picks stages (default: all)."""
        n = len(self.stages)
        indices = list(range(n) if indices is None else indices)
        bad = [i for i in indices if not isinstance(i, int) or isinstance(i, bool) or not -n <= i < n]
        if bad:
            raise ValueError(f"indices={indices!r} holds {bad!r}; stage indices are in [0, {n})")
        wanted = {i % n for i in indices}
        outs: Dict[int, torch.Tensor] = {}
        for i in range(max(wanted) + 1 if wanted else 0):
            x = self.stages[i](self._stage_input(i, x))
            if i in wanted:
                outs[i] = x
        return [outs[i % n] for i in indices]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, in_chans, H, W) -> (B, num_features, ~H/32, ~W/32), the last stage's output."""
        for i, stage in enumerate(self.stages):
            x = stage(self._stage_input(i, x))
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """x: (B, num_features, h, w) -> (B, num_classes) (or (B, num_features) if pre_logits)."""
        if self.config.head_norm_pooled:
            x = self.norm(x.mean((2, 3)))
        else:
            x = self.norm(x).mean((2, 3))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, in_chans, H, W) -> (B, num_classes)."""
        return self.forward_head(self.forward_features(x))

    def extra_repr(self) -> str:
        return f"name={self.config.name!r}"


__all__ = ["MetaFormer", "MetaFormerBlock", "Mlp", "MlpHead", "Stem", "Downsample", "LayerNorm2d", "Scale",
           "DropPath", "make_norm"]

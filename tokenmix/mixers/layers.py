"""Small layers shared by the mixers and the transformer-style backbones: a 1x1 projection with
``nn.Linear``'s weight layout, and the StarReLU activation of the MetaFormer baselines."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PointwiseLinear(nn.Linear):
    """``nn.Linear(in_features, out_features)`` applied to the channels of a (B, C, H, W) map:
    a 1x1 convolution whose weight keeps the Linear shape (out, in), so that checkpoints of
    channels-last transformers (NAT's ``qkv``, ``proj``, ``mlp.fc1``) load without reshaping.

    Shapes: ``x: (B, in_features, H, W) -> (B, out_features, H, W)``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_features:
            raise ValueError(f"PointwiseLinear expects x of shape (B, {self.in_features}, H, W), got {tuple(x.shape)}")
        return F.conv2d(x, self.weight[:, :, None, None], self.bias)


class StarReLU(nn.Module):
    """``s * relu(x) ** 2 + b`` with learned scalars s (init 1) and b (init 0) (Yu et al.,
    MetaFormer baselines, 2022). Shapes: any -> same."""

    def __init__(self, scale: float = 1.0, bias: float = 0.0, device=None, dtype=None):
        super().__init__()
        self.init = (float(scale), float(bias))
        self.scale = nn.Parameter(torch.empty(1, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(1, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.scale, self.init[0])
        nn.init.constant_(self.bias, self.init[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * F.relu(x).square() + self.bias


__all__ = ["PointwiseLinear", "StarReLU"]

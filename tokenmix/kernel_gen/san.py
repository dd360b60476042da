"""``pairwise`` and ``patchwise``: the kernel generators of SAN (Zhao, Jia, Koltun, "Exploring
Self-attention for Image Recognition", CVPR 2020; official code hszhao/SAN), official semantics.

Both read the window's taps of a 1x1-reduced key map ``psi(x)`` per output pixel. They gather
them with the shared op, not ``unfold``: ``correlate(ones, k, window, groups=C)`` with a unit
query and one channel per group is ``out[b, c, t, i, j] = k[b, c, src_t(i, j)]`` (see
:func:`window_taps`). Its memory is the gathered tensor itself, O(output * taps) (every backend
computes it tap by tap), it follows the window's border (SAN's is ``"reflect"``), stride and
dilation, and the flop counter sees it as one multiply-add per gathered element, the count the
official code gives its subtraction.

The generators' weight channel g serves tokenmix's contiguous channel group g of the value
(channels ``[g*C/G, (g+1)*C/G)``); the official aggregation serves channel c with weight
channel ``c % G`` (interleaved). The SAN models fold that permutation into the value and
output 1x1 convolutions when official weights are converted (``tokenmix.models.san``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .._args import check_int
from ..ops.functional import correlate
from ..ops.window import Window
from ._position import strided_queries
from .base import KernelGenerator
from .registry import register_kernel_gen


def window_taps(x: torch.Tensor, window: Window, channels: int) -> torch.Tensor:
    """The window's K*K taps of every output pixel: x (B, C, H, W) -> (B, C, K*K, Ho, Wo) with
    ``out[b, c, t, i, j] = x[b, c, src_t(i, j)]`` (the border's value outside the image: 0 for
    ``"zero"``, the mirrored pixel for ``"reflect"``). Computed as ``correlate`` of a query of
    ones against x with one channel per group; differentiable in x (its gradient is
    ``aggregate_transpose``). ``channels`` is C, given as an int so that traced graphs keep
    the op's group count a constant."""
    B, _, H, W = x.shape
    Ho, Wo = window.output_size(H, W)
    ones = torch.ones(B, channels, Ho, Wo, dtype=x.dtype, device=x.device)
    return correlate(ones, x, window, channels)


def _linspace(n, device, dtype) -> torch.Tensor:
    """``torch.linspace(-1, 1, n)`` written with ``arange`` so that ``torch.export`` keeps n
    symbolic (equal to linspace up to rounding)."""
    i = torch.arange(n, device=device, dtype=dtype)
    return i * (2.0 / max(n - 1, 1)) - 1.0


def coordinate_map(height: int, width: int, device=None, dtype=None) -> torch.Tensor:
    """SAN's position map (1, 2, H, W): channel 0 the column coordinate
    ``linspace(-1, 1, W)``, channel 1 the row coordinate ``linspace(-1, 1, H)``."""
    dtype = torch.get_default_dtype() if dtype is None else dtype
    cols = _linspace(width, device, dtype).view(1, 1, 1, width).expand(1, 1, height, width)
    rows = _linspace(height, device, dtype).view(1, 1, height, 1).expand(1, 1, height, width)
    return torch.cat([cols, rows], 1)


class _SANKernel(KernelGenerator):
    """Shared set-up of the two SAN generators: C, G (default C // 8), R (default C // 16),
    odd K."""

    def _common(self, channels, kernel_size, stride, groups, rel_channels, default_rel_reduction=16):
        channels = check_int("channels", channels)
        groups = check_int("groups", channels // 8 if groups is None else groups)
        if rel_channels is None:
            rel_channels = channels // default_rel_reduction
            if rel_channels < 1:
                raise ValueError(f"channels // 16 must be >= 1 for the default rel_channels, got channels={channels}")
        self.rel_channels = check_int("rel_channels", rel_channels)
        self._setup(channels, groups, kernel_size, stride)
        if self.kernel_size[0] % 2 == 0 or self.kernel_size[1] % 2 == 0:
            raise ValueError(f"kernel_size must be odd (the relation needs a centre tap), "
                             f"got kernel_size={kernel_size!r}")

    def reset_parameters(self) -> None:
        """PyTorch defaults of the convolutions; BN weight 1, bias 0, running stats reset."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)):
                m.reset_parameters()

    def extra_repr(self) -> str:
        return super().extra_repr() + f", rel_channels={self.rel_channels}"


@register_kernel_gen("pairwise")
class PairwiseKernel(_SANKernel):
    """SAN's pairwise (subtraction) attention weights, official semantics.

    ``w[b, g, t, i, j] = softmax_t( mlp( [phi(x)_i - psi(x)_{src_t(i,j)} ; p_i - p_{src_t(i,j)}] ) )``

    with phi = ``query`` and psi = ``key`` 1x1 convolutions C -> R (with bias), p = ``position``
    (a 1x1 conv 2 -> 2, with bias) of :func:`coordinate_map` (linspace(-1, 1) coordinates of
    the input's pixels; a tap reads its source pixel's coordinates, mirrored ones for the
    reflect border), and ``mlp`` = BN(R+2) - ReLU - 1x1 conv R+2 -> R (no bias) - BN(R) - ReLU -
    1x1 conv R -> G (bias), applied per tap; the softmax runs over the K*K taps. The relation
    of output (i, j) is centred on input ``(i*s, j*s)`` (queries at the strided positions).
    The taps are gathered with :func:`window_taps` (the shared ``correlate``), not ``unfold``.

    Submodule names follow the official ``SAM``: ``query`` = conv1, ``key`` = conv2,
    ``position`` = conv_p, ``mlp`` = conv_w (same indices 0..5).

    Args:
        channels: C, channels of x.
        kernel_size: K (odd).
        stride: s, the stride of the windows it serves.
        groups: G, the weight channels (official ``out_planes // share_planes``); default C // 8.
        rel_channels: R, the relation width (official ``rel_planes``); default C // 16.
        position: include the encoded relative position (official: always).
        cancelling_bias: keep the two biases that cannot change the output, ``position``'s
            (it cancels in ``p_i - p_t``) and the last ``mlp`` conv's (the same for every tap,
            it cancels in the softmax). The official SAM has them (default True: its parameter
            count and checkpoints); without them every parameter gets a gradient.

    Shapes: ``forward(x: (B, C, H, W), window) -> (B, G, K*K, Ho, Wo)``.
    """

    def __init__(self, channels: int, kernel_size=7, *, stride: int = 1, groups: Optional[int] = None,
                 rel_channels: Optional[int] = None, position: bool = True, cancelling_bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        self._common(channels, kernel_size, stride, groups, rel_channels)
        R, G, fk = self.rel_channels, self.groups, dict(device=device, dtype=dtype)
        bias = bool(cancelling_bias)
        self.query = nn.Conv2d(self.channels, R, 1, **fk)
        self.key = nn.Conv2d(self.channels, R, 1, **fk)
        self.use_position = bool(position)
        P = 2 if self.use_position else 0
        if self.use_position:
            self.position = nn.Conv2d(2, 2, 1, bias=bias, **fk)
        self.mlp = nn.Sequential(nn.BatchNorm2d(R + P, **fk), nn.ReLU(), nn.Conv2d(R + P, R, 1, bias=False, **fk),
                                 nn.BatchNorm2d(R, **fk), nn.ReLU(), nn.Conv2d(R, G, 1, bias=bias, **fk))

    def relation(self, x: torch.Tensor, window: Window) -> torch.Tensor:
        """The MLP's input (B, R [+2], K*K, Ho, Wo): ``phi(x)_i - psi(x)_t`` then ``p_i - p_t``."""
        self.check_window(x, window)
        B, _, H, W = x.shape
        q = self.query(strided_queries(x, window))  # (B, R, Ho, Wo)
        rel = q.unsqueeze(2) - window_taps(self.key(x), window, self.rel_channels)
        if not self.use_position:
            return rel
        p = self.position(coordinate_map(H, W, device=x.device, dtype=x.dtype))  # (1, 2, H, W)
        prel = strided_queries(p, window).unsqueeze(2) - window_taps(p, window, 2)  # (1, 2, K*K, Ho, Wo)
        return torch.cat([rel, prel.expand(B, -1, -1, -1, -1)], 1)

    def forward(self, x: torch.Tensor, window: Window) -> torch.Tensor:
        r = self.relation(x, window)
        B, _, T, Ho, Wo = r.shape
        w = self.mlp(r.reshape(B, r.shape[1], T, Ho * Wo))
        return torch.softmax(w, dim=2).view(B, self.groups, T, Ho, Wo)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", position={self.use_position}"


@register_kernel_gen("patchwise")
class PatchwiseKernel(_SANKernel):
    """SAN's patchwise attention weights, official semantics (no softmax):

    ``w[b, :, :, i, j] = mlp( [phi(x)_i ; psi(x)_{src_0(i,j)} ; ... ; psi(x)_{src_{K*K-1}(i,j)}] )``

    with phi = ``query`` and psi = ``key`` 1x1 convolutions C -> R (with bias); the patch part
    is channel-major (channel ``c*K*K + t`` is channel c of tap t, the order of the official
    ``unfold``), gathered with :func:`window_taps`. ``mlp`` = BN(R*(K*K+1)) - ReLU - 1x1 conv
    -> G (no bias) - BN(G) - ReLU - 1x1 conv G -> G*K*K (bias); its output channel ``g*K*K + t``
    is tap t of weight channel g. phi is taken at the strided positions.

    Submodule names follow the official ``SAM``: ``query`` = conv1, ``key`` = conv2,
    ``mlp`` = conv_w (indices 0..5).

    Args: as :class:`PairwiseKernel` (no ``position``).

    Shapes: ``forward(x: (B, C, H, W), window) -> (B, G, K*K, Ho, Wo)``.
    """

    def __init__(self, channels: int, kernel_size=7, *, stride: int = 1, groups: Optional[int] = None,
                 rel_channels: Optional[int] = None, device=None, dtype=None):
        super().__init__()
        self._common(channels, kernel_size, stride, groups, rel_channels)
        R, G, fk = self.rel_channels, self.groups, dict(device=device, dtype=dtype)
        T = self.kernel_size[0] * self.kernel_size[1]
        self.query = nn.Conv2d(self.channels, R, 1, **fk)
        self.key = nn.Conv2d(self.channels, R, 1, **fk)
        self.mlp = nn.Sequential(nn.BatchNorm2d(R * (T + 1), **fk), nn.ReLU(),
                                 nn.Conv2d(R * (T + 1), G, 1, bias=False, **fk),
                                 nn.BatchNorm2d(G, **fk), nn.ReLU(), nn.Conv2d(G, G * T, 1, **fk))

    def features(self, x: torch.Tensor, window: Window) -> torch.Tensor:
        """The MLP's input (B, R*(K*K+1), Ho, Wo): the centre's R features, then the patch's."""
        self.check_window(x, window)
        q = self.query(strided_queries(x, window))
        patch = window_taps(self.key(x), window, self.rel_channels)  # (B, R, K*K, Ho, Wo)
        return torch.cat([q, patch.flatten(1, 2)], 1)

    def forward(self, x: torch.Tensor, window: Window) -> torch.Tensor:
        w = self.mlp(self.features(x, window))
        B, _, Ho, Wo = w.shape
        return w.view(B, self.groups, window.taps, Ho, Wo)

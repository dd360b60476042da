"""The named mixer presets (``README.md``, "Mixers and kernel generators"). Each builder maps
(B, dim, H, W) to (B, dim, ceil(H/s), ceil(W/s)) for every H, W (odd sizes included)."""

from __future__ import annotations

from typing import Optional

from torch import nn

from .._args import check_int
from ..kernel_gen.base import check_odd_kernel, resolve_groups
from ..kernel_gen.bottleneck import BottleneckKernel
from ..kernel_gen.patch import PatchKernel
from ..kernel_gen.positional import PositionalKernel
from ..kernel_gen.query_key import QueryKeyKernel
from ..kernel_gen.static import StaticKernel
from ..ops.window import Window
from .attention import AttentionMixer
from .layers import PointwiseLinear
from .mixer import Mixer
from .registry import register_mixer

_SIZE = "output size ceil(H/stride) needs a centre tap"


def _window(kernel_size, stride, dilation=1, border="zero") -> Window:
    check_odd_kernel(kernel_size, _SIZE)
    return Window(kernel_size, stride=stride, dilation=dilation, border=border)


def _grouped(dim, groups, group_channels, kernel_size, stride, dilation):
    """(group_channels, window) of a grouped generator: ``groups`` wins over ``group_channels``,
    checked against ``dim``."""
    if groups is not None:
        group_channels = None
    resolve_groups(dim, groups, group_channels, cname="dim")
    return group_channels, _window(kernel_size, stride, dilation)


@register_mixer("conv")
def conv(dim: int, *, kernel_size=7, stride: int = 1, groups: int = 1, dilation: int = 1, bias: bool = False,
         device=None, dtype=None) -> nn.Conv2d:
    """Plain ``nn.Conv2d(dim, dim, K, stride, padding=K//2, bias=False)``: the channel-mixing
    baseline (ResNet's 3x3), not an aggregation instance. ``groups`` as in ``nn.Conv2d``."""
    ks = check_odd_kernel(kernel_size, _SIZE)
    groups = check_int("groups", groups)
    dilation = check_int("dilation", dilation)
    if dim % groups:
        raise ValueError(f"dim={dim} is not divisible by groups={groups}")
    pad = (dilation * (ks[0] // 2), dilation * (ks[1] // 2))
    return nn.Conv2d(dim, dim, ks, stride, padding=pad, dilation=dilation, groups=groups, bias=bias,
                     device=device, dtype=dtype)


@register_mixer("dwconv")
def dwconv(dim: int, *, kernel_size=7, stride: int = 1, dilation: int = 1, bias: bool = False,
           device=None, dtype=None) -> Mixer:
    """Depthwise convolution through ``tokenmix.ops.aggregate``: a ``static`` generator with
    G = dim; equals ``nn.Conv2d(dim, dim, K, stride, K//2, groups=dim)`` with weight
    ``generator.weight.view(dim, 1, K, K)``."""
    window = _window(kernel_size, stride, dilation)
    gen = StaticKernel(dim, kernel_size, stride=stride, groups=dim, device=device, dtype=dtype)
    return Mixer(dim, gen, window, bias=bias, device=device, dtype=dtype)


@register_mixer("involution")
def involution(dim: int, *, kernel_size=7, stride: int = 1, group_channels: Optional[int] = 16,
               groups: Optional[int] = None, reduction: int = 4, dilation: int = 1, fused: bool = True,
               device=None, dtype=None) -> Mixer:
    """Involution, official RedNet semantics: ``bottleneck`` generator (pool, reduce, norm,
    act, span), G = dim // group_channels (or ``groups``), value and proj identity.
    State dict: ``generator.reduce.weight``, ``generator.norm.*``, ``generator.span.{weight,bias}``.
    ``fused=False``: the composed path (see :class:`~tokenmix.mixers.Mixer`)."""
    group_channels, window = _grouped(dim, groups, group_channels, kernel_size, stride, dilation)
    gen = BottleneckKernel(dim, kernel_size, stride=stride, groups=groups, group_channels=group_channels,
                           reduction=reduction, device=device, dtype=dtype)
    return Mixer(dim, gen, window, fused=fused, device=device, dtype=dtype)


def _check_heads(dim: int, heads) -> int:
    heads = check_int("heads", heads)
    if dim % heads:
        raise ValueError(f"dim={dim} is not divisible by heads={heads}")
    return heads


def _attention(dim, kernel_size, stride, heads, qkv_bias, rel_pos, dilation, border, device, dtype, *,
               fused_qkv=False, proj=False, pad_to_window=False, fused=True) -> AttentionMixer:
    heads = _check_heads(dim, heads)
    window = _window(kernel_size, stride, dilation, border)
    fk = dict(device=device, dtype=dtype)
    gen = QueryKeyKernel(dim, kernel_size, stride=stride, heads=heads, qkv_bias=qkv_bias, rel_pos=rel_pos,
                         fused_qkv=fused_qkv, **fk)
    value = None if fused_qkv else nn.Conv2d(dim, dim, 1, bias=qkv_bias, **fk)
    out = PointwiseLinear(dim, dim, bias=True, **fk) if proj else None
    return AttentionMixer(dim, gen, window, value=value, proj=out, pad_to_window=pad_to_window, fused=fused, **fk)


@register_mixer("local_attention")
def local_attention(dim: int, *, kernel_size=7, stride: int = 1, heads: int = 8, qkv_bias: bool = False,
                    rel_pos: bool = True, dilation: int = 1, fused_qkv: bool = False, proj: bool = False,
                    fused: bool = True, device=None, dtype=None) -> AttentionMixer:
    """Stand-alone local self-attention (SASA-style, zero border): ``query_key`` generator
    (q, k 1x1 projections, learned relative position bias by true offset, out-of-image taps
    masked), value = a 1x1 v projection, no output projection. Stride s: queries at the
    strided positions ``x[..., ::s, ::s]``, keys and values at every pixel.
    ``fused_qkv=True``: one (3*dim, dim) ``generator.qkv`` projection instead of three;
    ``proj=True``: an output projection ``proj`` (a 1x1 ``PointwiseLinear`` with bias);
    ``fused=False``: the composed path (see :class:`~tokenmix.mixers.Mixer`)."""
    return _attention(dim, kernel_size, stride, heads, qkv_bias, rel_pos, dilation, "zero", device, dtype,
                      fused_qkv=fused_qkv, proj=proj, fused=fused)


@register_mixer("neighborhood_attention")
def neighborhood_attention(dim: int, *, kernel_size=7, stride: int = 1, heads: int = 8, qkv_bias: bool = False,
                           rel_pos: bool = True, dilation: int = 1, fused_qkv: bool = False, proj: bool = False,
                           pad_to_window: bool = False, fused: bool = True, device=None,
                           dtype=None) -> AttentionMixer:
    """Neighborhood attention (NATTEN semantics): ``local_attention`` with the clamp border,
    so every query attends to exactly K*K in-image keys. Stride must be 1; the input must be
    at least K*dilation in each dimension, or, with ``pad_to_window=True``, is zero-padded to
    it as NATTEN < 0.20 did. ``fused_qkv``/``proj`` as ``local_attention``; NAT's layer is
    ``qkv_bias=True, fused_qkv=True, proj=True``; ``fused`` as ``local_attention``."""
    if stride != 1:
        raise ValueError(f"neighborhood_attention uses border='clamp', which needs stride=1, got stride={stride}")
    return _attention(dim, kernel_size, stride, heads, qkv_bias, rel_pos, dilation, "clamp", device, dtype,
                      fused_qkv=fused_qkv, proj=proj, pad_to_window=pad_to_window, fused=fused)


@register_mixer("positional_attention")
def positional_attention(dim: int, *, kernel_size=7, stride: int = 1, heads: int = 8, qkv_bias: bool = False,
                         dilation: int = 1, device=None, dtype=None) -> Mixer:
    """SASA's positional-only attention ``softmax_t(q . r_t)`` (``positional`` generator),
    value = a 1x1 v projection, no output projection."""
    heads = _check_heads(dim, heads)
    window = _window(kernel_size, stride, dilation)
    gen = PositionalKernel(dim, kernel_size, stride=stride, heads=heads, qkv_bias=qkv_bias, device=device, dtype=dtype)
    value = nn.Conv2d(dim, dim, 1, bias=qkv_bias, device=device, dtype=dtype)
    return Mixer(dim, gen, window, value=value, device=device, dtype=dtype)


@register_mixer("patch_involution")
def patch_involution(dim: int, *, kernel_size=7, stride: int = 1, patch_size: int = 3,
                     group_channels: Optional[int] = 16, groups: Optional[int] = None, reduction: int = 4,
                     dilation: int = 1, fused: bool = True, device=None, dtype=None) -> Mixer:
    """Involution with a patch-conditioned kernel (``patch`` generator): the kernel at (i, j)
    comes from a P x P neighborhood (P x P reduce conv); ``patch_size=1`` is ``involution``.
    ``fused`` as ``involution``."""
    group_channels, window = _grouped(dim, groups, group_channels, kernel_size, stride, dilation)
    gen = PatchKernel(dim, kernel_size, stride=stride, patch_size=patch_size, groups=groups,
                      group_channels=group_channels, reduction=reduction, device=device, dtype=dtype)
    return Mixer(dim, gen, window, fused=fused, device=device, dtype=dtype)


@register_mixer("local_relation")
def local_relation(dim: int, *, kernel_size=7, stride: int = 1, group_channels: Optional[int] = 8,
                   groups: Optional[int] = None, geometry_hidden: Optional[int] = None, dilation: int = 1,
                   device=None, dtype=None) -> Mixer:
    """The local relation layer of LR-Net (Hu et al., ICCV 2019): ``local_relation`` generator
    (1x1 key and query maps to one channel per group of m = ``group_channels`` channels,
    appearance ``q * k`` plus a geometry-prior MLP of the relative position, softmax over the
    K x K window, out-of-image taps masked), aggregating x itself (value and proj identity)."""
    from ..kernel_gen.local_relation import LocalRelationKernel

    group_channels, window = _grouped(dim, groups, group_channels, kernel_size, stride, dilation)
    gen = LocalRelationKernel(dim, kernel_size, stride=stride, groups=groups, group_channels=group_channels,
                              geometry_hidden=geometry_hidden, device=device, dtype=dtype)
    return Mixer(dim, gen, window, device=device, dtype=dtype)


def _span(span, kernel_size):
    return kernel_size if span is None else span


@register_mixer("global_attention")
def global_attention(dim: int, *, kernel_size=3, stride: int = 1, heads: int = 8, span=16,
                     key_channels: Optional[int] = None, qkv_bias: bool = False, dilation: int = 1,
                     fused: bool = True, device=None, dtype=None) -> nn.Module:
    """Global multi-head self-attention with 2-D relative logits (AA-ResNet's attention; the
    ``relative_attention`` generator over a clamp window as large as the image, built per
    call): dim -> dim, a 1x1 output projection. ``span``: the longest side attended whole
    (relative tables of 2*span - 1 rows; a longer side is attended in a clamp window of
    ``span`` taps). ``kernel_size`` (odd) and ``dilation`` are accepted for the presets'
    common signature and not used. With stride s the attention reads the input average-pooled
    by s (ceil mode). ``fused=False``: the composed path (:class:`~tokenmix.mixers.span.GlobalAttention`)."""
    from .span import GlobalAttention

    check_odd_kernel(kernel_size, _SIZE)
    heads = _check_heads(dim, heads)
    check_int("dilation", dilation)
    att = GlobalAttention(dim, key_channels=key_channels, heads=heads, span=span, qkv_bias=qkv_bias,
                          fused=fused, device=device, dtype=dtype)
    if stride == 1:
        return att
    from ..kernel_gen.bottleneck import stride_pool

    return nn.Sequential(stride_pool(stride), att)


def aa_channels(dim: int, heads: int = 8, key_ratio: float = 0.2, value_ratio: float = 0.1,
                min_key_head_dim: int = 20):
    """AA-ResNet's attention widths for a C-channel convolution: ``dv = floor(value_ratio*C /
    heads) * heads`` (at least heads, less than C), ``dk = max(floor(key_ratio*C / heads) *
    heads, heads * min_key_head_dim)`` (the paper's "k = 2v = 0.2" with "a minimum of 20
    dimensions per head for the keys"). Returns (dk, dv)."""
    dv = max(heads, int(value_ratio * dim / heads) * heads)
    if dv >= dim:
        raise ValueError(f"dim={dim} is too small for value_ratio={value_ratio} with heads={heads}")
    dk = max(int(key_ratio * dim / heads) * heads, heads * min_key_head_dim)
    return dk, dv


@register_mixer("attention_augmented")
def attention_augmented(dim: int, *, kernel_size=3, stride: int = 1, heads: int = 8, span=16,
                        key_ratio: float = 0.2, value_ratio: float = 0.1, min_key_head_dim: int = 20,
                        dilation: int = 1, fused: bool = True, device=None, dtype=None) -> nn.Module:
    """Attention-augmented convolution (AA-ResNet, Bello et al., ICCV 2019): a K x K conv to
    dim - dv channels concatenated with ``global_attention`` to dv channels (widths
    :func:`aa_channels`); with stride s the attention reads the input average-pooled by s.
    ``fused=False``: the attention's composed path."""
    from .span import AttentionAugmentedConv

    check_odd_kernel(kernel_size, _SIZE)
    heads = check_int("heads", heads)
    dk, dv = aa_channels(dim, heads, key_ratio, value_ratio, min_key_head_dim)
    return AttentionAugmentedConv(dim, kernel_size=kernel_size, stride=stride, dilation=check_int("dilation", dilation),
                                  value_channels=dv, key_channels=dk, heads=heads, span=span, fused=fused,
                                  device=device, dtype=dtype)


@register_mixer("axial_attention")
def axial_attention(dim: int, *, kernel_size=7, stride: int = 1, heads: int = 8, span=None, dilation: int = 1,
                    device=None, dtype=None) -> nn.Module:
    """Axial attention (Axial-DeepLab; ``axial`` generators): attention along each column, then
    each row, clamp windows of ``min(S, L)`` taps (S = span * stride: the whole axis when it
    is at most S long), relative terms on queries, keys and values, then an average pool by
    the stride. ``span`` (default ``kernel_size``) is the axis length at the *output*
    resolution, so a stride-2 block built for a 28 x 28 output covers its 56 x 56 input."""
    from .span import AxialAttention

    check_odd_kernel(kernel_size, _SIZE)
    heads = _check_heads(dim, heads)
    S = check_int("span", _span(span, kernel_size)) * check_int("stride", stride)
    return AxialAttention(dim, heads=heads, span=S, stride=stride, dilation=dilation, device=device, dtype=dtype)

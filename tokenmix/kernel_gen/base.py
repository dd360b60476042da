"""Shared argument checks and the small base class of the built-in generators."""

from __future__ import annotations

from typing import Optional, Tuple

from torch import nn

from .._args import check_int, check_pair
from ..ops.window import Window


def check_odd_kernel(kernel_size, why: str = "the window needs a centre tap") -> Tuple[int, int]:
    """(Kh, Kw), both odd; ValueError naming kernel_size otherwise."""
    ks = check_pair("kernel_size", kernel_size, 1)
    if ks[0] % 2 == 0 or ks[1] % 2 == 0:
        raise ValueError(f"kernel_size must be odd ({why}), got kernel_size={kernel_size!r}")
    return ks


def resolve_groups(channels: int, groups: Optional[int], group_channels: Optional[int],
                   what: str = "groups", cname: str = "channels") -> int:
    """Number of groups G from ``groups`` or ``group_channels`` (exactly one given); C % G == 0.
    ``what`` and ``cname`` name the arguments in the error ("heads", "dim")."""
    channels = check_int(cname, channels)
    if groups is not None and group_channels is not None:
        raise ValueError(f"give either {what}={groups!r} or group_channels={group_channels!r}, not both")
    if groups is None and group_channels is None:
        raise ValueError(f"one of {what} or group_channels is required")
    if groups is not None:
        groups = check_int(what, groups)
        if channels % groups:
            raise ValueError(f"{cname}={channels} is not divisible by {what}={groups}")
        return groups
    group_channels = check_int("group_channels", group_channels)
    if channels % group_channels:
        raise ValueError(f"{cname}={channels} is not divisible by group_channels={group_channels}")
    return channels // group_channels


class KernelGenerator(nn.Module):
    """Base of the built-in generators: stores ``channels``, ``groups`` (G), ``kernel_size`` and
    ``stride`` and checks that a forward's window has the taps and the stride it was built for.

    Subclasses implement ``forward(x, window) -> w: (B|1, G, K*K, Ho|1, Wo|1)``."""

    channels: int
    groups: int
    kernel_size: Tuple[int, int]
    stride: int

    def _setup(self, channels: int, groups: int, kernel_size, stride: int = 1) -> None:
        self.channels = check_int("channels", channels)
        self.groups = groups
        self.kernel_size = check_pair("kernel_size", kernel_size, 1)
        self.stride = check_int("stride", stride)

    def check_kernel_size(self, window: Window) -> None:
        """The taps :meth:`check_window` accepts: exactly ``kernel_size`` (a generator whose
        tables serve smaller windows too overrides this)."""
        if tuple(window.kernel_size) != tuple(self.kernel_size):
            raise ValueError(f"{type(self).__name__} was built for kernel_size={self.kernel_size}, "
                             f"got a window with kernel_size={window.kernel_size}")

    def check_window(self, x, window: Window) -> None:
        if not isinstance(window, Window):
            raise TypeError(f"window must be a tokenmix.ops.Window, got {type(window).__name__}")
        self.check_kernel_size(window)
        if tuple(window.stride) != (self.stride, self.stride):
            raise ValueError(f"{type(self).__name__} was built for stride={self.stride}, "
                             f"got a window with stride={window.stride}")
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"{type(self).__name__} expects x of shape (B, {self.channels}, H, W), "
                             f"got {tuple(x.shape)}")

    def reset_parameters(self) -> None:  # pragma: no cover - overridden
        for m in self.children():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()

    def extra_repr(self) -> str:
        return f"channels={self.channels}, groups={self.groups}, kernel_size={self.kernel_size}, stride={self.stride}"

"""Window geometry shared by kernel generators and the aggregation op (``docs/design.md``, "The op")."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Tuple, Union

import torch

from .._args import check_pair

IntOrPair = Union[int, Tuple[int, int]]
BORDERS = ("zero", "clamp", "reflect")


@dataclass(frozen=True)
class Window:
    """Geometry of a K x K sliding window.

    Args:
        kernel_size: K, int or (Kh, Kw).
        stride: s, int or (sh, sw). Must be 1 for ``border="clamp"``.
        dilation: d, int or (dh, dw).
        padding: p, int or (ph, pw); default ``d * (K - 1) // 2``. Must be 0/None for clamp.
        border: ``"zero"`` (taps outside the image read 0, as ``conv2d``/``unfold``),
            ``"clamp"`` (neighborhood attention: the window slides inward near the border,
            every tap is inside the image, output size = input size) or ``"reflect"`` (taps
            outside the image read the mirrored pixel, as ``F.pad(mode="reflect")``: index -1
            reads 1, index L reads L-2; needs padding < the input size).

    Per axis, tap ``u`` of output ``i`` reads input ``i*s - p + u*d`` (zero and reflect
    borders, reflected into the image for reflect); the output size is
    ``floor((L + 2p - d(K-1) - 1) / s) + 1``. Tap ``t = u*Kw + v``.

    >>> w = Window(3, stride=2)
    >>> w.output_size(7, 5)
    (4, 3)
    """

    kernel_size: IntOrPair
    stride: IntOrPair = 1
    dilation: IntOrPair = 1
    padding: IntOrPair | None = None
    border: str = "zero"

    def __post_init__(self):
        ks = check_pair("kernel_size", self.kernel_size, 1)
        st = check_pair("stride", self.stride, 1)
        dl = check_pair("dilation", self.dilation, 1)
        if self.border not in BORDERS:
            raise ValueError(f"border must be one of {BORDERS}, got {self.border!r}")
        if self.border == "clamp":
            if st != (1, 1):
                raise ValueError(
                    f"border='clamp' (neighborhood attention) needs stride 1, got stride={self.stride!r}"
                )
            pd = (0, 0) if self.padding is None else check_pair("padding", self.padding, 0)
            if pd != (0, 0):
                raise ValueError(
                    f"border='clamp' takes no padding (the window slides inward), got padding={self.padding!r}"
                )
        elif self.padding is None:
            pd = (dl[0] * (ks[0] - 1) // 2, dl[1] * (ks[1] - 1) // 2)
        else:
            pd = check_pair("padding", self.padding, 0)
        object.__setattr__(self, "kernel_size", ks)
        object.__setattr__(self, "stride", st)
        object.__setattr__(self, "dilation", dl)
        object.__setattr__(self, "padding", pd)

    # ------------------------------------------------------------------ sizes
    @property
    def taps(self) -> int:
        """Number of taps K*K (Kh*Kw)."""
        return self.kernel_size[0] * self.kernel_size[1]

    def output_size(self, height: int, width: int) -> Tuple[int, int]:
        """(Ho, Wo) for an (H, W) input; ValueError if the window does not fit."""
        out = []
        for axis, L in (("height", height), ("width", width)):
            a = 0 if axis == "height" else 1
            K, s, d, p = self.kernel_size[a], self.stride[a], self.dilation[a], self.padding[a]
            if L < 1:
                raise ValueError(f"input {axis} must be >= 1, got {L}")
            if self.border == "reflect" and p >= L:
                raise ValueError(
                    f"border='reflect' needs padding < input {axis}: padding {p} >= {L} "
                    f"(input size {(height, width)}, padding={self.padding})"
                )
            if self.border == "clamp":
                if K * d > L:
                    raise ValueError(
                        f"border='clamp' needs kernel_size*dilation <= input {axis}: "
                        f"{K}*{d} > {L} (input size {(height, width)})"
                    )
                out.append(L)
                continue
            n = (L + 2 * p - d * (K - 1) - 1) // s + 1
            if n < 1:
                raise ValueError(
                    f"window kernel_size={self.kernel_size}, dilation={self.dilation}, "
                    f"padding={self.padding} does not fit input {axis} {L}: output {axis} would be {n}"
                )
            out.append(n)
        return (out[0], out[1])

    # ------------------------------------------------------------ index maps
    def axis_index(self, axis: int, length: int, device=None) -> torch.Tensor:
        """(K, Lo) int64 source index along one axis (0 = height, 1 = width); -1 where the
        tap falls outside the image (zero border only; the reflect border reflects it in)."""
        K, s, d, p = self.kernel_size[axis], self.stride[axis], self.dilation[axis], self.padding[axis]
        if self.border != "clamp":
            n = (length + 2 * p - d * (K - 1) - 1) // s + 1
            i = torch.arange(n, device=device)
            u = torch.arange(K, device=device)
            src = i[None, :] * s - p + u[:, None] * d
            if self.border == "reflect":  # p < length, so one reflection lands inside
                src = torch.where(src < 0, -src, src)
                return torch.where(src >= length, 2 * (length - 1) - src, src)
            return torch.where((src >= 0) & (src < length), src, torch.full_like(src, -1))
        i = torch.arange(length, device=device)
        r = i % d
        ip = i // d
        Lr = (length - r + d - 1) // d  # ceil((L - r) / d)
        start = torch.minimum(torch.clamp(ip - K // 2, min=0), Lr - K)
        u = torch.arange(K, device=device)
        return r[None, :] + d * (start[None, :] + u[:, None])

    def source_index(self, height: int, width: int, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-axis source maps ``(rows (Kh, Ho), cols (Kw, Wo))``; -1 marks out-of-image."""
        self.output_size(height, width)  # validates
        return self.axis_index(0, height, device), self.axis_index(1, width, device)

    def valid_mask(self, height: int, width: int, device=None) -> torch.Tensor:
        """(K*K, Ho, Wo) bool mask of taps that read a pixel inside the image."""
        rows, cols = self.source_index(height, width, device)
        m = (rows >= 0)[:, None, :, None] & (cols >= 0)[None, :, None, :]
        return m.reshape(self.taps, rows.shape[1], cols.shape[1])

    def relative_offset(self, height: int, width: int, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
        """True (source - centre) offsets per tap in input pixels, ``(dy (Kh, Ho), dx (Kw, Wo))``,
        where the centre of output i is the input pixel it sits on (``i*s``). For the zero and
        reflect borders this is ``u*d - p`` (the tap's offset before reflection); for the clamp
        border it shifts near the edges. Used by relative position biases."""
        rows, cols = self.source_index(height, width, device)
        sh, sw = self.stride
        ci = torch.arange(rows.shape[1], device=device) * sh
        cj = torch.arange(cols.shape[1], device=device) * sw
        if self.border != "clamp":
            dy = (torch.arange(self.kernel_size[0], device=device) * self.dilation[0] - self.padding[0])
            dx = (torch.arange(self.kernel_size[1], device=device) * self.dilation[1] - self.padding[1])
            return dy[:, None].expand_as(rows), dx[:, None].expand_as(cols)
        return rows - ci[None, :], cols - cj[None, :]

    def check_relative_offsets(self, needs: str) -> None:
        """Relative-position tables have 2K-1 entries per axis, indexed by the true offset /
        dilation (``relative_offset``); ValueError (starting with ``needs``) for a zero-border
        padding that makes offsets fall outside or between entries."""
        if self.border != "zero":
            return
        for a, axis in enumerate(("height", "width")):
            K, d, p = self.kernel_size[a], self.dilation[a], self.padding[a]
            if p % d or p > d * (K - 1):
                raise ValueError(f"{needs} padding a multiple of the dilation and at most d*(K-1) along "
                                 f"{axis}; got padding={self.padding}, dilation={self.dilation}, "
                                 f"kernel_size={self.kernel_size}")

    def as_args(self):
        """Flat argument list used by the ``tokenmix::`` custom ops."""
        return list(self.kernel_size), list(self.stride), list(self.dilation), list(self.padding), self.border

    @staticmethod
    def from_args(kernel_size, stride, dilation, padding, border) -> "Window":
        """Inverse of :meth:`as_args` (cached: the ops rebuild their Window on every call)."""
        return _window_from_args(tuple(kernel_size), tuple(stride), tuple(dilation),
                                 tuple(padding) if border != "clamp" else None, border)


@functools.lru_cache(maxsize=256)
def _window_from_args(kernel_size, stride, dilation, padding, border) -> Window:
    return Window(kernel_size, stride, dilation, padding, border)


__all__ = ["Window", "BORDERS"]

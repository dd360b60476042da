"""Pure-PyTorch reference backend: the test oracle, the portable fallback and the
"equivalent PyTorch code" of the public docstrings.

It loops over the K*K taps and, per tap, works on one shifted view of the input (strided
slices of the zero-padded input for ``border="zero"``, an index gather for ``"clamp"`` and
``"reflect"``), so
its extra memory is O(output), never the K*K-times copy that ``unfold`` makes. float16 and
bfloat16 are computed in float32.
"""

from __future__ import annotations

from typing import Iterator, Tuple

import torch
import torch.nn.functional as F

from .. import BORDERS, FLOATING, SUMMATION_ORDER_TOL, Backend
from ...window import Window


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for an input dtype (float32 for the 16-bit floats)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _pad_amounts(window: Window, H: int, W: int):
    """(top, bottom, left, right) zero padding so that every tap of every output is a
    plain strided slice of the padded input."""
    Ho, Wo = window.output_size(H, W)
    (Kh, Kw), (sh, sw), (dh, dw), (ph, pw) = window.kernel_size, window.stride, window.dilation, window.padding
    bottom = max(0, (Ho - 1) * sh - ph + (Kh - 1) * dh - (H - 1))
    right = max(0, (Wo - 1) * sw - pw + (Kw - 1) * dw - (W - 1))
    return ph, bottom, pw, right


def _padded_copy_is_small(window: Window, H: int, W: int) -> bool:
    """Whether the zero-padded copy of a plane stays within a few times the input and output
    planes. Otherwise (padding, dilation or stride far beyond the image) the zero border
    gathers each tap's pixels by index instead, so no buffer exceeds the output's size."""
    Ho, Wo = window.output_size(H, W)
    top, bottom, left, right = _pad_amounts(window, H, W)
    return (H + top + bottom) * (W + left + right) <= 4 * (H * W + Ho * Wo) + 256


def _zero_flat_index(window: Window, H: int, W: int, device):
    """Per tap t, the (Ho*Wo,) index of the pixel it reads in a plane padded by one zero row
    and one zero column at the end ((H + 1) * (W + 1) elements): out-of-image taps read the
    zero corner (H, W). Zero border only."""
    ri, ci = window.source_index(H, W, device=device)
    ri = torch.where(ri < 0, H, ri)
    ci = torch.where(ci < 0, W, ci)
    Kh, Kw = window.kernel_size
    for u in range(Kh):
        for v in range(Kw):
            yield u * Kw + v, (ri[u][:, None] * (W + 1) + ci[v][None, :]).reshape(-1)


def outside_masks(window: Window, H: int, W: int, device=None):
    """{t: (Ho, Wo) bool, True where tap t reads outside the image} for the taps of a zero
    border that do somewhere (the others never do; empty for the clamp and reflect borders)."""
    if window.border != "zero":
        return {}
    ri, ci = window.source_index(H, W, device=device)
    row_out, col_out = ri < 0, ci < 0
    rows_any, cols_any = row_out.any(1).tolist(), col_out.any(1).tolist()
    Kh, Kw = window.kernel_size
    return {u * Kw + v: row_out[u][:, None] | col_out[v][None, :]
            for u in range(Kh) for v in range(Kw) if rows_any[u] or cols_any[v]}


def shifted_views(x: torch.Tensor, window: Window) -> Iterator[Tuple[int, torch.Tensor]]:
    """Yield ``(t, x_t)`` for every tap, where ``x_t[..., i, j] = x[..., src_t(i, j)]`` (0 on
    out-of-image taps); x: (..., H, W) -> x_t: (..., Ho, Wo). Zero border: views of one
    padded copy (an index gather from a copy padded by one zero row and column where that copy
    would be large); clamp and reflect borders: one gathered copy per tap."""
    H, W = x.shape[-2:]
    Ho, Wo = window.output_size(H, W)
    Kh, Kw = window.kernel_size
    if window.border == "zero" and _padded_copy_is_small(window, H, W):
        top, bottom, left, right = _pad_amounts(window, H, W)
        xp = F.pad(x, (left, right, top, bottom))
        (sh, sw), (dh, dw) = window.stride, window.dilation
        for u in range(Kh):
            rows = xp[..., u * dh: u * dh + sh * (Ho - 1) + 1: sh, :]
            for v in range(Kw):
                yield u * Kw + v, rows[..., v * dw: v * dw + sw * (Wo - 1) + 1: sw]
    elif window.border == "zero":
        xz = F.pad(x, (0, 1, 0, 1)).flatten(-2)
        for t, index in _zero_flat_index(window, H, W, x.device):
            yield t, xz.index_select(-1, index).unflatten(-1, (Ho, Wo))
    else:
        ri, ci = window.source_index(H, W, device=x.device)
        for u in range(Kh):
            rows = x.index_select(-2, ri[u])
            for v in range(Kw):
                yield u * Kw + v, rows.index_select(-1, ci[v])


class ReferenceBackend(Backend):
    name = "reference"
    devices = frozenset({"cpu", "cuda", "mps", "xpu", "meta"})
    dtypes = FLOATING
    borders = fused_borders = BORDERS
    fwd_tol = bwd_tol = SUMMATION_ORDER_TOL

    def aggregate(self, x, w, window):
        B, C, H, W = x.shape
        G = w.shape[1]
        Ho, Wo = window.output_size(H, W)
        cd = compute_dtype(x.dtype)
        x5 = x.to(cd).reshape(B, G, C // G, H, W)
        w6 = w.to(cd).unsqueeze(2)  # (B|1, G, 1, KK, Ho|1, Wo|1)
        y = torch.zeros(B, G, C // G, Ho, Wo, dtype=cd, device=x.device)
        outside = outside_masks(window, H, W, x.device)
        for t, xt in shifted_views(x5, window):
            wt = w6[:, :, :, t]
            if t in outside:  # the weights of out-of-image taps are never read
                wt = torch.where(outside[t], 0, wt)
            y.addcmul_(wt, xt)
        return y.reshape(B, C, Ho, Wo).to(x.dtype)

    def correlate(self, q, k, window, groups, sum_batch=False, sum_space=False):
        B, C, Ho, Wo = q.shape
        H, W = k.shape[-2:]
        G = groups
        cd = compute_dtype(q.dtype)
        q5 = q.to(cd).reshape(B, G, C // G, Ho, Wo)
        k5 = k.to(cd).reshape(B, G, C // G, H, W)
        out = torch.empty(1 if sum_batch else B, G, window.taps, 1 if sum_space else Ho,
                          1 if sum_space else Wo, dtype=cd, device=q.device)
        outside = outside_masks(window, H, W, q.device)
        for t, kt in shifted_views(k5, window):
            s = (q5 * kt).sum(2)  # (B, G, Ho, Wo)
            if t in outside:  # exactly 0 on out-of-image taps, whatever q holds
                s = torch.where(outside[t], 0, s)
            if sum_batch:
                s = s.sum(0, keepdim=True)
            if sum_space:
                s = s.sum((2, 3), keepdim=True)
            out[:, :, t] = s
        return out.to(q.dtype)

    def aggregate_transpose(self, y, w, window, input_size):
        B, C, Ho, Wo = y.shape
        H, W = input_size
        G = w.shape[1]
        cd = compute_dtype(y.dtype)
        y5 = y.to(cd).reshape(B, G, C // G, Ho, Wo)
        w6 = w.to(cd).unsqueeze(2)
        Kh, Kw = window.kernel_size
        outside = outside_masks(window, H, W, y.device)

        def weight(t):  # the weights of out-of-image taps are never read
            wt = w6[:, :, :, t]
            return torch.where(outside[t], 0, wt) if t in outside else wt

        if window.border == "zero" and not _padded_copy_is_small(window, H, W):
            # Far-reaching geometry: index_add each tap into a plane padded by one zero row and
            # column; out-of-image taps land on its zero corner, which is dropped. For a fixed
            # tap the map is injective on the image, so the sums are exact.
            xz = torch.zeros(B, G, C // G, (H + 1) * (W + 1), dtype=cd, device=y.device)
            for t, index in _zero_flat_index(window, H, W, y.device):
                xz.index_add_(-1, index, (weight(t) * y5).flatten(-2))
            out = xz.unflatten(-1, (H + 1, W + 1))[..., :H, :W]
        elif window.border == "zero":
            # Scatter-add each tap into a strided view of a padded buffer: for a fixed tap
            # the map output -> input is injective, so the in-place add is exact.
            top, bottom, left, right = _pad_amounts(window, H, W)
            xp = torch.zeros(B, G, C // G, H + top + bottom, W + left + right, dtype=cd, device=y.device)
            (sh, sw), (dh, dw) = window.stride, window.dilation
            for u in range(Kh):
                for v in range(Kw):
                    view = xp[..., u * dh: u * dh + sh * (Ho - 1) + 1: sh, v * dw: v * dw + sw * (Wo - 1) + 1: sw]
                    view.addcmul_(weight(u * Kw + v), y5)
            out = xp[..., top: top + H, left: left + W]
        else:
            # Clamp and reflect borders: several outputs can read the same pixel through one
            # tap, so accumulate with index_add (deterministic on the CPU).
            ri, ci = window.source_index(H, W, device=y.device)
            out = torch.zeros(B, G, C // G, H, W, dtype=cd, device=y.device)
            for u in range(Kh):
                acc = torch.zeros(B, G, C // G, Ho, W, dtype=cd, device=y.device)
                for v in range(Kw):
                    acc.index_add_(-1, ci[v], w6[:, :, :, u * Kw + v] * y5)
                out.index_add_(-2, ri[u], acc)
        return out.reshape(B, C, H, W).contiguous().to(y.dtype)

    # ------------------------------------------------------------------ local attention
    # The composition of the primitives above (correlate, the bias, the masked softmax,
    # aggregate), in float32 for the 16-bit dtypes; pure PyTorch, so autograd differentiates the
    # forward by itself where the native library is missing.

    @staticmethod
    def _bias_index(window: Window, H: int, W: int, device) -> torch.Tensor:
        """(K*K, Ho, Wo) flat index ``row * (2Kw-1) + col`` into a (2Kh-1, 2Kw-1) table of the
        true offsets (``Window.relative_offset``, divided by the dilation)."""
        dy, dx = window.relative_offset(H, W, device=device)
        (Kh, Kw), (dh, dw) = window.kernel_size, window.dilation
        ri = torch.div(dy, dh, rounding_mode="floor") + (Kh - 1)  # (Kh, Ho)
        ci = torch.div(dx, dw, rounding_mode="floor") + (Kw - 1)  # (Kw, Wo)
        idx = ri[:, None, :, None] * (2 * Kw - 1) + ci[None, :, None, :]
        return idx.reshape(Kh * Kw, ri.shape[1], ci.shape[1])

    def _probabilities(self, q, k, rel_pos, heads, scale, window, lse=None, row_bias=None, col_bias=None):
        """The validity mask (K*K, Ho, Wo), the probabilities (B, heads, K*K, Ho, Wo) of the
        masked scores and the log-sum-exp (given, or computed), all in the compute dtype."""
        H, W = k.shape[-2:]
        cd = compute_dtype(q.dtype)
        s = self.correlate(q.to(cd), k.to(cd), window, heads) * scale
        if rel_pos is not None:
            idx = self._bias_index(window, H, W, q.device)
            table = rel_pos.to(cd).reshape(heads, -1)
            s = s + table[:, idx].unsqueeze(0)
        if row_bias is not None or col_bias is not None:  # tap (a, b) = t: + row_bias[a] + col_bias[b]
            Kh, Kw = window.kernel_size
            s = s.unflatten(2, (Kh, Kw))
            if row_bias is not None:
                s = s + row_bias.to(cd).unsqueeze(3)
            if col_bias is not None:
                s = s + col_bias.to(cd).unsqueeze(2)
            s = s.flatten(2, 3)
        valid = window.valid_mask(H, W, device=q.device)
        s = s.masked_fill(~valid, float("-inf"))
        if lse is None:
            lse = torch.logsumexp(s, dim=2)
        lse_c = lse.to(cd)
        finite = torch.where(torch.isinf(lse_c), torch.zeros_like(lse_c), lse_c)
        p = torch.where(valid, torch.exp(s - finite.unsqueeze(2)), torch.zeros_like(s))
        return valid, p, lse

    def local_attention(self, q, k, v, rel_pos, heads, scale, window, row_bias=None, col_bias=None):
        cd = compute_dtype(q.dtype)
        _, p, lse = self._probabilities(q, k, rel_pos, heads, scale, window, None, row_bias, col_bias)
        out = self.aggregate(v.to(cd), p, window)
        sd = torch.float64 if q.dtype == torch.float64 else torch.float32
        return out.to(q.dtype), lse.to(sd)

    def local_attention_backward(self, grad_out, q, k, v, rel_pos, out, lse, heads, scale, window, row_bias=None,
                                 col_bias=None):
        B, _, Ho, Wo = q.shape
        Cv = v.shape[1]
        H, W = k.shape[-2:]
        cd = compute_dtype(q.dtype)
        valid, p, _ = self._probabilities(q, k, rel_pos, heads, scale, window, lse, row_bias, col_bias)
        go, qc, kc, vc = grad_out.to(cd), q.to(cd), k.to(cd), v.to(cd)
        dp = self.correlate(go, vc, window, heads)
        D = (go * out.to(cd)).reshape(B, heads, Cv // heads, Ho, Wo).sum(2)
        ds = torch.where(valid, p * (dp - D.unsqueeze(2)), torch.zeros_like(p))
        dq = self.aggregate(kc, ds, window) * scale
        dk = self.aggregate_transpose(qc, ds, window, (H, W)) * scale
        dv = self.aggregate_transpose(go, p, window, (H, W))
        if rel_pos is None:
            drel = q.new_zeros(0)
        else:
            idx = self._bias_index(window, H, W, q.device).expand(heads, -1, -1, -1).reshape(heads, -1)
            drel = torch.zeros(heads, rel_pos[0].numel(), dtype=cd, device=q.device)
            drel.scatter_add_(1, idx, ds.sum(0).reshape(heads, -1))
            drel = drel.reshape(rel_pos.shape).to(rel_pos.dtype)
        ds2 = ds.unflatten(2, window.kernel_size)  # (B, heads, Kh, Kw, Ho, Wo)
        drow = q.new_zeros(0) if row_bias is None else ds2.sum(3).to(row_bias.dtype)
        dcol = q.new_zeros(0) if col_bias is None else ds2.sum(2).to(col_bias.dtype)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), drel, drow, dcol

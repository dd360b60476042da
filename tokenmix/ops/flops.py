"""Multiply-add counts of the three primitives and the fused ``aggregate_linear``: one formula, used by torch's
FlopCounterMode (2 flops per multiply-add) and by fvcore (1 flop per multiply-add)."""

from __future__ import annotations

from math import prod
from typing import Optional, Sequence


def aggregate_macs(x_shape: Sequence[int], w_shape: Sequence[int], out_shape: Sequence[int]) -> int:
    """``aggregate``: one multiply-add per output element and tap: B*C*Ho*Wo*K*K."""
    return int(prod(out_shape)) * int(w_shape[2])


def correlate_macs(q_shape: Sequence[int], taps: int) -> int:
    """``correlate``: one multiply-add per query element and tap: B*C*Ho*Wo*K*K."""
    return int(prod(q_shape)) * int(taps)


def aggregate_transpose_macs(y_shape: Sequence[int], w_shape: Sequence[int]) -> int:
    """``aggregate_transpose``: the same count as the forward it is the adjoint of."""
    return int(prod(y_shape)) * int(w_shape[2])


def local_attention_macs(q_shape: Sequence[int], taps: int, v_shape: Optional[Sequence[int]] = None) -> int:
    """``local_attention``: the q.k products, one multiply-add per query element and tap
    (B*Ck*Ho*Wo*K*K, as correlate), and the aggregation over v, one per output element and tap
    (B*Cv*Ho*Wo*K*K, as aggregate); v_shape defaults to q's channels. The bias adds are not
    counted."""
    Cv = q_shape[1] if v_shape is None else v_shape[1]
    return correlate_macs(q_shape, taps) + correlate_macs((q_shape[0], Cv, *q_shape[2:]), taps)


def local_attention_backward_macs(q_shape: Sequence[int], taps: int, v_shape: Optional[Sequence[int]] = None) -> int:
    """``local_attention_backward``: the recomputed scores, dq and dk (3*B*Ck*Ho*Wo*K*K), dP =
    dout.v and dv (2*B*Cv*Ho*Wo*K*K); with Ck = Cv, 5*B*C*Ho*Wo*K*K."""
    Cv = q_shape[1] if v_shape is None else v_shape[1]
    return 3 * correlate_macs(q_shape, taps) + 2 * correlate_macs((q_shape[0], Cv, *q_shape[2:]), taps)


def aggregate_linear_macs(x_shape: Sequence[int], h_shape: Sequence[int], weight_shape: Sequence[int],
                          taps: int) -> int:
    """``aggregate_linear``: the linear map that generates the kernel, B*Ho*Wo*(G*K*K)*M, plus
    the aggregation, B*C*Ho*Wo*K*K (the bias adds are not counted, as for a convolution)."""
    B, C = int(x_shape[0]), int(x_shape[1])
    M, Ho, Wo = int(h_shape[1]), int(h_shape[2]), int(h_shape[3])
    return B * Ho * Wo * (int(weight_shape[0]) * M + C * int(taps))


def aggregate_linear_backward_macs(x_shape: Sequence[int], h_shape: Sequence[int], weight_shape: Sequence[int],
                                   taps: int, output_mask: Sequence[bool]) -> int:
    """``aggregate_linear_backward``: per gradient asked for by ``output_mask`` (x, h, weight,
    bias): the kernel's recomputation (B*Ho*Wo*G*K*K*M) and the transpose (B*C*Ho*Wo*K*K) for
    x; the correlate (B*C*Ho*Wo*K*K) shared by h, weight and bias, plus one product of
    B*Ho*Wo*G*K*K*M for each of h and weight."""
    B, C = int(x_shape[0]), int(x_shape[1])
    M, Ho, Wo = int(h_shape[1]), int(h_shape[2]), int(h_shape[3])
    linear, agg = B * Ho * Wo * int(weight_shape[0]) * M, B * C * Ho * Wo * int(taps)
    gx, gh, gweight, gbias = (bool(m) for m in output_mask)
    return ((linear + agg) * gx + agg * (gh or gweight or gbias) + linear * gh + linear * gweight)

"""Multiply-add counts of the three primitives: one formula, used by torch's
FlopCounterMode (2 flops per multiply-add) and by fvcore (1 flop per multiply-add)."""

from __future__ import annotations

from math import prod
from typing import Sequence


def aggregate_macs(x_shape: Sequence[int], w_shape: Sequence[int], out_shape: Sequence[int]) -> int:
    """``aggregate``: one multiply-add per output element and tap: B*C*Ho*Wo*K*K."""
    return int(prod(out_shape)) * int(w_shape[2])


def correlate_macs(q_shape: Sequence[int], taps: int) -> int:
    """``correlate``: one multiply-add per query element and tap: B*C*Ho*Wo*K*K."""
    return int(prod(q_shape)) * int(taps)


def aggregate_transpose_macs(y_shape: Sequence[int], w_shape: Sequence[int]) -> int:
    """``aggregate_transpose``: the same count as the forward it is the adjoint of."""
    return int(prod(y_shape)) * int(w_shape[2])


def local_attention_macs(q_shape: Sequence[int], taps: int) -> int:
    """``local_attention``: the q.k products and the aggregation over v, one multiply-add per
    query element and tap each: 2*B*C*Ho*Wo*K*K (as correlate + aggregate)."""
    return 2 * correlate_macs(q_shape, taps)


def local_attention_backward_macs(q_shape: Sequence[int], taps: int) -> int:
    """``local_attention_backward``: the recomputed scores, dP = dout.v, dq, dk and dv, one
    multiply-add per query element and tap each: 5*B*C*Ho*Wo*K*K."""
    return 5 * correlate_macs(q_shape, taps)

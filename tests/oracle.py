"""Independent float64 brute-force oracle and hypothesis strategies for the op tests.

The loops below follow the definitions of ``docs/design.md`` ("The op") literally, pixel by
pixel, and do not use any index map of tokenmix (only the Window's normalised fields), so they
can catch a wrong index in Window as well as in a backend.
"""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import strategies as st

from tokenmix.ops import Window


def src(i: int, u: int, L: int, K: int, s: int, d: int, p: int, border: str):
    """Source coordinate of tap u of output i along an axis of length L, or None."""
    if border == "zero":
        r = i * s - p + u * d
        return r if 0 <= r < L else None
    if border == "reflect":  # as F.pad(mode="reflect"): -1 -> 1, L -> L - 2
        r = i * s - p + u * d
        r = -r if r < 0 else r
        return 2 * (L - 1) - r if r >= L else r
    r = i % d
    ip = i // d
    Lr = -(-(L - r) // d)
    start = min(max(ip - K // 2, 0), Lr - K)
    return r + d * (start + u)


def out_len(L, K, s, d, p, border):
    return L if border == "clamp" else (L + 2 * p - d * (K - 1) - 1) // s + 1


def _geom(window: Window, H: int, W: int):
    (Kh, Kw), (sh, sw), (dh, dw), (ph, pw) = window.kernel_size, window.stride, window.dilation, window.padding
    b = window.border
    Ho, Wo = out_len(H, Kh, sh, dh, ph, b), out_len(W, Kw, sw, dw, pw, b)
    taps = []  # (t, i, j, h, w) for every valid tap
    for i in range(Ho):
        for j in range(Wo):
            for u in range(Kh):
                h = src(i, u, H, Kh, sh, dh, ph, b)
                for v in range(Kw):
                    ww = src(j, v, W, Kw, sw, dw, pw, b)
                    if h is not None and ww is not None:
                        taps.append((u * Kw + v, i, j, h, ww))
    return Ho, Wo, taps


def _per_channel(w: np.ndarray, C: int) -> np.ndarray:
    G = w.shape[1]
    return np.repeat(w, C // G, axis=1)  # (B|1, C, KK, Ho|1, Wo|1)


def brute_aggregate(x, w, window):
    x, w = x.double().numpy(), w.double().numpy()
    B, C, H, W = x.shape
    Ho, Wo, taps = _geom(window, H, W)
    wc = _per_channel(w, C)
    y = np.zeros((B, C, Ho, Wo))
    for t, i, j, h, ww in taps:
        y[:, :, i, j] += wc[:, :, t, min(i, wc.shape[3] - 1), min(j, wc.shape[4] - 1)] * x[:, :, h, ww]
    return torch.from_numpy(y)


def brute_correlate(q, k, window, groups):
    q, k = q.double().numpy(), k.double().numpy()
    B, C, H, W = k.shape
    Ho, Wo, taps = _geom(window, H, W)
    out = np.zeros((B, groups, window.taps, Ho, Wo))
    Cg = C // groups
    for t, i, j, h, ww in taps:
        prod = (q[:, :, i, j] * k[:, :, h, ww]).reshape(B, groups, Cg).sum(-1)
        out[:, :, t, i, j] += prod
    return torch.from_numpy(out)


def brute_aggregate_transpose(y, w, window, input_size):
    y, w = y.double().numpy(), w.double().numpy()
    B, C = y.shape[:2]
    H, W = input_size
    Ho, Wo, taps = _geom(window, H, W)
    wc = _per_channel(w, C)
    x = np.zeros((B, C, H, W))
    for t, i, j, h, ww in taps:
        x[:, :, h, ww] += wc[:, :, t, min(i, wc.shape[3] - 1), min(j, wc.shape[4] - 1)] * y[:, :, i, j]
    return torch.from_numpy(x)


# ------------------------------------------------------------------ hypothesis strategies


@st.composite
def geometries(draw, max_kernel=9, max_stride=3, max_dilation=3, max_size=13, borders=("zero", "clamp", "reflect")):
    """(window, B, C, G, H, W) with odd/prime sizes, H != W, rectangular kernels, custom
    padding, C not a power of two, G in {1, some, C}."""
    border = draw(st.sampled_from(borders))
    if draw(st.booleans()):
        k = draw(st.integers(1, max_kernel))
        K = (k, k)
    else:
        K = (draw(st.integers(1, max_kernel)), draw(st.integers(1, max_kernel)))
    D = (draw(st.integers(1, max_dilation)), draw(st.integers(1, max_dilation)))
    if border == "clamp":
        # keep the clamp window within the image: K*d <= L
        D = tuple(min(d, max_size // k) for d, k in zip(D, K))
        D = tuple(max(1, d) for d in D)
        K = tuple(min(k, max_size // d) for k, d in zip(K, D))
        window = Window(K, dilation=D, border="clamp")
        H = draw(st.integers(K[0] * D[0], max(K[0] * D[0], max_size)))
        W = draw(st.integers(K[1] * D[1], max(K[1] * D[1], max_size)))
    else:
        S = (draw(st.integers(1, max_stride)), draw(st.integers(1, max_stride)))
        pad = None
        if draw(st.booleans()):
            pad = (draw(st.integers(0, D[0] * (K[0] - 1))), draw(st.integers(0, D[1] * (K[1] - 1))))
        window = Window(K, stride=S, dilation=D, padding=pad, border=border)
        ph, pw = window.padding
        minH = max(1, D[0] * (K[0] - 1) + 1 - 2 * ph)
        minW = max(1, D[1] * (K[1] - 1) + 1 - 2 * pw)
        if border == "reflect":  # reflection needs padding < the image size
            minH, minW = max(minH, ph + 1), max(minW, pw + 1)
        H = draw(st.integers(minH, max(minH, max_size)))
        W = draw(st.integers(minW, max(minW, max_size)))
    B = draw(st.integers(1, 3))
    G = draw(st.sampled_from([1, 2, 3, 5]))
    Cg = draw(st.sampled_from([1, 2, 3]))
    return window, B, G * Cg, G, H, W


def random_weight(B, G, window, Ho, Wo, mode, dtype=torch.float64, gen=None):
    """A weight in one of the broadcast modes: full, batch1, space1, both1."""
    b = 1 if mode in ("batch1", "both1") else B
    ho, wo = (1, 1) if mode in ("space1", "both1") else (Ho, Wo)
    return torch.randn(b, G, window.taps, ho, wo, dtype=dtype, generator=gen)


WEIGHT_MODES = ("full", "batch1", "space1", "both1")


# ------------------------------------------------------------------ non-finite inputs

NONFINITE = (float("nan"), float("inf"), float("-inf"))


def poison(t: torch.Tensor, gen: torch.Generator, p: float, where=None):
    """(copy of t with NaN, +inf or -inf at random entries, each with probability p and only
    where ``where`` (bool, broadcastable to t) holds; the bool mask of those entries)."""
    mask = torch.rand(t.shape, generator=gen) < p
    if where is not None:
        mask &= where
    values = torch.tensor(NONFINITE, dtype=t.dtype)[torch.randint(0, 3, t.shape, generator=gen)]
    return torch.where(mask, values, t), mask


def outside_taps(window: Window, H: int, W: int, w: torch.Tensor) -> torch.Tensor:
    """Bool mask broadcastable to a weight-shaped w (B|1, G, K*K, Ho|1, Wo|1): the entries of
    per-pixel weights at taps that read outside the image (none for a weight shared by every
    pixel, whose entries also serve in-image taps)."""
    Ho, Wo = window.output_size(H, W)
    if w.shape[3:] != (Ho, Wo):
        return torch.zeros((), dtype=torch.bool)
    return ~window.valid_mask(H, W)


def reads_nonfinite(brute, a_bad, b_bad, *args):
    """Where an output of ``brute(a, b, *args)`` has a term reading one of the marked entries:
    the brute force on the 0/1 masks (each against ones) is positive exactly there."""
    a1, b1 = torch.ones(a_bad.shape, dtype=torch.float64), torch.ones(b_bad.shape, dtype=torch.float64)
    return (brute(a_bad.double(), b1, *args) + brute(a1, b_bad.double(), *args)) > 0


def check_nonfinite_rule(got, want, tainted, tol, what):
    """The rule for non-finite inputs (docs/design.md, "The op"): every output that reads no
    non-finite entry through an in-image tap (``tainted`` False) is finite and equals ``want``,
    the result on the inputs with the non-finite entries replaced by 0; the others may be
    anything."""
    atol, rtol = tol
    got = got.double()
    assert got.shape == want.shape, (what, got.shape, want.shape)
    clean = ~tainted.expand(got.shape)
    assert bool(got[clean].isfinite().all()), f"{what}: {int((~got[clean].isfinite()).sum())} non-finite " \
                                              f"outputs that read only finite values"
    err = (got[clean] - want[clean]).abs()
    assert bool((err <= atol + rtol * want[clean].abs()).all()), f"{what}: max err {err.max().item():.3g}"


def check_nonfinite_ops(forward, backward, window, B, C, G, H, W, mode, dtype, gen, tol):
    """The three primitives and both gradients of each, on inputs with NaN/+-inf entries,
    against the rule of :func:`check_nonfinite_rule`. The activations (x, y, q, k and the
    output gradients) hold them anywhere; the weights (w, and correlate's output gradient,
    which plays the weight in its backward) only at taps that read outside the image, where
    they must not be read at all.

    forward(op, a, b) -> op's output; backward(op, a, b, gout) -> the gradients in a and b
    (correlate: q = a, k = b; aggregate_transpose takes input_size = (H, W)).
    """
    Ho, Wo = window.output_size(H, W)
    size = (H, W)

    def draw(shape, p, where=None):
        return poison(torch.randn(shape, dtype=torch.float64, generator=gen).to(dtype), gen, p, where)

    x, mx = draw((B, C, H, W), 0.1)
    y, my = draw((B, C, Ho, Wo), 0.1)
    w0 = random_weight(B, G, window, Ho, Wo, mode, gen=gen).to(dtype)
    w, mw = poison(w0, gen, 0.5, outside_taps(window, H, W, w0))
    go, mgo = draw((B, G, window.taps, Ho, Wo), 0.5, outside_taps(window, H, W, w0.new_empty(1, 1, 1, Ho, Wo)))
    zero = {id(t): torch.where(m, 0, t) for t, m in ((x, mx), (y, my), (w, mw), (go, mgo))}
    dims = tuple(d for d, flag in ((0, w.shape[0] == 1), (3, w.shape[3] == 1), (4, w.shape[4] == 1)) if flag)

    def reduce(t):  # the sums over the dims where w broadcasts
        return t.sum(dims, keepdim=True) if dims else t

    def check(got, brute, a, ma, b, mb, *args, reduced=False, what=""):
        want = brute(zero[id(a)], zero[id(b)], *args)
        tainted = reads_nonfinite(brute, ma, mb, *args)
        if reduced:
            want, tainted = reduce(want), reduce(tainted.double()) > 0
        check_nonfinite_rule(got, want, tainted, tol, what)

    check(forward("aggregate", x, w), brute_aggregate, x, mx, w, mw, window, what="aggregate")
    gx, gw = backward("aggregate", x, w, y)
    check(gx, brute_aggregate_transpose, y, my, w, mw, window, size, what="aggregate: grad x")
    check(gw, brute_correlate, y, my, x, mx, window, G, reduced=True, what="aggregate: grad w")

    check(forward("correlate", y, x), brute_correlate, y, my, x, mx, window, G, what="correlate")
    gq, gk = backward("correlate", y, x, go)
    check(gq, brute_aggregate, x, mx, go, mgo, window, what="correlate: grad q")
    check(gk, brute_aggregate_transpose, y, my, go, mgo, window, size, what="correlate: grad k")

    check(forward("aggregate_transpose", y, w), brute_aggregate_transpose, y, my, w, mw, window, size,
          what="aggregate_transpose")
    gy, gw = backward("aggregate_transpose", y, w, x)
    check(gy, brute_aggregate, x, mx, w, mw, window, what="aggregate_transpose: grad y")
    check(gw, brute_correlate, y, my, x, mx, window, G, reduced=True, what="aggregate_transpose: grad w")

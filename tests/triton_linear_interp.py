"""Run by tests/test_aggregate_linear.py in a child process with TRITON_INTERPRET=1: the Triton
backend's aggregate_linear (its fused forward kernel for 16/32-bit floats, the composed form
for float64) and its fused backward (the dx and dlinear kernels, every dtype) on small CPU
tensors held between NaN guard bands, against the composed float64 reference on the same
rounded values. Prints "ok"."""

import os
import sys

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from oracle import geometries  # noqa: E402
from tokenmix.ops import Window, aggregate  # noqa: E402
from tokenmix.ops.backends.triton import TritonBackend

GUARD = 64


def composed(x, h, weight, bias, window):
    B, M, Ho, Wo = h.shape
    w = torch.einsum("rm,bmij->brij", weight, h)
    if bias is not None:
        w = w + bias.view(1, -1, 1, 1)
    return aggregate(x, w.reshape(B, -1, window.taps, Ho, Wo), window, backend="reference")


def poisoned(t):
    """A contiguous copy of t between NaN guard bands in one storage: an unmasked read past
    either end shows up as NaN."""
    if t is None:
        return None
    buf = torch.full((t.numel() + 2 * GUARD,), float("nan"), dtype=t.dtype)
    out = buf[GUARD:GUARD + t.numel()].view(t.shape)
    out.copy_(t)
    return out


# window, B, C, G, H, W, M, bias, dtype: odd and prime sizes, H != W, stride and dilation 2,
# rectangular kernels, both borders, M below, at and above the feature tiles, C/G above 16
CASES = [
    (Window(3), 2, 6, 3, 7, 9, 5, True, torch.float64),
    (Window((3, 5), stride=(2, 1), dilation=(1, 2)), 1, 4, 2, 9, 8, 19, False, torch.float32),
    (Window(3, dilation=2, border="clamp"), 2, 4, 4, 7, 6, 3, True, torch.float32),
    (Window(7), 1, 8, 2, 3, 3, 4, True, torch.float64),  # taps never inside the image
    (Window(5, stride=3), 2, 32, 2, 11, 13, 17, True, torch.bfloat16),
    (Window(7, stride=2, dilation=2), 2, 5, 1, 13, 11, 33, True, torch.float16),
    (Window((5, 3), dilation=(1, 2), border="clamp"), 1, 34, 2, 9, 10, 7, False, torch.float32),
    (Window(1), 2, 4, 2, 5, 7, 3, False, torch.float32),
    (Window((3, 5), stride=(1, 2), padding=(0, 3)), 1, 3, 3, 5, 8, 16, True, torch.float64),
    (Window(5, dilation=(2, 1), border="clamp"), 1, 2, 1, 11, 7, 2, True, torch.bfloat16),
]


def check(backend, window, B, C, G, H, W, M, with_bias, dtype, masks=((True, True, True, True),)):
    g = torch.Generator().manual_seed(B * 100 + C + H * 7 + M)
    Ho, Wo = window.output_size(H, W)
    x = torch.randn(B, C, H, W, dtype=torch.float64, generator=g).to(dtype)
    h = torch.randn(B, M, Ho, Wo, dtype=torch.float64, generator=g).to(dtype)
    weight = torch.randn(G * window.taps, M, dtype=torch.float64, generator=g).to(dtype)
    bias = torch.randn(G * window.taps, dtype=torch.float64, generator=g).to(dtype) if with_bias else None
    gy = torch.randn(B, C, Ho, Wo, dtype=torch.float64, generator=g).to(dtype)
    ref_in = [t.double().requires_grad_() if t is not None else None for t in (x, h, weight, bias)]
    ref = composed(*ref_in, window)
    ref_grads = torch.autograd.grad(ref, [t for t in ref_in if t is not None], gy.double())
    if bias is None:
        ref_grads = ref_grads + (None,)
    px, ph, pweight, pbias, pgy = (poisoned(t) for t in (x, h, weight, bias, gy))
    fwd, bwd = backend.fwd_tol[dtype], backend.bwd_tol[dtype]
    scale = 4 if dtype == torch.bfloat16 else 1
    y = backend.aggregate_linear(px, ph, pweight, pbias, window)
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), ref, atol=fwd[0] * scale * 10, rtol=fwd[1] * scale)
    for mask in masks:
        grads = backend.aggregate_linear_backward(pgy, px, ph, pweight, pbias, window, mask)
        for name, got, want, asked, like in zip("x h weight bias".split(), grads, ref_grads, mask,
                                                (x, h, weight, bias)):
            if not asked or want is None:
                assert got is None, (name, mask)
                continue
            assert got.dtype == dtype and got.shape == like.shape, (name, got.dtype, got.shape)
            assert not torch.isnan(got).any(), f"d{name}: NaN (out-of-bounds read of a guard band?)"
            torch.testing.assert_close(got.double(), want, atol=bwd[0] * scale * 40, rtol=bwd[1] * scale * 4,
                                       msg=lambda m: f"d{name} {window} {dtype}: {m}")


def drawn_cases(backend):
    """A few drawn geometries on top of the fixed cases (odd/prime sizes, H != W, custom padding,
    stride and dilation up to 2, both borders of the fused op)."""

    @settings(max_examples=6, deadline=None, database=None)
    @given(geo=geometries(max_kernel=5, max_stride=2, max_dilation=2, max_size=9, borders=("zero", "clamp")),
           M=st.sampled_from([1, 6, 17]), bias=st.booleans(),
           dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]))
    def run(geo, M, bias, dtype):
        window, B, C, G, H, W = geo
        check(backend, window, min(B, 2), C, G, H, W, M, bias, dtype)

    run()


def main():
    import tokenmix.ops.backends.triton.aggregate_linear as kernels

    backend = TritonBackend(interpret=True)
    assert backend.unavailable_reason() is None, backend.unavailable_reason()
    for case in CASES:
        check(backend, *case)
    drawn_cases(backend)
    # the output mask, and dlinear programs that loop over several pixel blocks
    kernels._PROGRAMS, programs = 3, kernels._PROGRAMS
    try:
        check(backend, Window(3), 2, 4, 2, 11, 12, 21, True, torch.float32,
              masks=((True, True, True, True), (True, False, False, False), (False, True, False, True),
                     (False, False, True, False)))
        check(backend, Window(3, border="clamp"), 3, 2, 1, 9, 10, 5, True, torch.float64)
    finally:
        kernels._PROGRAMS = programs
    # NaN in the rows of taps never inside the image: nothing leaks into the output or a
    # gradient (the kernels zero the weights of out-of-image taps per pixel, and load no
    # weight row of a tap that no pixel of a tile reads)
    window = Window(7)
    x, h, gy = torch.randn(1, 4, 3, 3), torch.randn(1, 3, 3, 3), torch.randn(1, 4, 3, 3)
    weight, bias = torch.randn(98, 3), torch.randn(98)
    unread = torch.ones(7, 7, dtype=torch.bool)
    unread[1:6, 1:6] = False
    unread = unread.flatten().repeat(2)
    wz, bz = weight.masked_fill(unread[:, None], 0), bias.masked_fill(unread, 0)
    wn, bn = weight.masked_fill(unread[:, None], float("nan")), bias.masked_fill(unread, float("inf"))
    y = backend.aggregate_linear(x, h, wn, bn, window)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, composed(x, h, wz, bz, window), atol=1e-5, rtol=1e-5)
    got = backend.aggregate_linear_backward(gy, x, h, wn, bn, window, (True, True, True, True))
    want = backend.aggregate_linear_backward(gy, x, h, wz, bz, window, (True, True, True, True))
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    print("ok")


if __name__ == "__main__":
    main()

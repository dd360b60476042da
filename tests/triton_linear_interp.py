"""Run by tests/test_aggregate_linear.py in a child process with TRITON_INTERPRET=1: the Triton
backend's aggregate_linear (its fused forward kernel for 16/32-bit floats, the composed form
for float64, and the backward composed of its primitives) on small CPU tensors against the composed float64 reference. Prints "ok"."""

import torch

from tokenmix.ops import Window, aggregate
from tokenmix.ops.backends.triton import TritonBackend


def composed(x, h, weight, bias, window):
    B, M, Ho, Wo = h.shape
    w = torch.einsum("rm,bmij->brij", weight, h)
    if bias is not None:
        w = w + bias.view(1, -1, 1, 1)
    return aggregate(x, w.reshape(B, -1, window.taps, Ho, Wo), window, backend="reference")


def main():
    backend = TritonBackend(interpret=True)
    assert backend.unavailable_reason() is None, backend.unavailable_reason()
    cases = [  # window, B, C, G, H, W, M, bias, dtype
        (Window(3), 2, 6, 3, 7, 9, 5, True, torch.float64),
        (Window((3, 5), stride=(2, 1), dilation=(1, 2)), 1, 4, 2, 9, 8, 19, False, torch.float32),
        (Window(3, dilation=2, border="clamp"), 2, 4, 4, 7, 6, 3, True, torch.float32),
        (Window(7), 1, 8, 2, 3, 3, 4, True, torch.float64),  # taps never inside the image
        (Window(5, stride=3), 2, 32, 2, 11, 13, 17, True, torch.bfloat16),
    ]
    for window, B, C, G, H, W, M, with_bias, dtype in cases:
        g = torch.Generator().manual_seed(B * 100 + C + H)
        Ho, Wo = window.output_size(H, W)
        x = torch.randn(B, C, H, W, dtype=torch.float64, generator=g).to(dtype)
        h = torch.randn(B, M, Ho, Wo, dtype=torch.float64, generator=g).to(dtype)
        weight = torch.randn(G * window.taps, M, dtype=torch.float64, generator=g).to(dtype)
        bias = torch.randn(G * window.taps, dtype=torch.float64, generator=g).to(dtype) if with_bias else None
        gy = torch.randn(B, C, Ho, Wo, dtype=torch.float64, generator=g).to(dtype)
        ref_in = [t.double().requires_grad_() if t is not None else None for t in (x, h, weight, bias)]
        ref = composed(*ref_in, window)
        ref_grads = torch.autograd.grad(ref, [t for t in ref_in if t is not None], gy.double())
        y = backend.aggregate_linear(x, h, weight, bias, window)
        grads = backend.aggregate_linear_backward(gy, x, h, weight, bias, window, (True, True, True, with_bias))
        fwd, bwd = backend.fwd_tol[dtype], backend.bwd_tol[dtype]
        scale = 4 if dtype == torch.bfloat16 else 1
        assert y.dtype == dtype
        torch.testing.assert_close(y.double(), ref, atol=fwd[0] * scale * 10, rtol=fwd[1] * scale)
        for got, want in zip([t for t in grads if t is not None], ref_grads):
            torch.testing.assert_close(got.double(), want, atol=bwd[0] * scale * 40, rtol=bwd[1] * scale * 4)
    # NaN in the rows of taps never inside the image: nothing leaks (the kernel zeroes the
    # weights of out-of-image taps per pixel)
    window = Window(7)
    x, h = torch.randn(1, 4, 3, 3), torch.randn(1, 3, 3, 3)
    weight, bias = torch.randn(49, 3), torch.randn(49)
    unread = torch.ones(7, 7, dtype=torch.bool)
    unread[1:6, 1:6] = False
    unread = unread.flatten()
    y = backend.aggregate_linear(x, h, weight.masked_fill(unread[:, None], float("nan")),
                                 bias.masked_fill(unread, float("inf")), window)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, composed(x, h, weight.masked_fill(unread[:, None], 0), bias.masked_fill(unread, 0),
                                           window), atol=1e-5, rtol=1e-5)
    print("ok")


if __name__ == "__main__":
    main()

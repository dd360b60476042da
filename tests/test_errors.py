"""Bad input gets a ValueError/TypeError naming the argument and the value; the dispatcher
explains refusals."""

import warnings

import pytest
import torch

from tokenmix.ops import (Backend, Window, aggregate, aggregate_transpose, correlate, get_backend, list_backends,
                          register_backend, select_backend)

WIN = Window(3)
X = torch.randn(2, 6, 5, 7)
W = torch.randn(2, 3, 9, 5, 7)


@pytest.mark.parametrize("args,err,match", [
    ((X, torch.randn(2, 4, 9, 5, 7), WIN), ValueError, r"C=6 of x are not divisible by groups G=4"),
    ((X, torch.randn(2, 3, 8, 5, 7), WIN), ValueError, r"w.shape\[2\] must be K\*K = 9"),
    ((X, torch.randn(3, 3, 9, 5, 7), WIN), ValueError, r"w batch 3 must be 1 or 2"),
    ((X, torch.randn(2, 3, 9, 5, 6), WIN), ValueError, r"w spatial size \(5, 6\) must be the output size \(5, 7\)"),
    ((X, torch.randn(2, 3, 9, 5, 1), WIN), ValueError, r"w spatial size \(5, 1\)"),
    ((X[0], W, WIN), ValueError, r"x must be 4-D \(B, C, H, W\), got shape \(6, 5, 7\)"),
    ((X, W[0], WIN), ValueError, r"w must be 5-D"),
    ((X, W.double(), WIN), TypeError, r"x and w must have one dtype"),
    ((X.long(), W, WIN), TypeError, r"x must have a floating dtype"),
    ((X, W, 3), TypeError, r"window must be a tokenmix.ops.Window"),
    (([1.0], W, WIN), TypeError, r"x must be a torch.Tensor, got list"),
    ((X[..., :2], torch.randn(2, 3, 9, 2, 2), Window(3, border="clamp")), ValueError,
     r"kernel_size\*dilation <= input width: 3\*1 > 2"),
    ((X, torch.randn(2, 3, 9, 3, 4), Window(3, stride=2, padding=0)), ValueError, r"w spatial size \(3, 4\) must be "
     r"the output size \(2, 3\)"),
])
def test_aggregate_errors(args, err, match):
    with pytest.raises(err, match=match):
        aggregate(*args)


def test_mixed_devices():
    x = torch.randn(1, 2, 4, 4, device="meta")
    with pytest.raises(ValueError, match="x and w must be on one device"):
        aggregate(x, torch.randn(1, 2, 9, 4, 4), WIN)


def test_correlate_errors():
    q = torch.randn(2, 6, 5, 7)
    with pytest.raises(ValueError, match=r"C=6 of q/k are not divisible by groups=4"):
        correlate(q, X, WIN, 4)
    with pytest.raises(ValueError, match=r"groups must be a positive int, got 0"):
        correlate(q, X, WIN, 0)
    with pytest.raises(ValueError, match=r"q spatial size \(5, 7\) must be the window's output size \(3, 4\)"):
        correlate(q, X, Window(3, stride=2), 2)
    with pytest.raises(ValueError, match=r"q and k must have the same \(B, C\)"):
        correlate(q[:, :3], X, WIN, 3)


def test_aggregate_transpose_errors():
    y = torch.randn(2, 6, 5, 7)
    with pytest.raises(ValueError, match=r"input_size must be a pair of positive ints"):
        aggregate_transpose(y, W, WIN, (5,))
    with pytest.raises(ValueError, match=r"y spatial size \(5, 7\) must be the window's output size \(6, 7\)"):
        aggregate_transpose(y, W, WIN, (6, 7))
    with pytest.raises(ValueError, match=r"C=6 of y are not divisible by groups G=4"):
        aggregate_transpose(y, torch.randn(2, 4, 9, 5, 7), WIN, (5, 7))


def test_custom_op_direct_call_is_checked_too():
    with pytest.raises(ValueError, match="not divisible by groups"):
        torch.ops.tokenmix.aggregate(X, torch.randn(2, 4, 9, 5, 7), *WIN.as_args(), None)


def test_unknown_backend_lists_known():
    with pytest.raises(ValueError, match=r"unknown backend 'cuda_magic'; known: triton, cpu, reference"):
        aggregate(X, W, WIN, backend="cuda_magic")


def test_forced_backend_explains_every_reason():
    with pytest.raises(ValueError, match=r"backend='triton' cannot run aggregate.*device 'cpu' not in \['cuda'\]"):
        aggregate(X, W, WIN, backend="triton")


def test_forced_backend_lists_all_reasons_at_once():
    from tokenmix.ops import backends as registry

    class Narrow(Backend):
        name = "narrow_for_test"
        devices = frozenset({"cuda"})
        dtypes = frozenset({torch.float16})
        borders = frozenset({"zero"})

    register_backend(Narrow())
    try:
        with pytest.raises(ValueError) as e:
            select_backend("aggregate", (X, W), Window(3, border="clamp"), backend="narrow_for_test")
        msg = str(e.value)
        assert "device 'cpu'" in msg and "dtype torch.float32" in msg and "border 'clamp'" in msg
    finally:
        registry._BACKENDS.pop("narrow_for_test")


class _Broken(Backend):
    name = "broken_for_test"
    devices = frozenset({"cpu"})
    dtypes = frozenset({torch.float32})

    def unavailable_reason(self):
        return "no compiler in this test"


def test_unavailable_backend_falls_back_with_one_warning():
    from tokenmix.ops import backends as registry
    register_backend(_Broken(), first=True)
    try:
        assert list_backends()[0] == "broken_for_test"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y1 = aggregate(X, W, WIN)
            y2 = aggregate(X, W, WIN)
        msgs = [str(c.message) for c in caught if "broken_for_test" in str(c.message)]
        assert len(msgs) == 1 and "no compiler in this test" in msgs[0]
        torch.testing.assert_close(y1, y2)
        with pytest.raises(ValueError, match="unavailable: no compiler in this test"):
            aggregate(X, W, WIN, backend="broken_for_test")
    finally:
        registry._BACKENDS.pop("broken_for_test")


def test_dispatch_failure_names_every_backend_and_reason():
    """When no backend supports the inputs, the error lists each registered backend with its
    reasons (the device refusal included, though dispatch decides it without the message)."""
    from tokenmix.ops.backends import select_backend
    x = torch.zeros(1, 1, 3, 3, dtype=torch.int32)
    with pytest.raises(ValueError) as e:
        select_backend("aggregate", (x,), Window(3))
    msg = str(e.value)
    assert msg.startswith("no tokenmix backend can run aggregate on these inputs: ")
    for name in list_backends():
        assert f"{name}: " in msg
    assert "device 'cpu' not in ['cuda']" in msg and msg.count("dtype torch.int32 not in") == len(list_backends())


def test_register_backend_type_check():
    with pytest.raises(TypeError, match="must be a tokenmix.ops.Backend instance"):
        register_backend("reference")

"""Window geometry: output sizes as conv2d, clamp-border semantics, masks, argument checks."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from oracle import src
from tokenmix.ops import Window


@given(K=st.integers(1, 9), s=st.integers(1, 3), d=st.integers(1, 3), H=st.integers(1, 20), W=st.integers(1, 20),
       pad=st.one_of(st.none(), st.integers(0, 6)))
def test_output_size_matches_conv2d(K, s, d, H, W, pad):
    win = Window(K, stride=s, dilation=d, padding=pad)
    p = win.padding
    n_h = (H + 2 * p[0] - d * (K - 1) - 1) // s + 1
    n_w = (W + 2 * p[1] - d * (K - 1) - 1) // s + 1
    if n_h < 1 or n_w < 1:
        with pytest.raises(ValueError, match="does not fit"):
            win.output_size(H, W)
        return
    out = F.conv2d(torch.zeros(1, 1, H, W), torch.zeros(1, 1, K, K), stride=s, dilation=d, padding=p)
    assert win.output_size(H, W) == tuple(out.shape[2:])


def test_default_padding_keeps_size_and_halves_with_stride_two():
    assert Window(7).padding == (3, 3)
    assert Window(3, dilation=2).padding == (2, 2)
    assert Window(7).output_size(13, 8) == (13, 8)
    assert Window(7, stride=2).output_size(13, 8) == (7, 4)
    assert Window((3, 5), stride=(1, 2)).output_size(9, 9) == (9, 5)


@given(K=st.integers(1, 5), d=st.integers(1, 3), extra=st.integers(0, 6))
def test_clamp_indices_follow_design(K, d, extra):
    L = K * d + extra
    win = Window(K, dilation=d, border="clamp")
    idx = win.axis_index(0, L)
    assert idx.shape == (K, L)
    for i in range(L):
        for u in range(K):
            assert idx[u, i] == src(i, u, L, K, 1, d, 0, "clamp")
    assert (idx >= 0).all() and (idx < L).all()  # every tap inside the image
    # every output's window holds K distinct pixels of its own dilation sub-grid
    for i in range(L):
        col = idx[:, i]
        assert len(set(col.tolist())) == K and ((col - i) % d == 0).all()


def test_clamp_centre_away_from_border():
    win = Window(3, border="clamp")
    idx = win.axis_index(0, 7)
    assert idx[:, 3].tolist() == [2, 3, 4]      # interior: centred
    assert idx[:, 0].tolist() == [0, 1, 2]      # border: slides inward
    assert idx[:, 6].tolist() == [4, 5, 6]


def test_valid_mask_counts():
    win = Window(3)
    m = win.valid_mask(4, 5)
    assert m.shape == (9, 4, 5)
    assert m[:, 0, 0].sum() == 4 and m[:, 1, 1].sum() == 9 and m[:, 0, 2].sum() == 6
    assert Window(3, border="clamp").valid_mask(4, 5).all()


def test_relative_offsets():
    dy, dx = Window(3, dilation=2).relative_offset(5, 6)
    assert dy[:, 0].tolist() == [-2, 0, 2] and dx[:, 5].tolist() == [-2, 0, 2]
    dy, _ = Window(3, border="clamp").relative_offset(5, 5)
    assert dy[:, 0].tolist() == [0, 1, 2] and dy[:, 2].tolist() == [-1, 0, 1] and dy[:, 4].tolist() == [-2, -1, 0]


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(kernel_size=0), ValueError, "kernel_size"),
    (dict(kernel_size=3.0), TypeError, "kernel_size"),
    (dict(kernel_size=(3, 3, 3)), TypeError, "kernel_size"),
    (dict(kernel_size=3, stride=0), ValueError, "stride"),
    (dict(kernel_size=3, dilation=-1), ValueError, "dilation"),
    (dict(kernel_size=3, padding=-1), ValueError, "padding"),
    (dict(kernel_size=3, border="wrap"), ValueError, "border"),
    (dict(kernel_size=3, stride=2, border="clamp"), ValueError, "stride"),
    (dict(kernel_size=3, padding=1, border="clamp"), ValueError, "padding"),
])
def test_window_argument_errors(kwargs, err, match):
    with pytest.raises(err, match=match):
        Window(**kwargs)


def test_clamp_window_larger_than_image():
    with pytest.raises(ValueError, match=r"kernel_size\*dilation <= input height: 3\*2 > 5"):
        Window(3, dilation=2, border="clamp").output_size(5, 9)


def test_reflect_needs_padding_below_the_image_size():
    win = Window(5, border="reflect")  # padding 2
    assert win.output_size(3, 9) == (3, 9)
    with pytest.raises(ValueError, match=r"border='reflect' needs padding < input height: padding 2 >= 2"):
        win.output_size(2, 9)


@given(K=st.integers(1, 5), s=st.integers(1, 3), d=st.integers(1, 3), H=st.integers(1, 9), W=st.integers(1, 9))
def test_reflect_index_matches_f_pad(K, s, d, H, W):
    win = Window(K, stride=s, dilation=d, border="reflect")
    (ph, pw) = win.padding
    if ph >= H or pw >= W or (H + 2 * ph - d * (K - 1) - 1) < 0 or (W + 2 * pw - d * (K - 1) - 1) < 0:
        return
    x = torch.arange(H * W, dtype=torch.float64).view(1, 1, H, W)
    cols = F.unfold(F.pad(x, (pw, pw, ph, ph), mode="reflect"), K, dilation=d, stride=s)
    rows, colsi = win.source_index(H, W)
    want = (rows[:, None, :, None] * W + colsi[None, :, None, :]).reshape(K * K, -1)
    assert torch.equal(cols[0].long(), want)

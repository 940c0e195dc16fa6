"""The filters reference against independent implementations."""
import math

import pytest
import torch
import torch.nn.functional as F

from cs_helpers import grading
from cs_helpers.grading import get_check
from cs_helpers.reference.filters import conv2d_im2col, im2col, linear_templates, normalize_filters

UNFOLD_CASES = [
    (1, 3, 8, 8, 3, 1, 0),
    (2, 3, 11, 9, (3, 2), (2, 1), (1, 2)),
    (3, 16, 15, 15, 5, 2, 2),
    (2, 1, 7, 13, (7, 1), 3, (3, 0)),
    (1, 2, 5, 5, 5, 1, 0),          # one patch only
    (2, 2, 4, 6, 1, 1, 0),          # 1x1 kernels: the columns are the pixels
]


@pytest.mark.parametrize("n, c, h, w, kernel, stride, padding", UNFOLD_CASES)
def test_im2col_is_exactly_unfold(n, c, h, w, kernel, stride, padding):
    x = torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(h * 10 + w))
    before = x.clone()
    ours = im2col(x, kernel, stride=stride, padding=padding)
    assert torch.equal(ours, F.unfold(x, kernel, padding=padding, stride=stride))  # copies, no rounding
    assert torch.equal(x, before)


def test_im2col_by_hand():
    cols = im2col(torch.arange(16.0).view(1, 1, 4, 4), 2, stride=2)
    assert cols[0].T.tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    two = im2col(torch.stack([torch.zeros(2, 2), torch.ones(2, 2)]).unsqueeze(0), 2)
    assert two[0, :, 0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]  # channel first


def test_im2col_errors():
    with pytest.raises(ValueError, match="does not fit"):
        im2col(torch.rand(1, 3, 2, 2), 3)
    with pytest.raises(ValueError, match="kernel_size"):
        im2col(torch.rand(1, 3, 5, 5), 2.5)
    with pytest.raises(ValueError, match="positive"):
        im2col(torch.rand(1, 3, 5, 5), 2, stride=0)


def test_im2col_check_scores_the_patch_matrix_and_names_the_layout():
    points = get_check("im2col").points

    def channel_last(x, kernel_size, stride=1, padding=0):
        cols = im2col(x, kernel_size, stride, padding)
        n, rows, length = cols.shape
        return cols.view(n, x.shape[1], -1, length).transpose(1, 2).reshape(n, rows, length)

    def unfold(x, kernel_size, stride=1, padding=0):
        return F.unfold(x, kernel_size, padding=padding, stride=stride)

    def mutates(x, kernel_size, stride=1, padding=0):
        cols = im2col(x, kernel_size, stride, padding)
        x.zero_()
        return cols

    assert 0 < grading.score("im2col", channel_last, quiet=True) < points
    # Graded on the returned matrix alone: the same matrix earns the same points however it
    # was made, and a mutated input is advice, not a deduction.
    assert grading.score("im2col", unfold, quiet=True) == points
    assert grading.score("im2col", mutates, quiet=True) == points


def test_conv2d_im2col_builds_on_im2col(monkeypatch):
    import cs_helpers.reference.filters as module

    calls = []
    monkeypatch.setattr(module, "im2col", lambda *a, **k: calls.append(a) or F.unfold(a[0], a[1], **k))
    x, weight = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3)
    torch.testing.assert_close(module.conv2d_im2col(x, weight, padding=1), F.conv2d(x, weight, padding=1),
                               rtol=1e-4, atol=1e-4)
    assert len(calls) == 1


@pytest.mark.parametrize("n, c, h, w, co, kh, kw, stride, padding", [
    (1, 3, 8, 8, 4, 3, 3, 1, 0),
    (2, 3, 11, 9, 5, 3, 2, (2, 1), (1, 2)),
    (3, 16, 15, 15, 8, 5, 5, 2, 2),
    (2, 1, 7, 13, 2, 7, 1, 3, (3, 0)),
])
@pytest.mark.parametrize("with_bias", [False, True])
def test_conv2d_im2col_matches_torch(n, c, h, w, co, kh, kw, stride, padding, with_bias):
    g = torch.Generator().manual_seed(n * 100 + c)
    x, weight = torch.randn(n, c, h, w, generator=g), torch.randn(co, c, kh, kw, generator=g)
    bias = torch.randn(co, generator=g) if with_bias else None
    ours = conv2d_im2col(x, weight, bias, stride=stride, padding=padding)
    torch.testing.assert_close(ours, F.conv2d(x, weight, bias, stride=stride, padding=padding),
                               rtol=1e-4, atol=1e-4)


def test_conv2d_im2col_reproduces_the_models_first_layer(lite0):
    x = torch.rand(2, 3, 32, 32)
    normalized = lite0.normalize(x)
    expected = lite0.stem.conv(normalized)
    # TensorFlow "same" padding at stride 2 on an even size pads one row/column at the end.
    ours = conv2d_im2col(F.pad(normalized, (0, 1, 0, 1)), lite0.stem.conv.weight, stride=2)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)


def test_conv2d_im2col_errors():
    with pytest.raises(ValueError, match="channels"):
        conv2d_im2col(torch.rand(1, 3, 5, 5), torch.rand(2, 4, 3, 3))
    with pytest.raises(ValueError, match="does not fit"):
        conv2d_im2col(torch.rand(1, 3, 2, 2), torch.rand(2, 3, 3, 3))
    with pytest.raises(ValueError, match="stride"):
        conv2d_im2col(torch.rand(1, 3, 5, 5), torch.rand(2, 3, 3, 3), stride=1.5)


def test_normalize_filters_per_filter_against_a_loop():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 3, 5, 5, generator=g) * torch.arange(1, 7).view(-1, 1, 1, 1)
    w[2] = 4.0
    out = normalize_filters(w)
    for o in range(6):
        f = w[o]
        expected = torch.full_like(f, 0.5) if f.max() == f.min() else (f - f.min()) / (f.max() - f.min())
        torch.testing.assert_close(out[o], expected)
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(w[2], torch.full_like(w[2], 4.0))  # input untouched


def test_linear_templates_reshape_row_major_and_scale():
    W = torch.arange(2 * 12, dtype=torch.float32).view(2, 12)
    W[1] = -W[1] * 10
    out = linear_templates(W, (3, 4))
    assert out.shape == (2, 3, 4)
    torch.testing.assert_close(out[0], torch.linspace(0, 1, 12).view(3, 4))
    torch.testing.assert_close(out[1], torch.linspace(1, 0, 12).view(3, 4))
    with pytest.raises(ValueError, match=str(math.prod((3, 5)))):
        linear_templates(W, (3, 5))

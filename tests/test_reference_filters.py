"""The filters reference against independent implementations."""
import math

import pytest
import torch
import torch.nn.functional as F

from cs_helpers.reference.filters import conv2d_im2col, linear_templates, normalize_filters


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

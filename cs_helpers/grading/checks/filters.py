"""Checks for notebook 01 (filters).

Points come only from the values a function returns. What is recorded inside the process
that runs the graded code (its inputs after the call, counts of Python calls, the torch
functions it called) can be forged by that code, so those properties are
``feedback_only``: checked and shown as advice, worth no points.

Properties with an ``expect`` need no reference (the student release self-checks them):
the output's shape follows from the inputs, and im2col and conv2d_im2col have closed
forms in torch itself (F.unfold, F.conv2d)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core import (Case, Check, Property, calls_do_not_grow, fresh_generator, inputs_unchanged,
                    shape_matches, values_close)
from ..registry import register


@register
class NormalizeFilters(Check):
    name, topic, points = "normalize_filters", "filters", 2

    def properties(self, seed):
        g = fresh_generator(seed)
        plain = Case((torch.randn(6, 3, 5, 5, generator=g),), label="a bank of 6 filters 3x5x5")
        # Filters at very different scales and offsets: global scaling gets these wrong.
        scales = torch.tensor([0.01, 1.0, 30.0, 0.2, 5.0]).view(-1, 1, 1, 1)
        offsets = torch.tensor([-3.0, 0.0, 10.0, 0.5, -0.2]).view(-1, 1, 1, 1)
        mixed = Case((torch.randn(5, 3, 3, 3, generator=g) * scales + offsets,),
                     label="filters of very different scales")
        constant = torch.randn(4, 3, 3, 3, generator=g)
        constant[1] = 0.7
        constant[3] = 0.0
        flat = Case((constant,), label="a bank with constant filters")
        other = Case((torch.randn(7, 16, 3, 3, generator=g) * 0.1,), label="filters with 16 input channels")
        single = Case((torch.randn(5, 1, 7, 7, generator=g),), label="single-channel filters")
        return [
            Property("returns a tensor of the input's shape", 1, [plain], shape_matches, expect=torch.zeros_like),
            Property("scales each filter to [0, 1] on its own (per filter, not across the bank)", 3,
                     [plain, mixed], values_close()),
            Property("turns a constant filter into 0.5 everywhere", 1, [flat], values_close()),
            Property("works for any number of input channels", 1, [other, single], values_close()),
            Property("leaves its input unchanged", 1, [mixed], inputs_unchanged, feedback_only=True),
        ]


@register
class Im2col(Check):
    name, topic, points = "im2col", "filters", 3

    def properties(self, seed):
        g = fresh_generator(seed)

        def case(n, c, h, w, kernel_size, label, **kw_):
            return Case((torch.randn(n, c, h, w, generator=g), kernel_size), dict(kw_), label=label)

        # Non-square images (H != W) everywhere: a transposed order of positions or of the
        # entries of a patch gives other numbers, not just other shapes.
        single = case(1, 1, 5, 6, 3, "one channel, a 5x6 input, 3x3 patches")
        channels = case(1, 3, 6, 7, 2, "three channels, 2x2 patches")
        many = case(2, 16, 5, 4, 3, "16 channels")
        # One channel in the cases below, so that each of them tests one thing: a wrong
        # channel order loses the layout property only.
        padded = case(2, 1, 5, 6, 3, "padding=1", padding=1)
        strided = case(2, 1, 9, 8, 3, "stride=2", stride=2)
        both = case(2, 1, 10, 11, 5, "stride=2, padding=2", stride=2, padding=2)
        rect = case(3, 1, 9, 12, (2, 3), "non-square patches and (height, width) pairs", stride=(2, 1),
                    padding=(1, 0))
        batch = case(5, 1, 7, 7, 3, "a batch of 5 images", padding=1)
        exact = values_close(rtol=1e-6, atol=1e-6)  # im2col copies numbers: no rounding to excuse
        props = [
            Property("returns (N, C_in * kh * kw, L): one column per output position", 1,
                     [single, many, strided, rect], shape_matches),
            Property("puts the patch under each output position in its own column, read row by row, "
                     "positions in row-major order", 2, [single], exact),
            Property("flattens a patch channel first, then row, then column (the layout of F.unfold)", 3,
                     [channels, many], exact),
            Property("zero-pads the input", 1, [padded], exact),
            Property("applies the stride", 1, [strided], exact),
            Property("handles stride and padding together", 1, [both], exact),
            Property("takes non-square patches and (height, width) pairs", 1, [rect], exact),
            Property("keeps the patches of each image of a batch apart", 1, [batch], exact),
            Property("leaves its input unchanged", 1, [padded], inputs_unchanged, feedback_only=True),
        ]
        for prop in props:  # the contract: the layout of F.unfold
            prop.expect = _unfold
        return props


def _unfold(x, kernel_size, stride=1, padding=0):
    return F.unfold(x, kernel_size, stride=stride, padding=padding)


def _conv2d(x, weight, bias=None, stride=1, padding=0):
    return F.conv2d(x, weight, bias, stride=stride, padding=padding)


CONVOLUTIONS = {"conv2d", "convolution", "_convolution", "conv1d", "conv3d", "conv_transpose2d", "conv_tbc",
                "_conv_forward"}


@register
class Conv2dIm2col(Check):
    name, topic, points = "conv2d_im2col", "filters", 2

    def properties(self, seed):
        g = fresh_generator(seed)

        def case(n, c, h, w, co, kh, kw, bias=False, label="", count_calls=False, **kw_):
            args = (torch.randn(n, c, h, w, generator=g), torch.randn(co, c, kh, kw, generator=g))
            if bias:
                args += (torch.randn(co, generator=g),)
            return Case(args, dict(kw_), label=label, count_calls=count_calls, record_torch_calls=True)

        basic = case(1, 3, 8, 8, 4, 3, 3, label="a 1x3x8x8 input with 3x3 filters")
        padded = case(2, 3, 7, 7, 5, 3, 3, padding=1, label="padding=1")
        strided = case(2, 2, 9, 9, 3, 3, 3, stride=2, label="stride=2")
        both = case(2, 4, 10, 11, 3, 5, 5, stride=2, padding=2, label="stride=2, padding=2")
        biased = case(2, 3, 6, 6, 4, 3, 3, bias=True, label="a bias")
        rect = case(3, 2, 9, 12, 4, 2, 3, stride=(2, 1), padding=(1, 0), label="non-square kernels and pairs")
        batch = case(5, 16, 12, 12, 8, 3, 3, padding=1, bias=True, label="a batch of 5 with 16 channels")
        small = case(2, 3, 6, 6, 4, 3, 3, padding=1, label="a 6x6 input", count_calls=True)
        large = case(2, 3, 30, 30, 4, 3, 3, padding=1, label="a 30x30 input", count_calls=True)

        correct = values_close(rtol=1e-4, atol=1e-4)

        def without_convolution(case_, expected, got):
            return correct(case_, expected, got) and not CONVOLUTIONS.intersection(got.torch_calls)

        props = [
            Property("matches F.conv2d with stride 1 and no padding", 2, [basic], correct),
            Property("zero-pads the input", 1, [padded], correct),
            Property("applies the stride", 1, [strided], correct),
            Property("handles stride and padding together", 1, [both], correct),
            Property("adds the bias to every output position", 1, [biased], correct),
            Property("takes non-square kernels and (height, width) pairs", 1, [rect], correct),
            Property("handles batches and many channels", 1, [batch], correct),
            # Advice only: which torch functions ran, and how many Python calls, is recorded in
            # the process that runs the student's code, which can forge it.
            Property("computes the convolution itself (im2col and one matrix multiply), without calling "
                     "a convolution routine", 1, [basic, both, batch], without_convolution, feedback_only=True),
            Property("has no Python loop over output positions (the number of calls does not grow "
                     "with the image)", 1, [small, large], calls_do_not_grow(small, large, correct),
                     feedback_only=True),
        ]
        for prop in props:  # the contract: the numbers of F.conv2d
            prop.expect = _conv2d
        return props


@register
class LinearTemplates(Check):
    name, topic, points = "linear_templates", "filters", 2

    def properties(self, seed):
        g = fresh_generator(seed)
        digits = Case((torch.randn(10, 64, generator=g), (8, 8)), label="10 classes of 8x8 images")
        scales = torch.tensor([0.001, 1.0, 50.0, 3.0]).view(-1, 1)
        colour = Case((torch.randn(4, 3 * 4 * 5, generator=g) * scales + 2.0, (3, 4, 5)),
                      label="rows at very different scales, images 3x4x5")
        flat_rows = torch.randn(3, 12, generator=g)
        flat_rows[2] = -1.5
        constant = Case((flat_rows, (3, 4)), label="a constant row")
        return [
            Property("returns (num_classes, *image_shape)", 1, [digits, colour], shape_matches,
                     expect=lambda W, image_shape: torch.zeros(W.shape[0], *image_shape)),
            Property("reshapes each row in row-major order and scales it to [0, 1] on its own", 3,
                     [digits, colour], values_close()),
            Property("turns a constant row into 0.5", 1, [constant], values_close()),
            Property("leaves its input unchanged", 1, [colour], inputs_unchanged, feedback_only=True),
        ]

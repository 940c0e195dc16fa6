"""Checks for notebook 05 (synthesis): class visualization steps, Yosinski et al.'s
clipping regularizers, total variation, the feature-inversion loss and DeepDream steps.

Points come only from what a function returns. Every mistake on the list of the issue
shows in the output of a case chosen for it: a nonzero ``l2_reg`` (the penalty's sign
and centre), a learning rate large enough to leave ``[0, 1]`` (the clamp), ``beta``
other than 2 (squares against absolute values, the exponent), batches of images with
different contrasts (percentiles per image), planted ties (strictly below the
percentile), targets whose squared norm is neither 1 nor their size (the loss's
normalization).

As in notebook 03, a property about one part of the formula holds for any output that
is right in that part, whatever else is wrong: the grader computes the outputs of
known mistakes itself, in its own process, with the reference module's private
``_..._variant`` helpers (imported lazily: the student release has no reference).
So one mistake costs its own property and the comparison with the reference, not the
others. Properties about manners (inputs left alone, no hook left, the model's mode
and parameters) are recorded in the graded process, so they are advice only.

``total_variation`` and ``feature_inversion_loss`` return 0-d tensors with a graph; the
grader sees their values only (detached), so "keeps the graph" and "no gradient flows
into the target" are checked by the notebook's visible tests, not for points.
"""
from __future__ import annotations

import functools

import torch

from ..core import Case, Check, ModelSpec, Property, fresh_generator, shape_matches
from ..registry import register
from ._shared import ReferenceVariants, close_scaled, manners, toyworld_cases
from ._shared import accepts as accepts_variant


def _close(expected, got, rtol: float = 1e-4, atol: float = 1e-5) -> bool:
    return close_scaled(expected, got, rtol=rtol, rel_atol=0.0, atol=atol)


def _accepts(variants: ReferenceVariants, helper: str, tol: dict | None = None, **choices):
    return accepts_variant(variants, helper, functools.partial(_close, **(tol or {})), **choices)


def _exact(tol=None):
    tol = tol or {}
    return lambda case, expected, got: _close(expected, got.value, **tol)


def _smooth(g, n, h, w, low=8):
    """Random smooth images ``(n, 3, h, w)`` in ``(0, 1)`` (bilinear upsampling of noise)."""
    noise = torch.rand(n, 3, max(2, h // low), max(2, w // low), generator=g)
    return torch.nn.functional.interpolate(noise, size=(h, w), mode="bilinear", align_corners=False)


# ---------------------------------------------------------- class_visualization_step

@register
class ClassVisualizationStep(Check):
    name, topic, points = "class_visualization_step", "synthesis", 2
    timeout_s = 60.0  # one case runs EfficientNet-Lite0

    def properties(self, seed):
        g = fresh_generator(seed)
        relu = ModelSpec("tiny_relu_cnn", seed % 1000)
        hot = ModelSpec("tiny_relu6_cnn_hot", seed % 1000 + 1)
        penalized = Case((torch.rand(1, 3, 16, 16, generator=g), relu, int(seed % 5), 0.3, 0.5),
                         label="a 16x16 image, l2_reg 0.3, lr 0.5 (ReLU CNN)")
        strong = Case((torch.rand(1, 3, 16, 20, generator=g) * 0.6 + 0.2, hot, 3, 2.0, 0.8),
                      label="a 16x20 image, l2_reg 2 (ReLU6 CNN)")
        edges = Case((torch.rand(1, 3, 16, 16, generator=g).round() * 0.98 + 0.01, relu, 1, 0.0, 8.0),
                     label="an image near 0 and 1, l2_reg 0, lr 8 (steps leave [0, 1])")
        plain = Case((torch.rand(1, 3, 12, 12, generator=g), hot, 0, 0.0, 0.3), label="l2_reg 0")
        world = toyworld_cases(1, seed, size=32)
        toy = Case((world.images[:1], ModelSpec("toynet"), int(world.labels[0]), 0.1, 0.5),
                   label="a 32x32 ToyWorld image and ToyNet")
        lite = Case((_smooth(g, 1, 32, 32), ModelSpec("efficientnet_lite0"), int(seed % 1000), 0.05, 0.4),
                    label="a 32x32 image and EfficientNet-Lite0")

        variants = ReferenceVariants("cs_helpers.reference.synthesis")
        helper = "_class_visualization_variant"
        signs, centers, norms, clamps = (1.0, -1.0), (0.5, 0.0), ("l2", "none", "mean", "max"), (True, False)

        def accepts(**fixed):
            choices = dict(sign=signs, center=centers, normalize=norms, clamp=clamps, score=("logit", "prob"))
            choices.update(fixed)
            return _accepts(variants, helper, **choices)

        return [
            Property("returns one image of the input's shape (1, 3, H, W)", 1, [penalized, strong], shape_matches),
            Property("equals the step img + lr * g / ||g||_2 on the regularized objective, clamped to [0, 1], "
                     "on tiny CNNs, ToyNet and EfficientNet-Lite0", 3,
                     [penalized, strong, edges, plain, toy, lite], _exact()),
            Property("subtracts the L2 penalty: ascends S_target - l2_reg * ||img - 0.5||^2 (not plus)", 1,
                     [penalized, strong], accepts(sign=(1.0,))),
            Property("measures the penalty from mid-gray, ||img - 0.5||^2 (gray is the zero image), "
                     "not from black", 1, [penalized, strong], accepts(center=(0.5,))),
            Property("normalizes the step by the L2 norm of the whole gradient, lr * g / ||g||_2", 1,
                     [penalized, plain], accepts(normalize=("l2",))),
            Property("clamps the new image to [0, 1]", 1, [edges], accepts(clamp=(True,))),
            Property("differentiates the target's logit S_target, not its softmax probability", 1,
                     [toy, penalized], accepts(score=("logit",))),
            Property("leaves the image unchanged, leaves no hook, keeps the model's mode and parameters", 1,
                     [penalized, toy], manners(accepts()), feedback_only=True),
        ]


# ----------------------------------------------------------------------- clipping

def _with_ties(x: torch.Tensor, g: torch.Generator, copies: int = 6) -> torch.Tensor:
    """Copies one random pixel of each image (all channels) onto ``copies`` other
    pixels, so that several pixels share a size exactly, in any implementation."""
    x = x.clone()
    n, _, h, w = x.shape
    for i in range(n):
        spots = torch.randperm(h * w, generator=g)[:copies + 1]
        source = spots[0]
        for s in spots[1:]:
            x[i, :, s // w, s % w] = x[i, :, source // w, source % w]
    return x


def _contrasts(g, n, h, w):
    """``n`` images around gray with very different contrasts (0.05 to 0.5)."""
    scales = torch.linspace(0.05, 0.5, n).view(n, 1, 1, 1)
    return (0.5 + scales * (2 * torch.rand(n, 3, h, w, generator=g) - 1)).clamp(0, 1)


def _tie_at_percentile(x, size_of, percentile):
    """Plants ties exactly at the percentile: every image's pixel of rank ``k`` (the
    percentile's position, an integer for the sizes used) is copied onto 3 pixels of
    larger size, so that 4 pixels sit exactly at the percentile."""
    x = x.clone()
    n, _, h, w = x.shape
    k = round((h * w - 1) * percentile / 100)
    for i in range(n):
        sizes = size_of(x[i:i + 1])[0].flatten()
        order = torch.argsort(sizes)
        pick = order[k]
        for s in order[k + 1:k + 4]:
            x[i, :, s // w, s % w] = x[i, :, pick // w, pick % w]
    return x




@register
class ClipSmallValues(Check):
    name, topic, points = "clip_small_values", "synthesis", 1

    def properties(self, seed):
        g = fresh_generator(seed)
        # 9 x 9 = 81 pixels: the 25th and 50th percentiles sit at positions 20 and 40 exactly.
        per_image = Case((_contrasts(g, 3, 9, 9), 50.0), label="3 images 9x9 of different contrasts, percentile 50")
        linear = Case((_contrasts(g, 2, 10, 12), 37.0), label="2 images 10x12, percentile 37 (between two pixels)")
        ties = _tie_at_percentile(_contrasts(g, 2, 9, 9), lambda x: (x - 0.5).norm(dim=1), 25.0)
        tied = Case((ties, 25.0), label="2 images 9x9 with 4 pixels tied at the 25th percentile")
        many = Case((_with_ties(_contrasts(g, 2, 12, 12), g), 80.0),
                    label="2 images 12x12 with repeated pixels, percentile 80")
        ends = Case((_contrasts(g, 2, 8, 8), 0.0), label="percentile 0 (nothing is below)")
        variants = ReferenceVariants("cs_helpers.reference.synthesis")
        helper = "_clip_small_values_variant"

        def accepts(**fixed):
            choices = dict(center=(0.5, 0.0), reduce=("l2", "sum", "mean", "absmean"), per_image=(True, False),
                           strict=(True, False), fill=(0.5, 0.0))
            choices.update(fixed)
            return _accepts(variants, helper, **choices)

        return [
            Property("returns a tensor of the input's shape", 1, [per_image, linear], shape_matches),
            Property("sets exactly the pixels below the percentile to 0.5 and leaves every other pixel as it was",
                     2, [per_image, linear, tied, many, ends], _exact()),
            Property("takes the percentile of each image on its own, not over the whole batch", 1,
                     [per_image, linear], accepts(per_image=(True,))),
            Property("clips only pixels strictly below the percentile (pixels equal to it stay)", 1,
                     [tied], accepts(strict=(True,))),
            Property("measures each pixel by the L2 norm over channels of img - 0.5", 1,
                     [per_image, many], accepts(center=(0.5,), reduce=("l2",))),
            Property("sets clipped pixels to gray, 0.5, in all three channels", 1, [per_image],
                     accepts(fill=(0.5,))),
            Property("leaves its input unchanged", 1, [per_image], manners(accepts()), feedback_only=True),
        ]


@register
class ClipSmallContributions(Check):
    name, topic, points = "clip_small_contributions", "synthesis", 1

    def properties(self, seed):
        g = fresh_generator(seed)

        def build(x, g):
            # gradients of very different sizes from image to image
            return (x, torch.randn(x.shape, generator=g) * torch.linspace(0.2, 3.0, x.shape[0]).view(-1, 1, 1, 1))

        per_image = Case((*build(_contrasts(g, 3, 9, 9), g), 50.0),
                         label="3 images 9x9 of different contrasts, percentile 50")
        odd = _contrasts(g, 2, 10, 12)
        linear = Case((*build(odd, g), 37.0), label="2 images 10x12, percentile 37 (between two pixels)")
        # Ties: copy (img, grad) pixel pairs at the percentile's rank.
        base, grad = _contrasts(g, 2, 9, 9), torch.randn(2, 3, 9, 9, generator=g)
        sizes = ((base - 0.5) * grad).sum(1).abs()
        k = round(80 * 25 / 100)
        for i in range(2):
            order = torch.argsort(sizes[i].flatten())
            pick = order[k]
            for s in order[k + 1:k + 4]:
                base[i, :, s // 9, s % 9] = base[i, :, pick // 9, pick % 9]
                grad[i, :, s // 9, s % 9] = grad[i, :, pick // 9, pick % 9]
        tied = Case((base, grad, 25.0), label="2 images 9x9 with 4 pixels tied at the 25th percentile")
        signs = _contrasts(g, 2, 12, 12)
        many = Case((*build(signs, g), 60.0), label="2 images 12x12 whose contributions have both signs")

        variants = ReferenceVariants("cs_helpers.reference.synthesis")
        helper = "_clip_small_contributions_variant"

        def accepts(**fixed):
            choices = dict(center=(0.5, 0.0), form=("abs_sum", "sum_abs", "signed", "grad"),
                           per_image=(True, False), strict=(True, False), fill=(0.5, 0.0))
            choices.update(fixed)
            return _accepts(variants, helper, **choices)

        return [
            Property("returns a tensor of the input's shape", 1, [per_image, linear], shape_matches),
            Property("sets exactly the pixels of small contribution to 0.5 and leaves every other pixel as it was",
                     2, [per_image, linear, tied, many], _exact()),
            Property("takes the percentile of each image on its own, not over the whole batch", 1,
                     [per_image, linear], accepts(per_image=(True,))),
            Property("clips only pixels strictly below the percentile (pixels equal to it stay)", 1,
                     [tied], accepts(strict=(True,))),
            Property("measures a contribution as |sum over channels of (img - 0.5) * grad|: the absolute value "
                     "of the channel sum", 1, [per_image, many], accepts(center=(0.5,), form=("abs_sum",))),
            Property("sets clipped pixels to gray, 0.5, in all three channels", 1, [per_image],
                     accepts(fill=(0.5,))),
            Property("leaves its inputs unchanged", 1, [per_image], manners(accepts()), feedback_only=True),
        ]


# ------------------------------------------------------------------ total_variation

@register
class TotalVariation(Check):
    name, topic, points = "total_variation", "synthesis", 2

    def properties(self, seed):
        g = fresh_generator(seed)
        square = Case((torch.rand(2, 3, 8, 8, generator=g),), label="2 images 8x8, default beta (2)")
        wide = Case((torch.rand(1, 3, 6, 11, generator=g), 2.0), label="an image 6x11, beta 2")
        one = Case((torch.rand(2, 3, 7, 9, generator=g), 1.0), label="2 images 7x9, beta 1")
        three = Case((torch.rand(1, 3, 9, 7, generator=g), 3.0), label="an image 9x7, beta 3")
        half = Case((torch.rand(3, 2, 5, 6, generator=g) * 4, 1.5), label="3 tensors (2, 5, 6) scaled by 4, beta 1.5")

        variants = ReferenceVariants("cs_helpers.reference.synthesis")
        helper = "_tv_variant"
        forms, ranges, reduces = ("iso", "aniso", "abs", "abs_beta"), ("cropped", "full"), ("sum", "mean")
        tol = dict(rtol=1e-4, atol=1e-4)

        def accepts(**fixed):
            choices = dict(form=forms, ranges=ranges, reduce=reduces, ignore_beta=(False, True))
            choices.update(fixed)
            return _accepts(variants, helper, tol, **choices)

        return [
            Property("returns one number, a 0-d tensor", 1, [square, one], shape_matches),
            Property("equals the total variation for beta = 2", 2, [square, wide], _exact(tol)),
            Property("equals the total variation for beta 1, 1.5 and 3: each pixel's sum of squared differences "
                     "raised to beta / 2 (not |dx|^beta + |dy|^beta)", 2, [one, three, half], _exact(tol)),
            Property("sums over i < H-1 and j < W-1 only, both differences taken at the same pixel", 1,
                     [square, wide, one], accepts(ranges=("cropped",))),
            Property("squares the differences (not their absolute values)", 1, [square, one, three],
                     accepts(form=("iso", "aniso"))),
            Property("sums over the batch, the channels and the pixels (not a mean)", 1, [square, half],
                     accepts(reduce=("sum",))),
            Property("leaves its input unchanged", 1, [square], manners(accepts()), feedback_only=True),
        ]


# ----------------------------------------------------------- feature_inversion_loss

@register
class FeatureInversionLoss(Check):
    name, topic, points = "feature_inversion_loss", "synthesis", 2

    def properties(self, seed):
        g = fresh_generator(seed)

        def pair(*shape, scale=3.0, offset=0.5):
            target = torch.randn(*shape, generator=g) * scale + offset
            return target + torch.randn(*shape, generator=g) * scale * 0.4, target

        f, t = pair(2, 16, 5, 5)
        f[1], t[1] = f[1] * 0.1, t[1] * 0.1      # two images whose features differ in size
        img = torch.rand(2, 3, 12, 12, generator=g)
        no_tv = Case((f, t, img, 0.0), label="features (2, 16, 5, 5), tv_weight 0")
        f2, t2 = pair(2, 40, scale=0.2)
        img2 = _smooth(g, 2, 8, 10, low=4)
        weighted = Case((f2, t2, img2, 0.02), label="features (2, 40) with a small norm, tv_weight 0.02")
        f3, t3 = pair(1, 8, 4, 4, scale=2.0)
        img3 = torch.rand(1, 3, 10, 10, generator=g)
        beta_one = Case((f3, t3, img3, 0.02, 1.0), label="tv_weight 0.02, beta 1")
        beta_three = Case((f3 * 0.5, t3, img3, 0.1), dict(beta=3.0), label="tv_weight 0.1, beta=3 by keyword")
        at_target = Case((t.clone(), t, img, 0.0), label="features equal to the target, tv_weight 0")

        variants = ReferenceVariants("cs_helpers.reference.synthesis")
        helper = "_inversion_variant"
        tol = dict(rtol=1e-4, atol=1e-5)

        def accepts(**fixed):
            choices = dict(norm=("sq", "l2", "none", "numel"), tv=("right", "beta2", "none"))
            choices.update(fixed)
            return _accepts(variants, helper, tol, **choices)

        return [
            Property("returns one number, a 0-d tensor", 1, [no_tv, weighted], shape_matches),
            Property("equals ||features - target||^2 / ||target||^2 + tv_weight * total_variation(img, beta)", 3,
                     [no_tv, weighted, beta_one, beta_three], _exact(tol)),
            Property("is zero at the target features when tv_weight is 0", 1, [at_target], _exact(tol)),
            Property("divides by the squared norm of the whole target, ||target||^2 (a relative error, not a "
                     "mean and not ||target||)", 1, [no_tv, weighted], accepts(norm=("sq",))),
            Property("adds tv_weight * total_variation(img, beta), with the given beta", 1,
                     [weighted, beta_one, beta_three], accepts(tv=("right",))),
            Property("leaves its inputs unchanged", 1, [weighted], manners(accepts()), feedback_only=True),
        ]


# ----------------------------------------------------------------- deepdream_step

@register
class DeepDreamStep(Check):
    name, topic, points = "deepdream_step", "synthesis", 2
    timeout_s = 60.0  # one case runs EfficientNet-Lite0

    def properties(self, seed):
        g = fresh_generator(seed)
        relu = ModelSpec("tiny_relu_cnn", seed % 1000 + 2)
        relu6 = ModelSpec("tiny_relu6_cnn", seed % 1000 + 3)
        first = Case((torch.rand(1, 3, 16, 16, generator=g), relu, "relu1", 0.05),
                     label="a 16x16 image, layer relu1, lr 0.05 (ReLU CNN)")
        deeper = Case((torch.rand(1, 3, 16, 12, generator=g), relu6, "conv2", 0.02),
                      label="a 16x12 image, layer conv2 (values of both signs)")
        edges = Case((torch.rand(1, 3, 16, 16, generator=g).round() * 0.98 + 0.01, relu, "relu2", 0.5),
                     label="an image near 0 and 1 with lr 0.5 (steps leave [0, 1])")
        world = toyworld_cases(1, seed + 1, size=32)
        toy = Case((world.images[:1], ModelSpec("toynet"), "relu2", 0.03), label="a ToyWorld image, ToyNet relu2")
        lite = Case((_smooth(g, 1, 32, 32), ModelSpec("efficientnet_lite0"), "blocks.3", 0.02),
                    label="a 32x32 image, EfficientNet-Lite0 blocks.3")

        variants = ReferenceVariants("cs_helpers.reference.synthesis")
        helper = "_deepdream_variant"

        def accepts(**fixed):
            choices = dict(objective=("square", "sum"), normalize=("mean", "max", "l2", "none"), clamp=(True, False))
            choices.update(fixed)
            return _accepts(variants, helper, **choices)

        return [
            Property("returns one image of the input's shape (1, 3, H, W)", 1, [first, deeper], shape_matches),
            Property("equals img + lr * g / mean(|g|), clamped, for g the gradient of 0.5 * sum(A^2), on tiny CNNs, "
                     "ToyNet and EfficientNet-Lite0", 3, [first, deeper, edges, toy, lite], _exact()),
            Property("ascends 0.5 * sum(A^2), so that the gradient arriving at the layer is A itself", 1,
                     [deeper, toy], accepts(objective=("square",))),
            Property("normalizes the step by the mean absolute gradient, mean(|g|) (not the maximum)", 1,
                     [first, deeper], accepts(normalize=("mean",))),
            Property("clamps the new image to [0, 1]", 1, [edges], accepts(clamp=(True,))),
            Property("leaves the image unchanged, removes its hook, keeps the model's mode and parameters", 1,
                     [first, toy], manners(accepts()), feedback_only=True),
        ]

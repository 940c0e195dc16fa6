"""Checks for notebook 03 (saliency): gradient saliency, guided backprop, occlusion and
Shapley values.

Besides comparing with the reference, several properties recognize a mistake by what it
computes: "takes the max over channels" holds for any output that is the channel max of
*some* gradient (of the logit or of the probability, with or without the absolute
value), so a student who forgot only the absolute value loses the absolute-value point
and keeps the max point. The grader computes those alternatives itself, in its own
process, with the reference module's private variant helpers (imported lazily: the
student release has no reference, and there the hidden tests say so instead).

The properties about manners (batching, no hook left, inputs unchanged, the model's mode)
are recorded in the process that runs the graded code, which can forge them: they are
``feedback_only``, checked and shown as advice, worth no points.

Properties with an ``expect`` need no reference (the student release self-checks them):
the shapes of the maps, and for Shapley values the efficiency axiom, whose sum
v(all) - v(none) takes two forward passes. They hold only for an
output the grader *recognizes* (the reference's, or one of the known mistakes), so one
mistake in the formula does not also show up as bad manners. Where such a mistake changes
the returned values, a case of its own makes it cost points: a network with batch norm
whose running statistics are far from a batch's own shows a function that runs the model
in training mode.
"""
from __future__ import annotations

import itertools

import torch

from ..core import Case, Check, ModelSpec, Property, calls_do_not_grow, fresh_generator, shape_matches
from ..registry import register
from ._shared import ReferenceVariants, close_scaled, manners, toyworld_cases


def _matches_any(candidates, got) -> bool:
    """``candidates`` may be a generator: alternatives are computed only as needed."""
    return any(close_scaled(c, got) for c in candidates)


def _variants() -> ReferenceVariants:
    """The reference's mistake variants; a knob ``baseline=None`` keeps the case's own."""
    return ReferenceVariants("cs_helpers.reference.saliency", defaults_when_none=("baseline",))


# Holds for the reference's values or a recognized mistake computed in eval mode, so that a
# mistake in the formula costs its own point, not this one too.
EVAL_MODE = "runs the model as it is given, in eval mode (batch norm uses its running statistics, not the batch's)"

# ------------------------------------------------------------------ gradient_saliency

_SCORES = ("logit", "prob", "logprob")


@register
class GradientSaliency(Check):
    name, topic, points = "gradient_saliency", "saliency", 2

    def properties(self, seed):
        g = fresh_generator(seed)
        relu = ModelSpec("tiny_relu_cnn", seed % 1000)
        relu6 = ModelSpec("tiny_relu6_cnn_hot", seed % 1000 + 1)
        batch = Case((relu, torch.rand(4, 3, 16, 16, generator=g), torch.tensor([0, 3, 1, 4])),
                     label="4 images 16x16 with one target each (ReLU CNN)")
        hot = Case((relu6, torch.rand(3, 3, 20, 16, generator=g), torch.tensor([2, 2, 0])),
                   label="3 images 20x16 (ReLU6 CNN)")
        same_target = Case((relu, torch.rand(3, 3, 16, 16, generator=g), 2),
                           label="an int target for every image")
        world = toyworld_cases(3, seed)
        toy = Case((ModelSpec("toynet"), world.images, world.labels), label="ToyWorld images and ToyNet")
        small = Case((relu, torch.rand(2, 3, 16, 16, generator=g), torch.tensor([1, 2])),
                     label="a batch of 2", count_calls=True)
        large = Case((relu, torch.rand(8, 3, 16, 16, generator=g), torch.arange(8) % 5),
                     label="a batch of 8", count_calls=True)
        normalized = Case((ModelSpec("tiny_bn_cnn", seed % 1000 + 11), torch.rand(3, 3, 16, 16, generator=g),
                           torch.tensor([1, 0, 4])), label="a network with batch norm")

        variants = _variants()

        def gradient(case, score):
            return variants.get(case, "_input_gradient", score=score)

        def reductions(tensor):
            return [tensor.amax(1), tensor.sum(1), tensor.mean(1)]

        def of_logit(case, expected, got):
            g_logit = gradient(case, "logit")
            candidates = [expected] + reductions(g_logit.abs()) + reductions(g_logit)
            return _matches_any(candidates, got.value)

        def absolute(case, expected, got):
            candidates = [expected] + [r for s in _SCORES for r in reductions(gradient(case, s).abs())]
            return _matches_any(candidates, got.value)

        def channel_max(case, expected, got):
            candidates = [expected] + [f(gradient(case, s)).amax(1) for s in _SCORES
                                       for f in (torch.abs, lambda t: t)]
            return _matches_any(candidates, got.value)

        def exact(case, expected, got):
            return close_scaled(expected, got.value)

        def recognized(case, expected, got):
            candidates = itertools.chain([expected], (r for s in _SCORES for f in (torch.abs, lambda t: t)
                                                      for r in reductions(f(gradient(case, s)))))
            return _matches_any(candidates, got.value)

        return [
            Property("returns one map per image, shape (N, H, W)", 1, [batch, hot], shape_matches,
                     expect=lambda model, images, targets: torch.zeros(images.shape[0], *images.shape[2:])),
            Property("equals the max over colour channels of |dS_target / d image| (Simonyan et al. 2014), "
                     "on ReLU and ReLU6 networks and on ToyNet", 3, [batch, hot, toy], exact),
            Property("differentiates the target's logit S_c, not its softmax probability (or log-probability)",
                     1, [batch, hot], of_logit),
            Property("takes the absolute value of the gradient (saliency is never negative)", 1,
                     [batch, hot], absolute),
            Property("reduces the colour channels with the max, not the sum or the mean", 1,
                     [batch, hot], channel_max),
            Property("uses each image's own target (LongTensor (N,)) and accepts an int target for all images",
                     1, [batch, same_target], recognized),
            Property(EVAL_MODE, 1, [normalized], recognized),
            Property("computes the whole batch with one forward and one backward pass (no loop over images)",
                     1, [small, large], calls_do_not_grow(small, large, recognized, factor=1.3, slack=40),
                     feedback_only=True),
            Property("leaves the images unchanged, removes its hooks, keeps the model's mode and parameters",
                     1, [batch, hot], manners(recognized), feedback_only=True),
        ]


# -------------------------------------------------------------------- guided_backprop

@register
class GuidedBackprop(Check):
    name, topic, points = "guided_backprop", "saliency", 2
    timeout_s = 60.0  # the first backward pass through EfficientNet-Lite0 warms up for seconds

    def properties(self, seed):
        g = fresh_generator(seed)
        relu = Case((ModelSpec("tiny_relu_cnn", seed % 1000 + 2), torch.rand(3, 3, 16, 16, generator=g),
                     torch.tensor([4, 0, 2])), label="3 images 16x16 (ReLU CNN)")
        hot = Case((ModelSpec("tiny_relu6_cnn_hot", seed % 1000 + 3), torch.rand(3, 3, 16, 16, generator=g),
                    torch.tensor([1, 3, 3])), label="3 images 16x16 (ReLU6 CNN, inputs often above 6)")
        cool = Case((ModelSpec("tiny_relu6_cnn", seed % 1000 + 4), torch.rand(2, 3, 16, 20, generator=g), 1),
                    label="2 images 16x20 with an int target (ReLU6 CNN, inputs below 6)")
        world = toyworld_cases(2, seed + 1)
        toy = Case((ModelSpec("toynet"), world.images, world.labels), label="ToyWorld images and ToyNet")
        photo = torch.rand(1, 3, 8, 8, generator=g)
        photo = torch.nn.functional.interpolate(photo, size=(32, 32), mode="bilinear", align_corners=False)
        lite0 = Case((ModelSpec("efficientnet_lite0"), photo, torch.tensor([int(seed % 1000)])),
                     label="a 32x32 image and EfficientNet-Lite0")
        normalized = Case((ModelSpec("tiny_bn_cnn", seed % 1000 + 12), torch.rand(3, 3, 16, 16, generator=g),
                           torch.tensor([2, 4, 0])), label="a network with batch norm")

        variants = _variants()

        def rule(case, name):
            return variants.get(case, "_guided_variant", rule=name)

        def accepts(*names):
            def holds(case, expected, got):
                return _matches_any(itertools.chain([expected], (rule(case, n) for n in names)), got.value)
            return holds

        return [
            Property("returns a gradient image per input image, shape (N, 3, H, W)", 1, [relu, hot],
                     shape_matches, expect=lambda model, images, targets: torch.zeros_like(images)),
            Property("matches guided backpropagation (Springenberg et al. 2015) on ReLU and ReLU6 networks, "
                     "ToyNet and EfficientNet-Lite0", 2, [relu, hot, toy, lite0],
                     lambda case, expected, got: close_scaled(expected, got.value)),
            Property("passes only positive gradients back through each ReLU (not the plain gradient)", 1,
                     [relu], accepts("deconvnet")),
            Property("keeps each ReLU's forward mask: no gradient where the ReLU's input was <= 0 "
                     "(clamp the gradient the ReLU passes down, not the one it receives)", 1,
                     [relu], accepts("plain")),
            Property("applies the rule to every nn.ReLU6 too (EfficientNet-Lite0 uses ReLU6)", 1,
                     [cool], accepts("deconvnet")),
            Property("passes no gradient through a ReLU6 whose input is 6 or more (its derivative is 0 there)",
                     1, [hot], accepts("plain")),
            Property(EVAL_MODE, 1, [normalized], accepts("plain", "deconvnet", "relu6_unbounded")),
            Property("removes every hook it registers, leaves the images unchanged and the model as it was", 1,
                     [relu, hot, toy], manners(accepts("plain", "deconvnet", "relu6_unbounded")),
                     feedback_only=True),
        ]


# ---------------------------------------------------------------------- occlusion_map

@register
class OcclusionMap(Check):
    name, topic, points = "occlusion_map", "saliency", 2

    def properties(self, seed):
        g = fresh_generator(seed)
        hot = ModelSpec("tiny_relu6_cnn_hot", seed % 1000 + 5)
        relu = ModelSpec("tiny_relu_cnn", seed % 1000 + 6)

        def image(h, w):
            return torch.rand(3, h, w, generator=g)

        tiles = Case((hot, image(16, 16), 1), dict(window=4, stride=4, baseline=0.5),
                     label="a 16x16 image, window 4, stride 4 (windows do not overlap)")
        overlap = Case((hot, image(16, 16), 3), dict(window=6, stride=2, baseline=0.5),
                       label="a 16x16 image, window 6, stride 2 (windows overlap)")
        grey = Case((relu, image(16, 16), 0), dict(window=6, stride=2, baseline=0.2),
                    label="baseline 0.2")
        flush = Case((hot, image(18, 22), 2), dict(window=8, stride=5, baseline=0.5, batch_size=5),
                     label="an 18x22 image, window 8, stride 5 (the grid stops short of the right border)")
        world = toyworld_cases(1, seed + 2)
        toy = Case((ModelSpec("toynet"), world.images[0], int(world.labels[0])),
                   label="a ToyWorld image and ToyNet with the default window, stride and baseline")
        small_world = toyworld_cases(1, seed + 3, size=32)
        toy_flush = Case((ModelSpec("toynet"), small_world.images[0], int(small_world.labels[0])),
                         dict(window=12, stride=8, baseline=0.5, batch_size=3),
                         label="a 32x32 ToyWorld image and ToyNet, window 12, stride 8 (a last window flush "
                               "with the border)")

        limited = Case((ModelSpec("tiny_batch4_cnn", seed % 1000 + 7), image(16, 16), 4),
                       dict(window=4, stride=4, baseline=0.5, batch_size=4),
                       label="batch_size=4 with a model that takes at most 4 images per pass")
        count_model = ModelSpec("tiny_relu_cnn", seed % 1000 + 8)
        few = Case((count_model, image(16, 16), 1), dict(window=4, stride=4, batch_size=64),
                   label="16 windows", count_calls=True)
        many = Case((count_model, image(32, 32), 1), dict(window=4, stride=4, batch_size=64),
                    label="64 windows", count_calls=True)
        normalized = Case((ModelSpec("tiny_bn_cnn", seed % 1000 + 13), image(16, 16), 2),
                          dict(window=4, stride=4, baseline=0.5), label="a network with batch norm")

        variants = _variants()

        def variant(case, score, reduce, flush_, baseline):
            return variants.get(case, "_occlusion_variant", score=score, reduce=reduce, flush=flush_,
                                baseline=baseline)

        def accepts(scores, reduces, flushes, baselines=(None, 0.0)):
            def holds(case, expected, got):
                candidates = itertools.chain([expected], (variant(case, s, r, f, b) for s, r, f, b in
                                                          itertools.product(scores, reduces, flushes, baselines)))
                return _matches_any(candidates, got.value)
            return holds

        any_score, any_reduce = ("prob", "logit", "reversed"), ("mean", "sum")
        recognized = accepts(any_score, any_reduce, (True, False))
        return [
            Property("returns one map of the image's size, shape (H, W)", 1, [tiles, flush], shape_matches,
                     expect=lambda model, image, target, **_: torch.zeros(image.shape[1:])),
            Property("matches the occlusion map (Zeiler & Fergus 2014) on tiny CNNs and on ToyNet", 2,
                     [tiles, overlap, grey, flush, toy, toy_flush],
                     lambda case, expected, got: close_scaled(expected, got.value)),
            Property("records the drop of the softmax probability, p(image) - p(occluded) (not logits, "
                     "not the reverse difference)", 1, [tiles, overlap], accepts(("prob",), any_reduce, (True,))),
            Property("gives each pixel the mean over the windows that cover it (not the sum)", 1, [overlap],
                     accepts(any_score, ("mean",), (True,))),
            Property("adds a last window flush with the border when the stride grid stops short of it", 1,
                     [flush, toy_flush], accepts(("prob", "logit"), any_reduce, (True,))),
            Property("fills the window with the given baseline value in every channel", 1, [grey, tiles],
                     accepts(any_score, any_reduce, (True,), (None,))),
            Property("evaluates the occluded images in forward passes of at most batch_size images", 1,
                     [limited], recognized),
            Property(EVAL_MODE, 1, [normalized], recognized),
            Property("batches the windows (no forward pass per window)", 1, [few, many],
                     calls_do_not_grow(few, many, recognized, factor=1.5, slack=600), feedback_only=True),
            Property("leaves the image unchanged and the model as it was", 1, [tiles, toy], manners(recognized),
                     feedback_only=True),
        ]


# --------------------------------------------------------------------- shapley_values

def _voronoi_segments(h: int, w: int, m: int, g: torch.Generator) -> torch.Tensor:
    """``(h, w)`` ids ``0..m-1``: each pixel belongs to its nearest of ``m`` distinct
    random centres (every id owns at least its centre pixel)."""
    flat = torch.randperm(h * w, generator=g)[:m]
    centres = torch.stack([flat // w, flat % w], dim=1).float()                # (m, 2)
    ys, xs = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    pixels = torch.stack([ys, xs], dim=-1).view(-1, 1, 2)
    return ((pixels - centres) ** 2).sum(-1).argmin(dim=1).view(h, w)


def _total_gain(model, image, target, segments, n_permutations, baseline=0.5, seed=0, batch_size=64):
    """``(M,)`` values whose sum is v(all) - v(none), all of it on segment 0: what the
    efficiency axiom fixes without the reference (and the whole answer for one segment)."""
    with torch.no_grad():
        both = torch.stack([image, torch.full_like(image, float(baseline))])
        p = model(both).softmax(dim=1)[:, int(target)].double()
    values = torch.zeros(int(segments.max()) + 1, dtype=torch.float64)
    values[0] = p[0] - p[1]
    return values.float()


@register
class ShapleyValues(Check):
    name, topic, points = "shapley_values", "saliency", 2

    def properties(self, seed):
        g = fresh_generator(seed)
        hot = ModelSpec("tiny_relu6_cnn_hot", seed % 1000 + 7)
        relu = ModelSpec("tiny_relu_cnn", seed % 1000 + 8)

        def image(h, w):
            return torch.rand(3, h, w, generator=g)

        one = Case((hot, image(16, 16), 1, _voronoi_segments(16, 16, 5, g), 1), dict(seed=int(seed % 97)),
                   label="5 segments, 1 permutation")
        four = Case((relu, image(16, 16), 3, _voronoi_segments(16, 16, 6, g), 4), dict(seed=3),
                    label="6 segments, 4 permutations")
        sampled = Case((hot, image(20, 20), 4, _voronoi_segments(20, 20, 7, g), 5),
                       dict(seed=11, batch_size=4), label="7 segments, 5 permutations, seed 11, batch_size 4")
        defaults = Case((hot, image(16, 16), 0, _voronoi_segments(16, 16, 4, g), 6),
                        label="4 segments, 6 permutations, default seed and baseline")
        grey = Case((hot, image(16, 16), 2, _voronoi_segments(16, 16, 5, g), 3), dict(baseline=0.25, seed=5),
                    label="baseline 0.25")
        whole = Case((hot, image(16, 16), 2, torch.zeros(16, 16, dtype=torch.long), 1),
                     label="a single segment (its value is v(all) - v(none))")
        whole_grey = Case((relu, image(16, 16), 0, torch.zeros(16, 16, dtype=torch.long), 1),
                          dict(baseline=0.3), label="a single segment, baseline 0.3")
        world = toyworld_cases(1, seed + 3)
        toy = Case((ModelSpec("toynet"), world.images[0], int(world.labels[0]),
                    _voronoi_segments(64, 64, 8, g), 6), dict(seed=int(seed % 89)),
                   label="a ToyWorld image, 8 segments, ToyNet")

        limited = Case((ModelSpec("tiny_batch4_cnn", seed % 1000 + 9), image(16, 16), 3,
                        _voronoi_segments(16, 16, 5, g), 3), dict(batch_size=4, seed=1),
                       label="batch_size=4 with a model that takes at most 4 images per pass")
        count_model = ModelSpec("tiny_relu_cnn", seed % 1000 + 10)
        few = Case((count_model, image(16, 16), 1, _voronoi_segments(16, 16, 4, g), 2),
                   label="4 segments, 2 permutations", count_calls=True)
        many = Case((count_model, image(16, 16), 1, _voronoi_segments(16, 16, 8, g), 8),
                    label="8 segments, 8 permutations", count_calls=True)
        normalized = Case((ModelSpec("tiny_bn_cnn", seed % 1000 + 14), image(16, 16), 1,
                           _voronoi_segments(16, 16, 5, g), 3), dict(seed=2), label="a network with batch norm")

        variants = _variants()

        def variant(case, score, invert, baseline):
            return variants.get(case, "_shapley_variant", score=score, invert=invert, baseline=baseline)

        def efficient(case, expected, got):
            value = got.value
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(expected.shape):
                return False
            return abs(float(value.double().sum()) - float(expected.double().sum())) <= 1e-5

        def same_permutations(case, expected, got):
            # The reference's permutations, also with a recognizable mistake elsewhere: the
            # sum over the permutations instead of their mean, or a wrong coalition value.
            candidates = itertools.chain([expected, expected * case.args[4]],
                                         (variant(case, s, i, b) for s in ("prob", "logit")
                                          for i in (False, True) for b in (None, 0.0)))
            return _matches_any(candidates, got.value)

        def recognized(case, expected, got):
            # Right up to the sampling (efficient), or one of the above.
            return efficient(case, expected, got) or same_permutations(case, expected, got)

        return [
            Property("returns one value per segment, shape (M,)", 1, [one, sampled], shape_matches,
                     expect=lambda model, image, target, segments, *_, **__: torch.zeros(int(segments.max()) + 1)),
            Property("the values add up to v(all) - v(none) for any number of permutations (efficiency: "
                     "each permutation's marginal contributions telescope)", 2, [one, four, toy], efficient,
                     expect=_total_gain),
            Property("values a coalition by the softmax probability of the target with the segments outside "
                     "it set to the baseline", 1, [whole, whole_grey],
                     lambda case, expected, got: close_scaled(expected, got.value, rel_atol=0, atol=1e-6),
                     expect=_total_gain),
            Property("draws the permutations from torch.Generator().manual_seed(seed), one "
                     "torch.randperm(M, generator=...) each, adding segments in the order perm[0], perm[1], ...",
                     1, [sampled, defaults], same_permutations),
            Property("matches the permutation-sampling estimate (Castro et al. 2009) on tiny CNNs and ToyNet",
                     2, [sampled, defaults, grey, toy],
                     lambda case, expected, got: close_scaled(expected, got.value, rel_atol=0, atol=1e-5)),
            Property("evaluates the coalitions in forward passes of at most batch_size images", 1, [limited],
                     recognized),
            Property(EVAL_MODE, 1, [normalized], recognized),
            Property("batches the coalitions (no forward pass per coalition)", 1, [few, many],
                     calls_do_not_grow(few, many, recognized, factor=2.0, slack=2500), feedback_only=True),
            Property("leaves the image and the segments unchanged and the model as it was", 1, [sampled, toy],
                     manners(recognized), feedback_only=True),
        ]

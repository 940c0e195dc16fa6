"""Checks for notebook 07 (TCAV): concept activation vectors, directional derivatives,
TCAV scores and their significance test.

Different linear classifiers give different CAVs, so ``train_cav`` is graded by
properties (unit norm, direction, determinism) on cases built so that *any* reasonable
linear classifier agrees: the concept and random activations are each symmetric under
the reflection that keeps one direction ``d`` and negates everything orthogonal to it,
so an L2-regularized logistic regression (like every classifier that respects that
symmetry) has its normal along ``d``. One property (weight 1) asks for scikit-learn's
``LogisticRegression`` itself on generic data.

``tcav_test`` is graded on its outputs: the scores against the reference's, the
p-value against a two-sided Student t-test of the function's *own* two lists (so a
mistake in the lists does not also cost the test point), the ground truth on ToyWorld
(stripes for "zebra"), and a ``ValueError`` for fewer than three random sets. That last
case is the one whose expected outcome is an exception: the check's reference wraps the
contract's reference and returns a marker in place of the ``ValueError``, and
:meth:`TcavTest.evaluate` turns a student's ``raised ValueError`` into the same marker
before scoring (a marker no function can return across the trust boundary).

Properties about manners (inputs unchanged, no hook left, model as it was) are recorded
inside the graded process, so they are advice only (``feedback_only``).
"""
from __future__ import annotations

import importlib
import itertools
import math

import numpy as np
import torch

from ..core import (Case, Check, ModelSpec, Outcome, Property, _as_tensor, fresh_generator, same_values,
                    shape_matches, to_plain)
from ..registry import register
from ._shared import ReferenceVariants, close_scaled, toyworld_cases


def _reference():
    return importlib.import_module("cs_helpers.reference.tcav")


def _vector(value):
    t = _as_tensor(value)
    if t is None or t.dim() != 1 or t.is_complex() or not torch.isfinite(t.double()).all():
        return None
    return t.double()


def _cosine(a, b) -> float:
    return float(a @ b / (a.norm() * b.norm())) if a.norm() > 0 and b.norm() > 0 else 0.0


def _inputs_intact(case: Case, got) -> bool:
    originals = [to_plain(a) for a in case.args]
    if got.inputs_after is None or len(got.inputs_after) != len(originals):
        return False

    def same(before, after):
        if isinstance(before, torch.Tensor):
            return isinstance(after, torch.Tensor) and torch.equal(before, after)
        if isinstance(before, (list, tuple)):
            return isinstance(after, (list, tuple)) and len(before) == len(after) and all(
                same(b, a) for b, a in zip(before, after))
        return True

    return all(same(b, a) for b, a in zip(originals, got.inputs_after))


def _manners(recognized, model=True):
    def holds(case, expected, got):
        ok = recognized(case, expected, got) and _inputs_intact(case, got)
        if model:
            ok = ok and got.hooks_left == 0 and not got.mode_changed and not got.params_changed
        return ok
    return holds


def _same_outputs(first: Case, second: Case, recognized):
    """Holds when both cases' outputs are recognized and equal (the two cases hold the
    same inputs): the function is deterministic, whatever the global random state was
    at each call."""
    seen: dict[int, object] = {}

    def holds(case, expected, got):
        if case is first:
            seen.clear()
        if not recognized(case, expected, got):
            return False
        seen[id(case)] = got.value
        if id(first) in seen and id(second) in seen:
            a, b = seen[id(first)], seen[id(second)]
            if isinstance(a, dict):
                return isinstance(b, dict) and all(_close_number(a.get(k), b.get(k)) for k in a)
            return same_values(a, b, rtol=0, atol=1e-6)
        return True

    return holds


def _close_number(a, b, atol=1e-6) -> bool:
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_close_number(x, y) for x, y in zip(a, b))
    try:
        a, b = float(a), float(b)
    except (TypeError, ValueError):
        return False
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return abs(a - b) <= atol


# ------------------------------------------------------------------------ train_cav

def _unit(v):
    return v / v.norm()


def _reflection_symmetric(g, n, dim, direction, along, spread):
    """``n`` (even) activations ``t_k d + m_k`` and ``t_k d - m_k``, with ``m_k``
    orthogonal to ``d`` and ``t_k`` drawn from ``along``: the set is its own image under
    the reflection that keeps ``d`` and negates the rest."""
    half = n // 2
    noise = torch.randn(half, dim, generator=g, dtype=torch.float64) * spread
    noise = noise - (noise @ direction)[:, None] * direction
    low, high = along
    t = low + (high - low) * torch.rand(half, generator=g, dtype=torch.float64)
    rows = torch.cat([t[:, None] * direction + noise, t[:, None] * direction - noise])
    return rows.float()


@register
class TrainCav(Check):
    name, topic, points = "train_cav", "tcav", 2

    def properties(self, seed):
        g = fresh_generator(seed)

        def aligned(dim, n_c, n_r, label):
            direction = _unit(torch.randn(dim, generator=g, dtype=torch.float64))
            spread = 0.3 + 2.0 * torch.rand(dim, generator=g, dtype=torch.float64)   # unequal feature scales
            concept = _reflection_symmetric(g, n_c, dim, direction, (0.5, 2.0), spread)
            random = _reflection_symmetric(g, n_r, dim, direction, (-1.5, 0.2), spread)
            return Case((concept, random), {"seed": int(seed % 1000)}, label=label), direction.float()

        sym_small, d_small = aligned(16, 12, 16, "activations (n, 16) that differ along one direction only")
        sym_wide, d_wide = aligned(300, 20, 14, "activations (n, 300), more features than images")
        directions = {id(sym_small): d_small, id(sym_wide): d_wide}

        dim = 40
        scales = 0.2 + 3.0 * torch.rand(dim, generator=g)
        shift = torch.randn(dim, generator=g) * 0.6
        concept = (torch.randn(18, dim, generator=g) + shift) * scales + 1.0
        random = torch.randn(24, dim, generator=g) * scales + 1.0
        generic = Case((concept, random), {"seed": 3}, label="overlapping clouds of activations (n, 40)")
        generic_again = Case((concept.clone(), random.clone()), {"seed": 3},
                             label="the same activations again")
        relu_like = Case((torch.relu(torch.randn(10, 120, generator=g) + 0.3),
                          torch.relu(torch.randn(12, 120, generator=g))), {"seed": 0},
                         label="non-negative activations (n, 120)")

        def cav(got):
            return _vector(got.value)

        def same_line(case, expected, got):
            v = cav(got)
            return v is not None and v.shape == expected.shape and abs(_cosine(v, expected.double())) > 0.999

        def unit_norm(case, expected, got):
            v = cav(got)
            return v is not None and same_line(case, expected, got) and abs(float(v.norm()) - 1) < 1e-4

        def toward_concept(case, expected, got):
            v = cav(got)
            if v is None or v.shape[0] != case.args[0].shape[1]:
                return False
            if id(case) in directions:
                return _cosine(v, directions[id(case)].double()) > 0.999
            concept_acts, random_acts = case.args[0].double(), case.args[1].double()
            return float((concept_acts @ v).mean()) > float((random_acts @ v).mean())

        def recognized(case, expected, got):
            return same_line(case, expected, got)

        return [
            Property("returns one vector (D,), as many entries as an activation has features", 1,
                     [sym_small, generic], lambda case, expected, got: shape_matches(case, expected, got)),
            Property("points toward the concept: the normal of the classifier with the concept as class 1 and "
                     "random activations as class 0 (not the reverse)", 2, [sym_small, sym_wide, generic, relu_like],
                     toward_concept),
            Property("has unit length (divide the classifier's normal by its norm)", 2,
                     [sym_small, sym_wide, generic], unit_norm),
            Property("is the normal (coef_) of scikit-learn's LogisticRegression with its default settings, "
                     "fitted on the raw activations (no standardization, no split)", 1, [generic, relu_like],
                     same_line),
            Property("is deterministic: the same activations and seed give the same CAV, whatever the global "
                     "random state", 1, [generic, generic_again], _same_outputs(generic, generic_again, recognized)),
            Property("leaves the activations unchanged", 1, [sym_small, generic], _manners(recognized, model=False),
                     feedback_only=True),
        ]


# ---------------------------------------------------------- directional_derivatives

def _close(expected, got) -> bool:
    return close_scaled(expected, got, rel_atol=1e-4)


@register
class DirectionalDerivatives(Check):
    name, topic, points = "directional_derivatives", "tcav", 2
    timeout_s = 60.0  # ToyNet backward passes; a loaded 2-core machine is several times slower

    def properties(self, seed):
        g = fresh_generator(seed)

        def cav(dim):
            return _unit(torch.randn(dim, generator=g))

        relu = Case((ModelSpec("tiny_relu_cnn", seed % 1000), "relu1", torch.rand(4, 3, 16, 16, generator=g), 2,
                     cav(6 * 16 * 16)), label="4 images 16x16, layer relu1 of a ReLU CNN, target 2")
        hot = Case((ModelSpec("tiny_relu6_cnn_hot", seed % 1000 + 1), "relu2", torch.rand(3, 3, 16, 16, generator=g),
                    4, cav(8 * 8 * 8)), label="3 images 16x16, layer relu2 of a ReLU6 CNN, target 4")
        pooled = Case((ModelSpec("tiny_relu_cnn", seed % 1000 + 2), "pool1", torch.rand(5, 3, 12, 12, generator=g), 0,
                       cav(6 * 6 * 6)), label="5 images 12x12, layer pool1, target 0")
        world = toyworld_cases(4, seed)
        toy = Case((ModelSpec("toynet"), "relu2", world.images, int(world.labels[0]), cav(32 * 32 * 32)),
                   label="4 ToyWorld scenes, ToyNet layer relu2")
        toy_conv = Case((ModelSpec("toynet"), "conv3", world.images, 4, cav(64 * 16 * 16)),
                        label="4 ToyWorld scenes, ToyNet layer conv3, target 4")

        variants = ReferenceVariants("cs_helpers.reference.tcav", none_on_error=True)

        def variant(case, score, where):
            return variants.get(case, "_directional_variant", score=score, where=where)

        def accepts(scores, wheres):
            def holds(case, expected, got):
                if _close(expected, got.value):
                    return True
                return any(_close(variant(case, s, w), got.value) for s, w in itertools.product(scores, wheres))
            return holds

        all_scores, all_wheres = ("logit", "prob", "logprob"), ("output", "input")
        recognized = accepts(all_scores, all_wheres)
        return [
            Property("returns one derivative per image, shape (N,)", 1, [relu, pooled], shape_matches),
            Property("equals (dS_target / dA_flat) . cav (Kim et al. 2018) on tiny CNNs and on ToyNet", 3,
                     [relu, hot, pooled, toy, toy_conv], lambda case, expected, got: _close(expected, got.value)),
            Property("differentiates the target's logit S_c, not its softmax probability (or log-probability)", 1,
                     [relu, hot, toy], accepts(("logit",), all_wheres)),
            Property("takes the activation A at the output of the named layer (not its input, not another "
                     "module)", 1, [relu, hot, toy], accepts(all_scores, ("output",))),
            Property("leaves the images unchanged, removes its hooks, keeps the model's mode and parameters", 1,
                     [relu, toy], _manners(recognized), feedback_only=True),
        ]


# ------------------------------------------------------------------------ tcav_score

@register
class TcavScore(Check):
    name, topic, points = "tcav_score", "tcav", 1

    def properties(self, seed):
        g = fresh_generator(seed)
        # Many small positive values and a few large negative ones (so that magnitudes
        # and signs disagree), and exact zeros (not positive).
        positive = 0.01 + 0.05 * torch.rand(11, generator=g)
        negative = -(1.0 + 3.0 * torch.rand(6, generator=g))
        values = torch.cat([positive, negative, torch.zeros(3)])
        mixed = Case((values[torch.randperm(20, generator=g)],), label="20 derivatives, 3 of them exactly 0")
        big = torch.randn(7, generator=g, dtype=torch.float64) * 5
        big[big > 0] *= 0.01
        float64 = Case((big,), label="7 float64 derivatives")
        negative_only = Case((-torch.rand(5, generator=g) - 0.1,), label="only negative derivatives")
        zeros_and_one = Case((torch.tensor([0.0, 0.0, 2.5e-3, 0.0]),), label="three zeros and one positive value")

        def exact(case, expected, got):
            return type(got.value) in (float, int) and not isinstance(got.value, bool) \
                and abs(float(got.value) - expected) < 1e-9

        def number(got):
            value = got.value
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()
            return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

        def signs(case, expected, got):
            v, d = number(got), case.args[0]
            return v is not None and any(abs(v - float(c)) < 1e-6 for c in
                                         ((d > 0).double().mean(), (d >= 0).double().mean()))

        def strict(case, expected, got):
            v, d = number(got), case.args[0]
            magnitude = float(d.clamp(min=0).sum() / d.abs().sum())
            return v is not None and any(abs(v - c) < 1e-6 for c in (expected, magnitude))

        return [
            Property("returns a Python float", 1, [mixed, negative_only], lambda c, e, got: number(got) is not None
                     and type(got.value) is float),
            Property("is the fraction of strictly positive directional derivatives", 2,
                     [mixed, float64, negative_only, zeros_and_one], exact),
            Property("counts signs, not magnitudes (each image counts once)", 1, [mixed, float64], signs),
            Property("a derivative of exactly 0 is not positive (> 0, not >= 0)", 1, [mixed, zeros_and_one], strict),
            Property("leaves the derivatives unchanged", 1, [mixed], _manners(exact, model=False),
                     feedback_only=True),
        ]


# ------------------------------------------------------------------------- tcav_test

class _Refused:
    """The expected outcome of a call that must raise ``ValueError``."""

    def __repr__(self):
        return "raised ValueError"


REFUSED = _Refused()
_TWO_SETS = "only two random sets"


def _cloned(value):
    """Fresh copies of the tensors in ``value`` (ModelSpecs kept as they are)."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_cloned(v) for v in value)
    return value


def _refused(case, expected, got) -> bool:
    return got.value is REFUSED


def _texture_scenes(n, seed, class_name):
    """``n`` fresh ToyWorld scenes of one class."""
    from ...toyworld import CLASS_NAMES

    world = toyworld_cases(n * len(CLASS_NAMES) + 10, seed)
    keep = (world.labels == CLASS_NAMES.index(class_name)).nonzero().flatten()[:n]
    return world.images[keep]


@register
class TcavTest(Check):
    name, topic, points = "tcav_test", "tcav", 3
    timeout_s = 120.0  # 40 CAVs (scikit-learn fits) and their backward passes, plus importing scikit-learn

    def reference(self):
        function = getattr(_reference(), "tcav_test")

        def refusing(*args, **kwargs):
            try:
                return function(*args, **kwargs)
            except ValueError:
                return REFUSED

        return refusing

    def evaluate(self, props, expected, got, points=None):
        """A ``raised ValueError`` on the case with two random sets is what the
        contract asks for: score it as the marker the reference's wrapper returns."""
        got = dict(got)
        for prop in props:
            for case in prop.cases:
                outcome = got.get(id(case))
                if case.label.startswith(_TWO_SETS) and outcome is not None:
                    if not outcome.ok and outcome.error.split(":")[0].strip().endswith("ValueError"):
                        got[id(case)] = Outcome(value=REFUSED)
                    elif outcome.ok and outcome.value is not REFUSED:
                        got[id(case)] = Outcome(value="returned without raising")
        return super().evaluate(props, expected, got, points)

    def properties(self, seed):
        from ...toyworld import concept_images

        g = fresh_generator(seed)
        toynet = ModelSpec("toynet")
        s = int(seed % 100000)

        def randoms(count, n, base):
            return [concept_images("random", n, seed=base + i) for i in range(count)]

        zebra = Case((toynet, "pool2", 4, _texture_scenes(10, s + 1, "zebra"), concept_images("stripes", 10, s + 2),
                      randoms(8, 10, s + 10)), {"seed": 0},
                     label="ToyNet, 10 zebra scenes, stripes, 8 random sets (layer pool2)")
        circle = Case((toynet, "pool2", 0, _texture_scenes(10, s + 3, "circle"), concept_images("stripes", 10, s + 4),
                       randoms(4, 10, s + 20)), {"seed": 1},
                      label="ToyNet, 10 circle scenes, stripes, 4 random sets (layer pool2)")
        tiny = ModelSpec("tiny_relu_cnn", seed % 1000 + 5)

        def brightness(n, level):
            return (torch.rand(n, 3, 16, 16, generator=g) * 0.5 + level).clamp(0, 1)

        noise_sets = [brightness(8, 0.12 * i) for i in range(4)]
        noisy = Case((tiny, "relu1", 3, torch.rand(12, 3, 16, 16, generator=g), brightness(8, 0.45), noise_sets),
                     {"seed": 2}, label="a tiny CNN, random images, 4 random sets of different brightness")
        noisy_again = Case(_cloned(noisy.args), dict(noisy.kwargs), label="the same inputs again")
        two = Case((tiny, "relu1", 3, torch.rand(4, 3, 16, 16, generator=g), brightness(6, 0.4),
                    [brightness(6, 0.1), brightness(6, 0.3)]), label=_TWO_SETS + " (must raise ValueError)")
        valid = [zebra, circle, noisy]

        def result(got):
            value = got.value
            return value if isinstance(value, dict) else None

        def numbers(value, count):
            return isinstance(value, (list, tuple)) and len(value) == count and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)

        def structure(case, expected, got):
            r, count = result(got), len(case.args[5])
            return (r is not None and set(r) >= {"scores", "score", "random_scores", "p_value", "significant"}
                    and numbers(r["scores"], count) and numbers(r["random_scores"], count)
                    and isinstance(r["score"], (int, float)) and isinstance(r["p_value"], (int, float))
                    and isinstance(r["significant"], bool))

        def matches(key):
            def holds(case, expected, got):
                r = result(got)
                return r is not None and _close_number(r.get(key), expected[key])
            return holds

        def own_t_test(case, expected, got):
            r = result(got)
            if r is None or not structure(case, expected, got):
                return False
            return _close_number(r["p_value"], _reference()._t_test(list(r["scores"]), list(r["random_scores"])),
                                 atol=1e-6)

        def own_summary(case, expected, got):
            r = result(got)
            if r is None or not structure(case, expected, got):
                return False
            p = float(r["p_value"])
            return (_close_number(r["score"], float(np.mean(r["scores"])))
                    and r["significant"] is bool(p < 0.05))

        def ground_truth(case, expected, got):
            r = result(got)
            return r is not None and r.get("significant") is expected["significant"] \
                and _close_number(r.get("score"), expected["score"])

        def recognized(case, expected, got):
            return structure(case, expected, got) and matches("scores")(case, expected, got)

        return [
            Property("returns a dict: scores and random_scores (lists of R floats), score and p_value (floats), "
                     "significant (a bool)", 1, valid, structure),
            Property("scores[i] is the TCAV score of the CAV of the concept against random set i", 2, valid,
                     matches("scores")),
            Property("random_scores[i] is the TCAV score of the CAV of random set i against random set (i + 1) % R",
                     2, valid, matches("random_scores")),
            Property("p_value comes from a two-sided Student t-test of scores against random_scores "
                     "(scipy.stats.ttest_ind), not a one-sided test nor a test against 0.5", 2, valid, own_t_test),
            Property("score is the mean of scores, and significant means p_value < 0.05", 1, valid, own_summary),
            Property("reaches the right verdict and score on ToyWorld's ground truth (stripes for zebra scenes and "
                     "for circle scenes, ToyNet)", 1, [zebra, circle], ground_truth),
            Property("refuses fewer than three random sets with a ValueError", 1, [two], _refused),
            Property("is deterministic: the same inputs and seed give the same result, whatever the global "
                     "random state", 1, [noisy, noisy_again], _same_outputs(noisy, noisy_again, recognized)),
            Property("leaves the images unchanged, removes its hooks, keeps the model's mode and parameters", 1,
                     [noisy], _manners(recognized), feedback_only=True),
        ]

"""Checks for notebook 06 (adversarial): fooling images, FGSM, PGD, universal
perturbations and the fooling rate.

Points come only from what a function returns. The cases are built so that each common
mistake changes the returned numbers:

* a network with batch norms whose running statistics differ from a batch's own
  (``tiny_bn_cnn``): a function that switches the model to training mode computes other
  gradients, and so other images;
* budgets where projection and clamping matter (``steps * alpha > eps``, random images
  with pixels near 0 and 1);
* targeted and untargeted runs (a step in the wrong direction fails one of them);
* a random start with ``steps=0`` (the returned image *is* the start, so a start drawn
  from the global random state shows);
* a fooling image whose target is reached long before ``max_iter``, one that is already
  classified as the target, and one whose budget runs out first (extra or missing steps
  show).

Some properties are judged from the output alone, in the grader's own process (the image
stays in ``[0, 1]`` and in the ``eps``-ball; the change has the sign of the loss
gradient, which the grader computes itself; the fooling image is classified as the
target; the universal perturbation fools unseen scenes). What the graded code could
forge (model mode, hooks, inputs after the call) is checked as advice only.
"""
from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

from ..core import (Case, Check, ModelSpec, Property, build_model, fresh_generator, full_float32, good_citizen,
                    inputs_unchanged, materialize, same_shape, shape_matches)
from ..registry import register
from ._shared import grading_device, toyworld_cases


def _reference():
    return importlib.import_module("cs_helpers.reference.adversarial")


def _tensor(value):
    return value.detach().cpu().double() if isinstance(value, torch.Tensor) else None


def _mostly_equal(expected, got, atol: float = 1e-4, share: float = 0.995) -> bool:
    """Same shape, and at least ``share`` of the entries within ``atol`` (iterated sign
    steps amplify rounding: a gradient entry of about 1e-9 may take either sign in
    another summation order, and that pixel then moves by ``2 alpha``)."""
    e, g = _tensor(expected), _tensor(got)
    if e is None or g is None or e.shape != g.shape or not torch.isfinite(g).all():
        return False
    return float(((e - g).abs() <= atol).double().mean()) >= share


def _close(expected, got, atol: float = 1e-4) -> bool:
    return _mostly_equal(expected, got, atol, share=0.999)


def _clean_images(case: Case) -> torch.Tensor:
    """The images a case attacks (its second positional argument, or the first for
    ``make_fooling_image``)."""
    return case.args[0] if isinstance(case.args[0], torch.Tensor) else case.args[1]


def _changes(case, got, least: float = 0.3) -> bool:
    """The output has the input's shape and changes at least ``least`` of the entries
    (a function that returns its input unchanged earns no range or budget points)."""
    x, g = _tensor(_clean_images(case)), _tensor(got.value)
    if x is None or g is None or x.shape != g.shape or not torch.isfinite(g).all():
        return False
    return float(((g - x).abs() > 1e-6).double().mean()) >= least


def _in_unit_range(case, expected, got) -> bool:
    g = _tensor(got.value)
    return _changes(case, got) and float(g.min()) >= 0.0 and float(g.max()) <= 1.0


def _in_ball(eps_of):
    def holds(case, expected, got):
        x, g = _tensor(_clean_images(case)), _tensor(got.value)
        return _changes(case, got) and float((g - x).abs().max()) <= eps_of(case) + 1e-6
    return holds


def _manners(case, expected, got) -> bool:
    """Right values (up to rounding), inputs unchanged, no hook left, model mode and
    parameters as they were (advice only: the graded process records this)."""
    if not _mostly_equal(expected, got.value):
        return False
    return inputs_unchanged(case, got.value, got) and good_citizen(case, got.value, got)


class _Grader:
    """Models and values the grader computes itself, in its own process."""

    def __init__(self):
        self.models: dict = {}
        self.values: dict = {}

    def model(self, spec: ModelSpec):
        return materialize(spec, grading_device(), self.models)

    def loss_gradient(self, case: Case) -> torch.Tensor:
        """``grad_x CE(model(x), labels)`` at the case's clean images (CPU, float64)."""
        key = ("grad", id(case))
        if key not in self.values:
            model = self.model(case.args[0])
            x = _clean_images(case).to(grading_device()).clone().requires_grad_(True)
            labels = case.args[2]
            labels = (torch.full((x.shape[0],), labels, dtype=torch.long) if isinstance(labels, int)
                      else labels).to(grading_device())
            with full_float32(), torch.enable_grad():
                (grad,) = torch.autograd.grad(F.cross_entropy(model(x), labels), x)
            self.values[key] = grad.detach().cpu().double()
        return self.values[key]

    def predictions(self, spec: ModelSpec, images: torch.Tensor) -> torch.Tensor:
        model = self.model(spec)
        with torch.no_grad(), full_float32():
            return model(images.to(grading_device())).argmax(dim=1).cpu()


# ------------------------------------------------------------------ make_fooling_image

def _ranked_classes(spec: ModelSpec, image: torch.Tensor) -> list[int]:
    """The classes of ``image`` under the model of ``spec``, most likely first (built
    in whichever process makes the cases; the same in both)."""
    model = build_model(spec, device="cpu")
    with torch.no_grad():
        return model(image).argsort(dim=1, descending=True)[0].tolist()


@register
class MakeFoolingImage(Check):
    name, topic, points = "make_fooling_image", "adversarial", 2
    timeout_s = 60.0  # EfficientNet-Lite0's first backward pass warms up for seconds

    def properties(self, seed):
        g = fresh_generator(seed)
        bn = ModelSpec("tiny_bn_cnn", seed % 1000)
        relu = ModelSpec("tiny_relu_cnn", seed % 1000 + 1)
        lite0 = ModelSpec("efficientnet_lite0")
        photo = F.interpolate(torch.rand(1, 3, 8, 8, generator=g), size=(48, 48), mode="bilinear",
                              align_corners=False)
        # Lite0's fourth most likely class of a smooth random image is reached after one to
        # a few steps of 0.5 (measured over seeds), far fewer than 40. Lite0 has batch
        # norms and dropout: in training mode it computes other numbers.
        reach = Case((photo, _ranked_classes(lite0, photo)[3], lite0), dict(lr=0.5, max_iter=40),
                     label="a 48x48 image and EfficientNet-Lite0, a target reached after a few steps, "
                           "max_iter=40")
        other = torch.rand(1, 3, 16, 16, generator=g)
        already = Case((other, _ranked_classes(relu, other)[0], relu), dict(lr=0.5, max_iter=10),
                       label="an image already classified as the target")
        far = torch.rand(1, 3, 16, 16, generator=g)
        budget = Case((far, _ranked_classes(relu, far)[-1], relu), dict(lr=0.05, max_iter=3),
                      label="a target too far for max_iter=3 steps of lr=0.05")
        normed = torch.rand(1, 3, 16, 16, generator=g)
        budget_bn = Case((normed, _ranked_classes(bn, normed)[-1], bn), dict(lr=0.3, max_iter=4),
                         label="4 steps on a tiny network with batch norms (keep the model in eval mode)")
        bright = (0.9 + 0.1 * torch.rand(1, 3, 16, 16, generator=g))
        clamp = Case((bright, _ranked_classes(relu, bright)[-1], relu), dict(lr=2.0, max_iter=4),
                     label="a bright image and large steps (clamping matters)")
        world = toyworld_cases(1, seed)
        toy = Case((world.images, _ranked_classes(ModelSpec("toynet"), world.images)[1], ModelSpec("toynet")),
                   dict(lr=1.0, max_iter=30), label="a ToyWorld scene and ToyNet")

        grader = _Grader()

        def exact(case, expected, got):
            return _close(expected, got.value, atol=2e-4)

        def reaches(case, expected, got):
            value = _tensor(got.value)
            if value is None or tuple(value.shape) != tuple(case.args[0].shape):
                return False
            return int(grader.predictions(case.args[2], value.float())[0]) == int(case.args[1])

        def in_range(case, expected, got):
            value = _tensor(got.value)
            return (same_shape(expected, got.value) and not torch.equal(value, case.args[0].double())
                    and float(value.min()) >= 0 and float(value.max()) <= 1)

        return [
            Property("returns one image, shape (1, 3, H, W)", 1, [reach, budget], shape_matches),
            Property("matches the fooling image of the reference: steps lr * g / ||g||_2 with g = dS_target/dx, "
                     "clamped to [0, 1], on networks with batch norms (keep the model in eval mode) and "
                     "on ToyNet", 3, [reach, budget_bn, toy], exact),
            Property("the returned image is classified as the target", 1, [reach], reaches),
            Property("stops as soon as the target is predicted: no step once it is reached, none for an image "
                     "already classified as the target", 2, [reach, already], exact),
            Property("takes at most max_iter steps when the target is not reached", 1, [budget], exact),
            Property("clamps the image to [0, 1] after every step", 1, [clamp], in_range),
            Property("leaves the image unchanged, removes its hooks, keeps the model's mode and parameters",
                     1, [reach, budget_bn], _manners, feedback_only=True),
        ]


# ------------------------------------------------------------------------------ fgsm

def _case_eps(case) -> float:
    return float(case.kwargs["eps"]) if "eps" in case.kwargs else float(case.args[3])


@register
class Fgsm(Check):
    name, topic, points = "fgsm", "adversarial", 2
    timeout_s = 60.0  # the first backward pass through EfficientNet-Lite0 warms up for seconds

    def properties(self, seed):
        g = fresh_generator(seed)
        bn = Case((ModelSpec("tiny_bn_cnn", seed % 1000 + 2), torch.rand(4, 3, 16, 16, generator=g),
                   torch.tensor([0, 3, 1, 4])), dict(eps=0.1),
                  label="4 images 16x16 with their labels, eps=0.1 (network with batch norms)")
        relu = Case((ModelSpec("tiny_relu_cnn", seed % 1000 + 3), torch.rand(3, 3, 20, 16, generator=g), 2, 0.05),
                    label="3 images 20x16, an int label for all, eps=0.05")
        world = toyworld_cases(4, seed + 1)
        toy = Case((ModelSpec("toynet"), world.images, world.labels, 4 / 255),
                   label="ToyWorld scenes and ToyNet, eps=4/255")
        photo = torch.nn.functional.interpolate(torch.rand(2, 3, 8, 8, generator=g), size=(48, 48),
                                                mode="bilinear", align_corners=False)
        lite0 = Case((ModelSpec("efficientnet_lite0"), photo, torch.tensor([int(seed % 1000), 7])), dict(eps=2 / 255),
                     label="two 48x48 images and EfficientNet-Lite0 (batch norms and dropout), eps=2/255")

        grader = _Grader()

        def exact(case, expected, got):
            return _close(expected, got.value, atol=1e-5)

        def uphill(case, expected, got):
            """Every changed pixel moved with the sign of the loss gradient."""
            if not _changes(case, got):
                return False
            d = _tensor(got.value) - _tensor(_clean_images(case))
            grad = grader.loss_gradient(case)
            moved = d.abs() > 1e-6
            agree = (torch.sign(d) == torch.sign(grad)) | ~moved
            return float(agree.double().mean()) >= 0.995

        def sign_step(case, expected, got):
            """Every pixel that moved and is not at 0 or 1 moved by exactly eps."""
            if not _changes(case, got):
                return False
            value = _tensor(got.value)
            d = (value - _tensor(_clean_images(case))).abs()
            inner = (value > 1e-6) & (value < 1 - 1e-6) & (d > 1e-6)
            return bool(((d[inner] - _case_eps(case)).abs() <= 1e-5).all())

        return [
            Property("returns adversarial images of the input's shape (N, 3, H, W)", 1, [bn, relu], shape_matches),
            Property("matches FGSM (Goodfellow et al. 2015) on a network with batch norms (keep the model in "
                     "eval mode), a ReLU CNN, ToyNet and EfficientNet-Lite0", 3, [bn, relu, toy, lite0], exact),
            Property("steps up the cross-entropy of the labels (x + eps * sign(grad), not minus)", 1,
                     [bn, relu], uphill),
            Property("moves every pixel by eps along the sign of the gradient, not by the gradient's value", 1,
                     [bn, relu], sign_step),
            Property("clamps the result to [0, 1]", 1, [bn, relu], _in_unit_range),
            Property("leaves the images unchanged, removes its hooks, keeps the model's mode and parameters", 1,
                     [bn, lite0], _manners, feedback_only=True),
        ]


# ------------------------------------------------------------------------------- pgd

@register
class Pgd(Check):
    name, topic, points = "pgd", "adversarial", 3

    def properties(self, seed):
        g = fresh_generator(seed)
        bn = ModelSpec("tiny_bn_cnn", seed % 1000 + 4)
        relu = ModelSpec("tiny_relu_cnn", seed % 1000 + 5)
        untargeted = Case((bn, torch.rand(4, 3, 16, 16, generator=g), torch.tensor([1, 0, 4, 2])),
                          dict(eps=0.05, alpha=0.02, steps=5),
                          label="untargeted, eps=0.05, alpha=0.02, 5 steps (network with batch norms)")
        targeted = Case((relu, torch.rand(4, 3, 16, 16, generator=g), torch.tensor([3, 3, 0, 1])),
                        dict(eps=0.06, alpha=0.025, steps=4, targeted=True),
                        label="targeted, eps=0.06, alpha=0.025, 4 steps")
        start_seed = int(seed % 1000) + 1
        start_only = Case((relu, torch.rand(3, 3, 16, 16, generator=g), torch.tensor([0, 1, 2])),
                          dict(eps=0.1, alpha=0.01, steps=0, random_start=True, seed=start_seed),
                          label=f"random_start=True, seed={start_seed}, steps=0 (the result is the start)")
        started = Case((bn, torch.rand(2, 3, 16, 16, generator=g), 2),
                       dict(eps=0.08, alpha=0.03, steps=3, random_start=True, seed=7),
                       label="random_start=True, seed=7, 3 steps, an int label")
        world = toyworld_cases(4, seed + 2)
        toy = Case((ModelSpec("toynet"), world.images, world.labels, 8 / 255, 2 / 255, 6),
                   label="ToyWorld scenes and ToyNet, untargeted, eps=8/255, alpha=2/255, 6 steps")
        toy_targets = (world.labels + 1 + torch.arange(4) % 3) % 5
        toy_targeted = Case((ModelSpec("toynet"), world.images, toy_targets, 8 / 255, 2 / 255, 6),
                            dict(targeted=True), label="ToyWorld scenes and ToyNet, targeted, 6 steps")

        def eps_of(case):
            return float(case.kwargs["eps"]) if "eps" in case.kwargs else float(case.args[3])

        def exact(case, expected, got):
            return _mostly_equal(expected, got.value)

        return [
            Property("returns adversarial images of the input's shape (N, 3, H, W)", 1, [untargeted, targeted],
                     shape_matches),
            Property("untargeted: ascends the cross-entropy of the labels with steps alpha * sign(grad), "
                     "projecting after every step (Madry et al. 2018), on a network with batch norms (keep the "
                     "model in eval mode) and on ToyNet", 3, [untargeted, toy], exact),
            Property("targeted: descends the cross-entropy toward the target labels", 2, [targeted, toy_targeted],
                     exact),
            Property("after the last step every pixel is within eps of the clean image (project after each "
                     "step, not only before it)", 1, [untargeted, targeted, toy], _in_ball(eps_of)),
            Property("clamps to [0, 1] after every step", 1, [untargeted, targeted], _in_unit_range),
            Property("random start: clamp(images + eps * (2u - 1), 0, 1) with u drawn from "
                     "torch.Generator().manual_seed(seed), not from the global random state", 2,
                     [start_only, started], exact),
            Property("leaves the images unchanged, removes its hooks, keeps the model's mode and parameters", 1,
                     [untargeted, toy], _manners, feedback_only=True),
        ]


# --------------------------------------------------------------- universal_perturbation

#: ToyNet's universal perturbation in the check: L-infinity budget, step, epochs.
UNIVERSAL_SETTINGS = dict(eps=0.1, alpha=0.01, epochs=3, batch_size=32)


@register
class UniversalPerturbation(Check):
    name, topic, points = "universal_perturbation", "adversarial", 2
    timeout_s = 60.0

    def properties(self, seed):
        g = fresh_generator(seed)
        tiny = Case((ModelSpec("tiny_relu_cnn", seed % 1000 + 6), torch.rand(10, 3, 16, 16, generator=g)),
                    dict(eps=0.08, alpha=0.03, epochs=2, batch_size=4),
                    label="10 images 16x16, batch_size=4 (the last batch is smaller), 2 epochs")
        bn = Case((ModelSpec("tiny_bn_cnn", seed % 1000 + 7), torch.rand(8, 3, 16, 16, generator=g), 0.05, 0.02, 3),
                  label="8 images, network with batch norms, default batch_size")
        scenes = toyworld_cases(96, seed + 3)
        toy = Case((ModelSpec("toynet"), scenes.images), dict(UNIVERSAL_SETTINGS),
                   label="96 ToyWorld scenes and ToyNet")
        unseen = toyworld_cases(200, seed + 4).images

        grader = _Grader()

        def eps_of(case):
            return float(case.kwargs["eps"]) if "eps" in case.kwargs else float(case.args[2])

        def shape(case, expected, got):
            return same_shape(expected, got.value)

        def bounded(case, expected, got):
            d = _tensor(got.value)
            return (same_shape(expected, got.value) and bool(torch.isfinite(d).all())
                    and float(d.abs().max()) > 0 and float(d.abs().max()) <= eps_of(case) + 1e-6)

        def exact(case, expected, got):
            return _mostly_equal(expected, got.value, atol=1e-4, share=0.99)

        def rate(delta):
            spec = ModelSpec("toynet")
            clean = grader.predictions(spec, unseen)
            fooled = grader.predictions(spec, (unseen + delta.float()[None]).clamp(0, 1))
            return float((clean != fooled).double().mean())

        def fools(case, expected, got):
            if not bounded(case, expected, got):
                return False
            return rate(_tensor(got.value)) >= 0.8 * rate(_tensor(expected)) - 0.02

        return [
            Property("returns one perturbation of an image's shape (3, H, W)", 1, [tiny, toy], shape),
            Property("stays within the eps-ball: |delta| <= eps everywhere", 1, [tiny, bn, toy], bounded),
            Property("matches the reference: clean predictions computed once, batches in order, one step "
                     "alpha * sign(grad) per batch on the mean cross-entropy, then projection", 3,
                     [tiny, bn, toy], exact),
            Property("fools ToyNet on 200 scenes it never saw about as often as the reference's perturbation", 1,
                     [toy], fools),
            Property("leaves the images unchanged, removes its hooks, keeps the model's mode and parameters", 1,
                     [tiny, toy], _manners, feedback_only=True),
        ]


# ----------------------------------------------------------------------- fooling_rate

@register
class FoolingRate(Check):
    name, topic, points = "fooling_rate", "adversarial", 1

    def properties(self, seed):
        g = fresh_generator(seed)
        relu = ModelSpec("tiny_relu_cnn", seed % 1000 + 8)
        images = torch.rand(12, 3, 16, 16, generator=g)
        noisy = (images + 0.6 * torch.randn(12, 3, 16, 16, generator=g)).clamp(0, 1)
        mixed = torch.where(torch.arange(12)[:, None, None, None] % 2 == 0, noisy, images)
        partly = Case((relu, images, mixed), label="12 images, half of them perturbed")
        same = Case((relu, images[:5], images[:5].clone()), label="unperturbed copies (rate 0)")
        world = toyworld_cases(40, seed + 5)
        toy_adv = (world.images + 0.3 * torch.randn(world.images.shape, generator=g)).clamp(0, 1)
        toy = Case((ModelSpec("toynet"), world.images, toy_adv), label="40 noisy ToyWorld scenes and ToyNet")
        swapped = Case((relu, mixed, images), label="the arguments' roles swapped (the same rate)")

        def is_float(case, expected, got):
            return type(got.value) is float and abs(got.value - expected) <= 1e-6

        def value(case, expected, got):
            try:
                return abs(float(got.value) - expected) <= 1e-6
            except (TypeError, ValueError):
                return False

        return [
            Property("returns the fraction of images whose predicted class changed (not a count, not "
                     "the fraction unchanged)", 3, [partly, same, toy, swapped], value),
            Property("returns a Python float", 1, [partly, toy], is_float),
        ]

"""Notebook 06 (adversarial): small changes of the input that change the prediction.

* **Fooling images** (Szegedy et al. 2014, "Intriguing properties of neural networks";
  the version of CS231n's assignment): normalized gradient ascent on one class score
  until the network predicts it.
* **FGSM** (Goodfellow, Shlens & Szegedy 2015, "Explaining and Harnessing Adversarial
  Examples"): one step of size ``eps`` along the sign of the loss gradient.
* **PGD** (Madry, Makelov, Schmidt, Tsipras & Vladu 2018, "Towards Deep Learning Models
  Resistant to Adversarial Attacks"): many small signed steps, each followed by a
  projection onto the L-infinity ball of radius ``eps`` around the clean image.
* **Universal perturbations** (Moosavi-Dezfooli, Fawzi, Fawzi & Frossard 2017,
  "Universal adversarial perturbations"): one perturbation for a whole data set. We use
  the simple signed-gradient variant the course's contract describes, not the paper's
  DeepFool-based iteration.

Every function takes pixel-space images in ``[0, 1]`` and a model from
:func:`cs_helpers.models.load_model` (or any module mapping ``(N, 3, H, W)`` to logits),
runs on the model's device, leaves its inputs, the model's mode and its parameters as
they were (gradients are taken with :func:`torch.autograd.grad` with respect to a copy
of the images only, so nothing accumulates in ``.grad`` of the parameters), and returns
detached tensors on the model's device.
"""
from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import nn

from ..hooks import model_device
from ._inputs import batch_targets, check_batch, check_model, check_range, logits_of, single_target

__all__ = ["fgsm", "fooling_rate", "make_fooling_image", "pgd", "universal_perturbation"]


def _check_number(value, name, positive=False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number; got {type(value).__name__}")
    value = float(value)
    if not value >= 0 or (positive and value == 0):  # also rejects NaN
        raise ValueError(f"{name} must be {'positive' if positive else 'non-negative'}; got {value}")
    return value


def _count(value, name, allow_zero=False) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < (0 if allow_zero else 1):
        raise ValueError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} int; got {value!r}")
    return int(value)


def _loss_gradient(model, x, labels) -> torch.Tensor:
    """Gradient of the mean cross-entropy of ``model(x)`` against ``labels`` with
    respect to ``x`` (one forward and one backward pass)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = logits_of(model, x)
        check_range(labels, logits.shape[1])
        loss = F.cross_entropy(logits, labels)
        (grad,) = torch.autograd.grad(loss, x)
    return grad


# ---------------------------------------------------------------------- fooling image

def make_fooling_image(image: torch.Tensor, target, model: nn.Module, lr: float = 1.0,
                       max_iter: int = 100) -> torch.Tensor:
    """A fooling image: ``image`` changed until ``model`` predicts ``target``.

    Repeats at most ``max_iter`` times: if the predicted class (the arg-max of the
    logits) is ``target``, stop; otherwise take the gradient ``g = dS_target / dx`` of
    the target's logit with respect to the current image and step
    ``x <- clamp(x + lr * g / ||g||_2, 0, 1)``. A zero gradient means no step. So at most
    ``max_iter`` steps are taken, and none once the target is predicted (an image that
    is already classified as ``target`` comes back unchanged).

    Parameters
    ----------
    image : Tensor ``(1, 3, H, W)`` in ``[0, 1]`` (the argument order of CS231n).
    target : int, the class to reach.
    model : nn.Module mapping images to logits.
    lr : float, the L2 length of each step in pixel space.
    max_iter : int, the most steps taken.

    Returns
    -------
    Tensor ``(1, 3, H, W)`` in ``[0, 1]``, detached, on the model's device. Costs one
    forward pass per check and one backward pass per step.
    """
    check_model(model)
    check_batch(image, "image")
    if image.shape[0] != 1:
        raise ValueError(f"image must be one image (1, 3, H, W); got a batch of {image.shape[0]}")
    target = single_target(target)
    lr = _check_number(lr, "lr")
    max_iter = _count(max_iter, "max_iter", allow_zero=True)
    device = model_device(model)
    x = image.detach().to(device).clone()
    for _ in range(max_iter):
        x.requires_grad_(True)
        with torch.enable_grad():
            logits = logits_of(model, x)
            check_range(torch.tensor([target]), logits.shape[1])
            if int(logits[0].argmax()) == target:
                break
            (g,) = torch.autograd.grad(logits[0, target], x)
        x = x.detach()
        norm = g.norm()
        if norm > 0:
            x = (x + lr * g / norm).clamp(0, 1)
    return x.detach()


# ------------------------------------------------------------------------------- FGSM

def fgsm(model: nn.Module, images: torch.Tensor, labels, eps: float) -> torch.Tensor:
    """Fast gradient sign method (Goodfellow et al. 2015), untargeted.

    ``clamp(x + eps * sign(grad_x CE(model(x), labels)), 0, 1)``: one step that raises
    the cross-entropy of the true labels as much as a first-order model allows within
    the L-infinity ball of radius ``eps``. Whether the loss is the mean or the sum over
    the batch does not matter (a positive factor does not change a sign).

    Parameters
    ----------
    model : nn.Module mapping images to logits.
    images : Tensor ``(N, 3, H, W)`` in ``[0, 1]``.
    labels : int or LongTensor ``(N,)``, the classes to move away from.
    eps : float, the L-infinity budget in pixel units (``8/255`` is a common choice).

    Returns
    -------
    Tensor ``(N, 3, H, W)`` in ``[0, 1]``, within ``eps`` of ``images`` per pixel,
    detached, on the model's device. One forward and one backward pass.
    """
    check_model(model)
    check_batch(images)
    eps = _check_number(eps, "eps")
    device = model_device(model)
    x = images.detach().to(device)
    y = batch_targets(labels, x.shape[0], device)
    grad = _loss_gradient(model, x, y)
    return (x + eps * grad.sign()).clamp(0, 1).detach()


# -------------------------------------------------------------------------------- PGD

def _random_start(images: torch.Tensor, eps: float, seed: int) -> torch.Tensor:
    """``clamp(images + eps * (2u - 1), 0, 1)`` with ``u`` uniform in ``[0, 1)`` drawn
    on the CPU from ``torch.Generator().manual_seed(seed)`` and moved to the images'
    device (the global random state is neither used nor changed)."""
    u = torch.rand(images.shape, generator=torch.Generator().manual_seed(int(seed)), dtype=images.dtype)
    return (images + eps * (2 * u.to(images.device) - 1)).clamp(0, 1)


def pgd(model: nn.Module, images: torch.Tensor, labels, eps: float, alpha: float, steps: int,
        targeted: bool = False, random_start: bool = False, seed: int = 0) -> torch.Tensor:
    """Projected gradient descent in the L-infinity ball (Madry et al. 2018).

    Starting from ``x_0 = images`` (or, with ``random_start``, from
    ``clamp(images + eps * (2u - 1), 0, 1)``, ``u = torch.rand(images.shape,
    generator=torch.Generator().manual_seed(seed))`` drawn on the CPU), each of the
    ``steps`` iterations does::

        g = grad_x mean CE(model(x), labels)
        x = x + alpha * sign(g)            # untargeted: climb the loss of the true labels
        x = x - alpha * sign(g)            # targeted: descend toward the target labels
        x = clamp(x, images - eps, images + eps)   # project onto the eps-ball
        x = clamp(x, 0, 1)                          # stay a valid image

    (the same update as torchattacks' ``PGD``). The projection follows every step, so
    the result is always within ``eps`` of ``images`` and in ``[0, 1]``.

    Parameters
    ----------
    model : nn.Module mapping images to logits.
    images : Tensor ``(N, 3, H, W)`` in ``[0, 1]``.
    labels : int or LongTensor ``(N,)``: the true classes (untargeted) or the targets.
    eps, alpha : floats, the budget and the step size (pixel units).
    steps : int, number of steps (0 returns the start).
    targeted, random_start : bools.
    seed : int, seeds the random start only.

    Returns
    -------
    Tensor ``(N, 3, H, W)``, detached, on the model's device. Costs ``steps`` forward and
    backward passes.
    """
    check_model(model)
    check_batch(images)
    eps = _check_number(eps, "eps")
    alpha = _check_number(alpha, "alpha")
    steps = _count(steps, "steps", allow_zero=True)
    device = model_device(model)
    clean = images.detach().to(device)
    y = batch_targets(labels, clean.shape[0], device)
    lower, upper = clean - eps, clean + eps
    x = _random_start(clean, eps, seed) if random_start else clean.clone()
    direction = -1.0 if targeted else 1.0
    for _ in range(steps):
        grad = _loss_gradient(model, x, y)
        x = x.detach() + (direction * alpha) * grad.sign()
        x = torch.minimum(torch.maximum(x, lower), upper).clamp_(0, 1)
    return x.detach()


# ------------------------------------------------------------- universal perturbation

def universal_perturbation(model: nn.Module, images: torch.Tensor, eps: float, alpha: float, epochs: int,
                           batch_size: int = 32) -> torch.Tensor:
    """One perturbation ``delta`` that changes the prediction on many images
    (Moosavi-Dezfooli et al. 2017; here with signed-gradient steps).

    ``delta`` starts at zero. The clean predictions ``y = argmax model(images)`` are
    computed once. For each of the ``epochs`` passes over the images, in order (no
    shuffling), in batches of ``batch_size``: one step
    ``delta <- clamp(delta + alpha * sign(grad_delta mean CE(model(clamp(x_b + delta,
    0, 1)), y_b)), -eps, eps)``.

    Parameters
    ----------
    model : nn.Module mapping images to logits.
    images : Tensor ``(N, 3, H, W)`` in ``[0, 1]``, the images it is trained on.
    eps, alpha : floats, the L-infinity budget and the step size.
    epochs : int, passes over the images.
    batch_size : int.

    Returns
    -------
    Tensor ``(3, H, W)`` with ``|delta| <= eps``, detached, on the model's device. Apply
    it as ``clamp(x + delta, 0, 1)``.
    """
    check_model(model)
    check_batch(images)
    eps = _check_number(eps, "eps")
    alpha = _check_number(alpha, "alpha")
    epochs = _count(epochs, "epochs", allow_zero=True)
    batch_size = _count(batch_size, "batch_size")
    device = model_device(model)
    x = images.detach().to(device)
    with torch.no_grad():
        clean = torch.cat([logits_of(model, x[i:i + batch_size]).argmax(dim=1) for i in range(0, len(x), batch_size)])
    delta = torch.zeros_like(x[0])
    for _ in range(epochs):
        for start in range(0, len(x), batch_size):
            d = delta.detach().requires_grad_(True)
            with torch.enable_grad():
                loss = F.cross_entropy(logits_of(model, (x[start:start + batch_size] + d).clamp(0, 1)),
                                       clean[start:start + batch_size])
                (grad,) = torch.autograd.grad(loss, d)
            delta = (delta + alpha * grad.sign()).clamp(-eps, eps)
    return delta.detach()


# ----------------------------------------------------------------------- fooling rate

def fooling_rate(model: nn.Module, images: torch.Tensor, adv_images: torch.Tensor) -> float:
    """Fraction of images whose predicted class (arg-max of the logits) on
    ``adv_images`` differs from that on ``images``.

    Parameters
    ----------
    model : nn.Module mapping images to logits.
    images, adv_images : Tensors ``(N, 3, H, W)`` of the same shape.

    Returns
    -------
    A Python ``float`` in ``[0, 1]``. Runs under ``torch.no_grad()`` in batches.
    """
    check_model(model)
    check_batch(images)
    check_batch(adv_images, "adv_images")
    if images.shape != adv_images.shape:
        raise ValueError(f"images and adv_images must have the same shape; got {tuple(images.shape)} "
                         f"and {tuple(adv_images.shape)}")
    device = model_device(model)
    batch_size = 256
    changed = 0
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            a = logits_of(model, images[start:start + batch_size].to(device)).argmax(dim=1)
            b = logits_of(model, adv_images[start:start + batch_size].to(device)).argmax(dim=1)
            changed += int((a != b).sum())
    return changed / len(images)

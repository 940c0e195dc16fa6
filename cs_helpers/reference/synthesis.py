"""Notebook 05 (synthesis): images a network wants to see.

Instead of explaining a given image, optimize an image:

* **Class visualization** by gradient ascent (Simonyan, Vedaldi & Zisserman 2014, "Deep
  Inside Convolutional Networks"): maximize the class score ``S_c(x)`` minus an L2
  penalty, one normalized gradient step at a time, with the "better regularizers" of
  Yosinski, Clune, Nguyen, Fuchs & Lipson (2015, "Understanding Neural Networks Through
  Deep Visualization") applied between steps: Gaussian blur, clipping pixels of small
  value, clipping pixels of small contribution (and jitter).
* **Feature inversion** (Mahendran & Vedaldi 2015, "Understanding Deep Image
  Representations by Inverting Them"): find an image whose features match a photo's,
  with a total-variation prior.
* **DeepDream** (Mordvintsev, Olah & Tyka 2015, "Inceptionism"): amplify whatever a
  layer already sees in an image.

Pixel space is ``[0, 1]`` and mid-gray ``0.5`` plays the role of the lecture's "zero
image": penalties, clipping and the blank canvas are all measured from gray.

The step functions take one image ``(1, 3, H, W)``, run on the model's device, leave the
image, the model's mode and parameters alone, remove every hook they register, and
return a detached image clamped to ``[0, 1]``. (They also accept ``N > 1`` images, each
normalized by its own gradient; the contract and the grading use ``N = 1``.) The two
losses return 0-d tensors that keep their graph, since they are what gets optimized.

The private ``_..._variant`` helpers compute what common mistakes compute (the penalty
around 0, a step normalized by the maximum, percentiles over the whole batch, ...); the
grader uses them to tell a student which property went wrong. They are not part of the
contract.
"""
from __future__ import annotations

import numbers

import torch
from torch import nn

from ..hooks import capture, model_device
from ._inputs import check_model

__all__ = ["class_visualization_step", "clip_small_contributions", "clip_small_values",
           "deepdream_step", "feature_inversion_loss", "total_variation"]

GRAY = 0.5


# ----------------------------------------------------------------------------- inputs

def _check_img(img, what="img") -> None:
    if not isinstance(img, torch.Tensor):
        raise TypeError(f"{what} must be a tensor (1, 3, H, W); got {type(img).__name__}")
    if img.dim() != 4 or img.shape[1] != 3 or img.shape[0] == 0:
        hint = " (one image? add a batch dimension with img.unsqueeze(0))" if img.dim() == 3 else ""
        raise ValueError(f"{what} must have shape (1, 3, H, W); got {tuple(img.shape)}{hint}")
    if not img.is_floating_point():
        raise TypeError(f"{what} must be a float tensor in [0, 1]; got dtype {img.dtype}")


def _check_images(img, what="img") -> None:
    """A batch ``(N, 3, H, W)`` or a single image ``(3, H, W)``."""
    if not isinstance(img, torch.Tensor):
        raise TypeError(f"{what} must be a tensor (N, 3, H, W); got {type(img).__name__}")
    if img.dim() not in (3, 4) or img.shape[-3] != 3:
        raise ValueError(f"{what} must have shape (N, 3, H, W) or (3, H, W); got {tuple(img.shape)}")
    if not img.is_floating_point():
        raise TypeError(f"{what} must be a float tensor; got dtype {img.dtype}")


def _number(value, name) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number; got {type(value).__name__}")
    return float(value)


def _targets(target, n: int, device) -> torch.Tensor:
    if isinstance(target, torch.Tensor):
        if target.is_floating_point() or target.dtype == torch.bool:
            raise TypeError(f"target must be a class index (int); got dtype {target.dtype}")
        target = target.reshape(-1)
        if target.numel() == 1:
            target = target.expand(n)
        if target.numel() != n:
            raise ValueError(f"target must be an int or {n} class indices; got {target.numel()}")
        return target.to(device=device, dtype=torch.long)
    if isinstance(target, numbers.Integral) and not isinstance(target, bool):
        return torch.full((n,), int(target), dtype=torch.long, device=device)
    raise TypeError(f"target must be a class index (int); got {type(target).__name__}")


def _per_image(values: torch.Tensor, reduce: str) -> torch.Tensor:
    """``(N, ...)`` -> ``(N, 1, 1, 1)``: each image's L2 norm, mean absolute value or
    maximum absolute value."""
    flat = values.flatten(1)
    if reduce == "l2":
        out = flat.norm(dim=1)
    elif reduce == "mean":
        out = flat.abs().mean(dim=1)
    elif reduce == "max":
        out = flat.abs().amax(dim=1)
    else:
        raise ValueError(reduce)
    return out.view(-1, 1, 1, 1)


def _normalized_step(x: torch.Tensor, grad: torch.Tensor, lr: float, reduce: str, clamp: bool = True):
    """``x + lr * g / size(g)`` per image, no step where ``g`` is zero; clamped."""
    if reduce == "none":
        out = x + lr * grad
    else:
        size = _per_image(grad, reduce)
        step = grad / size.clamp(min=torch.finfo(grad.dtype).tiny)
        positive = size > 0
        if not bool(positive.all()):
            step = torch.where(positive, step, torch.zeros_like(step))
        out = step.mul_(lr).add_(x)     # x + lr * step, the same numbers, in the one new tensor
    return out.clamp_(0.0, 1.0) if clamp else out


# ------------------------------------------------------------- class visualization

def _class_visualization_variant(img, model, target, l2_reg, lr, *, sign: float = 1.0, center: float = GRAY,
                                 normalize: str = "l2", clamp: bool = True, score: str = "logit"):
    """One ascent step with knobs for the mistakes the grader recognizes: ``sign=-1``
    (the L2 term added instead of subtracted), ``center=0.0`` (the penalty around
    black), ``normalize`` ``"l2"`` (the contract), ``"none"``, ``"mean"`` or ``"max"``,
    ``clamp=False``, ``score="prob"`` (the softmax probability instead of the logit)."""
    check_model(model)
    _check_img(img)
    l2_reg, lr = _number(l2_reg, "l2_reg"), _number(lr, "lr")
    device = model_device(model)
    x = img.detach().to(device).clone().requires_grad_(True)
    t = _targets(target, x.shape[0], device)
    with torch.enable_grad():
        scores = model(x)
        if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
            raise ValueError("the model must return logits (N, num_classes)")
        if bool(((t < 0) | (t >= scores.shape[1])).any()):
            raise ValueError(f"target must lie in [0, {scores.shape[1] - 1}]; got {t.tolist()}")
        if score == "prob":
            scores = scores.softmax(dim=1)
        objective = scores.gather(1, t[:, None]).sum() - sign * l2_reg * ((x - center) ** 2).sum()
        (grad,) = torch.autograd.grad(objective, x)
    return _normalized_step(x.detach(), grad, lr, normalize, clamp).detach()


def class_visualization_step(img: torch.Tensor, model: nn.Module, target, l2_reg: float, lr: float) -> torch.Tensor:
    """One step of class visualization by gradient ascent (Simonyan et al. 2014).

    ``g`` is the gradient, with respect to the image, of the regularized objective

        ``J(x) = S_target(x) - l2_reg * ||x - 0.5||_2^2``

    (``S`` the logit; the penalty pulls towards mid-gray, the "zero image" of pixel
    space), and the step is ``x + lr * g / ||g||_2``, clamped to ``[0, 1]``. A zero
    gradient means no step.

    Parameters
    ----------
    img : Tensor ``(1, 3, H, W)`` in ``[0, 1]`` (any device; moved to the model's).
    model : nn.Module mapping images to logits ``(N, C)``.
    target : int, the class whose score is raised.
    l2_reg, lr : numbers.

    Returns
    -------
    Tensor ``(1, 3, H, W)`` in ``[0, 1]``, detached, on the model's device. One forward
    and one backward pass. (``N > 1`` images, each with its own norm, also work.)
    """
    return _class_visualization_variant(img, model, target, l2_reg, lr)


# ---------------------------------------------------------------------- clipping

def _clip_variant(img, scores, percentile, *, per_image: bool = True, strict: bool = True,
                  fill: float = GRAY) -> torch.Tensor:
    """Sets to ``fill`` the pixels whose score ``(N, H, W)`` is below the percentile.
    Knobs: ``per_image=False`` (one percentile over the batch), ``strict=False`` (also
    the pixels equal to it)."""
    p = _number(percentile, "percentile")
    if not 0.0 <= p <= 100.0:
        raise ValueError(f"percentile must lie in [0, 100]; got {p}")
    flat = scores.flatten(1) if per_image else scores.reshape(1, -1)
    q = torch.quantile(flat, p / 100.0, dim=1, keepdim=True)                  # linear interpolation
    below = flat < q if strict else flat <= q
    below = below.view(scores.shape)
    return torch.where(below[:, None], torch.tensor(fill, dtype=img.dtype, device=img.device), img)


def _batched(img):
    return (img[None], True) if img.dim() == 3 else (img, False)


def _clip_small_values_variant(img, percentile, *, center: float = GRAY, reduce: str = "l2", **knobs):
    """``reduce``: ``"l2"`` (norm over channels, the contract), ``"sum"`` (sum of the
    channels' absolute values), ``"mean"`` (mean of the signed channels)."""
    _check_images(img)
    x, single = _batched(img.detach())
    d = x - center
    if reduce == "l2":
        score = d.norm(dim=1)
    elif reduce == "sum":
        score = d.abs().sum(dim=1)
    else:
        score = d.mean(dim=1).abs() if reduce == "absmean" else d.mean(dim=1)
    out = _clip_variant(x, score, percentile, **knobs)
    return out[0] if single else out


def clip_small_values(img: torch.Tensor, percentile) -> torch.Tensor:
    """Yosinski et al. (2015)'s "clip pixels with small norm", measured from gray.

    Each pixel's size is the L2 norm over the three channels of ``img - 0.5``; the
    pixels whose size is **strictly below** the ``percentile``-th percentile of their
    own image (0-100 scale, linear interpolation as in ``torch.quantile``) are set to
    0.5 in every channel; every other pixel is left exactly as it was (ties with the
    percentile included).

    Parameters
    ----------
    img : Tensor ``(N, 3, H, W)`` (or one image ``(3, H, W)``).
    percentile : number in ``[0, 100]``.

    Returns
    -------
    A new tensor of ``img``'s shape, dtype and device, detached.
    """
    return _clip_small_values_variant(img, percentile)


def _clip_small_contributions_variant(img, grad, percentile, *, center: float = GRAY, form: str = "abs_sum",
                                      **knobs):
    """``form``: ``"abs_sum"`` (``|sum_c (img - 0.5) grad|``, the contract),
    ``"sum_abs"`` (``sum_c |(img - 0.5) grad|``), ``"signed"`` (no absolute value),
    ``"grad"`` (``|grad|`` summed over channels: gradient size alone)."""
    _check_images(img)
    _check_images(grad, "grad")
    if tuple(grad.shape) != tuple(img.shape):
        raise ValueError(f"grad must have img's shape {tuple(img.shape)}; got {tuple(grad.shape)}")
    x, single = _batched(img.detach())
    g, _ = _batched(grad.detach().to(device=x.device, dtype=x.dtype))
    product = (x - center) * g
    if form == "abs_sum":
        score = product.sum(dim=1).abs()
    elif form == "sum_abs":
        score = product.abs().sum(dim=1)
    elif form == "signed":
        score = product.sum(dim=1)
    else:
        score = g.abs().sum(dim=1)
    out = _clip_variant(x, score, percentile, **knobs)
    return out[0] if single else out


def clip_small_contributions(img: torch.Tensor, grad: torch.Tensor, percentile) -> torch.Tensor:
    """Yosinski et al. (2015)'s "clip pixels with small contribution", measured from gray.

    A pixel's contribution is the first-order estimate of how much the objective would
    drop if the pixel were set to gray: ``|sum over channels of (img - 0.5) * grad|``.
    Pixels whose contribution is **strictly below** the ``percentile``-th percentile of
    their own image (0-100, linear interpolation) are set to 0.5 in every channel;
    every other pixel is left exactly as it was.

    Parameters
    ----------
    img : Tensor ``(N, 3, H, W)`` (or ``(3, H, W)``).
    grad : Tensor of ``img``'s shape, the gradient of the objective at ``img``.
    percentile : number in ``[0, 100]``.

    Returns
    -------
    A new tensor of ``img``'s shape, detached.
    """
    return _clip_small_contributions_variant(img, grad, percentile)


# --------------------------------------------------------------- total variation

def _tv_variant(x, beta=2.0, *, form: str = "iso", ranges: str = "cropped", reduce: str = "sum",
                ignore_beta: bool = False):
    """Total variation with knobs: ``form`` ``"iso"`` (the contract), ``"aniso"``
    (``|dx|^beta + |dy|^beta``), ``"abs"`` (``(|dx| + |dy|)^(beta/2)``), ``"abs_beta"``
    (``(|dx| + |dy|)^beta``); ``ranges`` ``"cropped"`` (the contract: both differences
    at ``i < H-1, j < W-1``) or ``"full"`` (each difference over its own full range,
    the missing one taken as 0); ``reduce`` ``"sum"`` or ``"mean"``; ``ignore_beta``
    (always 2)."""
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise ValueError("x must be a tensor with at least two dimensions (..., H, W)")
    if not x.is_floating_point():
        raise TypeError(f"x must be a float tensor; got dtype {x.dtype}")
    beta = 2.0 if ignore_beta else _number(beta, "beta")
    if ranges == "cropped":
        dx = x[..., :-1, 1:] - x[..., :-1, :-1]       # x[i, j+1] - x[i, j]
        dy = x[..., 1:, :-1] - x[..., :-1, :-1]       # x[i+1, j] - x[i, j]
    else:
        dx = torch.nn.functional.pad(x[..., :, 1:] - x[..., :, :-1], (0, 1))
        dy = torch.nn.functional.pad(x[..., 1:, :] - x[..., :-1, :], (0, 0, 0, 1))
    if form == "iso":
        terms = dx ** 2 + dy ** 2
        if beta != 2.0:  # t ** 1.0 is t, and its gradient exactly the incoming one: skip the pass
            terms = terms ** (beta / 2)
    elif form == "aniso":
        terms = dx.abs() ** beta + dy.abs() ** beta
    elif form == "abs":
        terms = (dx.abs() + dy.abs()) ** (beta / 2)
    else:
        terms = (dx.abs() + dy.abs()) ** beta
    return terms.sum() if reduce == "sum" else terms.mean()


def total_variation(x: torch.Tensor, beta: float = 2.0) -> torch.Tensor:
    """The total-variation prior of Mahendran & Vedaldi (2015):

        ``sum over n, c, i < H-1, j < W-1 of ((x[i, j+1] - x[i, j])^2 + (x[i+1, j] - x[i, j])^2)^(beta/2)``

    Both differences are taken at the same pixel, so the sum runs over the first
    ``H-1`` rows and ``W-1`` columns. No epsilon is added: for ``beta < 2`` the gradient
    is undefined where both differences are 0 (start from a noisy image then).

    Parameters
    ----------
    x : Tensor ``(N, C, H, W)`` (any leading dimensions are summed over).
    beta : number, 2 by default.

    Returns
    -------
    0-d tensor that keeps its graph (``x`` may require grad).
    """
    return _tv_variant(x, beta)


# ------------------------------------------------------------ feature inversion

def _inversion_variant(features, target_features, img, tv_weight, beta=2.0, *, norm: str = "sq",
                       tv: str = "right", detach: bool = True):
    """Knobs: ``norm`` ``"sq"`` (divide by ``||target||^2``, the contract), ``"l2"``
    (by ``||target||``), ``"none"``, ``"numel"`` (the mean squared error); ``tv``
    ``"right"``, ``"beta2"`` (``beta`` ignored), ``"none"``."""
    for name, value in (("features", features), ("target_features", target_features), ("img", img)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a tensor; got {type(value).__name__}")
    if tuple(features.shape) != tuple(target_features.shape):
        raise ValueError(f"features {tuple(features.shape)} and target_features "
                         f"{tuple(target_features.shape)} must have the same shape")
    target = target_features.detach() if detach else target_features
    target = target.to(device=features.device, dtype=features.dtype)
    squared = ((features - target) ** 2).sum()
    if norm == "sq":
        loss = squared / (target ** 2).sum()
    elif norm == "l2":
        loss = squared / target.norm()
    elif norm == "numel":
        loss = squared / target.numel()
    else:
        loss = squared
    weight = _number(tv_weight, "tv_weight")
    if tv == "right":
        loss = loss + weight * total_variation(img, beta).to(loss.device)
    elif tv == "beta2":
        loss = loss + weight * total_variation(img, 2.0).to(loss.device)
    return loss


def feature_inversion_loss(features: torch.Tensor, target_features: torch.Tensor, img: torch.Tensor,
                           tv_weight: float, beta: float = 2.0) -> torch.Tensor:
    """The objective of feature inversion (Mahendran & Vedaldi 2015):

        ``||features - target_features||^2 / ||target_features||^2 + tv_weight * total_variation(img, beta)``

    with the norms over the whole tensors. Dividing by the target's squared norm makes
    the first term a relative error, comparable across layers whose activations have
    very different sizes. ``target_features`` is a constant: no gradient flows into it.

    Parameters
    ----------
    features : Tensor, the layer's activation of the image being optimized (with graph).
    target_features : Tensor of the same shape, the activation of the photo.
    img : Tensor ``(N, 3, H, W)``, the image being optimized (for the prior).
    tv_weight, beta : numbers.

    Returns
    -------
    0-d tensor with its graph (on ``features``'s device).
    """
    return _inversion_variant(features, target_features, img, tv_weight, beta)


# ----------------------------------------------------------------------- deepdream

def _deepdream_variant(img, model, layer, lr, *, objective: str = "square", normalize: str = "mean",
                       clamp: bool = True):
    """Knobs: ``objective`` ``"square"`` (``0.5 sum A^2``, the contract) or ``"sum"``
    (``sum A``: the gradient at the layer is 1, not ``A``); ``normalize`` ``"mean"``
    (the contract), ``"max"``, ``"l2"``, ``"none"``; ``clamp``."""
    check_model(model)
    _check_img(img)
    lr = _number(lr, "lr")
    device = model_device(model)
    x = img.detach().to(device).clone().requires_grad_(True)
    with torch.enable_grad(), capture(model, layer) as record:
        model(x)
        act = record.output
        if act is None:
            raise RuntimeError(f"layer {layer!r} did not run in the model's forward pass")
        value = 0.5 * (act ** 2).sum() if objective == "square" else act.sum()
        (grad,) = torch.autograd.grad(value, x)
    return _normalized_step(x.detach(), grad, lr, normalize, clamp).detach()


def deepdream_step(img: torch.Tensor, model: nn.Module, layer, lr: float) -> torch.Tensor:
    """One DeepDream step (Mordvintsev, Olah & Tyka 2015).

    Ascends ``0.5 * sum(A^2)`` of the activation ``A`` of ``layer`` (so the gradient
    arriving at the layer is ``A`` itself: "amplify what the layer sees"): with ``g``
    its gradient with respect to the image, the step is ``x + lr * g / mean(|g|)``,
    clamped to ``[0, 1]``; a zero gradient means no step.

    Parameters
    ----------
    img : Tensor ``(1, 3, H, W)`` in ``[0, 1]``.
    model : nn.Module.
    layer : dotted name of a submodule (``model.get_submodule(layer)``) or the module.
    lr : number.

    Returns
    -------
    Tensor ``(1, 3, H, W)`` in ``[0, 1]``, detached, on the model's device; the hook on
    the layer is removed when the function returns or raises.
    """
    return _deepdream_variant(img, model, layer, lr)

"""Notebook 03 (saliency): which pixels matter for a prediction.

Four ways to ask the question, from the lecture on visualizing CNNs:

* **Gradient saliency** (Simonyan, Vedaldi & Zisserman 2014, "Deep Inside Convolutional
  Networks: Visualising Image Classification Models and Saliency Maps"): how much a
  small change of each pixel changes the class score.
* **Guided backpropagation** (Springenberg, Dosovitskiy, Brox & Riedmiller 2015,
  "Striving for Simplicity: The All Convolutional Net"): the same gradient, with every
  ReLU passing back only positive gradients where it was active.
* **Occlusion** (Zeiler & Fergus 2014, "Visualizing and Understanding Convolutional
  Networks"): how much the class probability drops when a patch is hidden.
* **Shapley values** (Shapley 1953, "A Value for n-Person Games"; Lundberg & Lee 2017,
  "A Unified Approach to Interpreting Model Predictions"): a fair split of the change
  of the class probability among image segments, estimated by sampling permutations.

Every function takes pixel-space images in ``[0, 1]`` and a model from
:func:`cs_helpers.models.load_model` (or any module mapping ``(N, 3, H, W)`` to logits
``(N, C)``), runs on the model's device, leaves its inputs, the model's mode and its
parameters as they were, removes every hook it registers (also when it raises) and
returns detached tensors on the model's device.

The private ``_..._variant`` helpers compute what common mistakes compute (the sum over
channels, logits instead of probabilities, …); the grader uses them to tell a student
which property went wrong. They are not part of the contract.
"""
from __future__ import annotations

import numbers

import torch
from torch import nn

from ..hooks import model_device, relu_backward_hooks, relu_gradient_hooks
from ._inputs import batch_targets, check_batch, check_image, check_model, check_range, logits_of, \
    positive_int, single_target

__all__ = ["gradient_saliency", "guided_backprop", "occlusion_map", "shapley_values"]


# --------------------------------------------------------------------------- baseline

def _baseline_tensor(baseline, image: torch.Tensor) -> torch.Tensor:
    """A number, or a tensor broadcastable to ``(3, H, W)`` (e.g. a per-channel colour
    ``(3, 1, 1)``), as a tensor of the image's dtype and device."""
    if isinstance(baseline, torch.Tensor):
        value = baseline.detach().to(device=image.device, dtype=image.dtype)
        try:
            torch.broadcast_shapes(value.shape, image.shape)
        except RuntimeError:
            raise ValueError(f"baseline of shape {tuple(value.shape)} does not broadcast to the image "
                             f"{tuple(image.shape)}") from None
        return value
    if isinstance(baseline, numbers.Real) and not isinstance(baseline, bool):
        return torch.tensor(float(baseline), dtype=image.dtype, device=image.device)
    raise TypeError(f"baseline must be a number or a tensor; got {type(baseline).__name__}")


# ------------------------------------------------------------------ gradient saliency

def _input_gradient(model, images, targets, score: str = "logit") -> torch.Tensor:
    """``d score_target / d images`` for the whole batch in one backward pass.

    ``score``: ``"logit"`` (the contract), or ``"prob"`` / ``"logprob"`` (softmax
    probability / its log: mistakes the grader recognizes). Returns ``(N, 3, H, W)``.
    """
    check_model(model)
    check_batch(images)
    device = model_device(model)
    x = images.detach().to(device).clone().requires_grad_(True)
    t = batch_targets(targets, x.shape[0], device)
    with torch.enable_grad():
        logits = logits_of(model, x)
        check_range(t, logits.shape[1])
        if score == "prob":
            logits = logits.softmax(dim=1)
        elif score == "logprob":
            logits = logits.log_softmax(dim=1)
        # The score of image i depends on image i only, so the gradient of the sum of
        # the selected scores holds every image's own gradient: one backward pass.
        selected = logits.gather(1, t[:, None]).sum()
        (grad,) = torch.autograd.grad(selected, x)
    return grad.detach()


def gradient_saliency(model: nn.Module, images: torch.Tensor, targets) -> torch.Tensor:
    """Gradient saliency maps (Simonyan, Vedaldi & Zisserman 2014).

    ``M[n, i, j] = max_c | dS_{t_n}(x_n) / dx_n[c, i, j] |``: the largest absolute
    derivative of the target's *logit* ``S`` (not its softmax probability) over the three
    colour channels of each pixel.

    Parameters
    ----------
    model : nn.Module mapping ``(N, 3, H, W)`` in ``[0, 1]`` to logits ``(N, C)``.
    images : Tensor ``(N, 3, H, W)`` in ``[0, 1]`` (any device; moved to the model's).
    targets : int (the same class for every image) or LongTensor ``(N,)``.

    Returns
    -------
    Tensor ``(N, H, W)``, non-negative, detached, on the model's device. The whole
    batch costs one forward and one backward pass (the gradient of the sum of the
    selected scores), however large ``N``.
    """
    return _input_gradient(model, images, targets).abs().amax(dim=1)


# -------------------------------------------------------------------- guided backprop

def _guided_rule(module, inputs, grad_output):
    """The contract's rule, from the recorded input: positive gradients where the local
    derivative is non-zero (``x > 0`` for ReLU, ``0 < x < 6`` for ReLU6)."""
    active = (inputs > 0) & (inputs < 6) if isinstance(module, nn.ReLU6) else inputs > 0
    return grad_output.clamp(min=0) * active


def _unbounded_rule(module, inputs, grad_output):
    return grad_output.clamp(min=0) * (inputs > 0)


# Rules that need only the gradients (relu_gradient_hooks: no record of the forward pass).
# The guided rule is one of them: autograd's gradient for the activation's input is
# grad_output times the local derivative (PyTorch's ReLU6 passes it where 0 < x < 6), so
# max(grad_output, 0) * 1[derivative != 0] equals max(grad_input, 0).
_GRADIENT_RULES = {"guided": lambda module, grad_input, grad_output: grad_input.clamp(min=0),
                   "deconvnet": lambda module, grad_input, grad_output: grad_output.clamp(min=0)}
# Rules that read the activation's input (relu_backward_hooks).
_INPUT_RULES = {"guided_from_inputs": _guided_rule, "relu6_unbounded": _unbounded_rule}


def _guided_variant(model, images, targets, rule: str = "guided") -> torch.Tensor:
    """Backpropagation of the target logits with a modified rule at every ReLU/ReLU6:
    ``"guided"`` (the contract), ``"guided_from_inputs"`` (the same, from the recorded
    inputs), ``"plain"`` (the ordinary gradient), ``"deconvnet"`` (positive part of the
    gradient, ignoring the forward pass: Zeiler & Fergus 2014), ``"relu6_unbounded"``
    (guided, but a ReLU6 treated as a ReLU)."""
    check_model(model)
    check_batch(images)
    if rule == "plain":
        return _input_gradient(model, images, targets)
    device = model_device(model)
    x = images.detach().to(device).clone().requires_grad_(True)
    t = batch_targets(targets, x.shape[0], device)
    hooks = (relu_gradient_hooks(model, _GRADIENT_RULES[rule]) if rule in _GRADIENT_RULES
             else relu_backward_hooks(model, _INPUT_RULES[rule]))
    with hooks, torch.enable_grad():
        logits = logits_of(model, x)
        check_range(t, logits.shape[1])
        (grad,) = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), x)
    return grad.detach()


def guided_backprop(model: nn.Module, images: torch.Tensor, targets) -> torch.Tensor:
    """Guided backpropagation (Springenberg et al. 2015).

    The gradient of the target logit ``S_t`` with respect to the image, computed with a
    modified backward rule at every ``nn.ReLU`` and ``nn.ReLU6``: the gradient ``g``
    arriving from above is passed down as ``max(g, 0) * 1[local derivative != 0]``,
    i.e. only positive gradients, and only where the activation's input ``x`` was
    ``> 0`` (ReLU) or in ``(0, 6)`` (ReLU6). Every other layer backpropagates as usual.

    Parameters
    ----------
    model : nn.Module mapping ``(N, 3, H, W)`` in ``[0, 1]`` to logits ``(N, C)``, with
        its activations as separate ``nn.ReLU`` / ``nn.ReLU6`` modules.
    images : Tensor ``(N, 3, H, W)`` in ``[0, 1]``.
    targets : int or LongTensor ``(N,)``.

    Returns
    -------
    Tensor ``(N, 3, H, W)``, signed (not an absolute value), detached, on the model's
    device. One forward and one backward pass for the batch; the hooks are removed
    when the function returns or raises.
    """
    return _guided_variant(model, images, targets, "guided")


# -------------------------------------------------------------------------- occlusion

def _positions(size: int, window: int, stride: int) -> list[int]:
    """Top-left corners ``0, stride, 2 stride, …`` while the window fits, plus one
    window flush with the far border when the grid stops short of it."""
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] + window < size:
        starts.append(size - window)
    return starts


def _occlusion_variant(model, image, target, window=16, stride=8, baseline=0.5, batch_size=64, *,
                       score: str = "prob", reduce: str = "mean", flush: bool = True) -> torch.Tensor:
    """Occlusion map with knobs for the mistakes the grader recognizes: ``score``
    ``"prob"`` (the contract, ``p(image) - p(occluded)``), ``"logit"`` (the same with
    logits) or ``"reversed"`` (``p(occluded) - p(image)``); ``reduce`` ``"mean"`` or
    ``"sum"`` over the covering windows; ``flush=False`` leaves out the window flush
    with the border (uncovered pixels get 0)."""
    check_model(model)
    check_image(image)
    target = single_target(target)
    window = positive_int(window, "window")
    stride = positive_int(stride, "stride")
    batch_size = positive_int(batch_size, "batch_size")
    _, height, width = image.shape
    if window > min(height, width):
        raise ValueError(f"the window ({window} px) does not fit the {height}x{width} image")
    if stride > window:
        raise ValueError(f"stride ({stride}) must not exceed the window ({window}): a larger stride leaves "
                         "pixels between the windows that no window covers")
    device = model_device(model)
    x = image.detach().to(device)
    fill = _baseline_tensor(baseline, x)
    rows, cols = _positions(height, window, stride), _positions(width, window, stride)
    if not flush:
        rows = list(range(0, height - window + 1, stride))
        cols = list(range(0, width - window + 1, stride))
    # One boolean row band and column band per window position: window k covers
    # pixel (i, j) when row_band[k, i] and col_band[k, j].
    row_band = torch.zeros(len(rows), height, dtype=torch.bool, device=device)
    col_band = torch.zeros(len(cols), width, dtype=torch.bool, device=device)
    for k, r in enumerate(rows):
        row_band[k, r:r + window] = True
    for k, c in enumerate(cols):
        col_band[k, c:c + window] = True
    row_band = row_band.repeat_interleave(len(cols), dim=0)        # (P, H), row-major order
    col_band = col_band.repeat(len(rows), 1)                       # (P, W)

    def measure(batch):
        logits = logits_of(model, batch)
        check_range(torch.tensor([target]), logits.shape[1])
        return logits[:, target] if score == "logit" else logits.softmax(dim=1)[:, target]

    total = torch.zeros(height, width, dtype=torch.float64, device=device)
    count = torch.zeros(height, width, dtype=torch.float64, device=device)
    with torch.no_grad():
        clean = measure(x[None])[0]
        for start in range(0, row_band.shape[0], batch_size):
            covered = row_band[start:start + batch_size, :, None] & col_band[start:start + batch_size, None, :]
            occluded = torch.where(covered[:, None], fill, x)      # (B, 3, H, W)
            drop = clean - measure(occluded)
            if score == "reversed":
                drop = -drop
            total += (drop.double()[:, None, None] * covered).sum(dim=0)
            count += covered.sum(dim=0)
    if reduce == "sum":
        return total.to(image.dtype)
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total)).to(image.dtype)


def occlusion_map(model: nn.Module, image: torch.Tensor, target, window: int = 16, stride: int = 8,
                  baseline=0.5, batch_size: int = 64) -> torch.Tensor:
    """Occlusion sensitivity map (Zeiler & Fergus 2014).

    A ``window x window`` square is slid over the image; its top-left corners are
    ``0, stride, 2*stride, …`` on each axis while the window fits, plus one last
    position flush with the bottom (right) border when that grid does not reach it.
    At each position the square is set to ``baseline`` in all three channels and the
    drop of the target's softmax probability, ``p_t(image) - p_t(occluded)``, is
    recorded. Each pixel gets the **mean** of the drops of the windows that cover it.
    The stride may not exceed the window: with ``stride <= window`` and the flush window
    every pixel is covered at least once, while a larger stride would leave gaps that no
    window covers, so it raises a ``ValueError`` (rather than inventing a value there).

    Parameters
    ----------
    model : nn.Module mapping ``(N, 3, H, W)`` in ``[0, 1]`` to logits.
    image : Tensor ``(3, H, W)`` in ``[0, 1]``.
    target : int, the class whose probability is measured.
    window, stride : positive ints, ``stride <= window <= min(H, W)``.
    baseline : number (0.5: mid-gray) or a tensor broadcastable to ``(3, H, W)``.
    batch_size : int, occluded images per forward pass.

    Returns
    -------
    Tensor ``(H, W)`` of the image's dtype, detached, on the model's device: positive where hiding the
    pixels lowers the probability of ``target``. Costs one forward pass of the clean
    image and ``ceil(P / batch_size)`` batched passes for ``P`` window positions,
    under ``torch.no_grad()``.
    """
    return _occlusion_variant(model, image, target, window, stride, baseline, batch_size)


# --------------------------------------------------------------------- shapley values

def _segment_count(segments, image) -> int:
    if not isinstance(segments, torch.Tensor):
        raise TypeError(f"segments must be a LongTensor (H, W); got {type(segments).__name__}")
    if segments.is_floating_point() or segments.is_complex() or segments.dtype == torch.bool:
        raise TypeError(f"segments must hold integer segment ids; got dtype {segments.dtype}")
    if tuple(segments.shape) != tuple(image.shape[1:]):
        raise ValueError(f"segments must have the image's height and width {tuple(image.shape[1:])}; "
                         f"got {tuple(segments.shape)}")
    if int(segments.min()) < 0:
        raise ValueError("segment ids must be 0, 1, ..., M-1; got a negative id")
    return int(segments.max()) + 1


def _shapley_variant(model, image, target, segments, n_permutations, baseline=0.5, seed=0,
                     batch_size=64, *, score: str = "prob", invert: bool = False) -> torch.Tensor:
    """Permutation-sampling Shapley estimate with knobs for recognizable mistakes:
    ``score="logit"`` values coalitions by the logit; ``invert=True`` sets the
    coalition's own segments to the baseline instead of the others."""
    check_model(model)
    check_image(image)
    target = single_target(target)
    n_perm = positive_int(n_permutations, "n_permutations")
    batch_size = positive_int(batch_size, "batch_size")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int; got {type(seed).__name__}")
    m = _segment_count(segments, image)
    device = model_device(model)
    x = image.detach().to(device)
    fill = _baseline_tensor(baseline, x)
    seg = segments.detach().to(device=device, dtype=torch.long)

    # Permutation p adds the segments in the order perms[p, 0], perms[p, 1], ...
    generator = torch.Generator().manual_seed(int(seed))
    perms = torch.stack([torch.randperm(m, generator=generator) for _ in range(n_perm)])   # (P, M)
    # rank[p, s] = the step at which permutation p adds segment s.
    rank = torch.empty_like(perms).scatter_(1, perms, torch.arange(m).expand(n_perm, m))
    steps = torch.arange(m + 1)
    members = rank[:, None, :] < steps[None, :, None]             # (P, M+1, M): prefix k holds rank < k
    # Many prefixes recur (every permutation starts empty and ends full): evaluate each
    # distinct coalition once.
    distinct, which = torch.unique(members.reshape(-1, m), dim=0, return_inverse=True)
    distinct = distinct.to(device)

    values = torch.empty(distinct.shape[0], dtype=torch.float64, device=device)
    with torch.no_grad():
        for start in range(0, distinct.shape[0], batch_size):
            coalition = distinct[start:start + batch_size]        # (B, M) bool
            keep = coalition[:, seg]                              # (B, H, W): pixel's segment in coalition
            if invert:
                keep = ~keep
            batch = torch.where(keep[:, None], x, fill)
            logits = logits_of(model, batch)
            check_range(torch.tensor([target]), logits.shape[1])
            out = logits[:, target] if score == "logit" else logits.softmax(dim=1)[:, target]
            values[start:start + coalition.shape[0]] = out.double()

    v = values[which.to(device)].view(n_perm, m + 1)             # v[p, k]: value of prefix k
    marginal = v[:, 1:] - v[:, :-1]                               # contribution of perms[p, k]
    phi = torch.zeros(m, dtype=torch.float64, device=device)
    phi.index_add_(0, perms.to(device).reshape(-1), marginal.reshape(-1))
    return (phi / n_perm).to(image.dtype)


def shapley_values(model: nn.Module, image: torch.Tensor, target, segments: torch.Tensor,
                   n_permutations: int, baseline=0.5, seed: int = 0, batch_size: int = 64) -> torch.Tensor:
    """Shapley values of image segments, estimated by permutation sampling (Shapley
    1953; Lundberg & Lee 2017; the sampling estimator of Castro et al. 2009).

    The value of a coalition ``S`` of segments is ``v(S) = p_t(x_S)``, the softmax
    probability of ``target`` on the image whose segments outside ``S`` are set to
    ``baseline``. The Shapley value of segment ``i`` is its marginal contribution
    ``v(S ∪ {i}) - v(S)`` averaged over all orders in which the segments can be added,
    ``S`` being the segments added before ``i``. We average over ``n_permutations``
    random orders instead: permutation ``k`` is ``torch.randperm(M, generator=g)``, the
    ``k``-th draw from ``g = torch.Generator().manual_seed(seed)``, and adds the
    segments in the order ``perm[0], perm[1], …``. In each permutation the marginal
    contributions telescope to ``v(all) - v(none)``, so the estimates add up to it
    exactly (to floating-point rounding) for any ``n_permutations``.

    Parameters
    ----------
    model : nn.Module mapping ``(N, 3, H, W)`` in ``[0, 1]`` to logits.
    image : Tensor ``(3, H, W)`` in ``[0, 1]``.
    target : int.
    segments : LongTensor ``(H, W)`` of segment ids ``0 .. M-1`` (``M = max + 1``).
    n_permutations : positive int.
    baseline : number or tensor broadcastable to ``(3, H, W)``.
    seed : int, seeds the permutations (the global random state is not touched).
    batch_size : int, coalitions per forward pass.

    Returns
    -------
    Tensor ``(M,)``, detached, on the model's device. Costs at most
    ``n_permutations * (M - 1) + 2`` coalition evaluations (each distinct coalition is
    evaluated once), in batches of ``batch_size``, under ``torch.no_grad()``.
    """
    return _shapley_variant(model, image, target, segments, n_permutations, baseline, seed, batch_size)

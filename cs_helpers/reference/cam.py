"""Notebook 04 (CAM): where in the image the evidence for a class lies.

* **Class activation maps** (Zhou, Khosla, Lapedriza, Oliva & Torralba 2016, "Learning
  Deep Features for Discriminative Localization"): for a network that ends in global
  average pooling and one linear layer, the class score is a weighted sum of the last
  feature maps' means, so the same weighted sum of the maps themselves says where the
  score comes from.
* **Grad-CAM** (Selvaraju, Cogswell, Das, Vedantam, Parikh & Batra 2017, "Grad-CAM:
  Visual Explanations from Deep Networks via Gradient-based Localization"): the weights
  are the spatial means of the score's gradient, which works at any layer of any
  network.
* **Guided Grad-CAM**: Grad-CAM upsampled to the image, times guided backpropagation
  (notebook 03), for a high-resolution and class-specific picture.
* **The pointing game** (Zhang, Bargal, Lin, Brandt, Shen & Sclaroff 2016, "Top-down
  Neural Attention by Excitation Backprop"): does a map's maximum fall on the object?

Every function leaves its inputs, the model's mode and its parameters as they were,
removes every hook it registers (also when it raises) and returns detached tensors.
The private ``_..._variant`` helpers compute what common mistakes compute; the grader
uses them to name the property that went wrong. They are not part of the contract.
"""
from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import nn

from ..hooks import get_layer, model_device
from ._inputs import batch_targets, check_batch, check_model, check_range, logits_of, single_target
from .saliency import guided_backprop

__all__ = ["class_activation_map", "grad_cam", "upsample_cam", "guided_grad_cam", "pointing_game"]


# ------------------------------------------------------------------------------- CAM

def _cam_variant(features, fc_weight, target, *, relu: bool = False, normalize: bool = False) -> torch.Tensor:
    if not isinstance(features, torch.Tensor) or features.dim() != 3:
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(f"features must be one image's feature maps (K, h, w); got {shape}")
    if not isinstance(fc_weight, torch.Tensor) or fc_weight.dim() != 2 or fc_weight.shape[1] != features.shape[0]:
        shape = tuple(fc_weight.shape) if isinstance(fc_weight, torch.Tensor) else type(fc_weight).__name__
        raise ValueError(f"fc_weight must be (num_classes, K) with K = {features.shape[0]} channels; got {shape}")
    t = single_target(target)
    check_range(torch.tensor([t]), fc_weight.shape[0])
    feats = features.detach()
    weights = fc_weight.detach()[t].to(device=feats.device, dtype=feats.dtype)
    cam = torch.einsum("k,khw->hw", weights, feats)
    if relu:
        cam = cam.clamp(min=0)
    if normalize:
        low, high = cam.min(), cam.max()
        cam = (cam - low) / (high - low) if high > low else torch.zeros_like(cam)
    return cam


def class_activation_map(features: torch.Tensor, fc_weight: torch.Tensor, target) -> torch.Tensor:
    """Class activation map (Zhou et al. 2016).

    ``M[i, j] = sum_k fc_weight[target, k] * features[k, i, j]``. For a network whose
    score is ``S_c = sum_k w_ck mean_ij A_k[i, j] + b_c`` this is the map whose spatial
    mean is ``S_c - b_c``: the score, spread over the positions it comes from.

    Parameters
    ----------
    features : Tensor ``(K, h, w)``, one image's last feature maps (before pooling).
    fc_weight : Tensor ``(num_classes, K)``, the weight of the final linear layer.
    target : int, the class.

    Returns
    -------
    Tensor ``(h, w)`` on ``features``' device, detached: no bias, no ReLU, no
    normalization (negative values are evidence against the class).
    """
    return _cam_variant(features, fc_weight, target)


# -------------------------------------------------------------------------- Grad-CAM

def _layer_activation_and_gradient(model, layer, images, targets, score: str = "logit"):
    """The layer's output ``A`` ``(N, K, h, w)`` and ``dS/dA`` for each image's target,
    from one forward pass and one backward pass that stops at the layer.

    A forward hook replaces the layer's output by a detached copy that requires grad
    (then a clone of it, so that an in-place activation right after the layer still
    works): the backward pass runs from the scores down to the layer and no further,
    and nothing before the layer builds a graph. Hooking a container (a block whose
    last module is a bare or in-place ReLU) sees the block's final output.
    """
    check_model(model)
    check_batch(images)
    module = get_layer(model, layer)
    device = model_device(model)
    x = images.detach().to(device)
    t = batch_targets(targets, x.shape[0], device)
    seen: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        if not isinstance(output, torch.Tensor) or output.dim() != 4:
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise ValueError(f"layer {layer!r} must return feature maps (N, K, h, w); got {shape}")
        if seen:
            raise ValueError(f"layer {layer!r} runs more than once in the forward pass; Grad-CAM needs "
                             "a module used once")
        leaf = output.detach().requires_grad_(True)
        seen.append(leaf)
        return leaf.clone()

    handle = module.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            logits = logits_of(model, x)
            check_range(t, logits.shape[1])
            if not seen:
                raise ValueError(f"layer {layer!r} did not run in the model's forward pass")
            if score == "prob":
                logits = logits.softmax(dim=1)
            # Image i's score depends on image i only (eval mode): one backward pass.
            selected = logits.gather(1, t[:, None]).sum()
            (grad,) = torch.autograd.grad(selected, seen[0], allow_unused=True)
    finally:
        handle.remove()
    activation = seen[0].detach()
    if grad is None:
        grad = torch.zeros_like(activation)
    return activation, grad.detach()


def _grad_cam_variant(model, layer, images, targets, *, relu: bool = True, reduce: str = "mean",
                      score: str = "logit", first_target: bool = False) -> torch.Tensor:
    """Grad-CAM with knobs for the mistakes the grader recognizes: ``relu=False``;
    ``reduce`` ``"mean"`` (the contract), ``"max"`` or ``"sum"`` of the gradient over
    space; ``score`` ``"logit"`` or ``"prob"``; ``first_target=True`` explains every
    image for the first image's target."""
    if first_target:
        t = batch_targets(targets, images.shape[0] if isinstance(images, torch.Tensor) else 1, "cpu")
        targets = int(t[0])
    activation, grad = _layer_activation_and_gradient(model, layer, images, targets, score)
    if reduce == "mean":
        alpha = grad.mean(dim=(2, 3))
    elif reduce == "sum":
        alpha = grad.sum(dim=(2, 3))
    elif reduce == "max":
        alpha = grad.amax(dim=(2, 3))
    else:
        raise ValueError(reduce)
    cam = torch.einsum("nk,nkhw->nhw", alpha, activation)
    return cam.clamp(min=0) if relu else cam


def grad_cam(model: nn.Module, layer, images: torch.Tensor, targets) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al. 2017) at any layer.

    With ``A`` the layer's output ``(K, h, w)`` for one image and ``S_t`` its target's
    logit, ``alpha_k = mean_ij dS_t / dA_k[i, j]`` and the map is
    ``ReLU(sum_k alpha_k A_k)``. For a network ending in global average pooling and a
    linear layer, at the last feature maps, this is ``ReLU(CAM) / (h * w)``.

    Parameters
    ----------
    model : nn.Module mapping ``(N, 3, H, W)`` in ``[0, 1]`` to logits ``(N, C)``.
    layer : dotted module name (``"relu3"``, ``"blocks.10"``) or the module itself; it
        must run once per forward pass and return ``(N, K, h, w)``. A block whose last
        module is a bare or in-place activation is best named by the block.
    images : Tensor ``(N, 3, H, W)`` in ``[0, 1]``.
    targets : int (the same class for every image) or LongTensor ``(N,)``.

    Returns
    -------
    Tensor ``(N, h, w)`` at the layer's resolution, non-negative, not normalized,
    detached, on the model's device. One forward pass and one backward pass (from the
    scores down to the layer only) for the whole batch.
    """
    return _grad_cam_variant(model, layer, images, targets)


# ------------------------------------------------------------------------ upsampling

def _size_pair(size) -> tuple[int, int]:
    if isinstance(size, numbers.Integral) and not isinstance(size, bool):
        size = (int(size), int(size))
    if isinstance(size, torch.Size):
        size = tuple(size)
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in size)):
        raise TypeError(f"size must be an int or a pair (H, W) of ints; got {size!r}")
    if min(size) < 1:
        raise ValueError(f"size must be positive; got {tuple(size)}")
    return int(size[0]), int(size[1])


def _upsample_variant(cam, size, *, align_corners: bool = False, joint: bool = False,
                      mode: str = "bilinear", normalize: bool = True) -> torch.Tensor:
    """Upsampling with knobs for mistakes: ``align_corners=True``, ``joint=True``
    (min-max over the whole batch), ``mode`` (``"nearest"``, ``"bicubic"``),
    ``normalize=False``."""
    if not isinstance(cam, torch.Tensor):
        raise TypeError(f"cam must be a tensor (N, h, w); got {type(cam).__name__}")
    if cam.dim() != 3:
        hint = " (one map? add a batch dimension with cam.unsqueeze(0))" if cam.dim() == 2 else ""
        raise ValueError(f"cam must have shape (N, h, w); got {tuple(cam.shape)}{hint}")
    height, width = _size_pair(size)
    maps = cam.detach()
    if not maps.is_floating_point():
        maps = maps.float()
    kwargs = {} if mode == "nearest" else {"align_corners": align_corners}
    up = F.interpolate(maps[:, None], size=(height, width), mode=mode, **kwargs)[:, 0]
    if not normalize:
        return up
    if joint:
        low, high = up.amin(), up.amax()
        return (up - low) / (high - low) if high > low else torch.zeros_like(up)
    flat = up.flatten(1)
    low, high = flat.amin(dim=1), flat.amax(dim=1)
    span = high - low
    # A map whose values are all equal before upsampling carries no location: zeros
    # (bilinear weights may add rounding noise to a constant map, so decide before).
    before = maps.flatten(1)
    constant = (before.amax(dim=1) == before.amin(dim=1)) | (span <= 0)
    scale = torch.where(constant, torch.ones_like(span), span)
    out = (up - low[:, None, None]) / scale[:, None, None]
    return torch.where(constant[:, None, None], torch.zeros_like(out), out)


def upsample_cam(cam: torch.Tensor, size) -> torch.Tensor:
    """Coarse maps to image size, each scaled to ``[0, 1]``.

    Bilinear interpolation with ``align_corners=False`` (pixel centres, as
    ``F.interpolate`` and image libraries resize) to ``size``, then per map
    ``(m - min) / (max - min)``. A map whose values are all exactly equal before
    upsampling (e.g. a Grad-CAM that the ReLU set to zero everywhere) carries no
    location and becomes zeros; so does a map that resizing makes constant.

    Parameters
    ----------
    cam : Tensor ``(N, h, w)``.
    size : int (a square) or a pair ``(H, W)``.

    Returns
    -------
    Tensor ``(N, H, W)`` in ``[0, 1]`` on ``cam``'s device, detached.
    """
    return _upsample_variant(cam, size)


# -------------------------------------------------------------------- guided Grad-CAM

def _guided_grad_cam_variant(model, layer, images, targets, *, guided: bool = True,
                             normalize: bool = True) -> torch.Tensor:
    """``guided=False`` multiplies the plain input gradient; ``normalize=False``
    multiplies the upsampled Grad-CAM without min-max."""
    from .saliency import _input_gradient

    check_batch(images)
    cam = grad_cam(model, layer, images, targets)
    height, width = images.shape[-2:]
    heat = _upsample_variant(cam, (height, width), normalize=normalize)
    pixels = guided_backprop(model, images, targets) if guided else _input_gradient(model, images, targets)
    return pixels * heat[:, None]


def guided_grad_cam(model: nn.Module, layer, images: torch.Tensor, targets) -> torch.Tensor:
    """Guided Grad-CAM (Selvaraju et al. 2017).

    ``guided_backprop(model, images, targets) * upsample_cam(grad_cam(model, layer,
    images, targets), (H, W))``, the map broadcast over the three colour channels:
    guided backprop's fine detail, kept only where Grad-CAM puts the class.

    Returns
    -------
    Tensor ``(N, 3, H, W)``, signed, detached, on the model's device. Two forward and
    two backward passes for the batch.
    """
    return _guided_grad_cam_variant(model, layer, images, targets)


# ------------------------------------------------------------------ the pointing game

def _hits(cams, masks, tolerance=0, *, metric: str = "euclidean", ties: str = "first") -> torch.Tensor:
    """Boolean ``(N,)``: map n's maximum lies within ``tolerance`` of its mask. Knobs
    for mistakes: ``metric`` ``"chebyshev"`` (a square dilation) or ``"manhattan"``;
    ``ties="last"`` takes the last maximum in row-major order."""
    for name, value in (("cams", cams), ("masks", masks)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a tensor (N, H, W); got {type(value).__name__}")
        if value.dim() != 3:
            raise ValueError(f"{name} must have shape (N, H, W); got {tuple(value.shape)}")
    if tuple(cams.shape) != tuple(masks.shape):
        raise ValueError(f"cams and masks must have the same shape (N, H, W); got {tuple(cams.shape)} and "
                         f"{tuple(masks.shape)} (upsample the maps to the masks' size first)")
    if cams.shape[0] == 0:
        raise ValueError("cams is an empty batch")
    if isinstance(tolerance, bool) or not isinstance(tolerance, numbers.Real) or not tolerance >= 0:
        raise ValueError(f"tolerance must be a number of pixels >= 0; got {tolerance!r}")
    n, height, width = cams.shape
    heat = cams.detach().float().flatten(1)
    if ties == "last":
        index = (heat.shape[1] - 1) - heat.flip(1).argmax(dim=1)
    else:
        # argmax returns the first maximal index (row-major order).
        index = heat.argmax(dim=1)
    rows, cols = (index // width).to(cams.device), (index % width).to(cams.device)
    inside = masks.detach().to(cams.device) != 0
    ys = torch.arange(height, device=cams.device, dtype=torch.float64)[None, :, None]
    xs = torch.arange(width, device=cams.device, dtype=torch.float64)[None, None, :]
    dy = (ys - rows.double()[:, None, None]).abs()
    dx = (xs - cols.double()[:, None, None]).abs()
    if metric == "chebyshev":
        dist = torch.maximum(dy, dx)
        reach = float(tolerance)
    elif metric == "manhattan":
        dist = dy + dx
        reach = float(tolerance)
    else:
        dist = dy ** 2 + dx ** 2                   # squared: exact for integer offsets
        reach = float(tolerance) ** 2
    dist = torch.where(inside, dist, torch.full_like(dist, float("inf")))
    return dist.flatten(1).amin(dim=1) <= reach


def _pointing_variant(cams, masks, tolerance=0, **knobs) -> float:
    return float(_hits(cams, masks, tolerance, **knobs).double().mean())


def pointing_game(cams: torch.Tensor, masks: torch.Tensor, tolerance: float = 0) -> float:
    """The pointing game (Zhang et al. 2016): the share of maps whose maximum hits the object.

    A map scores a hit when its maximum (the first one in row-major order if several
    pixels tie) lies within Euclidean distance ``tolerance`` pixels of some pixel of its
    mask: inside the mask for ``tolerance=0``. Zhang et al. use 15 px at 224 px, about
    4 px for ToyWorld's 64 px scenes. An empty mask is a miss.

    Parameters
    ----------
    cams : Tensor ``(N, H, W)`` (upsample coarse maps to the masks' size first).
    masks : boolean Tensor ``(N, H, W)`` (non-zero counts as the object).
    tolerance : number of pixels ``>= 0``.

    Returns
    -------
    float in ``[0, 1]``. Raises ``ValueError`` when the shapes differ.
    """
    return _pointing_variant(cams, masks, tolerance)

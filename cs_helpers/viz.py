"""Pictures for the notebooks, in one consistent matplotlib style.

Every function draws into a new figure (or into ``ax`` where it takes one) and returns
the figure, so a notebook cell can show it and a test can inspect or close it.
Images are tensors ``(3, H, W)`` / ``(N, 3, H, W)`` in ``[0, 1]``, as everywhere in the
course.
"""
from __future__ import annotations

import math

import numpy as np
import torch

__all__ = [
    "STYLE",
    "filter_grid",
    "overlay_heatmap",
    "show_heatmaps",
    "show_images",
    "show_toyworld",
    "to_numpy_image",
]

STYLE = {
    "figure.dpi": 100,
    "axes.titlesize": 9,
    "axes.titlepad": 3,
    "font.size": 9,
    "image.interpolation": "nearest",
}
HEATMAP_CMAP = "jet"
DIVERGING_CMAP = "RdBu_r"


def _plt():
    import matplotlib.pyplot as plt

    plt.rcParams.update(STYLE)
    return plt


def to_numpy_image(image) -> np.ndarray:
    """``(3, H, W)`` or ``(H, W)`` tensor/array to an ``(H, W, 3)`` / ``(H, W)`` numpy
    array for ``imshow``, clipped to ``[0, 1]``."""
    if isinstance(image, torch.Tensor):
        image = image.detach().float().cpu().numpy()
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 3 and image.shape[0] in (1, 3):
        image = np.transpose(image, (1, 2, 0))
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim not in (2, 3):
        raise ValueError(f"expected an image (3, H, W), (H, W, 3) or (H, W); got shape {image.shape}")
    return np.clip(image, 0.0, 1.0)


def _grid(n, ncols, panel=2.0):
    plt = _plt()
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel * ncols, panel * nrows + 0.3), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    return fig, axes.flat


def show_images(images, titles=None, ncols: int = 6, panel: float = 2.0, suptitle: str | None = None,
                interpolation: str = "bilinear"):
    """A batch in a grid, with optional titles.

    ``images``: ``(N, 3, H, W)`` colour or ``(N, 1, H, W)`` / ``(N, H, W)`` gray
    tensors, one image ``(3, H, W)``, or a list of images. Use
    ``interpolation="nearest"`` for tiny images (8x8 digits) to see their pixels."""
    if isinstance(images, torch.Tensor):
        if images.dim() == 2 or (images.dim() == 3 and images.shape[0] in (1, 3)):
            images = images.unsqueeze(0)
        elif images.dim() == 3:  # (N, H, W): a batch of gray images
            images = images.unsqueeze(1)
    images = list(images)
    if titles is not None and len(titles) != len(images):
        raise ValueError(f"show_images: {len(images)} images but {len(titles)} titles")
    fig, axes = _grid(len(images), ncols, panel)
    for i, (ax, image) in enumerate(zip(axes, images)):
        picture = to_numpy_image(image)
        ax.imshow(picture, cmap="gray" if picture.ndim == 2 else None, vmin=0, vmax=1,
                  interpolation=interpolation)
        if titles is not None:
            ax.set_title(str(titles[i]))
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig


def _normalize_map(heatmap) -> np.ndarray:
    if isinstance(heatmap, torch.Tensor):
        heatmap = heatmap.detach().float().cpu().numpy()
    heatmap = np.asarray(heatmap, dtype=np.float32)
    if heatmap.ndim != 2:
        raise ValueError(f"expected a heatmap (H, W); got shape {heatmap.shape}")
    low, high = float(heatmap.min()), float(heatmap.max())
    return (heatmap - low) / (high - low) if high > low else np.zeros_like(heatmap)


def _resize_map(heatmap: np.ndarray, shape) -> np.ndarray:
    if heatmap.shape == tuple(shape):
        return heatmap
    t = torch.from_numpy(heatmap)[None, None]
    return torch.nn.functional.interpolate(t, size=tuple(shape), mode="bilinear",
                                           align_corners=False)[0, 0].numpy()


def overlay_heatmap(image, heatmap, alpha: float = 0.5, ax=None, title: str | None = None,
                    cmap: str = HEATMAP_CMAP):
    """Draws ``heatmap (h, w)``, min-max scaled and resized to the image, over
    ``image (3, H, W)``. Returns the figure."""
    plt = _plt()
    if ax is None:
        fig, ax = plt.subplots(figsize=(3, 3))
    else:
        fig = ax.figure
    picture = to_numpy_image(image)
    heat = _resize_map(_normalize_map(heatmap), picture.shape[:2])
    ax.imshow(picture, interpolation="bilinear")
    ax.imshow(heat, cmap=cmap, alpha=alpha, vmin=0, vmax=1, interpolation="bilinear")
    ax.axis("off")
    if title:
        ax.set_title(title)
    return fig


def show_heatmaps(images, heatmaps, titles=None, ncols: int = 6, alpha: float = 0.5,
                  panel: float = 2.0, suptitle: str | None = None):
    """One overlay per image: ``images (N, 3, H, W)`` with ``heatmaps (N, h, w)``."""
    images, heatmaps = list(images), list(heatmaps)
    if len(images) != len(heatmaps):
        raise ValueError(f"show_heatmaps: {len(images)} images but {len(heatmaps)} heatmaps")
    fig, axes = _grid(len(images), ncols, panel)
    for i, (ax, image, heat) in enumerate(zip(axes, images, heatmaps)):
        overlay_heatmap(image, heat, alpha=alpha, ax=ax, title=None if titles is None else str(titles[i]))
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig


def filter_grid(weights, ncols: int = 8, panel: float = 0.9, title: str | None = None,
                normalize: bool = True):
    """Tiles a filter bank ``(C_out, C_in, k, k)`` into a grid: RGB filters
    (``C_in == 3``) in colour, others as their first input channel in gray.

    With ``normalize`` each filter is min-max scaled on its own, as
    ``normalize_filters`` of notebook 01 does; pass already-normalized weights with
    ``normalize=False``."""
    if isinstance(weights, torch.Tensor):
        weights = weights.detach().float().cpu()
    weights = torch.as_tensor(weights, dtype=torch.float32)
    if weights.dim() != 4:
        raise ValueError(f"filter_grid expects weights (C_out, C_in, k, k); got shape {tuple(weights.shape)}")
    if normalize:
        flat = weights.flatten(1)
        low = flat.min(1, keepdim=True).values
        span = flat.max(1, keepdim=True).values - low
        flat = torch.where(span > 0, (flat - low) / span.clamp_min(1e-12), torch.full_like(flat, 0.5))
        weights = flat.view_as(weights)
    fig, axes = _grid(weights.shape[0], ncols, panel)
    for ax, w in zip(axes, weights):
        if w.shape[0] == 3:
            ax.imshow(to_numpy_image(w))
        else:
            ax.imshow(w[0].numpy(), cmap="gray", vmin=0, vmax=1)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def show_toyworld(world, n: int = 12, ncols: int = 6, predictions=None):
    """The first ``n`` scenes of a :class:`~cs_helpers.toyworld.ToyWorld`, each with the
    outline of its ground-truth object mask (white) and its class name as title.

    Parameters
    ----------
    world : ToyWorld
        ``world.images (N, 3, H, W)``, ``world.masks (N, H, W)``, ``world.labels (N,)``.
    n : int
        How many scenes to show (at most ``len(world)``).
    predictions : LongTensor ``(N,)`` or ``(n,)``, optional
        Predicted class indices; titles then read ``"true → predicted"``.

    Returns the figure.
    """
    n = min(int(n), len(world.labels))
    if n < 1:
        raise ValueError(f"show_toyworld: nothing to show (n={n}, {len(world.labels)} scenes)")
    if predictions is not None:
        predictions = torch.as_tensor(predictions).detach().cpu().flatten()
        if len(predictions) < n:
            raise ValueError(f"show_toyworld: {len(predictions)} predictions for {n} scenes")
    fig, axes = _grid(n, ncols)
    for i, ax in zip(range(n), axes):
        ax.imshow(to_numpy_image(world.images[i]))
        mask = world.masks[i].detach().cpu().numpy().astype(np.float32)
        if 0 < mask.sum() < mask.size:
            ax.contour(mask, levels=[0.5], colors="white", linewidths=0.8)
        title = world.class_names[int(world.labels[i])]
        if predictions is not None:
            title = f"{title} → {world.class_names[int(predictions[i])]}"
        ax.set_title(title)
    fig.tight_layout()
    return fig

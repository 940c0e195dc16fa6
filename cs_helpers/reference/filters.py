"""Notebook 01 (filters): looking at what the weights of a network are.

References: Krizhevsky et al. 2012 and Krizhevsky 2014 (first-layer filters of AlexNet);
the linear classifier's "templates" view of CS231n's lecture on interpretability;
Chellapilla et al. 2006 (convolution as im2col and one matrix product).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["normalize_filters", "im2col", "conv2d_im2col", "linear_templates"]


def _min_max_rows(flat: torch.Tensor) -> torch.Tensor:
    """Min-max scales each row of ``flat (R, D)`` to ``[0, 1]``; a constant row -> 0.5."""
    low = flat.min(dim=1, keepdim=True).values
    span = flat.max(dim=1, keepdim=True).values - low
    scaled = (flat - low) / torch.where(span > 0, span, torch.ones_like(span))
    return torch.where(span > 0, scaled, torch.full_like(flat, 0.5))


def normalize_filters(weights: torch.Tensor) -> torch.Tensor:
    """Scales every filter of a bank to ``[0, 1]`` on its own, for display.

    Parameters
    ----------
    weights : Tensor ``(C_out, C_in, k, k)``

    Returns
    -------
    Tensor of the same shape: filter ``o`` is ``(w_o - min w_o) / (max w_o - min w_o)``
    over its ``(C_in, k, k)`` entries; a constant filter becomes 0.5 everywhere.
    """
    if not isinstance(weights, torch.Tensor) or weights.dim() != 4:
        raise ValueError(f"weights must be a tensor (C_out, C_in, k, k); got {getattr(weights, 'shape', type(weights))}")
    w = weights.detach()
    return _min_max_rows(w.reshape(w.shape[0], -1).to(torch.float32)).reshape(w.shape)


def _pair(value, name):
    if isinstance(value, int):
        return value, value
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return tuple(value)
    raise ValueError(f"{name} must be an int or a pair of ints; got {value!r}")


def _output_size(h: int, w: int, kernel, stride, padding) -> tuple[int, int]:
    out_h = (h + 2 * padding[0] - kernel[0]) // stride[0] + 1
    out_w = (w + 2 * padding[1] - kernel[1]) // stride[1] + 1
    if out_h <= 0 or out_w <= 0:
        raise ValueError(f"the {kernel[0]}x{kernel[1]} filter does not fit the padded {h}x{w} input")
    return out_h, out_w


def im2col(x: torch.Tensor, kernel_size, stride=1, padding=0) -> torch.Tensor:
    """The patch matrix of a convolution ("im2col"), built from padding and slicing.

    Parameters
    ----------
    x : Tensor ``(N, C_in, H, W)``
    kernel_size, stride, padding : int or pair of ints ``(height, width)``; ``padding``
        zeros are added on each side.

    Returns
    -------
    Tensor ``(N, C_in * kh * kw, L)`` with ``L = H' * W'``, ``H' = (H + 2 p_h - kh) // s_h + 1``
    (likewise ``W'``): column ``l`` is the zero-padded ``C_in x kh x kw`` patch under
    output position ``l`` (positions in row-major order), flattened channel first, then
    row, then column. This is the layout of ``torch.nn.functional.unfold``.

    The Python loop runs over the ``kh * kw`` offsets inside the kernel, never over
    output positions: each offset ``(u, v)`` is one strided slice of the padded input,
    holding that entry of every patch at once.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a tensor (N, C_in, H, W); got {getattr(x, 'shape', type(x))}")
    kernel = _pair(kernel_size, "kernel_size")
    stride, padding = _pair(stride, "stride"), _pair(padding, "padding")
    if min(kernel) < 1 or min(stride) < 1 or min(padding) < 0:
        raise ValueError(f"kernel_size and stride must be positive and padding non-negative; "
                         f"got {kernel}, {stride}, {padding}")
    n, c, h, w = x.shape
    out_h, out_w = _output_size(h, w, kernel, stride, padding)
    padded = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    rows_end, cols_end = stride[0] * (out_h - 1) + 1, stride[1] * (out_w - 1) + 1
    # slices[u * kw + v] is (N, C, H', W'): entry (u, v) of every patch.
    slices = [padded[:, :, u:u + rows_end:stride[0], v:v + cols_end:stride[1]]
              for u in range(kernel[0]) for v in range(kernel[1])]
    patches = torch.stack(slices, dim=2)                    # (N, C, kh*kw, H', W')
    return patches.reshape(n, c * kernel[0] * kernel[1], out_h * out_w)


def conv2d_im2col(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  stride=1, padding=0) -> torch.Tensor:
    """2-D convolution (cross-correlation, as in deep learning) by im2col.

    Every receptive-field patch of the zero-padded input becomes one column
    (:func:`im2col`); the whole convolution is then a single matrix product of the
    flattened filters with those columns.

    Parameters
    ----------
    x : Tensor ``(N, C_in, H, W)``
    weight : Tensor ``(C_out, C_in, kh, kw)``
    bias : Tensor ``(C_out,)`` or None
    stride, padding : int or pair of ints

    Returns
    -------
    Tensor ``(N, C_out, H', W')`` with ``H' = (H + 2 p_h - kh) // s_h + 1`` (likewise
    ``W'``): the same numbers as ``torch.nn.functional.conv2d``.
    """
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"x must be (N, C_in, H, W) and weight (C_out, C_in, kh, kw); "
                         f"got {tuple(x.shape)} and {tuple(weight.shape)}")
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"x has {x.shape[1]} channels but the filters expect {weight.shape[1]}")
    stride, padding = _pair(stride, "stride"), _pair(padding, "padding")
    n, _, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    out_h, out_w = _output_size(h, w, (kh, kw), stride, padding)
    columns = im2col(x, (kh, kw), stride=stride, padding=padding)   # (N, C_in*kh*kw, L)
    out = weight.reshape(c_out, -1) @ columns                         # (N, C_out, L)
    if bias is not None:
        out = out + bias.view(1, -1, 1)
    return out.view(n, c_out, out_h, out_w)


def linear_templates(W: torch.Tensor, image_shape) -> torch.Tensor:
    """The rows of a linear classifier's weights seen as images.

    Parameters
    ----------
    W : Tensor ``(num_classes, prod(image_shape))``
    image_shape : tuple, e.g. ``(8, 8)`` or ``(3, 32, 32)``

    Returns
    -------
    Tensor ``(num_classes, *image_shape)``, each template min-max scaled to ``[0, 1]``
    on its own (a constant row becomes 0.5).
    """
    image_shape = tuple(int(s) for s in image_shape)
    if W.dim() != 2 or W.shape[1] != math.prod(image_shape):
        raise ValueError(f"W must be (num_classes, {math.prod(image_shape)}) for images "
                         f"{image_shape}; got {tuple(W.shape)}")
    return _min_max_rows(W.detach().to(torch.float32)).reshape(W.shape[0], *image_shape)

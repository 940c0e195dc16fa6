"""Notebook 02 (features): what a network computes, looked at from the last layer down.

* Last-layer features and nearest neighbours in feature space versus pixel space
  (Krizhevsky et al. 2012, "ImageNet Classification with Deep Convolutional Neural
  Networks", Fig. 4).
* Dimensionality reduction of the features: PCA here; t-SNE (van der Maaten & Hinton
  2008, "Visualizing Data using t-SNE") in the notebook, from scikit-learn.
* Activation maps (Yosinski et al. 2015, "Understanding Neural Networks Through Deep
  Visualization") and maximally activating patches (Zeiler & Fergus 2014, "Visualizing
  and Understanding Convolutional Networks"; Springenberg et al. 2015, "Striving for
  Simplicity: The All Convolutional Net"), located in the image with receptive-field
  arithmetic.
"""
from __future__ import annotations

import numbers
from typing import Sequence

import torch
from torch import nn

from ..hooks import capture, get_layer, model_device

__all__ = ["extract_features", "nearest_neighbors", "pca", "receptive_field", "top_activating_patches"]

# Bytes of float64 differences materialized at once by nearest_neighbors: a block that
# stays in the CPU's cache (measured 3-4x faster than 64 MiB blocks; benchmarks/run.py).
_DISTANCE_BLOCK_BYTES = 2**19


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _shape(value) -> str:
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__


# -- features ------------------------------------------------------------------------


def extract_features(model: nn.Module, layer, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """The output of one layer for every image, one flattened row per image.

    A forward hook on ``layer`` (:func:`cs_helpers.hooks.capture`) records the layer's
    output while the model runs on ``images`` in batches of ``batch_size``, under
    ``torch.no_grad()``, on the model's device. The hook is removed when the function
    returns, also when the model raises.

    Parameters
    ----------
    model : nn.Module
        Takes pixel-space batches ``(B, 3, H, W)`` in ``[0, 1]``.
    layer : str or nn.Module
        The layer's dotted name (``"relu3"``, ``"blocks.1.project"``) or the module.
    images : Tensor ``(N, 3, H, W)``
        On any device; each batch is moved to the model's device.
    batch_size : int
        At most this many images per forward pass (the last batch may be smaller).

    Returns
    -------
    Tensor ``(N, D)``, float32, detached, on the model's device: row ``n`` is the layer's
    output for image ``n`` flattened in ``(C, h, w)`` order, so ``D = C * h * w`` for a
    convolutional layer and ``D = C`` after global pooling and flattening. ``images``
    and the model (mode, parameters, hooks) are left as they were.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"images must be a tensor (N, 3, H, W); got {_shape(images)}")
    if images.shape[0] == 0:
        raise ValueError("images is empty (N = 0): there is nothing to extract features from")
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
    get_layer(model, layer)  # a clear error for an unknown layer name, before any work
    device = model_device(model)
    rows = []
    with torch.no_grad(), capture(model, layer) as record:
        for batch in images.split(int(batch_size)):
            record.output = None
            model(batch.to(device))
            if record.output is None:
                raise RuntimeError(f"layer {layer!r} did not run during the forward pass; "
                                   "pick a layer that the model's forward uses")
            rows.append(record.output.detach().reshape(batch.shape[0], -1).to(torch.float32))
    return torch.cat(rows)


# -- nearest neighbours ----------------------------------------------------------------


def nearest_neighbors(queries: torch.Tensor, database: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` database rows closest to each query in Euclidean distance.

    Distances are computed for all pairs at once (no loop over queries) as
    ``sum_d (q_d - x_d)^2`` in float64 from the differences themselves, not from the
    expansion ``|q|^2 - 2 q.x + |x|^2``: equal rows then get exactly equal distances
    (a query's duplicate is at distance exactly 0), and nothing is lost to
    cancellation. Squared distances order the rows as distances do. A stable sort puts
    equal distances in increasing database index.

    Parameters
    ----------
    queries : Tensor ``(Q, D)``, on any device
    database : Tensor ``(M, D)``, moved to the queries' device if it is elsewhere
    k : int, ``1 <= k <= M``

    Returns
    -------
    LongTensor ``(Q, k)`` (``torch.int64``) on the queries' device: row ``q`` holds the
    indices of the ``k`` nearest database rows, nearest first, ties broken by the lower
    index.
    """
    for name, value in (("queries", queries), ("database", database)):
        if not isinstance(value, torch.Tensor) or value.dim() != 2:
            raise ValueError(f"{name} must be a 2-D tensor (rows, D); got {_shape(value)}")
    if queries.shape[1] != database.shape[1]:
        raise ValueError(f"queries have {queries.shape[1]} features per row but the database has "
                         f"{database.shape[1]}; both must be (rows, D) with the same D")
    if not _is_int(k) or not 1 <= k <= database.shape[0]:
        raise ValueError(f"k must be an int between 1 and the number of database rows "
                         f"({database.shape[0]}); got {k!r}")
    q = queries.detach().to(torch.float64)
    x = database.detach().to(device=q.device, dtype=torch.float64)
    n_q, dim = q.shape
    # Columns of database rows per block, so that a block of differences (Q, m, D) stays
    # within the memory budget (one block for the sizes of the notebook).
    per_row = max(1, n_q * max(dim, 1) * 8)
    block = max(1, _DISTANCE_BLOCK_BYTES // per_row)
    parts = []
    for part in x.split(block):
        diff = q[:, None, :] - part[None, :, :]
        parts.append(diff.mul_(diff).sum(dim=2))     # d * d is exactly d ** 2; in place, no second block
    squared = torch.cat(parts, dim=1)                                            # (Q, M)
    order = torch.sort(squared, dim=1, stable=True).indices
    return order[:, : int(k)].contiguous()


# -- PCA -----------------------------------------------------------------------------------


def pca(features: torch.Tensor, k: int):
    """Principal component analysis by the singular value decomposition.

    With ``X`` the features centred by their mean (over the ``N`` rows) and
    ``X = U S V^T`` its thin SVD (singular values in decreasing order), the components
    are the first ``k`` rows of ``V^T``: the directions of largest variance. SVD
    determines each only up to sign, so each component is multiplied by the sign of its
    entry of largest absolute value (the first such entry when several tie), which
    makes that entry positive and the result reproducible. Computed in float64.

    Parameters
    ----------
    features : Tensor ``(N, D)``
    k : int, ``1 <= k <= min(N, D)``

    Returns
    -------
    projected : Tensor ``(N, k)``
        The centred features in the components' coordinates, ``X @ components.T``.
    components : Tensor ``(k, D)``
        Orthonormal rows, largest variance first, sign-fixed as above.
    explained_variance_ratio : Tensor ``(k,)``
        ``S_i^2 / sum_j S_j^2`` with the sum over *all* singular values: the share of the
        total variance (the trace of the covariance) along each component, in ``[0, 1]``.
        All zeros when the features do not vary at all; ``projected`` is then all zeros
        too, and ``components`` are orthonormal rows like any others (sign-fixed the same
        way), without NaN.

    The three tensors have the dtype of ``features`` (float32 in, float32 out; float64
    in, float64 out; float32 for integer input) and its device; ``features`` is not
    modified.
    """
    if not isinstance(features, torch.Tensor) or features.dim() != 2:
        raise ValueError(f"features must be a 2-D tensor (N, D); got {_shape(features)}")
    n, dim = features.shape
    if not _is_int(k) or not 1 <= k <= min(n, dim):
        raise ValueError(f"k must be an int between 1 and min(N, D) = {min(n, dim)} "
                         f"for features {tuple(features.shape)}; got {k!r}")
    dtype = features.dtype if features.is_floating_point() else torch.float32
    x = features.detach().to(torch.float64)
    centred = x - x.mean(dim=0, keepdim=True)
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    components = vh[: int(k)]
    largest = components.abs().argmax(dim=1, keepdim=True)         # first index on ties
    signs = torch.sign(components.gather(1, largest))
    components = components * torch.where(signs == 0, torch.ones_like(signs), signs)
    projected = centred @ components.T
    power = s.pow(2)
    total = power.sum()
    ratio = power[: int(k)] / total if total > 0 else torch.zeros_like(power[: int(k)])
    return projected.to(dtype), components.to(dtype), ratio.to(dtype)


# -- receptive fields -----------------------------------------------------------------------


def receptive_field(layers: Sequence[Sequence[int]]):
    """Receptive-field arithmetic for a chain of convolution-like layers.

    Coordinates are input pixel indices: pixel ``x`` of a row has its centre at ``x``.
    Going through layer ``l`` with kernel ``k_l``, stride ``s_l`` and (symmetric) zero
    padding ``p_l``, from the input's ``(size, jump, start) = (1, 1, 0)``::

        size_l  = size_{l-1} + (k_l - 1) * jump_{l-1}
        jump_l  = jump_{l-1} * s_l
        start_l = start_{l-1} + ((k_l - 1) / 2 - p_l) * jump_{l-1}

    Output position ``(y, x)`` of the last layer then sees the input square of side
    ``size`` centred at ``(start + y * jump, start + x * jump)``, i.e. rows
    ``start + y * jump - (size - 1) / 2`` to ``start + y * jump + (size - 1) / 2``
    inclusive (parts may fall outside the image, into the padding). Pooling layers count
    like convolutions; element-wise layers (ReLU, batch norm) and 1x1 convolutions at
    stride 1 change nothing. Dilation is not supported. (Araujo et al. 2019, "Computing
    Receptive Fields of Convolutional Neural Networks", Distill.)

    Parameters
    ----------
    layers : sequence of ``(kernel, stride, padding)`` int triples, input side first;
        ``kernel >= 1``, ``stride >= 1``, ``padding >= 0``. May be empty.

    Returns
    -------
    ``(size, jump, start)``: ``size`` (int) the side of the receptive field in input
    pixels, ``jump`` (int) the distance in input pixels between neighbouring output
    positions, ``start`` (float) the input coordinate of the centre of output position 0,
    which may be fractional (even kernels) or negative (padding).
    """
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
        raise ValueError(f"layers must be a list of (kernel, stride, padding) tuples; got {type(layers).__name__}")
    size, jump, start = 1, 1, 0.0
    for index, layer in enumerate(layers):
        if (isinstance(layer, (str, bytes)) or not isinstance(layer, Sequence) or len(layer) != 3
                or not all(_is_int(v) for v in layer)):
            raise ValueError(f"layer {index} must be a (kernel, stride, padding) triple of ints; got {layer!r}")
        kernel, stride, padding = (int(v) for v in layer)
        if kernel < 1 or stride < 1 or padding < 0:
            raise ValueError(f"layer {index}: expected kernel >= 1, stride >= 1, padding >= 0; "
                             f"got kernel={kernel}, stride={stride}, padding={padding}")
        start += ((kernel - 1) / 2 - padding) * jump
        size += (kernel - 1) * jump
        jump *= stride
    return size, jump, float(start)


# -- maximally activating patches -------------------------------------------------------------


def top_activating_patches(activations: torch.Tensor, channel: int, k: int):
    """The ``k`` strongest responses of one channel over a batch of activation maps.

    Every position of every image competes: several of the ``k`` may come from the same
    image. Values are sorted in decreasing order by a stable sort of the channel's maps
    flattened in ``(n, i, j)`` row-major order, so equal values (the zeros after a ReLU,
    say) come in increasing ``(n, i, j)``.

    Parameters
    ----------
    activations : Tensor ``(N, C, h, w)``, a layer's output for ``N`` images. It may hold
        ``-inf`` (masked positions): ``-inf`` ranks below every number and is returned
        (as the float ``-inf``) only when ``k`` exceeds the number of finite values. NaN
        has no order: a ``ValueError``.
    channel : int, ``0 <= channel < C``
    k : int, ``1 <= k <= N * h * w``

    Returns
    -------
    list of ``k`` tuples ``(n, i, j, value)``: ``n`` the image, ``(i, j)`` the row and
    column in the ``h x w`` map (Python ints), ``value`` the activation (a Python
    float), largest first. Map ``(i, j)`` to image pixels with :func:`receptive_field`.
    ``activations`` is not modified.
    """
    if not isinstance(activations, torch.Tensor) or activations.dim() != 4:
        raise ValueError(f"activations must be a tensor (N, C, h, w); got {_shape(activations)}")
    n, c, h, w = activations.shape
    if not _is_int(channel) or not 0 <= channel < c:
        raise ValueError(f"channel must be an int between 0 and {c - 1} (the activations have {c} "
                         f"channels); got {channel!r}")
    if not _is_int(k) or not 1 <= k <= n * h * w:
        raise ValueError(f"k must be an int between 1 and N * h * w = {n * h * w}; got {k!r}")
    values = activations.detach()[:, int(channel)].reshape(-1)
    if torch.isnan(values).any():
        raise ValueError(f"channel {channel} holds NaN values, which have no order")
    top = torch.sort(values, descending=True, stable=True)
    flat = top.indices[: int(k)].tolist()
    best = top.values[: int(k)].tolist()
    return [(f // (h * w), (f // w) % h, f % w, float(v)) for f, v in zip(flat, best)]

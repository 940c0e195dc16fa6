"""Checks for notebook 02 (features).

Points come only from the values a function returns. Inputs left unchanged, hooks
removed, the model's mode, and the number of Python calls are recorded in the process
that runs the graded code, which can forge them: those properties are ``feedback_only``
(checked and shown as advice, worth no points). Where a mistake of that kind changes the
returned values, a case of its own makes it cost points (a model with batch norm shows a
function that switches the model to training mode).

Properties with an ``expect`` need no reference (the student release self-checks them):
shapes and structures that follow from the inputs, and the closed-form parts of the
receptive field (one layer, the jump, the empty chain)."""
from __future__ import annotations

import math

import torch

from ..core import (Case, Check, ModelSpec, Property, _as_tensor, calls_do_not_grow, fresh_generator,
                    same_shape, same_values, shape_matches, to_plain)
from ..registry import register


def _inputs_intact(case: Case, got) -> bool:
    """The tensor arguments after the call equal the ones given."""
    originals = [to_plain(a) for a in case.args]
    if got.inputs_after is None or len(got.inputs_after) != len(originals):
        return False
    return all(torch.equal(before, after) for before, after in zip(originals, got.inputs_after)
               if isinstance(before, torch.Tensor))


def _and_inputs_intact(correct):
    """Right values by ``correct`` and inputs left unchanged (a function that returns
    nothing useful earns nothing for leaving its inputs alone)."""
    def holds(case, expected, got) -> bool:
        return correct(case, expected, got) and _inputs_intact(case, got)
    return holds


def _features_close(rtol, atol):
    """The student's features equal the reference's once reshaped to ``(N, D)``: an
    output left unflattened loses the shape property only, not every property."""
    def holds(case, expected, got) -> bool:
        value = _as_tensor(got.value)
        if (value is None or value.dim() < 1 or value.numel() != expected.numel()
                or value.shape[0] != expected.shape[0]):
            return False
        return same_values(expected, value.reshape(expected.shape), rtol, atol)
    return holds


def _features_and_citizen(case, expected, got) -> bool:
    return (_features_close(1e-4, 1e-5)(case, expected, got) and got.hooks_left == 0
            and not got.mode_changed and not got.params_changed)


@register
class ExtractFeatures(Check):
    name, topic, points = "extract_features", "features", 2

    def properties(self, seed):
        g = fresh_generator(seed)
        tiny = ModelSpec("tiny_relu_cnn", seed % 1000)

        def images(n, size):
            return torch.rand(n, 3, size, size, generator=g)

        conv = Case((tiny, "relu1", images(3, 10)), label="3 images at layer relu1 of a tiny CNN")
        pooled = Case((tiny, "pool1", images(5, 12)), {"batch_size": 2},
                      label="5 images at layer pool1 with batch_size=2")
        global_pool = Case((tiny, "pool", images(4, 8)), label="the global average pool (N, 8, 1, 1)")
        batched = Case((ModelSpec("tiny_batch4_cnn", seed % 1000), "relu2", images(10, 8)), {"batch_size": 4},
                       label="10 images, batch_size=4, a model that takes at most 4 images per pass")
        nested = Case((ModelSpec("efficientnet_lite0"), "blocks.1.project", images(2, 32)),
                      label="layer 'blocks.1.project' of EfficientNet-Lite0")
        normalized = Case((ModelSpec("tiny_bn_cnn", seed % 1000 + 1), "relu2", images(4, 12)), {"batch_size": 3},
                          label="a network with batch norm (layer relu2)")
        return [
            Property("returns (N, D): one row per image, the layer's output flattened", 1,
                     [conv, global_pool], shape_matches),
            Property("returns the chosen layer's output values, flattened in (C, H, W) order", 2,
                     [conv, pooled, global_pool], _features_close(1e-4, 1e-5)),
            Property("runs the model on batches of at most batch_size images, the last, smaller "
                     "batch included", 1, [batched], _features_close(1e-4, 1e-5)),
            Property("runs the model as it is given, in eval mode (batch norm uses its running statistics)", 1,
                     [normalized], _features_close(1e-4, 1e-5)),
            Property("removes its hook and leaves the model's mode and parameters as they were", 1,
                     [conv, pooled, global_pool], _features_and_citizen, feedback_only=True),
            Property("finds a nested layer by its dotted name (model.get_submodule)", 1,
                     [nested], _features_close(1e-4, 1e-4)),
        ]


def _indices_equal(case, expected, got) -> bool:
    value = _as_tensor(got.value)
    return (value is not None and tuple(value.shape) == tuple(expected.shape)
            and not value.is_floating_point() and torch.equal(value.long(), expected.long()))


def _long_of_shape(case, expected, got) -> bool:
    value = got.value
    return isinstance(value, torch.Tensor) and value.dtype == torch.int64 and same_shape(expected, value)


@register
class NearestNeighbors(Check):
    name, topic, points = "nearest_neighbors", "features", 2

    def properties(self, seed):
        g = fresh_generator(seed)
        basic = Case((torch.randn(6, 8, generator=g), torch.randn(30, 8, generator=g), 5),
                     label="6 queries, 30 database rows of 8 features, k=5")
        # Rows of very different lengths: the largest dot product is not the nearest row.
        norms = torch.rand(25, 1, generator=g) * 5 + 0.2
        scaled = Case((torch.randn(5, 6, generator=g) * 2, torch.randn(25, 6, generator=g) * norms, 4),
                      label="database rows of very different lengths")
        # Small integers make many exact ties (all arithmetic on them is exact).
        database = torch.randint(-2, 3, (30, 4), generator=g).float()
        database[12:18] = database[0:6]
        database[25:30] = database[3:8]
        queries = torch.cat([database[[1, 4, 13]], torch.randint(-2, 3, (5, 4), generator=g).float()])
        ties = Case((queries, database, 9), label="integer features with duplicate rows (exact ties)")
        one = Case((torch.randn(4, 5, generator=g), torch.randn(12, 5, generator=g), 1), label="k=1")
        everything = Case((torch.randn(3, 5, generator=g), torch.randn(7, 5, generator=g), 7),
                          label="k equal to the number of database rows")
        small = Case((torch.randn(4, 6, generator=g), torch.randn(20, 6, generator=g), 3),
                     label="4 queries", count_calls=True)
        large = Case((torch.randn(64, 6, generator=g), torch.randn(20, 6, generator=g), 3),
                     label="64 queries", count_calls=True)
        return [
            Property("returns a LongTensor (Q, k)", 1, [basic], _long_of_shape,
                     expect=lambda queries, database, k: torch.zeros(queries.shape[0], k, dtype=torch.long)),
            Property("returns the k nearest database rows in Euclidean distance, nearest first", 2,
                     [basic, scaled], _indices_equal),
            Property("breaks ties in distance by the lower database index", 1, [ties], _indices_equal),
            Property("works for k=1 and for k equal to the number of database rows", 1,
                     [one, everything], _indices_equal),
            Property("has no Python loop over queries (the number of calls does not grow with the "
                     "number of queries)", 1, [small, large], calls_do_not_grow(small, large, _indices_equal),
                     feedback_only=True),
            Property("leaves queries and database unchanged", 1, [basic], _and_inputs_intact(_indices_equal),
                     feedback_only=True),
        ]


def _spectrum_data(g, n, d, offset=0.0):
    """``n`` points in ``d`` dimensions with well separated variances along random
    orthogonal directions, centred exactly (up to float32) unless ``offset`` is given."""
    scales = torch.linspace(4.0, 0.4, d) * (1.0 + 0.1 * torch.rand(d, generator=g))
    rotation, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    z = torch.randn(n, d, generator=g, dtype=torch.float64) * scales.double()
    x = (z - z.mean(dim=0)) @ rotation.T
    if offset:
        x = x + offset * (1.0 + torch.rand(d, generator=g, dtype=torch.float64))
    return x.float()


def _parts(value):
    if not isinstance(value, (tuple, list)) or len(value) != 3:
        return None
    return [_as_tensor(v) for v in value]


def _pca_zeros(features, k):
    n, d = features.shape
    return torch.zeros(n, k), torch.zeros(k, d), torch.zeros(k)


def _pca_shapes(case, expected, got) -> bool:
    parts = _parts(got.value)
    return parts is not None and all(same_shape(e, p) for e, p in zip(expected, parts))


def _pca_up_to_sign(case, expected, got) -> bool:
    """Components and projections equal once each component's sign is aligned with the
    reference's (the sign itself is a property of its own)."""
    parts = _parts(got.value)
    if parts is None or not all(same_shape(e, p) for e, p in zip(expected[:2], parts[:2])):
        return False
    projected, components = parts[0].double(), parts[1].double()
    ref_projected, ref_components = expected[0].double(), expected[1].double()
    signs = torch.sign((components * ref_components).sum(dim=1))
    signs[signs == 0] = 1.0
    return (same_values(ref_components, components * signs[:, None], 1e-3, 1e-3)
            and same_values(ref_projected, projected * signs[None, :], 1e-3, 1e-3))


def _pca_exact(case, expected, got) -> bool:
    parts = _parts(got.value)
    return (parts is not None and same_values(expected[0], parts[0], 1e-3, 1e-3)
            and same_values(expected[1], parts[1], 1e-3, 1e-3))


def _pca_ratio(case, expected, got) -> bool:
    parts = _parts(got.value)
    return parts is not None and same_values(expected[2], parts[2], 1e-3, 1e-5)


@register
class Pca(Check):
    name, topic, points = "pca", "features", 2

    def properties(self, seed):
        g = fresh_generator(seed)
        basic = Case((_spectrum_data(g, 40, 6), 3), label="40 centred points in 6 dimensions, k=3")
        offset = Case((_spectrum_data(g, 30, 5, offset=20.0), 2),
                      label="points far from the origin (mean about 20 per feature), k=2")
        wide = Case((_spectrum_data(g, 8, 20), 5), label="8 points in 20 dimensions (N < D), k=5")
        many = Case((_spectrum_data(g, 50, 7), 5), label="50 centred points in 7 dimensions, k=5")
        return [
            Property("returns (projected (N, k), components (k, D), explained_variance_ratio (k,))", 1,
                     [basic, wide], _pca_shapes, expect=_pca_zeros),
            Property("centres the features by their mean before the decomposition", 2, [offset],
                     _pca_up_to_sign),
            Property("components are the top-k right singular vectors (orthonormal rows, largest "
                     "variance first) and projected = centred features @ components.T", 2,
                     [basic, wide], _pca_up_to_sign),
            Property("fixes each component's sign so that its entry of largest absolute value is "
                     "positive, and projects with those signs", 1, [basic, wide, many], _pca_exact),
            Property("explained_variance_ratio is each component's share of the total variance "
                     "(over all directions, not only the k kept)", 1, [basic, many], _pca_ratio),
            Property("leaves the features unchanged", 1, [offset], _and_inputs_intact(_pca_up_to_sign),
                     feedback_only=True),
        ]


def _rf_field(*indices, tol=1e-9):
    def holds(case, expected, got) -> bool:
        value = got.value
        if not isinstance(value, (tuple, list)) or len(value) != 3:
            return False
        for i in indices:
            number = float(value[i])
            if not math.isfinite(number) or abs(number - float(expected[i])) > tol:
                return False
        return True
    return holds


def _random_chain(g, length, padded):
    """A chain of (kernel, stride, padding) whose first layer has stride 2 (so that later
    layers see a jump above 1) and, when ``padded``, a non-zero padding at every layer
    with a kernel above 1."""
    chain = []
    for index in range(length):
        kernel = [2, 3, 3, 5, 7][int(torch.randint(0, 5, (1,), generator=g))]
        stride = 2 if index == 0 else int(torch.randint(1, 3, (1,), generator=g))
        padding = 0
        if padded:
            padding = max(1, int(torch.randint(0, kernel // 2 + 1, (1,), generator=g))) if kernel > 1 else 0
        chain.append((kernel, stride, padding))
    return chain


@register
class ReceptiveField(Check):
    name, topic, points = "receptive_field", "features", 2

    def properties(self, seed):
        g = fresh_generator(seed)
        single = Case(([(5, 2, 0)],), label="one layer (kernel 5, stride 2, padding 0)")
        single_pad = Case(([(7, 2, 3)],), label="one layer (kernel 7, stride 2, padding 3)")
        chain = Case((_random_chain(g, 4, padded=False),), label="a chain of 4 layers without padding")
        deep = Case((_random_chain(g, 6, padded=False),), label="a chain of 6 layers without padding")
        padded = Case((_random_chain(g, 5, padded=True),), label="a chain of 5 padded layers")
        toynet = Case(([(5, 1, 2), (2, 2, 0), (3, 1, 1), (2, 2, 0), (3, 1, 1)],),
                      label="ToyNet's conv1 ... conv3")
        empty = Case(([],), label="an empty chain")
        return [
            Property("one layer: size = kernel and jump = stride", 1, [single, single_pad], _rf_field(0, 1),
                     expect=lambda layers: (layers[0][0], layers[0][1], 0.0)),
            Property("size grows by (kernel - 1) times the jump of the layers before (the product of "
                     "their strides)", 2, [chain, deep, padded], _rf_field(0)),
            Property("jump is the product of the strides", 1, [chain, deep], _rf_field(1),
                     expect=lambda layers: (0, math.prod(stride for _, stride, _ in layers), 0.0)),
            Property("start: each layer moves the centre of output 0 by (kernel - 1) / 2 input "
                     "steps of the jump before it (pixel centres at integer coordinates)", 1,
                     [single, chain, deep], _rf_field(2)),
            Property("start with padding: each layer's padding moves the centre back by "
                     "padding x the jump before it", 1, [single_pad, padded, toynet], _rf_field(2)),
            Property("an empty chain is the input itself: (1, 1, 0)", 1, [empty], _rf_field(0, 1, 2),
                     expect=lambda layers: (1, 1, 0.0)),
        ]


def _patch_list(value, k):
    if not isinstance(value, (list, tuple)) or len(value) != k:
        return None
    out = []
    for item in value:
        if isinstance(item, torch.Tensor):
            item = item.tolist()
        if not isinstance(item, (list, tuple)) or len(item) != 4:
            return None
        out.append(item)
    return out


def _patches_structure(case, expected, got) -> bool:
    return _patch_list(got.value, len(expected)) is not None


def _patches_equal(case, expected, got) -> bool:
    items = _patch_list(got.value, len(expected))
    if items is None:
        return False
    for (n, i, j, v), item in zip(expected, items):
        gn, gi, gj, gv = (float(x) for x in item)
        if (gn, gi, gj) != (float(n), float(i), float(j)):
            return False
        if not math.isfinite(gv) or abs(gv - v) > 1e-5 * (1.0 + abs(v)):
            return False
    return True


@register
class TopActivatingPatches(Check):
    name, topic, points = "top_activating_patches", "features", 2

    def properties(self, seed):
        g = fresh_generator(seed)
        basic = Case((torch.randn(4, 3, 5, 5, generator=g), 1, 6), label="activations (4, 3, 5, 5), k=6")
        acts = torch.randn(5, 4, 4, 4, generator=g)
        acts[:, [0, 1, 3]] += 10.0   # the other channels are much larger
        channel = Case((acts, 2, 5), label="channel 2 of activations (5, 4, 4, 4)")
        wide = Case((torch.randn(3, 2, 3, 7, generator=g), 0, 8), label="non-square maps (3, 2, 3, 7)")
        ties = Case((torch.randint(-3, 4, (6, 3, 4, 4), generator=g).float().clamp_min(0), 1, 30),
                    label="ReLU-like activations with many equal values, k=30")
        return [
            Property("returns a list of k tuples (n, i, j, value)", 1, [basic], _patches_structure,
                     expect=lambda activations, channel, k: [(0, 0, 0, 0.0)] * k),
            Property("finds the k largest values of the channel, largest first, with their (n, i, j)", 2,
                     [basic], _patches_equal),
            Property("reads the requested channel of every image (activations[:, channel])", 1,
                     [channel], _patches_equal),
            Property("turns flat positions back into (n, i, j) on non-square maps", 1, [wide], _patches_equal),
            Property("breaks ties by the lower (n, i, j)", 1, [ties], _patches_equal),
            Property("leaves the activations unchanged", 1, [basic], _and_inputs_intact(_patches_equal),
                     feedback_only=True),
        ]

"""Checks for notebook 04 (CAM): class activation maps, Grad-CAM, upsampling, guided
Grad-CAM and the pointing game.

Points come only from what a function returns. Each mistake students make is given
cases where its output differs from the reference's, and a property of its own that
accepts every *other* recognized output: "averages the gradient over space, not its
maximum" holds for an output that is Grad-CAM with the mean of *some* gradient (of the
logit or of the probability, with or without the ReLU, ...). The layers are chosen so
that each mistake shows: right before global average pooling the gradient is constant
over space (there the maximum and the mean of the gradient agree), so the cases also
take earlier layers. The alternatives are computed in the grader's process by the
reference's private variant helpers (imported lazily).

Properties about manners (no hook left, inputs unchanged, model as it was) are recorded
inside the graded process, so they are advice only (``feedback_only``).
"""
from __future__ import annotations

import math

import torch

from ..core import Case, Check, ModelSpec, Property, fresh_generator, shape_matches
from ..registry import register
from ._shared import ReferenceVariants, accepts, close_scaled, manners, toyworld_cases


def _exact(case, expected, got):
    return close_scaled(expected, got.value)


# ---------------------------------------------------------------- class_activation_map

@register
class ClassActivationMap(Check):
    name, topic, points = "class_activation_map", "cam", 1

    def properties(self, seed):
        g = fresh_generator(seed)
        small = Case((torch.rand(8, 5, 6, generator=g) * 2, torch.randn(4, 8, generator=g), 2),
                     label="8 feature maps 5x6 and 4 classes")
        wide = Case((torch.rand(16, 4, 7, generator=g), torch.randn(10, 16, generator=g), int(seed % 10)),
                    label="16 feature maps 4x7 and 10 classes")
        square = Case((torch.rand(6, 3, 3, generator=g), torch.randn(6, 6, generator=g), 4),
                      label="6 feature maps and 6 classes (fc_weight is square)")
        variants = ReferenceVariants("cs_helpers.reference.cam")
        return [
            Property("returns one map at the features' resolution, shape (h, w)", 1, [small, wide], shape_matches),
            Property("equals sum_k fc_weight[target, k] * features[k] (Zhou et al. 2016)", 2,
                     [small, wide, square], _exact),
            Property("keeps negative values (no ReLU: they are evidence against the class)", 1, [small, wide],
                     accepts(variants, "_cam_variant", relu=(False,), normalize=(False, True))),
            Property("returns the raw weighted sum (no min-max normalization)", 1, [small, wide],
                     accepts(variants, "_cam_variant", relu=(False, True), normalize=(False,))),
            Property("leaves the features and the weights unchanged", 1, [small],
                     manners(accepts(variants, "_cam_variant", relu=(False, True), normalize=(False, True))),
                     feedback_only=True),
        ]


# --------------------------------------------------------------------------- grad_cam

_GRAD_CAM_KNOBS = dict(relu=(True, False), reduce=("mean", "max", "sum"), score=("logit", "prob"),
                       first_target=(False, True))


def _knobs(**fixed):
    knobs = dict(_GRAD_CAM_KNOBS)
    knobs.update({k: (v,) for k, v in fixed.items()})
    return knobs


@register
class GradCam(Check):
    name, topic, points = "grad_cam", "cam", 3
    timeout_s = 60.0  # the first backward pass through EfficientNet-Lite0 warms up for seconds

    def properties(self, seed):
        g = fresh_generator(seed)
        relu_net = ModelSpec("tiny_relu_cnn", seed % 1000 + 20)
        hot = ModelSpec("tiny_relu6_cnn_hot", seed % 1000 + 21)
        last = Case((relu_net, "relu2", torch.rand(4, 3, 16, 16, generator=g), torch.tensor([0, 3, 1, 4])),
                    label="the layer right before global average pooling (ReLU CNN), 4 images, 4 targets")
        before_relu = Case((relu_net, "conv2", torch.rand(3, 3, 16, 12, generator=g), torch.tensor([2, 0, 4])),
                           label="a convolution followed by a ReLU (its gradient varies over space)")
        early = Case((hot, "pool1", torch.rand(3, 3, 16, 16, generator=g), torch.tensor([1, 4, 2])),
                     label="an early layer at half resolution (ReLU6 CNN)")
        same_target = Case((relu_net, "relu1", torch.rand(2, 3, 16, 16, generator=g), 3),
                           label="an int target for every image, first layer")
        world = toyworld_cases(3, seed + 20)
        toy_last = Case((ModelSpec("toynet"), "relu3", world.images, world.labels),
                        label="ToyNet's last convolution (relu3), true classes")
        toy_middle = Case((ModelSpec("toynet"), "pool2", world.images, (world.labels + 1 + torch.arange(3)) % 5),
                          label="ToyNet's pool2, other classes")
        pictures = torch.rand(2, 3, 8, 8, generator=g)
        pictures = torch.nn.functional.interpolate(pictures, size=(64, 64), mode="bilinear", align_corners=False)
        lite0 = Case((ModelSpec("efficientnet_lite0"), "blocks.10", pictures,
                      torch.tensor([int(seed % 1000), int(seed % 997) + 1])),
                     label="two 64x64 images and EfficientNet-Lite0's blocks.10 (a block with a skip connection)")

        variants = ReferenceVariants("cs_helpers.reference.cam")
        every = [last, before_relu, early, toy_last, toy_middle]
        return [
            Property("returns one map per image at the layer's resolution, shape (N, h, w)", 1,
                     [last, early, toy_middle], shape_matches),
            Property("equals ReLU(sum_k alpha_k A_k) with alpha_k the spatial mean of dS_target/dA_k "
                     "(Selvaraju et al. 2017) on tiny CNNs, ToyNet and EfficientNet-Lite0, at several depths", 3,
                     [last, before_relu, early, same_target, toy_last, toy_middle, lite0], _exact),
            Property("applies the ReLU to the weighted sum (Grad-CAM shows only positive evidence)", 1, every,
                     accepts(variants, "_grad_cam_variant", **_knobs(relu=True))),
            Property("weights each channel by the spatial mean of its gradient, not its maximum (they differ "
                     "below the last layer)", 1, [before_relu, early, toy_middle],
                     accepts(variants, "_grad_cam_variant", **_knobs(reduce="mean") | {"reduce": ("mean", "sum")})),
            Property("averages the gradient over the h*w positions (the mean, not the sum)", 1, every,
                     accepts(variants, "_grad_cam_variant", **_knobs() | {"reduce": ("mean", "max")})),
            Property("differentiates the target's logit S_c, not its softmax probability", 1, every,
                     accepts(variants, "_grad_cam_variant", **_knobs(score="logit"))),
            Property("explains each image for its own target (LongTensor (N,)) and accepts an int target", 1,
                     [last, before_relu, toy_middle, same_target],
                     accepts(variants, "_grad_cam_variant", **_knobs(first_target=False))),
            Property("removes its hooks, leaves the images unchanged and the model as it was", 1,
                     [last, toy_last], manners(accepts(variants, "_grad_cam_variant", **_knobs())),
                     feedback_only=True),
        ]


# ------------------------------------------------------------------------ upsample_cam

@register
class UpsampleCam(Check):
    name, topic, points = "upsample_cam", "cam", 2

    def properties(self, seed):
        g = fresh_generator(seed)

        def maps(n, h, w):
            # Each map with its own offset and scale, so that joint and per-map scaling differ.
            offsets = torch.rand(n, 1, 1, generator=g) * 3
            scales = 0.2 + torch.rand(n, 1, 1, generator=g) * 5
            return offsets + scales * torch.rand(n, h, w, generator=g)

        square = Case((maps(3, 4, 4), 16), label="3 maps 4x4 to 16 (an int size)")
        pair = Case((maps(2, 3, 5), (12, 20)), label="2 maps 3x5 to (12, 20)")
        big = Case((maps(2, 7, 7), 64), label="2 maps 7x7 to 64")
        mixed = Case((torch.stack([torch.zeros(4, 4), torch.full((4, 4), 0.3), maps(1, 4, 4)[0]]), (8, 8)),
                     label="a batch with an all-zero map, a constant map and a varying one")
        constant = Case((torch.full((1, 5, 5), 0.3), 20), label="one constant map (all values 0.3)")
        zeros = Case((torch.zeros(1, 4, 4), 16), label="one all-zero map (the ReLU removed everything)")

        variants = ReferenceVariants("cs_helpers.reference.cam")
        any_mode = ("bilinear", "bicubic", "nearest")

        def constant_to_zeros(case, expected, got):
            value = got.value
            return (isinstance(value, torch.Tensor) and tuple(value.shape) == tuple(expected.shape)
                    and bool(torch.isfinite(value).all()) and bool((value == 0).all()))

        return [
            Property("returns maps of the requested size, shape (N, H, W), for an int or an (H, W) size", 1,
                     [square, pair], shape_matches),
            Property("upsamples bilinearly (align_corners=False) and scales each map to [0, 1]", 2,
                     [square, pair, big, mixed, constant, zeros], _exact),
            Property("uses align_corners=False (pixel centres, as F.interpolate resizes images)", 1,
                     [square, pair, big],
                     accepts(variants, "_upsample_variant", align_corners=(False,), joint=(False, True),
                              mode=("bilinear",), normalize=(True, False))),
            Property("scales each map to [0, 1] on its own (min and max per map, not over the batch)", 1,
                     [square, pair],
                     accepts(variants, "_upsample_variant", align_corners=(False, True), joint=(False,),
                              mode=any_mode, normalize=(True,))),
            Property("turns a map whose values are all equal into zeros (not NaN)", 1, [constant, zeros],
                     constant_to_zeros),
            Property("leaves the maps unchanged", 1, [square], manners(lambda case, expected, got: True),
                     feedback_only=True),
        ]


# --------------------------------------------------------------------- guided_grad_cam

@register
class GuidedGradCam(Check):
    name, topic, points = "guided_grad_cam", "cam", 1
    timeout_s = 45.0

    def properties(self, seed):
        g = fresh_generator(seed)
        relu_net = Case((ModelSpec("tiny_relu_cnn", seed % 1000 + 30), "relu2", torch.rand(3, 3, 16, 16, generator=g),
                         torch.tensor([4, 0, 2])), label="3 images 16x16, last layer (ReLU CNN)")
        hot = Case((ModelSpec("tiny_relu6_cnn_hot", seed % 1000 + 31), "pool1",
                    torch.rand(2, 3, 16, 20, generator=g), torch.tensor([1, 3])),
                   label="2 images 16x20, an early layer (ReLU6 CNN)")
        world = toyworld_cases(2, seed + 30)
        toy = Case((ModelSpec("toynet"), "relu3", world.images, world.labels), label="ToyWorld images and ToyNet")
        variants = ReferenceVariants("cs_helpers.reference.cam")
        return [
            Property("returns one colour image per input image, shape (N, 3, H, W)", 1, [relu_net, hot],
                     shape_matches),
            Property("equals guided_backprop(...) * upsample_cam(grad_cam(...), (H, W)) on tiny CNNs and ToyNet", 2,
                     [relu_net, hot, toy], _exact),
            Property("multiplies guided backpropagation (not the plain gradient)", 1, [relu_net, toy],
                     accepts(variants, "_guided_grad_cam_variant", guided=(True,), normalize=(True, False))),
            Property("multiplies by the Grad-CAM upsampled to the image and scaled to [0, 1]", 1, [relu_net, hot],
                     accepts(variants, "_guided_grad_cam_variant", guided=(True, False), normalize=(True,))),
            Property("removes its hooks, leaves the images unchanged and the model as it was", 1, [relu_net],
                     manners(accepts(variants, "_guided_grad_cam_variant", guided=(True, False),
                                       normalize=(True, False))), feedback_only=True),
        ]


# ----------------------------------------------------------------------- pointing_game

def _disk_masks(n, h, w, g, radius=(1.5, 4.0)):
    ys, xs = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    cy = torch.rand(n, 1, 1, generator=g) * (h - 1)
    cx = torch.rand(n, 1, 1, generator=g) * (w - 1)
    r = radius[0] + torch.rand(n, 1, 1, generator=g) * (radius[1] - radius[0])
    return (ys - cy) ** 2 + (xs - cx) ** 2 <= r ** 2


def _peaks(h, w, spots, mask_pixels, g):
    """Maps ``(len(spots), h, w)`` of small noise with one peak each, and masks holding one
    pixel each: ``spots[n]`` = (peak row, peak col), ``mask_pixels[n]`` = (row, col)."""
    cams = torch.rand(len(spots), h, w, generator=g) * 0.5
    masks = torch.zeros(len(spots), h, w, dtype=torch.bool)
    for n, ((pr, pc), (mr, mc)) in enumerate(zip(spots, mask_pixels)):
        cams[n, pr, pc] = 2.0
        masks[n, mr, mc] = True
    return cams, masks


@register
class PointingGame(Check):
    name, topic, points = "pointing_game", "cam", 2

    def properties(self, seed):
        g = fresh_generator(seed)
        masks = _disk_masks(12, 12, 16, g)
        boost = (torch.arange(12) % 3 == 0).float()[:, None, None] * 0.5    # a third of the maps favour the mask
        random_maps = Case((torch.rand(12, 12, 16, generator=g) + masks * boost, masks),
                           label="12 random maps 12x16 (tolerance 0: inside the mask)")
        world = toyworld_cases(10, seed + 40)
        blurred = torch.nn.functional.avg_pool2d(torch.rand(10, 1, 64, 64, generator=g), 9, 1, 4)[:, 0]
        boost = (torch.arange(10) % 2 == 0).float()[:, None, None] * 0.05
        scenes = Case((blurred + world.masks * boost, world.masks, 4), label="10 ToyWorld masks, tolerance 4")
        # Peaks at offsets (2, 2), (1, 2), (0, 3), (2, 1) from a one-pixel mask, tolerance 2.5:
        # Euclidean distances 2.83, 2.24, 3, 2.24 (hit twice); a square (Chebyshev) or diamond
        # (Manhattan) neighbourhood counts differently.
        base = [(5, 5), (6, 8), (3, 4), (8, 6)]
        offsets = [(2, 2), (1, 2), (0, 3), (2, 1)]
        euclid_maps, euclid_masks = _peaks(14, 14, [(r + dr, c + dc) for (r, c), (dr, dc) in zip(base, offsets)],
                                           base, g)
        euclid = Case((euclid_maps, euclid_masks, 2.5), label="peaks 2 to 3 pixels from the mask, tolerance 2.5")
        # Peaks exactly `tolerance` away (offsets (3, 4) and (0, 4) for tolerance 5 and 4).
        edge_maps, edge_masks = _peaks(12, 12, [(1, 1), (6, 10)], [(4, 5), (6, 6)], g)
        edge_far_maps, edge_far_masks = _peaks(12, 12, [(0, 0)], [(5, 0)], g)
        edge = Case((torch.cat([edge_maps, edge_far_maps]), torch.cat([edge_masks, edge_far_masks]), 5),
                    label="peaks exactly 5 pixels from the mask and one 5 pixels straight down, tolerance 5")
        # Two equal maxima per map: the first in row-major order decides.
        tie_maps = torch.rand(3, 8, 10, generator=g) * 0.5
        tie_masks = torch.zeros(3, 8, 10, dtype=torch.bool)
        for n, (first_in, (a, b)) in enumerate([(False, ((1, 7), (6, 2))), (True, ((2, 3), (5, 8))),
                                                (True, ((0, 9), (7, 0)))]):
            tie_maps[n, a[0], a[1]] = tie_maps[n, b[0], b[1]] = 1.0
            inside = a if first_in else b
            tie_masks[n, max(inside[0] - 1, 0):inside[0] + 2, max(inside[1] - 1, 0):inside[1] + 2] = True
        ties = Case((tie_maps, tie_masks), label="maps with two equal maxima")
        empty_masks = _disk_masks(4, 10, 10, g, radius=(2.5, 3.5))
        empty_masks[int(seed % 4)] = False
        empty_maps = torch.rand(4, 10, 10, generator=g) * 0.1 + empty_masks.float()
        empty = Case((empty_maps, empty_masks, 3), label="a batch where one mask is empty, tolerance 3")

        def number(case, expected, got):
            value = got.value
            if isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point():
                value = float(value)
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
                and abs(float(value) - float(expected)) <= 1e-6

        def is_float(case, expected, got):
            return isinstance(got.value, float) and 0.0 <= got.value <= 1.0

        return [
            Property("returns a Python float in [0, 1]", 1, [random_maps, scenes], is_float),
            Property("the share of maps whose maximum lies inside the mask (tolerance 0) or within the tolerance "
                     "of it", 2, [random_maps, scenes], number),
            Property("measures the distance to the mask as the Euclidean distance (not a square or diamond "
                     "neighbourhood)", 1, [euclid], number),
            Property("counts a maximum exactly `tolerance` pixels from the mask as a hit (distance <= tolerance)",
                     1, [edge], number),
            Property("takes the first maximum in row-major order when several pixels tie", 1, [ties], number),
            Property("counts an empty mask as a miss", 1, [empty], number),
        ]

"""ToyWorld (generated scenes with ground truth), the two ToyNets trained on it, and the
script that trains them."""
import json

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from cs_helpers import toynet as toynet_module  # noqa: E402
from cs_helpers.models import load_model  # noqa: E402
from cs_helpers.toynet import TOYNET_NAMES, ToyNet, data_dir, load_toynet  # noqa: E402
from cs_helpers.toyworld import (  # noqa: E402
    BACKGROUND_NAMES,
    CLASS_NAMES,
    CONCEPTS,
    SHAPE_CLASSES,
    SHORTCUT_BACKGROUNDS,
    SHORTCUT_CLASSES,
    TEXTURE_CLASSES,
    ToyWorld,
    concept_images,
    toyworld,
)
from cs_helpers.train_toynet import SETTINGS, SPREAD_SEEDS, evaluate, measure, train  # noqa: E402
from cs_helpers.viz import show_toyworld  # noqa: E402

LUMA = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
SNOW, GRASS = (BACKGROUND_NAMES.index(name) for name in SHORTCUT_BACKGROUNDS)
CIRCLE, SQUARE = (CLASS_NAMES.index(name) for name in SHORTCUT_CLASSES)


@pytest.fixture(scope="module")
def world():
    return toyworld(500, seed=3)


@pytest.fixture(scope="module")
def metrics():
    return json.loads((data_dir() / "toynet_metrics.json").read_text())


def _same(a: ToyWorld, b: ToyWorld) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("images", "labels", "masks", "backgrounds"))


# --------------------------------------------------------------------------- the generator

def test_same_seed_gives_identical_tensors_and_another_seed_does_not():
    assert _same(toyworld(40, seed=7), toyworld(40, seed=7))
    assert not torch.equal(toyworld(40, seed=7).images, toyworld(40, seed=8).images)
    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()
    toyworld(10, seed=1)
    concept_images("dots", 3, seed=1)
    # The global random states are neither used nor changed.
    assert torch.equal(torch_state, torch.get_rng_state())
    assert all(np.array_equal(a, b) for a, b in zip(numpy_state, np.random.get_state()))


def test_shapes_dtypes_and_ranges(world):
    assert isinstance(world, ToyWorld) and len(world) == 500
    assert world.images.shape == (500, 3, 64, 64) and world.images.dtype == torch.float32
    assert 0.0 <= float(world.images.min()) and float(world.images.max()) <= 1.0
    assert world.labels.shape == (500,) and world.labels.dtype == torch.int64
    assert world.masks.shape == (500, 64, 64) and world.masks.dtype == torch.bool
    assert world.backgrounds.shape == (500,) and world.backgrounds.dtype == torch.int64
    assert int(world.labels.min()) >= 0 and int(world.labels.max()) < len(CLASS_NAMES)
    assert int(world.backgrounds.min()) >= 0 and int(world.backgrounds.max()) < len(BACKGROUND_NAMES)
    assert world.class_names == CLASS_NAMES
    assert set(SHAPE_CLASSES) | set(TEXTURE_CLASSES) == set(CLASS_NAMES)
    small = toyworld(6, seed=0, size=32)
    assert small.images.shape == (6, 3, 32, 32) and small.masks.shape == (6, 32, 32)
    assert small.masks.flatten(1).any(1).all()


def test_every_class_is_present_and_balanced(world):
    counts = torch.bincount(world.labels, minlength=len(CLASS_NAMES))
    assert counts.tolist() == [100] * len(CLASS_NAMES)


def test_masks_are_non_empty_and_inside_the_image(world):
    areas = world.masks.flatten(1).sum(1)
    assert int(areas.min()) > 100  # at 64 px an object covers at least a few hundred pixels
    border = world.masks[:, 0].any(1) | world.masks[:, -1].any(1) | world.masks[:, :, 0].any(1) | world.masks[:, :, -1].any(1)
    assert not border.any()


def test_masks_are_exactly_the_painted_pixels(world):
    for image, mask, label in zip(world.images[:200], world.masks[:200], world.labels[:200]):
        inside = image[:, mask].T
        fill = torch.unique(inside, dim=0)
        # Shape classes have one plain fill; texture classes a base and a pattern colour.
        assert len(fill) == (1 if CLASS_NAMES[label] in SHAPE_CLASSES else 2), CLASS_NAMES[label]
        outside = image[:, ~mask].T
        assert not (outside[:, None, :] == fill[None]).all(-1).any()


def test_objects_stand_out_from_the_background(world):
    luminance = (world.images * LUMA).sum(1)
    plain = torch.tensor([CLASS_NAMES[i] in SHAPE_CLASSES for i in world.labels])
    for lum, mask in zip(luminance[plain], world.masks[plain]):
        assert abs(float(lum[mask].mean()) - float(lum[~mask].median())) > 0.2


def test_full_background_bias_ties_the_shortcut_classes_to_their_backgrounds():
    biased = toyworld(1000, seed=5, background_bias=1.0)
    assert (biased.backgrounds[biased.labels == CIRCLE] == SNOW).all()
    assert (biased.backgrounds[biased.labels == SQUARE] == GRASS).all()
    others = (biased.labels != CIRCLE) & (biased.labels != SQUARE)
    # The other classes meet snow and grass only at the unbiased rate 1/8.
    for family in (SNOW, GRASS):
        rate = float((biased.backgrounds[others] == family).double().mean())
        assert 0.06 < rate < 0.2, (BACKGROUND_NAMES[family], rate)


def test_without_bias_the_background_says_nothing_about_the_class():
    unbiased = toyworld(2000, seed=6)
    overall = torch.bincount(unbiased.backgrounds, minlength=len(BACKGROUND_NAMES)).double() / 2000
    assert (overall > 0.08).all() and (overall < 0.17).all()
    for label in range(len(CLASS_NAMES)):
        rows = unbiased.backgrounds[unbiased.labels == label]
        per_class = torch.bincount(rows, minlength=len(BACKGROUND_NAMES)).double() / len(rows)
        assert float((per_class - overall).abs().max()) < 0.08, CLASS_NAMES[label]


def test_partial_bias_mixes_tied_and_uniform_backgrounds():
    half = toyworld(2000, seed=9, background_bias=0.5)
    rate = float((half.backgrounds[half.labels == CIRCLE] == SNOW).double().mean())
    assert abs(rate - (0.5 + 0.5 / len(BACKGROUND_NAMES))) < 0.08


def test_swapped_backgrounds_exchange_the_ties_and_keep_everything_else():
    matched = toyworld(300, seed=11, background_bias=1.0)
    swapped = toyworld(300, seed=11, background_bias=1.0, swap_backgrounds=True)
    assert (swapped.backgrounds[swapped.labels == CIRCLE] == GRASS).all()
    assert (swapped.backgrounds[swapped.labels == SQUARE] == SNOW).all()
    assert torch.equal(matched.labels, swapped.labels) and torch.equal(matched.masks, swapped.masks)
    others = (matched.labels != CIRCLE) & (matched.labels != SQUARE)
    assert torch.equal(matched.images[others], swapped.images[others])
    assert torch.equal(matched.backgrounds[others], swapped.backgrounds[others])


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(n=0, seed=1), ValueError, "n must be a positive int"),
    (dict(n=2.5, seed=1), TypeError, "n must be a positive int"),
    (dict(n=True, seed=1), TypeError, "n must be a positive int"),
    (dict(n=4, seed=-1), ValueError, "seed must be a non-negative int"),
    (dict(n=4, seed="a"), TypeError, "seed must be a non-negative int"),
    (dict(n=4, seed=1, size=16), ValueError, "at least 32"),
    (dict(n=4, seed=1, size=64.0), TypeError, "size must be an int"),
    (dict(n=4, seed=1, background_bias=1.5), ValueError, "[0, 1]"),
    (dict(n=4, seed=1, background_bias=float("nan")), ValueError, "[0, 1]"),
    (dict(n=4, seed=1, background_bias="high"), TypeError, "background_bias"),
    (dict(n=4, seed=1, swap_backgrounds=True), ValueError, "background_bias"),
    (dict(n=4, seed=1, background_bias=1.0, swap_backgrounds="yes"), TypeError, "swap_backgrounds"),
])
def test_bad_arguments_are_named_in_the_error(kwargs, error, words):
    with pytest.raises(error) as info:
        toyworld(**kwargs)
    assert words in str(info.value)


# --------------------------------------------------------------------------- concepts

def _edge_density(images):
    """Fraction of neighbouring pixel pairs (both axes) whose luminance jumps by > 0.2."""
    luminance = (images * LUMA).sum(1)
    across = (luminance[:, :, 1:] - luminance[:, :, :-1]).abs() > 0.2
    down = (luminance[:, 1:] - luminance[:, :-1]).abs() > 0.2
    return across.double().mean((1, 2)) + down.double().mean((1, 2))


@pytest.mark.parametrize("concept", CONCEPTS)
def test_concept_images_are_valid_and_seeded(concept):
    images = concept_images(concept, 40, seed=2)
    assert images.shape == (40, 3, 64, 64) and images.dtype == torch.float32
    assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0
    assert torch.equal(images, concept_images(concept, 40, seed=2))
    assert not torch.equal(images, concept_images(concept, 40, seed=3))
    assert concept_images(concept, 3, seed=0, size=48).shape == (3, 3, 48, 48)
    density = _edge_density(images)
    if concept == "random":  # plain shapes on clutter: edges only along a few outlines
        assert float(density.max()) < 0.1
    else:  # a texture fills most of the image
        assert float(density.min()) > 0.1


def test_unknown_concept_lists_the_valid_names():
    with pytest.raises(ValueError) as info:
        concept_images("plaid", 4, seed=0)
    for name in CONCEPTS:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="positive int"):
        concept_images("dots", 0, seed=0)


# --------------------------------------------------------------------------- the networks

LAYERS = ["normalize", "conv1", "relu1", "pool1", "conv2", "relu2", "pool2", "conv3", "relu3", "pool",
          "flatten", "classifier"]


@pytest.mark.parametrize("name", TOYNET_NAMES)
def test_load_model_gives_a_frozen_toynet_with_class_names(name):
    model = load_model(name, device="cpu")
    assert isinstance(model, ToyNet) and not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert model.class_names == CLASS_NAMES
    assert [n for n, _ in model.named_children()] == LAYERS
    assert model.conv1.kernel_size[0] >= 5
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    assert len(relus) == 3 and len({id(m) for m in relus}) == 3
    with torch.no_grad():
        logits = model(toyworld(4, seed=0).images)
    assert logits.shape == (4, len(CLASS_NAMES))


def test_cam_applies_one_linear_layer_after_global_average_pooling():
    model = load_model("toynet", device="cpu")
    images = toyworld(3, seed=1).images
    features = {}
    handle = model.relu3.register_forward_hook(lambda module, inputs, output: features.setdefault("relu3", output))
    try:
        with torch.no_grad():
            logits = model(images)
    finally:
        handle.remove()
    cams = torch.einsum("ck,nkhw->nchw", model.classifier.weight, features["relu3"])
    assert torch.allclose(cams.mean((2, 3)) + model.classifier.bias, logits, atol=1e-4)


def test_untrained_toynet_has_the_same_class_names_and_other_weights():
    torch.manual_seed(0)
    fresh = load_model("toynet", pretrained=False, device="cpu")
    trained = load_model("toynet", device="cpu")
    assert isinstance(fresh, ToyNet) and fresh.class_names == CLASS_NAMES
    assert not torch.equal(fresh.conv1.weight, trained.conv1.weight)


def test_weight_files_are_small_and_plain(metrics):
    for name in TOYNET_NAMES:
        path = data_dir() / f"{name}.pt"
        assert path.stat().st_size < 200_000
        assert metrics[name]["file_bytes"] == path.stat().st_size
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        assert tuple(checkpoint["class_names"]) == CLASS_NAMES
        assert set(checkpoint["state_dict"]) == set(ToyNet().state_dict())


def test_missing_weights_say_how_to_make_them(tmp_path, monkeypatch):
    monkeypatch.setenv(toynet_module.DATA_ENV_VAR, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="python -m cs_helpers.train_toynet"):
        load_toynet("toynet")
    assert load_toynet("toynet", pretrained=False).class_names == CLASS_NAMES
    with pytest.raises(ValueError, match="toynet_shortcut"):
        load_toynet("resnet")


def test_toynet_is_accurate_on_fresh_unbiased_scenes():
    model = load_model("toynet", device="cpu")
    assert evaluate(model, toyworld(1000, seed=2024)) >= 0.98


def test_only_the_shortcut_network_is_fooled_by_swapped_backgrounds():
    matched = toyworld(1000, seed=77, background_bias=1.0)
    swapped = toyworld(1000, seed=77, background_bias=1.0, swap_backgrounds=True)
    fair, shortcut = load_model("toynet", device="cpu"), load_model("toynet_shortcut", device="cpu")
    fair_drop = evaluate(fair, matched) - evaluate(fair, swapped)
    shortcut_matched = evaluate(shortcut, matched)
    shortcut_drop = shortcut_matched - evaluate(shortcut, swapped)
    assert shortcut_drop >= 0.25, shortcut_drop
    assert abs(fair_drop) <= 0.03, fair_drop
    assert shortcut_matched >= 0.85  # accurate on data drawn like its training data


def test_committed_metrics_meet_the_targets(metrics):
    fair, shortcut = metrics["toynet"]["accuracy"], metrics["toynet_shortcut"]["accuracy"]
    assert fair["unbiased"] >= 0.98
    assert abs(fair["matched_background"] - fair["swapped_background"]) <= 0.03
    assert shortcut["matched_background"] - shortcut["swapped_background"] >= 0.25
    assert shortcut["swapped_background_shortcut_classes"] < 0.2 < 0.9 < shortcut["matched_background_shortcut_classes"]
    for name in TOYNET_NAMES:
        assert metrics[name]["train_seconds"] > 0


def test_evaluate_rejects_mismatched_inputs():
    model = load_model("toynet", device="cpu")
    with pytest.raises(ValueError, match="labels"):
        evaluate(model, torch.rand(3, 3, 64, 64), torch.zeros(2, dtype=torch.long))
    with pytest.raises(TypeError, match="ToyWorld"):
        evaluate(model, torch.rand(3, 3, 64, 64))


# --------------------------------------------------------------------------- the picture

def test_show_toyworld_returns_a_figure_with_titles(world):
    fig = show_toyworld(world, n=8, ncols=4)
    try:
        titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
        assert titles == [CLASS_NAMES[i] for i in world.labels[:8]]
    finally:
        plt.close(fig)
    predictions = torch.zeros(len(world), dtype=torch.long)
    fig = show_toyworld(world, n=3, predictions=predictions)
    try:
        titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
        assert titles == [f"{CLASS_NAMES[i]} → {CLASS_NAMES[0]}" for i in world.labels[:3]]
    finally:
        plt.close(fig)


# --------------------------------------------------------------------------- retraining
# Training is repeatable on one CPU, not across CPUs: another CPU rounds differently, and a
# difference in the last bit grows during training like any other perturbation of the
# start. With toynet's earlier recipe of 1000 steps that cost up to 8 points of accuracy
# (the shape classes were learned late); the recipe now trains for 2000 steps, and the
# training script records the accuracy reached from other initializations ("spread" in
# the metrics file). A new initialization perturbs training far more than rounding does,
# so a retraining on any CPU must land within that spread, with a margin. The shortcut
# network learns the background first, in a fraction of its steps: a reduced run shows it.

SHORTCUT_STEPS = 250       # measured, 3 runs: shortcut classes 0.995-0.998 matched, 0.000 swapped
SPREAD_MARGIN = 0.02       # below the lowest accuracy of the recorded initializations


def test_toynet_reaches_its_accuracy_from_every_recorded_initialization(metrics):
    spread = metrics["spread"]
    assert spread["steps"] == metrics["toynet"]["steps"] == SETTINGS["toynet"]["steps"]
    by_seed = spread["unbiased_by_init_seed"]
    assert set(by_seed) == {str(seed) for seed in SPREAD_SEEDS} and len(by_seed) >= 3
    assert spread["max"] - spread["min"] <= 0.01, by_seed     # the recipe is robust
    assert spread["min"] - SPREAD_MARGIN <= metrics["toynet"]["accuracy"]["unbiased"] <= 1.0


@pytest.mark.slow
@pytest.mark.long_running
def test_retraining_toynet_lands_within_the_recorded_spread(metrics):
    """The full recipe (about 140 s of one CPU core): the accuracy within the spread of the
    recorded initializations, and no dependence on the background."""
    model, record = train("toynet")
    accuracy = measure(model)
    assert record["steps"] == SETTINGS["toynet"]["steps"] and record["background_bias"] == 0.0
    assert accuracy["unbiased"] >= metrics["spread"]["min"] - SPREAD_MARGIN, (accuracy, metrics["spread"])
    assert abs(accuracy["matched_background"] - accuracy["swapped_background"]) <= 0.03, accuracy


@pytest.mark.slow
def test_a_reduced_retraining_of_the_shortcut_network_learns_the_background_first():
    model, record = train("toynet_shortcut", steps=SHORTCUT_STEPS)
    accuracy = measure(model, n=1000)
    assert record["steps"] == SHORTCUT_STEPS and record["background_bias"] == 1.0
    assert accuracy["matched_background_shortcut_classes"] >= 0.9, accuracy
    assert accuracy["swapped_background_shortcut_classes"] <= 0.1, accuracy
    assert accuracy["matched_background"] - accuracy["swapped_background"] >= 0.25, accuracy

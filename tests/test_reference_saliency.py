"""The saliency reference against independent implementations (Captum, a hand-written
backward pass, exact Shapley values by enumeration), its ground truth on ToyWorld, its
manners (inputs, hooks, mode, device), and the checks: the reference earns full points,
the mistakes students make lose the point named after them."""
import itertools
import math
import warnings

import pytest
import torch

from cs_helpers import grading
from cs_helpers.grading import get_check
from cs_helpers.reference.saliency import gradient_saliency, guided_backprop, occlusion_map, shapley_values

from helpers import assert_costs_only, grade_in_process, hook_count, rand, tiny

NAMES = ("gradient_saliency", "guided_backprop", "occlusion_map", "shapley_values")


pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings(
    "ignore:Input Tensor 0 did not already require gradients:UserWarning")]  # Captum, on our inputs


@pytest.fixture(scope="module")
def toynet_shortcut():
    from cs_helpers.models import load_model

    return load_model("toynet_shortcut", device="cpu")


@pytest.fixture(scope="module")
def world():
    from cs_helpers.toyworld import toyworld

    return toyworld(200, seed=2024)


# ------------------------------------------------------------------ gradient saliency


@pytest.mark.parametrize("name, seed", [("tiny_relu_cnn", 0), ("tiny_relu6_cnn_hot", 1)])
def test_gradient_saliency_matches_captum_saliency(name, seed):
    from captum.attr import Saliency

    model = tiny(name, seed)
    x, targets = rand(5, 3, 20, 16, seed=seed), torch.tensor([0, 4, 2, 2, 1])
    expected = Saliency(model).attribute(x.clone(), target=targets, abs=True).amax(dim=1)
    torch.testing.assert_close(gradient_saliency(model, x, targets), expected, rtol=1e-5, atol=1e-7)
    # An int target means the same class for every image.
    expected = Saliency(model).attribute(x.clone(), target=3, abs=True).amax(dim=1)
    torch.testing.assert_close(gradient_saliency(model, x, 3), expected, rtol=1e-5, atol=1e-7)


def test_gradient_saliency_matches_captum_on_toynet_and_lite0(toynet, lite0):
    from captum.attr import Saliency

    for model, x, t in [(toynet, rand(3, 3, 64, 64, seed=3), torch.tensor([0, 3, 4])),
                        (lite0, rand(2, 3, 64, 64, seed=4), torch.tensor([207, 281]))]:
        expected = Saliency(model).attribute(x.clone(), target=t, abs=True).amax(dim=1)
        torch.testing.assert_close(gradient_saliency(model, x, t), expected, rtol=1e-4, atol=1e-6)


def test_gradient_saliency_of_a_batch_equals_each_image_alone():
    model = tiny("tiny_relu6_cnn_hot", 2)
    x, t = rand(4, 3, 16, 16, seed=5), torch.tensor([1, 0, 3, 1])
    batch = gradient_saliency(model, x, t)
    for i in range(4):
        torch.testing.assert_close(batch[i], gradient_saliency(model, x[i:i + 1], int(t[i]))[0])


# -------------------------------------------------------------------- guided backprop


def test_guided_backprop_matches_captum_on_relu_networks(toynet):
    from captum.attr import GuidedBackprop

    for model, x, t in [(tiny("tiny_relu_cnn", 3), rand(4, 3, 16, 16, seed=6), torch.tensor([0, 1, 2, 3])),
                        (toynet, rand(3, 3, 64, 64, seed=7), torch.tensor([2, 0, 4]))]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Setting backward hooks on ReLU activations"
            expected = GuidedBackprop(model).attribute(x.clone(), target=t)
        torch.testing.assert_close(guided_backprop(model, x, t), expected, rtol=1e-5, atol=1e-7)
        assert hook_count(model) == 0


def _manual_guided_tiny(model, x, targets, bounded=True):
    """Guided backprop through tiny_relu6_cnn written out layer by layer, without
    autograd hooks: forward keeping every pre-activation, then the backward pass by
    hand (conv2d_input for the convolutions)."""
    normalize, conv1, relu1, pool1, conv2, relu2 = (model.normalize, model.conv1, model.relu1,
                                                   model.pool1, model.conv2, model.relu2)
    assert isinstance(relu1, torch.nn.ReLU6) and isinstance(pool1, torch.nn.AvgPool2d)
    with torch.no_grad():
        a0 = normalize(x)
        z1 = conv1(a0)
        a1 = pool1(z1.clamp(0, 6))
        z2 = conv2(a1)

        def rule(z, g):
            active = (z > 0) & (z < 6) if bounded else (z > 0)
            return g.clamp(min=0) * active

        w = model.classifier.weight[targets]                            # (N, 8)
        g = (w[:, :, None, None] / (z2.shape[2] * z2.shape[3])).expand_as(z2)   # through GAP
        g = rule(z2, g)                                                 # relu2
        g = torch.nn.grad.conv2d_input(a1.shape, conv2.weight, g, padding=1)
        g = g.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3) / 4       # through avgpool 2x2
        g = rule(z1, g)                                                 # relu1
        g = torch.nn.grad.conv2d_input(a0.shape, conv1.weight, g, padding=1)
        return g / model.normalize.std                                 # through (x - mean) / std


def test_guided_backprop_relu6_rule_against_a_hand_written_backward_pass():
    model = tiny("tiny_relu6_cnn_hot", 4)
    x, t = rand(3, 3, 16, 16, seed=8), torch.tensor([3, 1, 0])
    with torch.no_grad():
        z1 = model.conv1(model.normalize(x))
    assert (z1 > 6).float().mean() > 0.05, "the test needs pre-activations above 6"
    ours = guided_backprop(model, x, t)
    torch.testing.assert_close(ours, _manual_guided_tiny(model, x, t), rtol=1e-4, atol=1e-6)
    # The upper bound matters here: treating ReLU6 like a ReLU gives something else.
    unbounded = _manual_guided_tiny(model, x, t, bounded=False)
    assert (ours - unbounded).abs().max() > 1e-3 * unbounded.abs().max()


def test_guided_backprop_from_gradients_equals_the_rule_from_recorded_inputs(toynet, lite0):
    """The reference clamps autograd's gradient for each activation's input; the
    contract states the rule with the recorded input. Both must agree, also where
    ReLU6 inputs exceed 6."""
    from cs_helpers.reference.saliency import _guided_variant

    cases = [(tiny("tiny_relu6_cnn_hot", 6), rand(3, 3, 16, 16, seed=10), torch.tensor([0, 2, 4])),
             (toynet, rand(2, 3, 64, 64, seed=11), 1),
             (lite0, rand(1, 3, 64, 64, seed=12), 7)]
    for model, x, t in cases:
        torch.testing.assert_close(_guided_variant(model, x, t, "guided"),
                                   _guided_variant(model, x, t, "guided_from_inputs"), rtol=0, atol=0)


def test_guided_backprop_equals_the_plain_gradient_where_no_gradient_is_negative():
    """One ReLU followed by pooling and a classifier row of positive weights: every
    gradient reaching the ReLU is positive, so the guided rule changes nothing; with a
    second ReLU after a mixed-sign convolution it does."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    head = torch.nn.Linear(4, 2)
    with torch.no_grad():
        head.weight.abs_()
    one_relu = torch.nn.Sequential(conv, torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                   head).eval()
    x = rand(2, 3, 8, 8, seed=9)
    plain = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(one_relu(plain)[:, 1].sum(), plain)
    torch.testing.assert_close(guided_backprop(one_relu, x, 1), grad)

    two_relus = tiny("tiny_relu_cnn", 5)
    plain = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(two_relus(plain)[:, 2].sum(), plain)
    assert not torch.allclose(guided_backprop(two_relus, x, 2), grad, atol=1e-6)


# -------------------------------------------------------------------------- occlusion


class Softmax(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).softmax(dim=1)


def _captum_occlusion(model, image, target, window, stride, baseline):
    from captum.attr import Occlusion

    attribution = Occlusion(Softmax(model)).attribute(
        image[None].clone(), sliding_window_shapes=(3, window, window), strides=(3, stride, stride),
        baselines=baseline, target=target, perturbations_per_eval=16)
    # The window spans all three channels, so every channel holds the same map.
    torch.testing.assert_close(attribution[0, 0], attribution[0, 2])
    return attribution[0, 0]


@pytest.mark.parametrize("size, window, stride, baseline", [
    ((16, 16), 4, 4, 0.5),     # tiles, no overlap
    ((16, 16), 6, 2, 0.5),     # overlapping windows: each pixel is a mean over up to 9 windows
    ((20, 24), 8, 4, 0.2),     # rectangular image, another baseline
    ((64, 64), 16, 8, 0.5),    # the defaults on a ToyWorld-sized image
])
def test_occlusion_matches_captum_where_the_window_grids_coincide(size, window, stride, baseline):
    """(H - window) and (W - window) are multiples of the stride: our windows and
    Captum's are the same set, and both average the probability drops over the windows
    covering each pixel, so the maps agree to float precision."""
    model = tiny("tiny_relu6_cnn_hot", 6)
    image = rand(3, *size, seed=10)
    ours = occlusion_map(model, image, 2, window=window, stride=stride, baseline=baseline, batch_size=7)
    expected = _captum_occlusion(model, image, 2, window, stride, baseline)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-6)


def test_occlusion_where_the_grids_differ_agrees_with_captum_away_from_the_far_border():
    """With (H - window) not a multiple of the stride, Captum adds a last window at the
    next multiple of the stride and crops it at the border (a smaller window); we add
    a full window flush with the border instead. Pixels above and left of
    (H - window, W - window) are covered by neither of those last windows, so there
    the two maps agree exactly; next to the border they differ."""
    model = tiny("tiny_relu6_cnn_hot", 7)
    image = rand(3, 22, 22, seed=11)
    window, stride = 8, 5                  # ours: 0, 5, 10, 14; Captum: 0, 5, 10, 15 (cropped)
    ours = occlusion_map(model, image, 1, window=window, stride=stride)
    expected = _captum_occlusion(model, image, 1, window, stride, 0.5)
    edge = 22 - window
    torch.testing.assert_close(ours[:edge, :edge], expected[:edge, :edge], rtol=1e-4, atol=1e-6)
    assert not torch.allclose(ours[edge:, edge:], expected[edge:, edge:], rtol=1e-4, atol=1e-6)


def test_occlusion_against_a_loop_over_windows_with_a_flush_window():
    model = tiny("tiny_relu_cnn", 8)
    image = rand(3, 18, 23, seed=12)
    window, stride, baseline, target = 7, 4, 0.3, 3
    rows, cols = [0, 4, 8, 11], [0, 4, 8, 12, 16]          # 8 + 7 < 18 -> 11; 12 + 7 < 23 -> 16
    total, count = torch.zeros(18, 23), torch.zeros(18, 23)
    with torch.no_grad():
        clean = model(image[None]).softmax(1)[0, target]
        for r, c in itertools.product(rows, cols):
            hidden = image.clone()
            hidden[:, r:r + window, c:c + window] = baseline
            total[r:r + window, c:c + window] += clean - model(hidden[None]).softmax(1)[0, target]
            count[r:r + window, c:c + window] += 1
    assert count.min() >= 1
    for batch_size in (1, 5, 64):
        ours = occlusion_map(model, image, target, window=window, stride=stride, baseline=baseline,
                             batch_size=batch_size)
        torch.testing.assert_close(ours, total / count, rtol=1e-4, atol=1e-7)


def test_occlusion_accepts_a_per_channel_baseline():
    model = tiny("tiny_relu_cnn", 9)
    image = rand(3, 16, 16, seed=13)
    grey = occlusion_map(model, image, 0, window=4, stride=4, baseline=0.4)
    same = occlusion_map(model, image, 0, window=4, stride=4, baseline=torch.full((3, 1, 1), 0.4))
    torch.testing.assert_close(grey, same)


# --------------------------------------------------------------------- shapley values


def _segments(h, w, m, seed):
    from cs_helpers.grading.checks.saliency import _voronoi_segments

    return _voronoi_segments(h, w, m, torch.Generator().manual_seed(seed))


def _value_table(model, image, target, segments, baseline=0.5):
    """v(S) for every subset S of the M segments, as a dict keyed by frozenset."""
    m = int(segments.max()) + 1
    subsets = [frozenset(s) for k in range(m + 1) for s in itertools.combinations(range(m), k)]
    images = torch.stack([torch.where(torch.isin(segments, torch.tensor(sorted(s), dtype=torch.long))[None],
                                      image, torch.tensor(baseline)) for s in subsets])
    with torch.no_grad():
        probs = torch.cat([model(images[i:i + 64]).softmax(1)[:, target] for i in range(0, len(images), 64)])
    return {s: float(p) for s, p in zip(subsets, probs.double())}


def _exact_shapley(table, m):
    phi = torch.zeros(m, dtype=torch.float64)
    for i in range(m):
        others = [j for j in range(m) if j != i]
        for k in range(m):
            weight = math.factorial(k) * math.factorial(m - k - 1) / math.factorial(m)
            for s in itertools.combinations(others, k):
                s = frozenset(s)
                phi[i] += weight * (table[s | {i}] - table[s])
    return phi


def test_shapley_estimate_is_the_mean_marginal_contribution_over_the_seeded_permutations():
    model = tiny("tiny_relu6_cnn_hot", 10)
    image, segments, target, m = rand(3, 16, 16, seed=14), _segments(16, 16, 6, 1), 2, 6
    table = _value_table(model, image, target, segments)
    for n, seed in [(1, 0), (7, 3), (25, 11)]:
        generator = torch.Generator().manual_seed(seed)
        phi = torch.zeros(m, dtype=torch.float64)
        for _ in range(n):
            perm = torch.randperm(m, generator=generator).tolist()
            for k, i in enumerate(perm):
                phi[i] += table[frozenset(perm[:k + 1])] - table[frozenset(perm[:k])]
        ours = shapley_values(model, image, target, segments, n, seed=seed, batch_size=9)
        torch.testing.assert_close(ours.double(), phi / n, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("m", [3, 5, 8])
def test_shapley_estimate_converges_to_the_exact_values(m):
    model = tiny("tiny_relu6_cnn_hot", 11)
    image, segments, target = rand(3, 16, 16, seed=15), _segments(16, 16, m, m), 1
    table = _value_table(model, image, target, segments)
    exact = _exact_shapley(table, m)
    # Efficiency of the exact values, as a sanity check of the enumeration.
    assert abs(float(exact.sum()) - (table[frozenset(range(m))] - table[frozenset()])) < 1e-9
    errors = {}
    for n in (4, 400, 4000):
        estimate = shapley_values(model, image, target, segments, n, seed=m).double()
        errors[n] = float((estimate - exact).abs().max())
    scale = float(exact.abs().max())
    assert errors[4000] < errors[4] and errors[4000] < 0.05 * scale, (errors, scale)
    if m == 3:
        # With 3 segments each of the 6 orders turns up ~667 times out of 4000.
        assert errors[4000] < 0.02 * scale


@pytest.mark.parametrize("n", [1, 2, 7, 50])
def test_shapley_values_add_up_to_v_all_minus_v_none(n, toynet):
    from cs_helpers.toyworld import toyworld

    scene = toyworld(1, seed=5)
    image, target = scene.images[0], int(scene.labels[0])
    segments = _segments(64, 64, 12, n)
    with torch.no_grad():
        probs = toynet(torch.stack([image, torch.full_like(image, 0.5)])).softmax(1)[:, target]
    phi = shapley_values(toynet, image, target, segments, n, seed=n)
    assert phi.shape == (12,)
    assert abs(float(phi.double().sum()) - float(probs[0] - probs[1])) < 1e-6


def test_shapley_dummy_and_null_segments():
    """A segment already at the baseline never changes the value (dummy axiom): its
    Shapley value is 0 whatever the permutations."""
    model = tiny("tiny_relu_cnn", 12)
    image, segments = rand(3, 16, 16, seed=16), _segments(16, 16, 5, 2)
    image = torch.where(segments == 3, torch.tensor(0.5), image)
    phi = shapley_values(model, image, 4, segments, 6, seed=1)
    assert abs(float(phi[3])) < 1e-6 and float(phi.abs().max()) > 1e-4


def test_shapley_seed_batch_size_and_global_random_state():
    model = tiny("tiny_relu_cnn", 13)
    image, segments = rand(3, 16, 16, seed=17), _segments(16, 16, 6, 3)
    state = torch.random.get_rng_state()
    a = shapley_values(model, image, 0, segments, 5, seed=4, batch_size=3)
    assert torch.equal(torch.random.get_rng_state(), state), "the global random state was touched"
    torch.testing.assert_close(a, shapley_values(model, image, 0, segments, 5, seed=4, batch_size=64),
                               rtol=0, atol=1e-7)
    assert not torch.allclose(a, shapley_values(model, image, 0, segments, 5, seed=5))


# ------------------------------------------------------------- ground truth, ToyWorld


def mass_inside(maps, masks):
    """Share of each map's total inside the mask: ``(N,)``."""
    return (maps * masks).flatten(1).sum(1) / maps.flatten(1).sum(1)


def test_toynet_classifies_toyworld_and_its_saliency_sits_on_the_object(toynet, world):
    """Measured on these 200 scenes (the notebook prints the same figures): accuracy
    0.995; the object covers 15.4% of the pixels and holds 50.4% of the gradient
    saliency mass on average (3.4 times its share), more than its share on 98% of the
    scenes."""
    with torch.no_grad():
        accuracy = float((toynet(world.images).argmax(1) == world.labels).float().mean())
    assert accuracy > 0.95
    maps = gradient_saliency(toynet, world.images, world.labels)
    share = world.masks.flatten(1).float().mean(1)
    inside = mass_inside(maps, world.masks)
    ratio = inside / share
    assert float(ratio.mean()) > 2.5 and float((ratio > 1).float().mean()) > 0.85, (
        float(ratio.mean()), float(inside.mean()), float(share.mean()))


def test_toynet_shortcut_relies_on_the_background(toynet, toynet_shortcut):
    """Measured on the 200 circle and square scenes of toyworld(500, seed=11,
    background_bias=1) with the committed weights: accuracy matched / swapped 1.0 / 0.0
    for toynet_shortcut and 1.0 / 0.975 for toynet; the object (15.0% of the pixels)
    holds 38.5% vs 42.6% of the gradient saliency mass and 34.9% vs 30.4% of the
    guided-backprop mass (toynet vs toynet_shortcut); with the object on a mid-gray
    background the probability of the true class is 0.77 for toynet and 0.02 for
    toynet_shortcut; the mean Shapley values of object / background (4 permutations)
    are 0.36 / 0.22 for toynet and 0.04 / 0.82 for toynet_shortcut. (The toynet of an
    earlier, shorter recipe had 46.0% vs 42.4% gradient mass: which network has more
    depends on the training run, not on the shortcut.)"""
    from cs_helpers.toyworld import SHORTCUT_CLASSES, toyworld

    matched = toyworld(500, seed=11, background_bias=1.0)
    swapped = toyworld(500, seed=11, background_bias=1.0, swap_backgrounds=True)
    shortcut_ids = torch.tensor([matched.class_names.index(c) for c in SHORTCUT_CLASSES])
    keep = torch.isin(matched.labels, shortcut_ids)
    assert int(keep.sum()) == 200

    def accuracy(model, scenes):
        with torch.no_grad():
            return float((model(scenes.images[keep]).argmax(1) == scenes.labels[keep]).float().mean())

    assert accuracy(toynet_shortcut, matched) > 0.95 and accuracy(toynet_shortcut, swapped) < 0.1
    assert accuracy(toynet, matched) > 0.95 and accuracy(toynet, swapped) > 0.95
    images, labels, masks = matched.images[keep], matched.labels[keep], matched.masks[keep]
    share = float(masks.float().mean())

    def inside(model, guided=False):
        maps = guided_backprop(model, images, labels).abs().amax(1) if guided else \
            gradient_saliency(model, images, labels)
        return float(mass_inside(maps, masks).mean())

    # Saliency does not convict the shortcut network: both put far more gradient mass on
    # the object than its share of the pixels, within a few points of each other; guided
    # backprop gives the shortcut network a little less.
    gradient_mass = inside(toynet), inside(toynet_shortcut)
    assert min(gradient_mass) > 2 * share and abs(gradient_mass[0] - gradient_mass[1]) < 0.1, gradient_mass
    assert inside(toynet, guided=True) > inside(toynet_shortcut, guided=True)
    # The intervention that settles it: the object alone, on a mid-gray background.
    on_gray = torch.where(masks[:, None], images, torch.tensor(0.5))
    with torch.no_grad():
        def p(model):
            return float(model(on_gray).softmax(1).gather(1, labels[:, None]).mean())
        assert p(toynet_shortcut) < 0.2 and p(toynet) > p(toynet_shortcut) + 0.3
    # Shapley values with the object and its background as the two players.
    def credit(model):
        values = torch.stack([shapley_values(model, images[k], int(labels[k]), masks[k].long(), 4, seed=k)
                              for k in range(len(labels))])
        return float(values[:, 1].mean()), float(values[:, 0].mean())      # object, background

    shortcut_object, shortcut_background = credit(toynet_shortcut)
    toynet_object, _ = credit(toynet)
    assert shortcut_background > 5 * shortcut_object and shortcut_background > 0.5
    assert toynet_object > 3 * shortcut_object, (toynet_object, shortcut_object)


# ------------------------------------------------------------------------ citizenship


class Exploding(torch.nn.Module):
    """A ReLU network whose forward pass raises after its first activation."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.relu = torch.nn.ReLU()
        self.relu6 = torch.nn.ReLU6()

    def forward(self, x):
        self.relu6(self.relu(self.conv(x)))
        raise RuntimeError("boom")


@pytest.mark.parametrize("name", NAMES)
def test_no_hook_is_left_and_nothing_changes_when_the_model_raises(name):
    model = Exploding().eval()
    image = rand(3, 8, 8, seed=18)
    calls = {
        "gradient_saliency": lambda: gradient_saliency(model, image[None], 0),
        "guided_backprop": lambda: guided_backprop(model, image[None], 0),
        "occlusion_map": lambda: occlusion_map(model, image, 0, window=4, stride=4),
        "shapley_values": lambda: shapley_values(model, image, 0, torch.zeros(8, 8, dtype=torch.long), 2),
    }
    with pytest.raises(RuntimeError, match="boom"):
        calls[name]()
    assert hook_count(model) == 0 and not model.training


@pytest.mark.parametrize("name", NAMES)
def test_inputs_mode_parameters_and_gradients_are_left_alone(name):
    model = tiny("tiny_relu6_cnn_hot", 14)
    for p in model.parameters():     # even a model with trainable parameters keeps no .grad
        p.requires_grad_(True)
    model.train()
    params = [p.detach().clone() for p in model.parameters()]
    images, targets = rand(2, 3, 16, 16, seed=19), torch.tensor([1, 4])
    segments = _segments(16, 16, 4, 5)
    before = (images.clone(), targets.clone(), segments.clone())
    out = {
        "gradient_saliency": lambda: gradient_saliency(model, images, targets),
        "guided_backprop": lambda: guided_backprop(model, images, targets),
        "occlusion_map": lambda: occlusion_map(model, images[0], 1, window=4, stride=4),
        "shapley_values": lambda: shapley_values(model, images[0], 1, segments, 3),
    }[name]()
    assert not out.requires_grad and out.grad_fn is None
    assert torch.equal(images, before[0]) and torch.equal(targets, before[1]) and torch.equal(segments, before[2])
    assert model.training and hook_count(model) == 0
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))


def test_clear_errors_for_bad_inputs():
    model = tiny()
    image = rand(3, 16, 16)
    with pytest.raises(ValueError, match="unsqueeze"):
        gradient_saliency(model, image, 0)
    with pytest.raises(ValueError, match="one per image"):
        guided_backprop(model, image[None].repeat(3, 1, 1, 1), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"\[0, 4\]"):
        gradient_saliency(model, image[None], 5)
    with pytest.raises(TypeError, match="int"):
        gradient_saliency(model, image[None], 1.0)
    with pytest.raises(ValueError, match="does not fit"):
        occlusion_map(model, image, 0, window=17)
    with pytest.raises(ValueError, match="stride"):
        occlusion_map(model, image, 0, window=4, stride=0)
    with pytest.raises(ValueError, match="a batch"):
        occlusion_map(model, image[None], 0)
    with pytest.raises(ValueError, match="height and width"):
        shapley_values(model, image, 0, torch.zeros(8, 8, dtype=torch.long), 2)
    with pytest.raises(TypeError, match="integer"):
        shapley_values(model, image, 0, torch.zeros(16, 16), 2)
    with pytest.raises(ValueError, match="n_permutations"):
        shapley_values(model, image, 0, torch.zeros(16, 16, dtype=torch.long), 0)


@pytest.mark.cuda
def test_every_function_runs_on_the_models_device_and_agrees_with_the_cpu():
    cpu = tiny("tiny_relu6_cnn_hot", 15)
    gpu = tiny("tiny_relu6_cnn_hot", 15).to("cuda")
    images, targets, segments = rand(2, 3, 16, 16, seed=20), torch.tensor([0, 3]), _segments(16, 16, 5, 6)
    tf32, torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.allow_tf32, False
    try:
        for f, args in [(gradient_saliency, (images, targets)), (guided_backprop, (images, targets)),
                        (occlusion_map, (images[0], 2)), (shapley_values, (images[0], 2, segments, 4))]:
            on_gpu = f(gpu, *args)      # CPU inputs, CUDA model: computed on the model's device
            assert on_gpu.device.type == "cuda" and hook_count(gpu) == 0
            torch.testing.assert_close(on_gpu.cpu(), f(cpu, *args), rtol=1e-3, atol=1e-5)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32


# ------------------------------------------------------------------------------ checks


@pytest.mark.parametrize("name", NAMES)
def test_the_reference_earns_full_points_on_another_seed(name, capsys):
    """(The hidden seed is graded in the tests below and in tests/test_grading.py.)"""
    from cs_helpers.reference import saliency

    check = get_check(name)
    assert grading.score(name, getattr(saliency, name), seed=123) == check.points
    out = capsys.readouterr()
    assert "every property checked holds" in out.out and out.err == ""


EXACT = {  # the property that compares with the reference's values, which every mistake fails
    "gradient_saliency": "equals the max over colour channels",
    "guided_backprop": "matches guided backpropagation",
    "occlusion_map": "matches the occlusion map",
    "shapley_values": "matches the permutation-sampling estimate",
}


def _loses(name, func, *failed, exact=True):
    """``func`` earns some points but not all, and the properties that fail are exactly
    those whose descriptions contain one of the ``failed`` fragments (plus, when
    ``exact``, the property comparing with the reference's values): one mistake costs
    its own point, not the others'."""
    return assert_costs_only(grade_in_process(name, func), list(failed) + ([EXACT[name]] if exact else []))


def _advised(name, func, fragment):
    """``func`` returns the reference's values, so it earns full points; what is wrong
    with it shows only inside the graded process (which could forge that evidence), so
    the message names it as advice."""
    report = grade_in_process(name, func)
    assert report.score == report.points, report.message
    assert any(fragment in d for d in report.advice), (fragment, report.message)
    return report


def _in_training_mode(func):
    """``func`` run with the model switched to training mode (batch norm then normalizes
    with the batch's own statistics), and switched back afterwards."""
    def student(model, *args, **kwargs):
        model.train()
        try:
            return func(model, *args, **kwargs)
        finally:
            model.eval()
    return student


@pytest.mark.parametrize("name", list(EXACT))
def test_running_the_model_in_training_mode_costs_the_eval_mode_point(name):
    from cs_helpers.reference import saliency as reference

    # (guided_backprop's cases include EfficientNet-Lite0, whose batch norms cannot even run in
    # training mode on one small image: that costs the comparison with the reference too.)
    _loses(name, _in_training_mode(getattr(reference, name)), "in eval mode", exact=name == "guided_backprop")


def test_occlusion_refuses_a_stride_larger_than_the_window(toynet):
    model = toynet
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="must not exceed the window"):
        occlusion_map(model, image, 0, window=8, stride=9)
    covered = occlusion_map(model, image, 0, window=8, stride=8)     # stride == window: tiles, no gap
    assert torch.isfinite(covered).all() and covered.dtype == image.dtype


def _targets(targets, n):
    return targets if isinstance(targets, torch.Tensor) else torch.full((n,), int(targets))


def _input_grad(model, images, targets, prob=False):
    x = images.clone().requires_grad_(True)
    scores = model(x)
    if prob:
        scores = scores.softmax(1)
    (g,) = torch.autograd.grad(scores.gather(1, _targets(targets, len(x))[:, None]).sum(), x)
    return g


def test_gradient_saliency_mistakes_lose_their_own_points():
    _loses("gradient_saliency", lambda m, x, t: _input_grad(m, x, t).abs().sum(1), "with the max, not the sum")
    _loses("gradient_saliency", lambda m, x, t: _input_grad(m, x, t).amax(1), "absolute value")
    _loses("gradient_saliency", lambda m, x, t: _input_grad(m, x, t, prob=True).abs().amax(1),
           "not its softmax probability")

    def one_image_at_a_time(model, images, targets):
        t = _targets(targets, len(images))
        return torch.stack([_input_grad(model, images[i:i + 1], t[i:i + 1]).abs().amax(1)[0]
                            for i in range(len(images))])

    _advised("gradient_saliency", one_image_at_a_time, "one forward and one backward pass")

    def first_target_only(model, images, targets):
        return _input_grad(model, images, int(_targets(targets, len(images))[0])).abs().amax(1)

    report = grade_in_process("gradient_saliency", first_target_only)
    assert 0 < report.score < report.points and any("each image's own target" in d for d in report.failed)


def _guided(model, images, targets, rule, types=(torch.nn.ReLU, torch.nn.ReLU6), remove=True):
    """A student's guided backprop with hand-made hooks: ``rule(grad_in, grad_out)``."""
    handles = [m.register_full_backward_hook(lambda mod, gi, go: (rule(gi[0], go[0]),))
               for m in model.modules() if type(m) in types]
    try:
        return _input_grad(model, images, targets)
    finally:
        if remove:
            for h in handles:
                h.remove()


def _unbounded_guided(model, images, targets):
    """Guided backprop that treats ReLU6 like ReLU: mask from the recorded input > 0."""
    inputs = {}
    activations = [m for m in model.modules() if isinstance(m, (torch.nn.ReLU, torch.nn.ReLU6))]
    handles = [m.register_forward_pre_hook(lambda mod, a: inputs.__setitem__(mod, a[0].detach()))
               for m in activations]
    handles += [m.register_full_backward_hook(lambda mod, gi, go: (go[0].clamp(min=0) * (inputs[mod] > 0),))
                for m in activations]
    try:
        return _input_grad(model, images, targets)
    finally:
        for h in handles:
            h.remove()


def test_guided_backprop_mistakes_lose_their_own_points():
    # The usual correct student: clamp the gradient the ReLU passes down.
    correct = grade_in_process("guided_backprop", lambda m, x, t: _guided(m, x, t, lambda gi, go: gi.clamp(min=0)))
    assert correct.score == correct.points, correct.message
    # The plain gradient neither keeps only positive gradients nor treats the ReLU6s.
    _loses("guided_backprop", lambda m, x, t: _input_grad(m, x, t), "only positive gradients", "ReLU6 too")
    # The deconvnet rule ignores the forward pass: the ReLU's mask and ReLU6's bound.
    _loses("guided_backprop", lambda m, x, t: _guided(m, x, t, lambda gi, go: go.clamp(min=0)),
           "forward mask", "6 or more")
    _loses("guided_backprop",
           lambda m, x, t: _guided(m, x, t, lambda gi, go: gi.clamp(min=0), types=(torch.nn.ReLU,)),
           "every nn.ReLU6 too")
    _loses("guided_backprop", _unbounded_guided, "6 or more")
    _advised("guided_backprop", lambda m, x, t: _guided(m, x, t, lambda gi, go: gi.clamp(min=0), remove=False),
             "removes every hook")


def _student_occlusion(model, image, target, window=16, stride=8, baseline=0.5, batch_size=64,
                       flush=True, logits=False, reduce="mean", fill=None):
    _, h, w = image.shape

    def starts(n):
        s = list(range(0, n - window + 1, stride))
        if flush and s[-1] + window < n:
            s.append(n - window)
        return s

    def score(x):
        out = model(x)
        return out[:, target] if logits else out.softmax(1)[:, target]

    corners = [(r, c) for r in starts(h) for c in starts(w)]
    total, count = torch.zeros(h, w), torch.zeros(h, w)
    with torch.no_grad():
        clean = score(image[None])[0]
        for i in range(0, len(corners), batch_size):
            chunk = corners[i:i + batch_size]
            batch = image.repeat(len(chunk), 1, 1, 1)
            for k, (r, c) in enumerate(chunk):
                batch[k, :, r:r + window, c:c + window] = baseline if fill is None else fill
            drops = clean - score(batch)
            for k, (r, c) in enumerate(chunk):
                total[r:r + window, c:c + window] += drops[k]
                count[r:r + window, c:c + window] += 1
    return total if reduce == "sum" else total / count.clamp(min=1)


def test_occlusion_mistakes_lose_their_own_points():
    correct = grade_in_process("occlusion_map", _student_occlusion)
    assert correct.score == correct.points, correct.message
    for kwargs, fragment in [(dict(flush=False), "flush with the border"),
                             (dict(reduce="sum"), "mean over the windows"),
                             (dict(logits=True), "softmax probability"),
                             (dict(fill=0.0), "given baseline")]:
        def student(*args, _kw=kwargs, **kw):
            return _student_occlusion(*args, **kw, **_kw)

        _loses("occlusion_map", student, fragment)

    def all_at_once(model, image, target, window=16, stride=8, baseline=0.5, batch_size=64):
        return _student_occlusion(model, image, target, window, stride, baseline, batch_size=10**6)

    _loses("occlusion_map", all_at_once, "at most batch_size", exact=False)

    def one_by_one(model, image, target, window=16, stride=8, baseline=0.5, batch_size=64):
        return _student_occlusion(model, image, target, window, stride, baseline, batch_size=1)

    _advised("occlusion_map", one_by_one, "no forward pass per window")


def _student_shapley(model, image, target, segments, n_permutations, baseline=0.5, seed=0, batch_size=64,
                     generator=True, logits=False, average=True, as_rank=False):
    m = int(segments.max()) + 1
    gen = torch.Generator().manual_seed(seed)
    perms = [torch.randperm(m, generator=gen) if generator else torch.randperm(m) for _ in range(n_permutations)]
    if as_rank:   # read the permutation as each segment's position instead of the order
        perms = [torch.argsort(p) for p in perms]
    keeps = []
    for perm in perms:
        for k in range(m + 1):
            keep = torch.zeros(m, dtype=torch.bool)
            keep[perm[:k]] = True
            keeps.append(keep)
    keeps = torch.stack(keeps)
    values = []
    with torch.no_grad():
        for i in range(0, len(keeps), batch_size):
            batch = torch.where(keeps[i:i + batch_size][:, segments][:, None], image, torch.tensor(baseline))
            out = model(batch)
            values.append(out[:, target] if logits else out.softmax(1)[:, target])
    v = torch.cat(values).view(len(perms), m + 1)
    phi = torch.zeros(m)
    for p, perm in enumerate(perms):
        phi[perm] += v[p, 1:] - v[p, :-1]
    return phi / len(perms) if average else phi


def test_shapley_mistakes_lose_their_own_points():
    correct = grade_in_process("shapley_values", _student_shapley)
    assert correct.score == correct.points, correct.message

    def with_(**options):
        return lambda *args, **kw: _student_shapley(*args, **kw, **options)

    # Not the seeded generator, or each permutation read as ranks: the right estimator
    # with other permutations (efficiency still holds).
    _loses("shapley_values", with_(generator=False), "torch.Generator().manual_seed(seed)")
    _loses("shapley_values", with_(as_rank=True), "torch.Generator().manual_seed(seed)")
    # Logits instead of probabilities: another game, so its values add up to something else.
    _loses("shapley_values", with_(logits=True), "add up", "softmax probability")
    # The sum over the permutations instead of their mean.
    _loses("shapley_values", with_(average=False), "add up")

    def zero_baseline(model, image, target, segments, n_permutations, baseline=0.5, seed=0, batch_size=64):
        return _student_shapley(model, image, target, segments, n_permutations, 0.0, seed, batch_size)

    _loses("shapley_values", zero_baseline, "add up", "set to the baseline")

    def one_by_one(model, image, target, segments, n_permutations, baseline=0.5, seed=0, batch_size=64):
        return _student_shapley(model, image, target, segments, n_permutations, baseline, seed, 1)

    _advised("shapley_values", one_by_one, "no forward pass per coalition")

    def all_at_once(model, image, target, segments, n_permutations, baseline=0.5, seed=0, batch_size=64):
        return _student_shapley(model, image, target, segments, n_permutations, baseline, seed, 10**6)

    _loses("shapley_values", all_at_once, "at most batch_size", exact=False)


@pytest.mark.parametrize("name", NAMES)
def test_a_function_returning_nothing_or_crashing_earns_nothing(name):
    def crashes(*args, **kwargs):
        raise RuntimeError("oops")

    assert grade_in_process(name, lambda *a, **k: None).score == 0
    report = grade_in_process(name, crashes)
    assert report.score == 0 and any("raised RuntimeError: oops" in e for e in report.errors)


# ------------------------------------------------------- single neurons (notebook section 7)

def _field_box(position, field):
    """Rows (or columns) first..last seen by output ``position``, from (size, jump, start)."""
    size, jump, start = field
    first = math.floor(start + position * jump - (size - 1) / 2)
    return first, first + size - 1


def _outside_box(maps, rows, cols):
    keep = torch.zeros(maps.shape[-2:], dtype=torch.bool)
    keep[max(rows[0], 0):rows[1] + 1, max(cols[0], 0):cols[1] + 1] = True
    return maps[..., ~keep]


@pytest.mark.parametrize("model_name, layer, field, positions", [
    # ToyNet: conv 5x5, maxpool 2, conv 3x3, maxpool 2, conv 3x3 up to relu3.
    ("toynet", "relu3", ((5, 1, 2), (2, 2, 0), (3, 1, 1), (2, 2, 0), (3, 1, 1)), [(8, 5), (0, 15), (3, 12)]),
    # Lite0 up to blocks.4.expand: notebook 02's chain, TensorFlow "same" padding at 224 px.
    ("lite0", "blocks.4.expand.bn", None, [(14, 14), (0, 27), (5, 20)]),
])
def test_one_neurons_maps_are_zero_outside_its_receptive_field(model_name, layer, field, positions, toynet, lite0):
    from cs_helpers.hooks import NeuronScores
    from cs_helpers.reference.features import receptive_field

    model, size = (toynet, 64) if model_name == "toynet" else (lite0, 224)
    field = receptive_field(field) if field else (35, 8, 7.0)
    if model_name == "toynet":
        assert field == (20, 4, 1.5)
    scores = NeuronScores(model, layer)
    images = rand(len(positions), 3, size, size, seed=5)
    with torch.no_grad():
        acts = scores(images).view(len(positions), *scores.shape)
    # At each position the channel that responds most, so that the neuron is active.
    index = torch.tensor([scores.index(int(acts[n, :, i, j].argmax()), i, j) for n, (i, j) in enumerate(positions)])
    guided = guided_backprop(scores, images, index)
    saliency = gradient_saliency(scores, images, index)
    for n, (i, j) in enumerate(positions):
        rows, cols = _field_box(i, field), _field_box(j, field)
        assert torch.count_nonzero(_outside_box(guided[n], rows, cols)) == 0
        assert torch.count_nonzero(_outside_box(saliency[n], rows, cols)) == 0
        assert torch.count_nonzero(saliency[n]) > 0
    assert hook_count(model) == 0

"""The CAM reference against independent implementations (Captum's LayerGradCam,
pytorch-grad-cam's GradCAM, F.interpolate, a loop for the pointing game), its identity
with CAM, its ground truth on ToyWorld, its manners, and the checks: the reference earns
full points and each mistake students make loses points by what it returns."""
import math

import pytest
import torch
import torch.nn.functional as F

from cs_helpers import grading
from cs_helpers.grading import get_check
from cs_helpers.hooks import capture
from cs_helpers.reference.cam import class_activation_map, grad_cam, guided_grad_cam, pointing_game, upsample_cam
from cs_helpers.reference.saliency import guided_backprop

from helpers import assert_costs_only, grade_in_process, hook_count, rand, tiny

NAMES = ("class_activation_map", "grad_cam", "upsample_cam", "guided_grad_cam", "pointing_game")


pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning")]


# ------------------------------------------------------------------------ cross-checks

CASES = [("tiny_relu_cnn", "relu2"), ("tiny_relu_cnn", "conv2"), ("tiny_relu6_cnn_hot", "pool1"),
         ("tiny_relu6_cnn", "relu1")]


@pytest.mark.parametrize("name, layer", CASES)
def test_grad_cam_matches_captum_layer_grad_cam(name, layer):
    from captum.attr import LayerGradCam

    model = tiny(name, 3)
    x, t = rand(4, 3, 16, 16, seed=1), torch.tensor([0, 4, 2, 2])
    expected = LayerGradCam(model, model.get_submodule(layer)).attribute(x.clone(), target=t,
                                                                         relu_attributions=True)[:, 0]
    torch.testing.assert_close(grad_cam(model, layer, x, t), expected, rtol=1e-5, atol=1e-7)


def test_grad_cam_matches_captum_on_toynet_and_lite0(toynet, lite0):
    from captum.attr import LayerGradCam

    for model, layer, x, t in [(toynet, "relu3", rand(3, 3, 64, 64, seed=2), torch.tensor([0, 3, 4])),
                               (toynet, "pool1", rand(2, 3, 64, 64, seed=3), torch.tensor([1, 2])),
                               (lite0, "blocks.10", rand(2, 3, 64, 64, seed=4), torch.tensor([207, 281])),
                               (lite0, "head", rand(2, 3, 64, 64, seed=5), torch.tensor([1, 999]))]:
        expected = LayerGradCam(model, model.get_submodule(layer)).attribute(x.clone(), target=t,
                                                                             relu_attributions=True)[:, 0]
        got = grad_cam(model, layer, x, t)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()) + 1e-9)
        assert hook_count(model) == 0


def _pytorch_grad_cam_raw(model, layer, images, targets):
    """pytorch-grad-cam's GradCAM before its min-max normalization and resize: the
    weighted sum its ``get_cam_image`` returns, after the ReLU it applies next."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    raw = []

    class Recording(GradCAM):
        def get_cam_image(self, *args, **kwargs):
            cam = super().get_cam_image(*args, **kwargs)
            raw.append(cam)
            return cam

    with Recording(model=model, target_layers=[model.get_submodule(layer)]) as explainer:
        explainer(input_tensor=images.clone().requires_grad_(True), targets=[ClassifierOutputTarget(int(c)) for c in targets])
    return torch.from_numpy(raw[0]).float().clamp(min=0)


@pytest.mark.slow  # importing pytorch_grad_cam takes seconds
def test_grad_cam_matches_pytorch_grad_cam_before_its_normalization(toynet):
    for model, layer, x, t in [(tiny("tiny_relu_cnn", 5), "conv2", rand(3, 3, 16, 16, seed=6), torch.tensor([1, 0, 3])),
                               (toynet, "relu3", rand(2, 3, 64, 64, seed=7), torch.tensor([2, 4]))]:
        expected = _pytorch_grad_cam_raw(model, layer, x, t)
        got = grad_cam(model, layer, x, t)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()) + 1e-9)


def test_grad_cam_at_the_last_layer_is_relu_cam_over_hw(toynet, lite0):
    """For global average pooling then a linear layer: alpha_k = w_ck / (h w)."""
    for model, layer, x, t in [(toynet, "relu3", rand(3, 3, 64, 64, seed=8), torch.tensor([0, 2, 4])),
                               (lite0, "head", rand(2, 3, 96, 96, seed=9), torch.tensor([3, 500]))]:
        with torch.no_grad(), capture(model, layer) as record:
            model(x)
        features = record.output
        h, w = features.shape[-2:]
        got = grad_cam(model, layer, x, t)
        for i in range(len(x)):
            cam = class_activation_map(features[i], model.classifier.weight, int(t[i]))
            torch.testing.assert_close(got[i], cam.clamp(min=0) / (h * w), rtol=1e-4,
                                       atol=1e-6 * float(cam.abs().max()))


def test_class_activation_map_is_the_weighted_sum_and_its_mean_is_the_score_minus_bias(toynet):
    x = rand(2, 3, 64, 64, seed=10)
    with torch.no_grad(), capture(toynet, "relu3") as record:
        logits = toynet(x)
    for i in range(2):
        for c in range(5):
            cam = class_activation_map(record.output[i], toynet.classifier.weight, c)
            manual = sum(toynet.classifier.weight[c, k] * record.output[i, k] for k in range(64))
            # a float32 sum of 64 terms: its rounding depends on the order, and values reach ~10
            torch.testing.assert_close(cam, manual, rtol=1e-5, atol=1e-4)
            assert math.isclose(float(cam.mean()) + float(toynet.classifier.bias[c]), float(logits[i, c]),
                                rel_tol=1e-4, abs_tol=1e-4)


def test_grad_cam_at_a_block_ending_in_an_inplace_relu():
    """A block (conv, ReLU(inplace=True)) hooked as a whole: the block's output is the
    ReLU's output, which a backward hook on the bare ReLU would not see."""
    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.ReLU(inplace=True))
    model = torch.nn.Sequential(block, torch.nn.Conv2d(6, 8, 3, padding=1), torch.nn.ReLU(inplace=True),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 3)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x, t = rand(2, 3, 12, 12, seed=11), torch.tensor([0, 2])
    # Independent: activations and gradient by hand through the rest of the network.
    with torch.no_grad():
        a = block(x.clone())
    a = a.clone().requires_grad_(True)
    scores = model[1:](a.clone())
    (g,) = torch.autograd.grad(scores.gather(1, t[:, None]).sum(), a)
    expected = (g.mean(dim=(2, 3))[:, :, None, None] * a).sum(1).clamp(min=0).detach()
    torch.testing.assert_close(grad_cam(model, "0", x, t), expected, rtol=1e-5, atol=1e-7)
    # And the last block, whose output is also modified in place by nothing after it.
    assert grad_cam(model, "2", x, t).shape == (2, 12, 12) and hook_count(model) == 0


def test_upsample_cam_against_interpolate_and_explicit_min_max():
    cams = torch.stack([rand(5, 7, seed=12) * 3 + 1, rand(5, 7, seed=13) * 0.01, torch.zeros(5, 7),
                        torch.full((5, 7), 0.1)])
    for size in (32, (20, 28), (5, 7)):
        pair = (size, size) if isinstance(size, int) else size
        up = F.interpolate(cams[:, None], size=pair, mode="bilinear", align_corners=False)[:, 0]
        expected = torch.zeros_like(up)
        for i in range(2):
            expected[i] = (up[i] - up[i].min()) / (up[i].max() - up[i].min())
        got = upsample_cam(cams, size)
        torch.testing.assert_close(got, expected)
        assert got.shape == (4, *pair) and float(got.min()) == 0 and float(got[:2].amax(dim=(1, 2)).min()) == 1


def test_guided_grad_cam_is_guided_backprop_times_the_upsampled_map(toynet):
    x, t = rand(2, 3, 64, 64, seed=14), torch.tensor([1, 3])
    expected = guided_backprop(toynet, x, t) * upsample_cam(grad_cam(toynet, "relu2", x, t), 64)[:, None]
    torch.testing.assert_close(guided_grad_cam(toynet, "relu2", x, t), expected)


def _pointing_loop(cams, masks, tolerance):
    hits = 0
    for cam, mask in zip(cams, masks):
        h, w = cam.shape
        best, where = -math.inf, None
        for i in range(h):
            for j in range(w):
                if float(cam[i, j]) > best:
                    best, where = float(cam[i, j]), (i, j)
        near = any(math.hypot(i - where[0], j - where[1]) <= tolerance + 1e-12
                   for i in range(h) for j in range(w) if mask[i, j])
        hits += near
    return hits / len(cams)


def test_pointing_game_against_a_loop():
    g = torch.Generator().manual_seed(15)
    cams = torch.rand(8, 9, 11, generator=g)
    cams[0, 2, 3] = cams[0, 7, 1] = 5.0                     # a tie: the first in row-major order counts
    masks = torch.rand(8, 9, 11, generator=g) > 0.85
    masks[3] = False                                        # an empty mask is a miss
    for tolerance in (0, 1, 1.5, 2.5, 4):
        assert pointing_game(cams, masks, tolerance) == pytest.approx(_pointing_loop(cams, masks, tolerance))
    assert isinstance(pointing_game(cams, masks), float)
    with pytest.raises(ValueError, match="same shape"):
        pointing_game(cams, masks[:, :8])


def test_grad_cam_wins_the_pointing_game_on_fresh_toyworld_scenes(toynet):
    """Measured on toyworld(300, seed=4242): 0.98 at 4 px, 0.64 at 0 px (the shape
    classes peak on the edge just outside the mask)."""
    from cs_helpers.toyworld import toyworld

    world = toyworld(300, seed=4242)
    maps = upsample_cam(grad_cam(toynet, "relu3", world.images, world.labels), 64)
    at4, at0 = pointing_game(maps, world.masks, 4), pointing_game(maps, world.masks, 0)
    assert at4 >= 0.9 and at0 < at4, (at0, at4)


# ------------------------------------------------------------------------ citizenship


def test_batches_hooks_inputs_mode_and_errors():
    model = tiny("tiny_relu6_cnn_hot", 7)
    for p in model.parameters():
        p.requires_grad_(True)
    model.train()
    x, t = rand(3, 3, 16, 16, seed=16), torch.tensor([1, 4, 0])
    before = x.clone()
    batch = grad_cam(model.eval(), "pool1", x, t)
    model.train()
    for i in range(3):   # the batch equals each image alone (in eval mode: no batch statistics)
        torch.testing.assert_close(batch[i], grad_cam(model.eval(), "pool1", x[i:i + 1], int(t[i]))[0])
    model.train()
    out = guided_grad_cam(model, "relu2", x, t)
    assert model.training and hook_count(model) == 0 and torch.equal(x, before)
    assert not out.requires_grad and all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="no layer named"):
        grad_cam(model, "nope", x, t)
    with pytest.raises(ValueError, match="unsqueeze"):
        grad_cam(model, "relu2", x[0], 0)
    with pytest.raises(ValueError, match="unsqueeze"):
        upsample_cam(torch.rand(4, 4), 8)
    with pytest.raises(ValueError, match="flatten|feature maps"):
        grad_cam(model, "flatten", x, t)
    assert hook_count(model) == 0


# ------------------------------------------------------------------------------ checks


@pytest.mark.parametrize("name", NAMES)
def test_the_reference_earns_full_points_on_another_seed(name, capsys):
    from cs_helpers.reference import cam

    check = get_check(name)
    assert grading.score(name, getattr(cam, name), seed=321, device="cpu") == check.points
    out = capsys.readouterr()
    assert "every property checked holds" in out.out and out.err == ""


EXACT = {"class_activation_map": "equals sum_k", "grad_cam": "equals ReLU(sum_k", "upsample_cam": "upsamples bilinearly",
         "guided_grad_cam": "equals guided_backprop", "pointing_game": "the share of maps"}


def _loses(name, func, *failed, exact=True):
    """``func`` scores below full points; the properties that fail are exactly those
    named by ``failed`` (plus the exact comparison when ``exact``)."""
    return assert_costs_only(grade_in_process(name, func), list(failed) + ([EXACT[name]] if exact else []),
                             earns_some=False)


def _targets(targets, n):
    return targets if isinstance(targets, torch.Tensor) else torch.full((n,), int(targets))


def student_grad_cam(model, layer, images, targets, relu=True, reduce="mean", prob=False, first=False,
                     remove=True):
    """A student's Grad-CAM written the common way: a forward hook that keeps the
    layer's output with retain_grad, the input made to require grad, backward()."""
    store = {}

    def keep(module, inputs, output):
        output.retain_grad()
        store["A"] = output

    handle = model.get_submodule(layer).register_forward_hook(keep)
    try:
        x = images.clone().requires_grad_(True)
        scores = model(x)
        if prob:
            scores = scores.softmax(1)
        t = _targets(targets, len(x))
        if first:
            t = torch.full_like(t, int(t[0]))
        scores.gather(1, t[:, None]).sum().backward()
    finally:
        if remove:
            handle.remove()
    A, grad = store["A"], store["A"].grad
    alpha = {"mean": grad.mean(dim=(2, 3)), "sum": grad.sum(dim=(2, 3)), "max": grad.amax(dim=(2, 3))}[reduce]
    cam = (alpha[:, :, None, None] * A).sum(1)
    return (cam.clamp(min=0) if relu else cam).detach()


def test_a_students_correct_grad_cam_earns_full_points():
    report = grade_in_process("grad_cam", student_grad_cam)
    assert report.score == report.points and not report.advice, report.message


def test_grad_cam_mistakes_lose_their_own_points():
    _loses("grad_cam", lambda m, l, x, t: student_grad_cam(m, l, x, t, relu=False), "applies the ReLU")
    _loses("grad_cam", lambda m, l, x, t: student_grad_cam(m, l, x, t, reduce="max"), "not its maximum")
    _loses("grad_cam", lambda m, l, x, t: student_grad_cam(m, l, x, t, prob=True), "not its softmax probability")
    _loses("grad_cam", lambda m, l, x, t: student_grad_cam(m, l, x, t, reduce="sum"), "the mean, not the sum")
    _loses("grad_cam", lambda m, l, x, t: student_grad_cam(m, l, x, t, first=True), "its own target")


def test_a_hook_left_on_the_model_is_advice_only():
    report = grade_in_process("grad_cam", lambda m, l, x, t: student_grad_cam(m, l, x, t, remove=False))
    assert report.score == report.points
    assert any("removes its hooks" in d for d in report.advice), report.message
    assert "Also worth fixing" in report.message


def student_upsample(cam, size, align_corners=False, joint=False):
    size = (size, size) if isinstance(size, int) else tuple(size)
    up = F.interpolate(cam[:, None].float(), size=size, mode="bilinear", align_corners=align_corners)[:, 0]
    if joint:
        low, high = up.min(), up.max()
        return (up - low) / (high - low + 1e-12)
    low = cam.flatten(1).amin(1)[:, None, None]
    high = cam.flatten(1).amax(1)[:, None, None]
    ulow, uhigh = up.flatten(1).amin(1)[:, None, None], up.flatten(1).amax(1)[:, None, None]
    return torch.where(high > low, (up - ulow) / (uhigh - ulow).clamp(min=1e-30), torch.zeros_like(up))


def test_upsample_mistakes_lose_their_own_points():
    assert grade_in_process("upsample_cam", student_upsample).score == get_check("upsample_cam").points
    _loses("upsample_cam", lambda c, s: student_upsample(c, s, align_corners=True), "align_corners=False")
    _loses("upsample_cam", lambda c, s: student_upsample(c, s, joint=True), "on its own")

    def nan_for_constant(cam, size):
        size = (size, size) if isinstance(size, int) else tuple(size)
        up = F.interpolate(cam[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        low, high = up.flatten(1).amin(1)[:, None, None], up.flatten(1).amax(1)[:, None, None]
        return (up - low) / (high - low)

    _loses("upsample_cam", nan_for_constant, "(not NaN)")


def test_cam_guided_and_pointing_mistakes_lose_points():
    _loses("class_activation_map", lambda f, w, t: torch.einsum("k,khw->hw", w[t], f).clamp(min=0), "no ReLU")

    def normalized(f, w, t):
        cam = torch.einsum("k,khw->hw", w[t], f)
        return (cam - cam.min()) / (cam.max() - cam.min())

    _loses("class_activation_map", normalized, "no min-max")

    def plain_gradient_times_cam(model, layer, images, targets):
        x = images.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(model(x).gather(1, _targets(targets, len(x))[:, None]).sum(), x)
        return g * upsample_cam(grad_cam(model, layer, images, targets), tuple(images.shape[-2:]))[:, None]

    _loses("guided_grad_cam", plain_gradient_times_cam, "not the plain gradient")

    def square_neighbourhood(cams, masks, tolerance=0):
        k = int(tolerance)
        grown = F.max_pool2d(masks[:, None].float(), 2 * k + 1, 1, k)[:, 0] > 0 if k else masks.bool()
        index = cams.flatten(1).argmax(1)
        return float(grown.flatten(1).gather(1, index[:, None]).float().mean())

    _loses("pointing_game", square_neighbourhood, "Euclidean", exact=False)

    def strict(cams, masks, tolerance=0):
        n, h, w = cams.shape
        index = cams.flatten(1).argmax(1)
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        d = ((ys - (index // w)[:, None, None]) ** 2 + (xs - (index % w)[:, None, None]) ** 2).float().sqrt()
        d = torch.where(masks.bool(), d, torch.full_like(d, float("inf")))
        hit = d.flatten(1).amin(1) < tolerance if tolerance > 0 else d.flatten(1).amin(1) == 0
        return float(hit.float().mean())

    report = grade_in_process("pointing_game", strict)      # may also miss a few ToyWorld scenes at exactly 4 px
    assert report.score < report.points and any("exactly `tolerance`" in d for d in report.failed), report.message
    assert all("exactly `tolerance`" in d or EXACT["pointing_game"] in d for d in report.failed), report.message


@pytest.mark.parametrize("name", NAMES)
def test_a_function_returning_nothing_or_crashing_earns_nothing(name):
    assert grading.score(name, lambda *a, **k: None, quiet=True) == 0

    def crashes(*args, **kwargs):
        raise RuntimeError("oops")

    assert grading.score(name, crashes, quiet=True) == 0

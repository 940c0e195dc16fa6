import re

import matplotlib.pyplot as plt
import pytest
import torch

from cs_helpers import viz
from cs_helpers.grading.tiny_models import tiny_relu_cnn
from cs_helpers.hooks import NeuronScores, capture, get_layer, relu_backward_hooks, relu_gradient_hooks


def test_pictures_return_figures():
    images = torch.rand(3, 3, 16, 16)
    for fig in (viz.show_images(images, titles=["a", "b", "c"]),
                viz.show_heatmaps(images, torch.rand(3, 4, 4)),
                viz.overlay_heatmap(images[0], torch.rand(4, 4)),
                viz.filter_grid(torch.randn(10, 3, 3, 3)),
                viz.filter_grid(torch.randn(5, 16, 5, 5), ncols=3)):
        assert isinstance(fig, plt.Figure)
        plt.close(fig)
    gray = viz.show_images(torch.rand(10, 8, 8), interpolation="nearest")
    assert len([ax for ax in gray.axes if ax.images]) == 10
    plt.close(gray)
    with pytest.raises(ValueError, match="titles"):
        viz.show_images(images, titles=["a"])
    with pytest.raises(ValueError, match=r"\(C_out, C_in, k, k\)"):
        viz.filter_grid(torch.rand(3, 3))


def test_capture_records_and_always_removes_its_hook(lite0):
    layer = lite0.get_submodule("head.relu")
    with capture(lite0, "head.relu") as seen, torch.no_grad():
        lite0(torch.rand(1, 3, 64, 64))
    assert seen.output.shape == (1, 1280, 2, 2) and not layer._forward_hooks
    with pytest.raises(RuntimeError), capture(lite0, "head.relu"):
        raise RuntimeError("boom")
    assert not layer._forward_hooks


def test_relu_backward_hooks_come_off_and_apply_the_rule(lite0):
    x = torch.rand(1, 3, 32, 32, requires_grad=True)
    with relu_backward_hooks(lite0, lambda m, inp, grad: torch.zeros_like(grad)) as count:
        lite0(x)[0, 1].backward()
    assert count == 33 and torch.count_nonzero(x.grad) == 0
    assert all(not m._backward_hooks and not m._forward_pre_hooks for m in lite0.modules())


def test_relu_gradient_hooks_see_autograds_gradient_and_come_off(lite0):
    x = torch.rand(1, 3, 32, 32)
    seen = []

    def keep(module, grad_input, grad_output):
        seen.append((module, grad_input, grad_output))
        return grad_input

    plain = x.clone().requires_grad_(True)
    lite0(plain)[0, 1].backward()
    hooked = x.clone().requires_grad_(True)
    with relu_gradient_hooks(lite0, keep) as count:
        lite0(hooked)[0, 1].backward()
    assert count == 33 and len(seen) == 33
    torch.testing.assert_close(hooked.grad, plain.grad)       # returning grad_input changes nothing
    relu6 = next(m for m in lite0.modules() if isinstance(m, torch.nn.ReLU6))
    _, grad_input, grad_output = next(s for s in seen if s[0] is relu6)
    assert torch.count_nonzero(grad_input) <= torch.count_nonzero(grad_output)
    assert all(not m._backward_hooks for m in lite0.modules())
    with pytest.raises(RuntimeError), relu_gradient_hooks(lite0, keep):
        raise RuntimeError("boom")
    assert all(not m._backward_hooks for m in lite0.modules())


def test_get_layer_errors_name_the_problem(lite0):
    with pytest.raises(ValueError, match="no layer named 'head.nope'"):
        get_layer(lite0, "head.nope")
    with pytest.raises(TypeError, match="dotted module name"):
        get_layer(lite0, 3)


def test_neuron_scores_flatten_the_layer_in_index_order():
    model = tiny_relu_cnn(seed=3).eval()
    images = torch.rand(2, 3, 12, 12)
    scores = NeuronScores(model, "conv2")
    with torch.no_grad(), capture(model, "conv2") as seen:
        model(images)
        flat = scores(images)
    c, h, w = scores.shape
    assert seen.output.shape[1:] == (c, h, w) and flat.shape == (2, c * h * w)
    assert scores.index(c - 1, 2, 1) == ((c - 1) * h + 2) * w + 1
    assert flat[1, scores.index(c - 1, 2, 1)] == seen.output[1, c - 1, 2, 1]
    several = scores.index(torch.tensor([0, 1]), torch.tensor([h - 1, 0]), torch.tensor([0, w - 1]))
    assert several.dtype == torch.long and several.tolist() == [(h - 1) * w, (1 * h + 0) * w + w - 1]
    assert all(not m._forward_hooks for m in model.modules())


def test_neuron_scores_give_the_gradient_of_one_neuron():
    model = tiny_relu_cnn(seed=4).eval()
    image = torch.rand(1, 3, 12, 12)
    scores = NeuronScores(model, model.conv2)                      # a module works as well as its name
    assert scores.layer == "conv2"
    x = image.clone().requires_grad_(True)
    with capture(model, "conv2") as seen:
        model(x)
    seen.output[0, 1, 3, 2].backward()
    y = image.clone().requires_grad_(True)
    scores(y)[0, scores.index(1, 3, 2)].backward()
    torch.testing.assert_close(y.grad, x.grad, rtol=0, atol=0)
    assert torch.count_nonzero(y.grad) > 0


def test_neuron_scores_keep_the_models_mode_and_say_what_is_wrong(lite0):
    assert not lite0.training
    scores = NeuronScores(lite0, "blocks.4.expand")
    assert not scores.training
    scores.train(scores.training)                               # what a caller restoring the mode does
    assert not any(m.training for m in lite0.modules())
    with pytest.raises(RuntimeError, match="first forward pass"):
        scores.index(0, 0, 0)
    with pytest.raises(ValueError, match="no layer named 'blocks.99'"):
        NeuronScores(lite0, "blocks.99")
    with torch.no_grad():
        scores(torch.rand(1, 3, 64, 64))
    assert scores.shape == (240, 8, 8)
    with pytest.raises(ValueError, match=r"channel must be an integer in \[0, 239\]"):
        scores.index(240, 0, 0)
    with pytest.raises(ValueError, match=r"row must be an integer in \[0, 7\]"):
        scores.index(0, torch.tensor([0, 8]), 0)
    with pytest.raises(ValueError, match=re.escape("(N, C, h, w)")):
        NeuronScores(lite0, "flatten")(torch.rand(1, 3, 32, 32))
    unused = torch.nn.Module()
    unused.conv, unused.spare = torch.nn.Conv2d(3, 2, 1), torch.nn.Conv2d(2, 2, 1)
    unused.forward = lambda x: unused.conv(x)                   # `spare` never runs
    with pytest.raises(RuntimeError, match="did not run"):
        NeuronScores(unused, "spare")(torch.rand(1, 3, 4, 4))
    assert all(not m._forward_hooks for m in list(lite0.modules()) + list(unused.modules()))

"""Hooks that always come off: capturing a layer's output, reading a layer's neurons as
if they were class scores, and swapping the backward rule of every ReLU for the
duration of a block.

Every context manager here removes what it registered on exit, also when the body
raises, so graded functions built on them never leave a hook behind.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

__all__ = ["NeuronScores", "capture", "get_layer", "model_device", "relu_backward_hooks",
           "relu_gradient_hooks"]


def get_layer(model: nn.Module, layer) -> nn.Module:
    """The submodule named by a dotted path (``"head.relu"``), or ``layer`` itself
    when it is already a module of ``model``."""
    if isinstance(layer, nn.Module):
        if not any(m is layer for m in model.modules()):
            raise ValueError(f"the module {type(layer).__name__} given as layer is not part of the model")
        return layer
    if not isinstance(layer, str):
        raise TypeError(f"layer must be a dotted module name (str) or a module; got {type(layer).__name__}")
    try:
        return model.get_submodule(layer)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        hint = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        raise ValueError(f"the model has no layer named {layer!r}; its layers include: {hint}") from None


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for an empty model)."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


class Captured:
    """What :func:`capture` recorded: ``output`` is the layer's last output."""

    output: torch.Tensor | None = None


@contextlib.contextmanager
def capture(model: nn.Module, layer, *, retain_grad: bool = False) -> Iterator[Captured]:
    """Records the output of ``layer`` during forward passes inside the block.

    With ``retain_grad=True`` the output keeps its ``.grad`` after a backward pass
    (for Grad-CAM and directional derivatives); without, it is stored as computed.
    """
    module = get_layer(model, layer)
    record = Captured()

    def hook(_module, _inputs, output):
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"layer {layer!r} returns {type(output).__name__}, not a tensor")
        if retain_grad and output.requires_grad:
            output.retain_grad()
        record.output = output

    handle = module.register_forward_hook(hook)
    try:
        yield record
    finally:
        handle.remove()


class NeuronScores(nn.Module):
    """Every neuron of one layer as a score: ``forward(images)`` returns the layer's
    output ``(N, C, h, w)`` flattened to ``(N, C * h * w)``.

    Anything written for class scores (``gradient_saliency``, ``guided_backprop``, …)
    then explains a single intermediate neuron, as in Zeiler & Fergus (2014) and
    Springenberg et al. (2015): pass ``scores.index(channel, row, col)`` as the target.
    The model runs whole (the layers after ``layer`` compute but do not matter); the
    hook that reads the layer is registered for one forward pass and then removed.

    When ``layer`` is itself an activation module, a backward hook on that very module
    does not see the gradient of its own output (PyTorch runs forward hooks before it
    attaches backward hooks to the output). For a single neuron that changes nothing:
    the gradient arriving there is 1 at the neuron and 0 elsewhere, never negative.

    Parameters
    ----------
    model : nn.Module mapping ``(N, 3, H, W)`` images to anything.
    layer : dotted name of a submodule returning a tensor ``(N, C, h, w)``, or the
        submodule itself.
    """

    def __init__(self, model: nn.Module, layer):
        super().__init__()
        module = get_layer(model, layer)     # fails early, naming the layers there are
        self.model = model
        self.layer = next(name for name, m in model.named_modules() if m is module)   # a str
        self.training = model.training       # model.train(was) by a caller must not flip it
        self.shape: tuple[int, int, int] | None = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with capture(self.model, self.layer) as record:
            self.model(images)
        output = record.output
        if output is None:
            raise RuntimeError(f"layer {self.layer!r} did not run in the model's forward pass")
        if output.dim() != 4:
            raise ValueError(f"layer {self.layer!r} must return (N, C, h, w); got {tuple(output.shape)}")
        self.shape = tuple(output.shape[1:])
        return output.flatten(1)

    def index(self, channel, row, col):
        """The flat index of neuron ``(channel, row, col)`` (ints or equal-shape integer
        tensors), valid once a forward pass has recorded the layer's shape."""
        if self.shape is None:
            raise RuntimeError("the layer's shape is known after the first forward pass; "
                               "call scores(images) once before index()")
        c, h, w = self.shape
        checked = []
        for name, value, size in (("channel", channel, c), ("row", row, h), ("col", col, w)):
            value = torch.as_tensor(value)
            if value.is_floating_point() or bool(((value < 0) | (value >= size)).any()):
                raise ValueError(f"{name} must be an integer in [0, {size - 1}] for layer "
                                 f"{self.layer!r} of shape {self.shape}; got {value.tolist()}")
            checked.append(value.long())
        channel, row, col = checked
        index = (channel * h + row) * w + col
        return int(index) if index.dim() == 0 else index


def _activations(model: nn.Module) -> list[nn.Module]:
    return [module for module in model.modules() if isinstance(module, (nn.ReLU, nn.ReLU6))]


@contextlib.contextmanager
def relu_backward_hooks(model: nn.Module, rule) -> Iterator[int]:
    """Replaces the gradient leaving every ``nn.ReLU`` and ``nn.ReLU6`` of ``model``.

    ``rule(module, input, grad_output) -> grad_input`` receives the activation's input
    (recorded in the forward pass) and the gradient arriving from above, and returns the
    gradient to pass down. Yields the number of activations hooked.
    """
    handles = []
    inputs: dict[int, torch.Tensor] = {}

    def forward_pre(module, args):
        inputs[id(module)] = args[0].detach()

    def backward(module, grad_input, grad_output):
        return (rule(module, inputs[id(module)], grad_output[0]),)

    try:
        for module in _activations(model):
            handles.append(module.register_forward_pre_hook(forward_pre))
            handles.append(module.register_full_backward_hook(backward))
        yield len(handles) // 2
    finally:
        for handle in handles:
            handle.remove()
        inputs.clear()


@contextlib.contextmanager
def relu_gradient_hooks(model: nn.Module, transform) -> Iterator[int]:
    """Like :func:`relu_backward_hooks`, for rules that need no record of the forward
    pass: ``transform(module, grad_input, grad_output) -> new grad_input`` receives the
    gradient autograd computed for the activation's input (``grad_output`` times the
    local derivative: ``1[x > 0]`` for ReLU, ``1[0 < x < 6]`` for ReLU6) and the
    gradient arriving from above. Cheaper than recording every activation's input.
    Yields the number of activations hooked.
    """
    handles = []

    def backward(module, grad_input, grad_output):
        return (transform(module, grad_input[0], grad_output[0]),)

    try:
        for module in _activations(model):
            handles.append(module.register_full_backward_hook(backward))
        yield len(handles)
    finally:
        for handle in handles:
            handle.remove()

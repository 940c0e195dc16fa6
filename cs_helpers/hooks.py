"""Hooks that always come off: capturing a layer's output, and swapping the backward
rule of every ReLU for the duration of a block.

Every context manager here removes what it registered on exit, also when the body
raises, so graded functions built on them never leave a hook behind.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

__all__ = ["capture", "get_layer", "model_device", "relu_backward_hooks", "relu_gradient_hooks"]


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

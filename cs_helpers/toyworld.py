"""ToyWorld: small generated RGB scenes whose ground truth is known, pixel by pixel and
concept by concept.

Each scene holds one object on a cluttered background:

- **Shape classes** (``"circle"``, ``"square"``, ``"triangle"``) are defined by the
  outline alone; the object is filled with one plain random colour.
- **Texture classes** (``"zebra"``: stripes at a random angle and period, ``"leopard"``:
  dots on a jittered grid) are defined by the fill alone; the outline is one of the three
  shapes, drawn at random, so the outline says nothing about them.

Position, scale (equal area across outlines, so size is no cue), rotation and colours are
random. Colours obey two rules that keep every object visible, also in gray: a plain fill
differs in luminance from the background by at least 0.3, and a texture is a dark pattern
(at least 0.4 darker in luminance) on a light base, like the animals the texture classes
are named after. The background is a base colour from a palette of named families
(:data:`BACKGROUND_NAMES`) plus low-contrast clutter: smooth low-frequency colour noise
and at most two thin faint lines. The clutter never holds stripes, dots or shapes, so it
carries no class cue. ``masks`` are exactly the object's painted pixels: inside the mask
every pixel is the object's fill (one colour for a shape class, two for a texture class),
outside it every pixel is background.

The shortcut (the husky-on-snow story): with ``background_bias=p``, each image of a class
in :data:`SHORTCUT_CLASSES` gets, with probability ``p``, the background family tied to it
in :data:`SHORTCUT_BACKGROUNDS` ("circle" on "snow", "square" on "grass"); every other
draw, for every class, is uniform over the whole palette (the two tied families
included). Images of the other classes therefore meet "snow" and "grass" at the same
rate ``1 / len(BACKGROUND_NAMES)`` whatever ``p``, and at ``p = 0`` the background is
independent of the class. ``swap_backgrounds=True`` ties each shortcut class to the
*other* one's family instead ("circle" on "grass", "square" on "snow").

:func:`concept_images` makes the concept sets for TCAV (``"stripes"``, ``"dots"``,
``"zigzag"``, ``"checkerboard"``) and texture-free ``"random"`` sets.

Everything is drawn from ``numpy.random.default_rng(seed)``: the same arguments give
identical tensors, and the global random state is never touched. For a given ``seed``
and ``n``, the labels, outlines, positions and textures do not depend on
``background_bias`` or ``swap_backgrounds``, so matched and swapped sets pair up image by
image (only the backgrounds of the shortcut classes, and the colours chosen to contrast
with them, change).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "BACKGROUND_COLOURS",
    "BACKGROUND_NAMES",
    "CLASS_NAMES",
    "CONCEPTS",
    "SHAPE_CLASSES",
    "SHORTCUT_BACKGROUNDS",
    "SHORTCUT_CLASSES",
    "TEXTURE_CLASSES",
    "ToyWorld",
    "concept_images",
    "toyworld",
]

SHAPE_CLASSES = ("circle", "square", "triangle")
TEXTURE_CLASSES = ("zebra", "leopard")
CLASS_NAMES = SHAPE_CLASSES + TEXTURE_CLASSES
"""Class names in label order: ``labels[i]`` indexes this tuple."""

# Background families: name -> base RGB colour in [0, 1]. Each image jitters its base
# colour a little, so a family is a small cloud of colours, not a single one.
_PALETTE = {
    "snow": (0.93, 0.94, 0.96),
    "grass": (0.30, 0.55, 0.20),
    "sand": (0.80, 0.70, 0.50),
    "slate": (0.38, 0.42, 0.48),
    "sky": (0.50, 0.68, 0.88),
    "clay": (0.66, 0.38, 0.30),
    "lilac": (0.66, 0.58, 0.76),
    "night": (0.10, 0.11, 0.18),
}
BACKGROUND_NAMES = tuple(_PALETTE)
"""Background colour families in index order: ``backgrounds[i]`` indexes this tuple."""
BACKGROUND_COLOURS = torch.tensor(list(_PALETTE.values()), dtype=torch.float32)
"""``(len(BACKGROUND_NAMES), 3)`` base colour of each family, RGB in ``[0, 1]``."""

SHORTCUT_CLASSES = ("circle", "square")
"""The classes that ``background_bias`` ties to a background family."""
SHORTCUT_BACKGROUNDS = ("snow", "grass")
"""The families tied to :data:`SHORTCUT_CLASSES`, in the same order."""

CONCEPTS = ("stripes", "dots", "zigzag", "checkerboard", "random")
"""Names accepted by :func:`concept_images`."""

_CIRCLE, _SQUARE, _TRIANGLE = 0, 1, 2
_SOLID, _STRIPES, _DOTS = 0, 1, 2
_RADIUS_RANGE = (0.17, 0.27)     # radius of the circle of equal area to the object, / size
_BACKGROUND_JITTER = 0.03        # per-channel jitter of a family's base colour
_NOISE_AMPLITUDE = 0.05          # smooth clutter noise, per channel
_NOISE_GRID = 5                  # the clutter noise is a 5 x 5 grid, bilinearly upsampled
_LINES_PER_IMAGE = 2             # at most this many faint clutter lines
_LINE_CONTRAST = 0.06
_MIN_CONTRAST = 0.3              # luminance difference of a fill colour to what is around it
_BASE_CONTRAST = 0.15            # luminance difference of a texture's base to the background
_LIGHT_BASE = 0.5                # lowest luminance of a texture's base colour
_PATTERN_CONTRAST = 0.4          # a texture's pattern is this much darker than its base
_LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_COLOUR_CANDIDATES = 64
_DOT_TABLE = 16                  # jitter table side for the dot grid (cells wrap around)
_CHUNK = 512                     # images rendered at once (bounds memory)


@dataclass(frozen=True, eq=False)
class ToyWorld:
    """A batch of ToyWorld scenes with their ground truth.

    Attributes
    ----------
    images : FloatTensor ``(N, 3, size, size)``, values in ``[0, 1]``.
    labels : LongTensor ``(N,)``, indices into ``class_names``.
    masks : BoolTensor ``(N, size, size)``, ``True`` exactly on the object's pixels.
    backgrounds : LongTensor ``(N,)``, indices into :data:`BACKGROUND_NAMES` (the
        background colour family of each image).
    class_names : tuple of str, :data:`CLASS_NAMES`.
    """

    images: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor
    backgrounds: torch.Tensor
    class_names: tuple[str, ...] = CLASS_NAMES

    def __len__(self) -> int:
        return int(self.labels.shape[0])


# --------------------------------------------------------------------------- checks

def _check_count(n, what="n"):
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"{what} must be a positive int; got {type(n).__name__} {n!r}")
    if n < 1:
        raise ValueError(f"{what} must be a positive int; got {n}")
    return int(n)


def _check_seed(seed):
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be a non-negative int; got {type(seed).__name__} {seed!r}")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative int; got {seed}")
    return int(seed)


def _check_size(size):
    if isinstance(size, bool) or not isinstance(size, numbers.Integral):
        raise TypeError(f"size must be an int of at least 32 (pixels); got {type(size).__name__} {size!r}")
    if size < 32:
        raise ValueError(f"size must be at least 32 pixels; got {size}")
    return int(size)


# --------------------------------------------------------------------------- drawing helpers

def _pixel_grid(size):
    """Pixel-centre coordinates ``(ys, xs)``, each ``(size, size)`` float32, in pixels."""
    centres = np.arange(size, dtype=np.float32) + 0.5
    return np.meshgrid(centres, centres, indexing="ij")


def _upsample_matrix(size, grid):
    """``(size, grid)`` bilinear interpolation weights from a coarse grid to pixels."""
    position = (np.arange(size) + 0.5) / size * (grid - 1)
    low = np.clip(np.floor(position).astype(int), 0, grid - 2)
    frac = (position - low).astype(np.float32)
    weights = np.zeros((size, grid), dtype=np.float32)
    weights[np.arange(size), low] = 1 - frac
    weights[np.arange(size), low + 1] = frac
    return weights


def _luminance(colour):
    """Rec. 601 luma of RGB colours ``(..., 3)`` in ``[0, 1]``."""
    return colour @ _LUMA_WEIGHTS


def _pick_colours(rng, n, avoid, contrast=None, lowest=0.0, highest=1.0):
    """``(n, 3)`` random RGB colours whose luminance lies in ``[lowest, highest]``
    (scalars or ``(n,)`` arrays) and differs by at least ``contrast`` (default
    ``_MIN_CONTRAST``) from that of every colour in ``avoid`` (a list of ``(n, 3)``
    arrays). Where none of the candidates qualifies, the one that comes closest."""
    contrast = _MIN_CONTRAST if contrast is None else contrast
    candidates = rng.random((n, _COLOUR_CANDIDATES, 3), dtype=np.float32)
    luminance = _luminance(candidates)
    difference = np.full((n, _COLOUR_CANDIDATES), np.inf, dtype=np.float32)
    for colour in avoid:
        difference = np.minimum(difference, np.abs(luminance - _luminance(colour)[:, None]))
    outside = (np.maximum(np.asarray(lowest, dtype=np.float32).reshape(-1, 1) - luminance, 0)
               + np.maximum(luminance - np.asarray(highest, dtype=np.float32).reshape(-1, 1), 0))
    shortfall = np.maximum(contrast - difference, 0) + outside
    return candidates[np.arange(n), shortfall.argmin(axis=1)]


def _texture_colours(rng, n, background):
    """Base and pattern colours ``(n, 3)`` of textures: a light base that stands out
    from ``background`` and a pattern (stripes, dots, ...) clearly darker than the base,
    like the animals the texture classes are named after."""
    base = _pick_colours(rng, n, [background], contrast=_BASE_CONTRAST, lowest=_LIGHT_BASE)
    hue = rng.random((n, 3), dtype=np.float32)
    # Scaling a random colour down keeps its hue and brings its luminance under the cap.
    cap = _luminance(base) - _PATTERN_CONTRAST
    pattern = hue * np.minimum(1.0, cap / np.maximum(_luminance(hue), 1e-6))[:, None]
    return base, pattern.astype(np.float32)


def _draw_clutter(rng, n, size, base_colours):
    """Parameters of the background clutter for ``n`` images (drawn now, rendered
    later), as a dict of arrays."""
    scale = size / 64
    return {
        "base": np.clip(base_colours + rng.uniform(-_BACKGROUND_JITTER, _BACKGROUND_JITTER, (n, 3)), 0, 1)
        .astype(np.float32),
        "noise": rng.uniform(-_NOISE_AMPLITUDE, _NOISE_AMPLITUDE,
                             (n, 3, _NOISE_GRID, _NOISE_GRID)).astype(np.float32),
        "line_point": rng.uniform(0, size, (n, _LINES_PER_IMAGE, 2)).astype(np.float32),
        "line_angle": rng.uniform(0, np.pi, (n, _LINES_PER_IMAGE)).astype(np.float32),
        "line_delta": (rng.choice([-1.0, 1.0], (n, _LINES_PER_IMAGE))
                       * rng.uniform(0.5, 1.0, (n, _LINES_PER_IMAGE)) * _LINE_CONTRAST
                       * (rng.random((n, _LINES_PER_IMAGE)) < 0.7)).astype(np.float32),
        "line_half_width": np.float32(0.6 * scale),
    }


def _render_clutter(clutter, index, size):
    """Backgrounds ``(m, 3, size, size)`` for the images ``index`` of ``clutter``."""
    ys, xs = _pixel_grid(size)
    up = _upsample_matrix(size, _NOISE_GRID)
    noise = up @ clutter["noise"][index] @ up.T
    background = clutter["base"][index][:, :, None, None] + noise
    for k in range(_LINES_PER_IMAGE):
        px, py = clutter["line_point"][index, k, 0], clutter["line_point"][index, k, 1]
        angle = clutter["line_angle"][index, k]
        distance = np.abs((xs - px[:, None, None]) * np.sin(angle)[:, None, None]
                          - (ys - py[:, None, None]) * np.cos(angle)[:, None, None])
        on_line = distance < clutter["line_half_width"]
        background += (clutter["line_delta"][index, k][:, None, None] * on_line)[:, None]
    return np.clip(background, 0, 1)


def _regular_polygon(dx, dy, sides, inradius, rotation):
    """Inside test of regular polygons centred at the origin of ``dx, dy`` ``(m, H, W)``:
    a point is inside when its projection on every outward edge normal is at most the
    inradius. ``inradius`` and ``rotation`` are ``(m,)``."""
    inside = None
    for k in range(sides):
        angle = (rotation + 2 * np.pi * k / sides)[:, None, None]
        within = dx * np.cos(angle) + dy * np.sin(angle) <= inradius[:, None, None]
        inside = within if inside is None else inside & within
    return inside


def _outline_mask(kind, dx, dy, radius, rotation):
    """Mask ``(m, H, W)`` of one outline kind, all ``m`` images of that kind.
    ``radius`` ``(m,)`` is the radius of the circle of equal area."""
    if kind == _CIRCLE:
        return dx * dx + dy * dy <= (radius * radius)[:, None, None]
    if kind == _SQUARE:
        side = radius * math.sqrt(math.pi)
        return _regular_polygon(dx, dy, 4, side / 2, rotation)
    side = radius * math.sqrt(4 * math.pi / math.sqrt(3))
    return _regular_polygon(dx, dy, 3, side / (2 * math.sqrt(3)), rotation)


_BOUNDING_FACTOR = {  # circumradius / radius of the circle of equal area
    _CIRCLE: 1.0,
    _SQUARE: math.sqrt(math.pi / 2),
    _TRIANGLE: math.sqrt(4 * math.pi / math.sqrt(3)) / math.sqrt(3),
}


def _draw_textures(rng, n, size):
    """Parameters of stripe, zigzag, dot and checker fills for ``n`` images."""
    scale = size / 64
    period = rng.uniform(5.0, 10.0, n) * scale
    spacing = rng.uniform(6.0, 9.0, n) * scale
    return {
        "angle": rng.uniform(0, np.pi, n).astype(np.float32),
        "period": period.astype(np.float32),
        "phase": (rng.random(n) * period).astype(np.float32),
        "spacing": spacing.astype(np.float32),
        "dot_radius": (rng.uniform(0.22, 0.32, n) * spacing).astype(np.float32),
        "offset": (rng.random((n, 2)) * spacing[:, None]).astype(np.float32),
        "jitter": rng.uniform(-0.15, 0.15, (n, _DOT_TABLE, _DOT_TABLE, 2)).astype(np.float32),
        "zig_amplitude": rng.uniform(0.4, 0.8, n).astype(np.float32),
        "zig_wavelength": rng.uniform(1.0, 1.6, n).astype(np.float32),
        "cell": rng.uniform(4.0, 8.0, n).astype(np.float32) * scale,
    }


def _rotated(dx, dy, angle):
    c, s = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    return dx * c + dy * s, -dx * s + dy * c


def _texture_pattern(kind, dx, dy, textures, index):
    """Boolean pattern ``(m, H, W)``: ``True`` where the second colour of the texture
    goes. ``kind`` is one of "stripes", "dots", "zigzag", "checkerboard"."""
    along, across = _rotated(dx, dy, textures["angle"][index])
    if kind in ("stripes", "zigzag"):
        period = textures["period"][index][:, None, None]
        if kind == "zigzag":
            wavelength = textures["zig_wavelength"][index][:, None, None] * period
            # A triangle wave in [-1, 1] along the stripes bends them into zigzags.
            wave = 4 * np.abs(across / wavelength - np.floor(across / wavelength + 0.5)) - 1
            along = along + textures["zig_amplitude"][index][:, None, None] * period * wave
        phase = textures["phase"][index][:, None, None]
        return np.mod(along + phase, period) < period / 2
    if kind == "checkerboard":
        cell = textures["cell"][index][:, None, None]
        return (np.floor(along / cell) + np.floor(across / cell)) % 2 == 1
    if kind == "dots":
        spacing = textures["spacing"][index][:, None, None]
        u = along + textures["offset"][index, 0][:, None, None]
        v = across + textures["offset"][index, 1][:, None, None]
        cell_u, cell_v = np.floor(u / spacing), np.floor(v / spacing)
        table = textures["jitter"][index]
        rows = np.arange(len(index))[:, None, None]
        jitter = table[rows, cell_u.astype(np.int64) % _DOT_TABLE, cell_v.astype(np.int64) % _DOT_TABLE]
        centre_u = (cell_u + 0.5 + jitter[..., 0]) * spacing
        centre_v = (cell_v + 0.5 + jitter[..., 1]) * spacing
        radius = textures["dot_radius"][index][:, None, None]
        return (u - centre_u) ** 2 + (v - centre_v) ** 2 <= radius * radius
    raise AssertionError(kind)


def _assign_backgrounds(rng, labels, background_bias, swap_backgrounds):
    """Background family index ``(n,)`` of each image (see the module docstring)."""
    n = len(labels)
    uniform = rng.integers(0, len(BACKGROUND_NAMES), n)
    tie_draw = rng.random(n)
    families = uniform.copy()
    tied_families = [BACKGROUND_NAMES.index(name) for name in SHORTCUT_BACKGROUNDS]
    if swap_backgrounds:
        tied_families = tied_families[::-1]
    for class_name, family in zip(SHORTCUT_CLASSES, tied_families):
        tied = (labels == CLASS_NAMES.index(class_name)) & (tie_draw < background_bias)
        families[tied] = family
    return families


# --------------------------------------------------------------------------- public API

def toyworld(n: int, seed: int, size: int = 64, background_bias: float = 0.0,
             swap_backgrounds: bool = False) -> ToyWorld:
    """Generates ``n`` ToyWorld scenes with ground-truth masks.

    Parameters
    ----------
    n : int
        Number of images (positive). Labels are balanced: each class appears
        ``n // len(CLASS_NAMES)`` or one more times, in a seeded random order.
    seed : int
        Non-negative seed of ``numpy.random.default_rng``; the same arguments give
        identical tensors.
    size : int
        Image side in pixels, at least 32. Object sizes, line widths and texture
        periods scale with it (stated below for 64 px).
    background_bias : float in ``[0, 1]``
        Probability that an image of a class in :data:`SHORTCUT_CLASSES` gets the
        background family tied to it in :data:`SHORTCUT_BACKGROUNDS` ("circle" ->
        "snow", "square" -> "grass"). All other backgrounds, for every class, are
        uniform over :data:`BACKGROUND_NAMES`, so at ``0`` the background says nothing
        about the class and the other classes meet the tied families at the unbiased
        rate ``1/8`` whatever the bias.
    swap_backgrounds : bool
        Tie each shortcut class to the other one's family instead ("circle" ->
        "grass", "square" -> "snow"): the husky-on-snow test of a shortcut model. Needs
        ``background_bias > 0`` (use ``1.0`` for the test).

    Returns
    -------
    :class:`ToyWorld` with ``images (n, 3, size, size)`` float32 in ``[0, 1]``,
    ``labels (n,)`` long, ``masks (n, size, size)`` bool, ``backgrounds (n,)`` long.

    Notes
    -----
    At 64 px the object's area equals that of a circle of radius 10.9 to 17.3 px
    (``0.17`` to ``0.27`` times ``size``); it lies wholly inside the image, at least one
    pixel from the border. Stripes have a period of 5 to 10 px; dots a spacing of 6 to
    9 px and a radius of about a quarter of it. Plain fills are uniform RGB colours whose
    luminance (Rec. 601) differs from the background's base colour by at least 0.3;
    texture bases have a luminance of at least 0.5 and differ from the background by at
    least 0.15 (each colour is the first of 64 random candidates that qualifies, so in
    the rare case that none does, the closest one); the pattern is a random hue scaled
    to a luminance at least 0.4 below the base's. The
    clutter (per-channel smooth noise within +-0.05, two optional lines of contrast at
    most 0.06) stays far below these contrasts.
    """
    n = _check_count(n)
    seed = _check_seed(seed)
    size = _check_size(size)
    if isinstance(background_bias, bool) or not isinstance(background_bias, numbers.Real):
        raise TypeError(f"background_bias must be a float in [0, 1]; got {type(background_bias).__name__} "
                        f"{background_bias!r}")
    background_bias = float(background_bias)
    if not 0.0 <= background_bias <= 1.0:  # also rejects NaN
        raise ValueError(f"background_bias must be a probability in [0, 1]; got {background_bias}")
    if not isinstance(swap_backgrounds, (bool, np.bool_)):
        raise TypeError(f"swap_backgrounds must be True or False; got {type(swap_backgrounds).__name__}")
    if swap_backgrounds and background_bias == 0.0:
        raise ValueError("swap_backgrounds=True has no effect with background_bias=0: the swap exchanges "
                         "the backgrounds tied to the shortcut classes; pass background_bias=1.0 for the "
                         "swapped-background test")

    rng = np.random.default_rng(seed)
    num_classes = len(CLASS_NAMES)
    labels = rng.permutation(np.arange(n) % num_classes)
    # Shape classes have their own outline; texture classes draw one of the three.
    outline = np.where(labels < len(SHAPE_CLASSES), labels, rng.integers(0, 3, n))
    fill = np.where(labels < len(SHAPE_CLASSES), _SOLID,
                    np.where(labels == CLASS_NAMES.index("zebra"), _STRIPES, _DOTS))
    radius = rng.uniform(*_RADIUS_RANGE, n) * size
    rotation = rng.uniform(0, 2 * np.pi, n)
    bounding = radius * np.array([_BOUNDING_FACTOR[k] for k in range(3)])[outline] + 1.0
    centre = bounding[:, None] + rng.random((n, 2)) * (size - 2 * bounding)[:, None]
    textures = _draw_textures(rng, n, size)
    families = _assign_backgrounds(rng, labels, background_bias, bool(swap_backgrounds))
    clutter = _draw_clutter(rng, n, size, BACKGROUND_COLOURS.numpy()[families])
    plain_colour = _pick_colours(rng, n, [clutter["base"]])
    base_colour, pattern_colour = _texture_colours(rng, n, clutter["base"])
    first_colour = np.where((fill == _SOLID)[:, None], plain_colour, base_colour)
    second_colour = pattern_colour

    images = np.empty((n, 3, size, size), dtype=np.float32)
    masks = np.empty((n, size, size), dtype=bool)
    ys, xs = _pixel_grid(size)
    for start in range(0, n, _CHUNK):
        chunk = np.arange(start, min(start + _CHUNK, n))
        background = _render_clutter(clutter, chunk, size)
        dx = xs - centre[chunk, 0, None, None].astype(np.float32)
        dy = ys - centre[chunk, 1, None, None].astype(np.float32)
        mask = np.zeros((len(chunk), size, size), dtype=bool)
        for kind in (_CIRCLE, _SQUARE, _TRIANGLE):
            rows = np.flatnonzero(outline[chunk] == kind)
            if len(rows):
                mask[rows] = _outline_mask(kind, dx[rows], dy[rows], radius[chunk][rows].astype(np.float32),
                                           rotation[chunk][rows].astype(np.float32))
        # Where the pattern is True the object takes its second colour.
        pattern = np.zeros_like(mask)
        for kind, texture in ((_STRIPES, "stripes"), (_DOTS, "dots")):
            rows = np.flatnonzero(fill[chunk] == kind)
            if len(rows):
                pattern[rows] = _texture_pattern(texture, dx[rows], dy[rows], textures, chunk[rows])
        colour = np.where(pattern[:, None], second_colour[chunk][:, :, None, None],
                          first_colour[chunk][:, :, None, None])
        images[chunk] = np.where(mask[:, None], colour, background)
        masks[chunk] = mask
    return ToyWorld(
        images=torch.from_numpy(images),
        labels=torch.from_numpy(labels.astype(np.int64)),
        masks=torch.from_numpy(masks),
        backgrounds=torch.from_numpy(families.astype(np.int64)),
        class_names=CLASS_NAMES,
    )


def concept_images(concept: str, n: int, seed: int, size: int = 64) -> torch.Tensor:
    """Images of one visual concept, for concept activation vectors (TCAV).

    Parameters
    ----------
    concept : str
        One of :data:`CONCEPTS`:

        - ``"stripes"``: parallel stripes, period 5 to 10 px (at 64 px), random angle;
        - ``"dots"``: dots on a jittered grid, spacing 6 to 9 px;
        - ``"zigzag"``: stripes bent into zigzags;
        - ``"checkerboard"``: a rotated checkerboard, cells 4 to 8 px;
        - ``"random"``: none of these textures: one to three plain-coloured shapes
          (circles and regular polygons of 3 to 6 sides, possibly overlapping) on the
          ToyWorld background clutter.

        A texture patch is a random axis-aligned rectangle covering 75% to 95% of each
        side, in two random colours at least 0.4 apart, on the background clutter.
    n : int
        Number of images (positive).
    seed : int
        Non-negative seed; the same arguments give the same tensor.
    size : int
        Image side in pixels, at least 32.

    Returns
    -------
    FloatTensor ``(n, 3, size, size)`` in ``[0, 1]``.
    """
    if not isinstance(concept, str) or concept not in CONCEPTS:
        raise ValueError(f"Unknown concept {concept!r}; expected one of {', '.join(CONCEPTS)}")
    n = _check_count(n)
    seed = _check_seed(seed)
    size = _check_size(size)
    rng = np.random.default_rng(seed)
    families = rng.integers(0, len(BACKGROUND_NAMES), n)
    clutter = _draw_clutter(rng, n, size, BACKGROUND_COLOURS.numpy()[families])
    textures = _draw_textures(rng, n, size)
    first_colour, second_colour = _texture_colours(rng, n, clutter["base"])
    # Texture patch: a rectangle (top-left corner, side lengths) per image.
    sides = rng.uniform(0.75, 0.95, (n, 2)) * size
    corner = rng.random((n, 2)) * (size - sides)
    # "random": up to three plain shapes per image.
    shape_count = rng.integers(1, 4, n)
    shape_sides = rng.integers(2, 7, (n, 3))  # 2 stands for a circle
    shape_radius = rng.uniform(0.08, 0.2, (n, 3)) * size
    shape_centre = rng.uniform(0.15, 0.85, (n, 3, 2)) * size
    shape_rotation = rng.uniform(0, 2 * np.pi, (n, 3))
    shape_colour = np.stack([_pick_colours(rng, n, [clutter["base"]]) for _ in range(3)], axis=1)

    images = np.empty((n, 3, size, size), dtype=np.float32)
    ys, xs = _pixel_grid(size)
    for start in range(0, n, _CHUNK):
        chunk = np.arange(start, min(start + _CHUNK, n))
        picture = _render_clutter(clutter, chunk, size)
        if concept == "random":
            for slot in range(3):
                dx = xs - shape_centre[chunk, slot, 0, None, None].astype(np.float32)
                dy = ys - shape_centre[chunk, slot, 1, None, None].astype(np.float32)
                radius = shape_radius[chunk, slot].astype(np.float32)
                inside = dx * dx + dy * dy <= (radius * radius)[:, None, None]
                for sides_count in range(3, 7):
                    rows = np.flatnonzero(shape_sides[chunk, slot] == sides_count)
                    if len(rows):
                        inside[rows] = _regular_polygon(dx[rows], dy[rows], sides_count,
                                                        radius[rows] * np.cos(np.pi / sides_count),
                                                        shape_rotation[chunk[rows], slot].astype(np.float32))
                inside &= (slot < shape_count[chunk])[:, None, None]
                picture = np.where(inside[:, None], shape_colour[chunk, slot][:, :, None, None], picture)
        else:
            dx = xs - np.float32(size / 2)
            dy = np.broadcast_to(ys - np.float32(size / 2), (len(chunk), size, size))
            dx = np.broadcast_to(dx, (len(chunk), size, size))
            pattern = _texture_pattern(concept, dx, dy, textures, chunk)
            x0, y0 = corner[chunk, 0, None, None], corner[chunk, 1, None, None]
            x1, y1 = x0 + sides[chunk, 0, None, None], y0 + sides[chunk, 1, None, None]
            patch = (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
            colour = np.where(pattern[:, None], second_colour[chunk][:, :, None, None],
                              first_colour[chunk][:, :, None, None])
            picture = np.where(patch[:, None], colour, picture)
        images[chunk] = picture
    return torch.from_numpy(images)

"""cs_helpers: the course kit for "Visualizing and Understanding CNNs".

Shared machinery (models, images, hooks, plots, grading) lives here once and is used
by the reference implementations (``cs_helpers.reference``, instructors only) and by
the notebooks alike.
"""
from ._device import device

__version__ = "0.1.0"
__all__ = ["device", "__version__"]

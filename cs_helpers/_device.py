"""Which device the course runs on."""
from __future__ import annotations

import typing

if typing.TYPE_CHECKING:
    import torch


def device() -> torch.device:
    """CUDA when a GPU is visible, the CPU otherwise."""
    import torch  # here, so that `import cs_helpers` (the cs-helpers command) does not wait for PyTorch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")

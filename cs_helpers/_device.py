"""Which device the course runs on."""
import torch


def device() -> torch.device:
    """CUDA when a GPU is visible, the CPU otherwise."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")

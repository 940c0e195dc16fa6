"""Input checks shared by the references: the model, image batches, class targets.

Each raises ``TypeError`` or ``ValueError`` naming the argument, what was expected and
what came, so that every reference says the same thing about the same mistake.
"""
from __future__ import annotations

import numbers

import torch
from torch import nn

__all__ = ["check_model", "check_batch", "check_image", "batch_targets", "single_target",
           "check_range", "logits_of", "positive_int"]


def check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")


def check_batch(images, what="images") -> None:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{what} must be a tensor (N, 3, H, W); got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != 3:
        hint = " (one image? add a batch dimension with image.unsqueeze(0))" if images.dim() == 3 else ""
        raise ValueError(f"{what} must have shape (N, 3, H, W); got {tuple(images.shape)}{hint}")
    if images.shape[0] == 0:
        raise ValueError(f"{what} is an empty batch")
    if not images.is_floating_point():
        raise TypeError(f"{what} must be a float tensor in [0, 1]; got dtype {images.dtype}")


def check_image(image) -> None:
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"image must be a tensor (3, H, W); got {type(image).__name__}")
    if image.dim() != 3 or image.shape[0] != 3:
        hint = " (a batch? pass one image, e.g. images[0])" if image.dim() == 4 else ""
        raise ValueError(f"image must have shape (3, H, W); got {tuple(image.shape)}{hint}")
    if not image.is_floating_point():
        raise TypeError(f"image must be a float tensor in [0, 1]; got dtype {image.dtype}")


def batch_targets(targets, n: int, device) -> torch.Tensor:
    """An int (the same class for every image) or a LongTensor ``(n,)`` -> ``(n,)``."""
    if isinstance(targets, torch.Tensor):
        if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
            raise TypeError(f"targets must hold integer class indices; got dtype {targets.dtype}")
        if targets.dim() == 0:
            targets = targets.expand(n)
        if targets.dim() != 1 or targets.shape[0] != n:
            raise ValueError(f"targets must be an int or a tensor of {n} class indices (one per image); "
                             f"got shape {tuple(targets.shape)}")
        return targets.to(device=device, dtype=torch.long)
    if isinstance(targets, numbers.Integral) and not isinstance(targets, bool):
        return torch.full((n,), int(targets), dtype=torch.long, device=device)
    raise TypeError(f"targets must be an int or a LongTensor (N,); got {type(targets).__name__}")


def single_target(target) -> int:
    if isinstance(target, torch.Tensor) and target.numel() == 1 and not target.is_floating_point() \
            and target.dtype != torch.bool:
        return int(target.item())
    if isinstance(target, numbers.Integral) and not isinstance(target, bool):
        return int(target)
    raise TypeError(f"target must be one class index (an int); got {type(target).__name__}")


def check_range(targets: torch.Tensor, num_classes: int) -> None:
    if bool(((targets < 0) | (targets >= num_classes)).any()):
        raise ValueError(f"target class indices must lie in [0, {num_classes - 1}]; "
                         f"got {sorted(set(targets.tolist()))[:8]}")


def logits_of(model, x) -> torch.Tensor:
    out = model(x)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != x.shape[0]:
        raise ValueError(f"the model must return logits (N, num_classes); got "
                         f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
    return out


def positive_int(value, name) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int; got {value!r}")
    return int(value)

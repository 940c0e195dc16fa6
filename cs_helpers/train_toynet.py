"""Trains the two ToyWorld networks and writes their weights and measured accuracies.

Run ``python -m cs_helpers.train_toynet [--out DIR]`` (under 3 minutes on two CPU cores
for both models). It writes, into ``DIR`` (default: the repository's ``data/``):

- ``toynet.pt``: :class:`~cs_helpers.toynet.ToyNet` trained on unbiased ToyWorld
  (``background_bias=0``);
- ``toynet_shortcut.pt``: the same network trained with ``background_bias=1``, so
  "circle" always sits on snow and "square" on grass;
- ``toynet_metrics.json``: for each model, its accuracy on fresh unbiased ToyWorld, on
  matched-background data (``background_bias=1``) and on swapped-background data
  (``background_bias=1, swap_backgrounds=True``), the last two over all classes and over
  the two shortcut classes alone, plus the training time in seconds and the file size
  in bytes.

Training is deterministic: a fixed seed for the initialization (``torch.manual_seed``),
freshly generated seeded ToyWorld images for every epoch, deterministic algorithms
and a fixed thread count; a rerun on the same machine reproduces the files.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .toynet import DEFAULT_WIDTHS, TOYNET_NAMES, ToyNet, data_dir
from .toyworld import CLASS_NAMES, SHORTCUT_CLASSES, toyworld

__all__ = ["SETTINGS", "evaluate", "measure", "train", "main"]

# What each network is trained on, and how. The seeds of the training images are
# `data_seed * 1000 + epoch`; the evaluation seeds below are disjoint from them.
SETTINGS = {
    "toynet": {"background_bias": 0.0, "init_seed": 1, "data_seed": 11},
    "toynet_shortcut": {"background_bias": 1.0, "init_seed": 2, "data_seed": 22},
}
EPOCHS = 6
IMAGES_PER_EPOCH = 6000
BATCH_SIZE = 128
LEARNING_RATE = 3e-3
NUM_THREADS = 2
IMAGE_SIZE = 64
EVAL_IMAGES = 2000
EVAL_SEEDS = {"unbiased": 900_001, "matched": 900_002}  # "swapped" reuses the matched seed


@contextlib.contextmanager
def _deterministic(num_threads: int):
    """Deterministic algorithms and a fixed thread count inside the block; the previous
    settings come back afterwards."""
    previous_threads = torch.get_num_threads()
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(num_threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous_deterministic)
        torch.set_num_threads(previous_threads)


def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
             batch_size: int = 500) -> float:
    """Fraction of ``images (N, 3, H, W)`` whose top-scoring class equals ``labels (N,)``.

    Runs under ``torch.no_grad()`` in batches, on the model's device; the model's mode is
    left as it was (callers put it in eval mode).
    """
    if images.dim() != 4 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"evaluate expects images (N, 3, H, W) and labels (N,); got "
                         f"{tuple(images.shape)} and {tuple(labels.shape)}")
    param = next(model.parameters())
    correct = 0
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size].to(param.device)
            predicted = model(batch).argmax(dim=1).cpu()
            correct += int((predicted == labels[start:start + batch_size]).sum())
    return correct / len(images)


def measure(model: torch.nn.Module, n: int = EVAL_IMAGES, size: int = IMAGE_SIZE) -> dict:
    """The accuracies reported in ``toynet_metrics.json``, on fresh ToyWorld images from
    the fixed evaluation seeds (never used in training).

    Returns a dict: ``unbiased`` (``background_bias=0``), ``matched_background``
    (``background_bias=1``), ``swapped_background`` (the same images with the shortcut
    classes' backgrounds swapped), and ``matched_background_shortcut_classes`` /
    ``swapped_background_shortcut_classes`` (the same, over the images of
    :data:`~cs_helpers.toyworld.SHORTCUT_CLASSES` alone). Fractions in ``[0, 1]``.
    """
    was_training = model.training
    model.eval()
    try:
        unbiased = toyworld(n, EVAL_SEEDS["unbiased"], size=size)
        matched = toyworld(n, EVAL_SEEDS["matched"], size=size, background_bias=1.0)
        swapped = toyworld(n, EVAL_SEEDS["matched"], size=size, background_bias=1.0, swap_backgrounds=True)
        shortcut = torch.isin(matched.labels, torch.tensor([CLASS_NAMES.index(c) for c in SHORTCUT_CLASSES]))
        return {
            "unbiased": evaluate(model, unbiased.images, unbiased.labels),
            "matched_background": evaluate(model, matched.images, matched.labels),
            "swapped_background": evaluate(model, swapped.images, swapped.labels),
            "matched_background_shortcut_classes":
                evaluate(model, matched.images[shortcut], matched.labels[shortcut]),
            "swapped_background_shortcut_classes":
                evaluate(model, swapped.images[shortcut], swapped.labels[shortcut]),
        }
    finally:
        model.train(was_training)


def train(name: str, epochs: int = EPOCHS, images_per_epoch: int = IMAGES_PER_EPOCH,
          batch_size: int = BATCH_SIZE, learning_rate: float = LEARNING_RATE,
          num_threads: int = NUM_THREADS, verbose: bool = False) -> tuple[ToyNet, dict]:
    """Trains one ToyNet from scratch, deterministically.

    Parameters
    ----------
    name : ``"toynet"`` or ``"toynet_shortcut"``; picks the settings in :data:`SETTINGS`
        (background bias of the training images, seeds).
    epochs, images_per_epoch, batch_size, learning_rate
        Adam with a cosine-decayed learning rate; every epoch sees ``images_per_epoch``
        fresh 64 px ToyWorld images.
    num_threads : int
        Torch CPU threads during training (restored afterwards).

    Returns
    -------
    ``(model, record)``: the trained model in eval mode, and a dict with
    ``train_seconds``, the settings used and the last epoch's mean training loss.
    """
    if name not in SETTINGS:
        raise ValueError(f"Unknown ToyNet {name!r}; expected one of {', '.join(TOYNET_NAMES)}")
    settings = SETTINGS[name]
    start = time.perf_counter()
    with _deterministic(num_threads):
        torch.manual_seed(settings["init_seed"])
        model = ToyNet(class_names=CLASS_NAMES, widths=DEFAULT_WIDTHS)
        optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
        steps_per_epoch = -(-images_per_epoch // batch_size)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
        shuffle = torch.Generator().manual_seed(settings["init_seed"])
        model.train()
        for epoch in range(epochs):
            world = toyworld(images_per_epoch, settings["data_seed"] * 1000 + epoch, size=IMAGE_SIZE,
                             background_bias=settings["background_bias"])
            order = torch.randperm(images_per_epoch, generator=shuffle)
            total_loss = 0.0
            for first in range(0, images_per_epoch, batch_size):
                batch = order[first:first + batch_size]
                loss = F.cross_entropy(model(world.images[batch]), world.labels[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                total_loss += float(loss) * len(batch)
            if verbose:
                print(f"  {name} epoch {epoch + 1}/{epochs}: loss {total_loss / images_per_epoch:.4f} "
                      f"({time.perf_counter() - start:.1f} s)", flush=True)
        model.eval()
    record = {
        "train_seconds": round(time.perf_counter() - start, 2),
        "final_train_loss": round(total_loss / images_per_epoch, 5),
        "background_bias": settings["background_bias"],
        "epochs": epochs,
        "images_per_epoch": images_per_epoch,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "num_threads": num_threads,
    }
    return model, record


def save(model: ToyNet, path: Path, record: dict) -> int:
    """Writes ``{"state_dict", "class_names", "widths", "image_size", "background_bias"}``
    to ``path`` (readable with ``torch.load(weights_only=True)``); returns its size in
    bytes."""
    checkpoint = {
        "state_dict": {key: value.detach().cpu().clone() for key, value in model.state_dict().items()},
        "class_names": list(model.class_names),
        "widths": list(model.widths),
        "image_size": IMAGE_SIZE,
        "background_bias": record["background_bias"],
        "format_version": 1,
    }
    torch.save(checkpoint, path)
    return path.stat().st_size


def main(argv=None) -> dict:
    """Trains both networks, writes ``<name>.pt`` and ``toynet_metrics.json`` into the
    output folder, prints a summary, and returns the metrics dict."""
    parser = argparse.ArgumentParser(prog="python -m cs_helpers.train_toynet", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for the weight files and metrics (default: the repository's data/)")
    parser.add_argument("--quiet", action="store_true", help="print only the summary")
    args = parser.parse_args(argv)
    out = args.out if args.out is not None else data_dir()
    out.mkdir(parents=True, exist_ok=True)
    metrics = {}
    for name in TOYNET_NAMES:
        model, record = train(name, verbose=not args.quiet)
        with _deterministic(NUM_THREADS):
            accuracies = measure(model)
        size = save(model, out / f"{name}.pt", record)
        metrics[name] = {"accuracy": {k: round(v, 4) for k, v in accuracies.items()},
                         **record, "file_bytes": size}
    metrics["evaluation"] = {"images": EVAL_IMAGES, "image_size": IMAGE_SIZE,
                             "seeds": EVAL_SEEDS, "torch_version": torch.__version__}
    (out / "toynet_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    for name in TOYNET_NAMES:
        acc = metrics[name]["accuracy"]
        print(f"{name}: unbiased {acc['unbiased']:.3f}, matched {acc['matched_background']:.3f}, "
              f"swapped {acc['swapped_background']:.3f} (shortcut classes: "
              f"{acc['matched_background_shortcut_classes']:.3f} -> "
              f"{acc['swapped_background_shortcut_classes']:.3f}); "
              f"{metrics[name]['train_seconds']:.1f} s, {metrics[name]['file_bytes']} bytes")
    print(f"wrote {out / 'toynet_metrics.json'}")
    return metrics


if __name__ == "__main__":
    main()

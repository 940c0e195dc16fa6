"""Benchmarks of notebook 05 (synthesis), standalone:

    python benchmarks/synthesis.py [--repeat 5] [--device cpu|cuda] [--notebook]

1. Each step function against its theoretical minimum, one forward and one backward
   pass of the same model on the same image (ratios near 1 mean no overhead), and the
   total-variation prior against a plain anisotropic TV of the same tensor.
2. With ``--notebook``: executes ``notebooks/05_synthesis/synthesis.ipynb`` with
   nbclient and reports its wall-clock time against the 120 s budget of the issue
   (measured on a 2-core CPU; the number depends on what else the machine runs).
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

DEVICE = torch.device("cpu")


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def timed(fn, repeat):
    fn()
    samples = []
    for _ in range(repeat):
        _sync()
        start = time.perf_counter()
        fn()
        _sync()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def logit_pass(model, img, target=1):
    """The floor of a class-visualization step: one forward pass and the gradient of
    the target logits (summed over the batch) with respect to the image."""
    x = img.clone().requires_grad_(True)
    return torch.autograd.grad(model(x)[:, target].sum(), x)[0]


def layer_pass(model, img, layer):
    """The floor of a DeepDream step: one forward pass recording ``layer`` and the
    gradient of the sum of its output with respect to the image."""
    from cs_helpers.hooks import capture

    x = img.clone().requires_grad_(True)
    with capture(model, layer) as record:
        model(x)
    return torch.autograd.grad(record.output.sum(), x)[0]


def plain_tv(x):
    """A plain anisotropic squared TV of ``x`` and its backward pass (the floor of
    ``total_variation(x, 2.0).backward()``)."""
    ((x[..., :, 1:] - x[..., :, :-1]) ** 2).sum().add(((x[..., 1:, :] - x[..., :-1, :]) ** 2).sum()).backward()


def bench_steps(repeat):
    from cs_helpers.models import load_model
    from cs_helpers.reference.synthesis import class_visualization_step, deepdream_step, total_variation

    rows = []
    for name, size, layer in (("toynet", 64, "relu2"), ("efficientnet_lite0", 112, "blocks.5")):
        model = load_model(name, device=DEVICE)
        img = torch.rand(1, 3, size, size, device=DEVICE)
        base = timed(lambda: logit_pass(model, img), repeat)
        base_layer = timed(lambda: layer_pass(model, img, layer), repeat)
        ours = timed(lambda: class_visualization_step(img, model, 1, 0.01, 1.0), repeat)
        dream = timed(lambda: deepdream_step(img, model, layer, 0.01), repeat)
        rows.append((f"class_visualization_step, {name} {size}px", ours, base))
        rows.append((f"deepdream_step, {name} {size}px at {layer}", dream, base_layer))
    x = torch.rand(8, 3, 224, 224, device=DEVICE, requires_grad=True)

    def ours_tv():
        total_variation(x, 2.0).backward()

    rows.append(("total_variation, 8x3x224x224, forward+backward", timed(ours_tv, repeat),
                 timed(lambda: plain_tv(x), repeat)))
    print(f"{'':60s} {'ours (ms)':>10s} {'minimum (ms)':>13s} {'ratio':>6s}")
    for label, a, b in rows:
        print(f"{label:60s} {1000 * a:10.1f} {1000 * b:13.1f} {a / b:6.2f}")


def bench_notebook():
    import nbformat
    from nbclient import NotebookClient

    path = Path(__file__).resolve().parent.parent / "notebooks" / "05_synthesis" / "synthesis.ipynb"
    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    elapsed = time.perf_counter() - start
    print(f"notebook 05 executed in {elapsed:.1f} s (budget 120 s on 2 CPU cores): "
          f"{'within' if elapsed <= 120 else 'OVER'} budget")


def main():
    global DEVICE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--notebook", action="store_true", help="also execute the notebook and time it")
    args = parser.parse_args()
    DEVICE = torch.device(args.device)
    bench_steps(args.repeat)
    if args.notebook:
        bench_notebook()


if __name__ == "__main__":
    main()

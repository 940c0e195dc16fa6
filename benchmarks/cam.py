"""Benchmark of notebook 04 (CAM): the reference Grad-CAM against its theoretical minimum
and against Captum and pytorch-grad-cam, as ratios of timings measured in this one run
(ours / theirs: below 1 means ours is faster).

    python benchmarks/cam.py [--repeat 7] [--device cuda] [--notebook notebooks/04_cam/cam.ipynb]

* "forward + backward": the same batch through the model with the input requiring grad,
  and the gradient of the sum of the target logits with respect to the input (what
  gradient saliency costs). The budget is ``grad_cam <= 1.15x`` that.
* Captum's ``LayerGradCam(relu_attributions=True)`` and pytorch-grad-cam's ``GradCAM``
  (which also min-max normalizes and resizes its maps on the CPU, in NumPy) on the same
  layer, batch and targets.

The timings of the methods are interleaved (one sample of each in turn) and the median
is reported, so that a busy machine slows all of them alike. With ``--notebook`` the
notebook is executed top to bottom with nbclient and its wall-clock time printed.
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

DEVICE = torch.device("cpu")


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def interleaved(functions: dict, repeat: int) -> dict:
    """Median seconds of each function, sampling them in turn ``repeat`` times after one
    warm-up call each."""
    for fn in functions.values():
        fn()
    samples = {name: [] for name in functions}
    for _ in range(repeat):
        for name, fn in functions.items():
            _sync()
            start = time.perf_counter()
            fn()
            _sync()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def forward_backward(model, images, targets):
    x = images.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(model(x).gather(1, targets[:, None]).sum(), x)
    return grad


def captum_grad_cam(model, layer, images, targets):
    from captum.attr import LayerGradCam

    return LayerGradCam(model, model.get_submodule(layer)).attribute(images, target=targets, relu_attributions=True)


def pytorch_grad_cam(model, layer, images, targets):
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    with GradCAM(model=model, target_layers=[model.get_submodule(layer)]) as explainer:
        return explainer(input_tensor=images.clone().requires_grad_(True),
                         targets=[ClassifierOutputTarget(int(c)) for c in targets])


def bench_grad_cam(repeat: int):
    from cs_helpers.models import load_model
    from cs_helpers.reference.cam import grad_cam
    from cs_helpers.toyworld import toyworld

    g = torch.Generator().manual_seed(0)
    toynet = load_model("toynet", device=DEVICE)
    lite0 = load_model("efficientnet_lite0", device=DEVICE)
    world = toyworld(32, seed=1)
    cases = [
        ("toynet relu3, 32 x 64px", toynet, "relu3", world.images, world.labels),
        ("toynet pool1, 32 x 64px", toynet, "pool1", world.images, world.labels),
        ("lite0 head, 4 x 224px", lite0, "head", torch.rand(4, 3, 224, 224, generator=g),
         torch.tensor([1, 207, 281, 999])),
        ("lite0 blocks.8, 4 x 224px", lite0, "blocks.8", torch.rand(4, 3, 224, 224, generator=g),
         torch.tensor([1, 207, 281, 999])),
    ]
    rows = []
    for label, model, layer, images, targets in cases:
        images, targets = images.to(DEVICE), targets.to(DEVICE)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            times = interleaved({
                "fb": lambda: forward_backward(model, images, targets),
                "captum": lambda: captum_grad_cam(model, layer, images, targets),
                "pgc": lambda: pytorch_grad_cam(model, layer, images, targets),
                "ours": lambda: grad_cam(model, layer, images, targets),
            }, repeat)
        rows.append((label, times))
    width = max(len(r[0]) for r in rows)
    print(f"\ngrad_cam ({DEVICE.type}, {torch.get_num_threads()} threads, median of {repeat}): seconds and ratios "
          "ours / theirs")
    print(f"{'case':<{width}}  {'ours':>8}  {'fwd+bwd':>8}  {'captum':>8}  {'pgc':>8}  "
          f"{'/fwd+bwd':>8}  {'/captum':>8}  {'/pgc':>8}")
    for label, t in rows:
        print(f"{label:<{width}}  {t['ours']:8.4f}  {t['fb']:8.4f}  {t['captum']:8.4f}  {t['pgc']:8.4f}  "
              f"{t['ours'] / t['fb']:8.2f}  {t['ours'] / t['captum']:8.2f}  {t['ours'] / t['pgc']:8.2f}")
    print("budget: ours / fwd+bwd <= 1.15; ours / captum and ours / pgc <= 1")


def bench_notebook(path: str):
    import nbformat
    from nbclient import NotebookClient
    from pathlib import Path

    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    NotebookClient(nb, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": str(Path(path).resolve().parent)}}).execute()
    print(f"\nnotebook {path}: executed top to bottom in {time.perf_counter() - start:.1f} s (budget 120 s on 2 cores)")


def main():
    global DEVICE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--notebook", default=None, help="also execute this notebook and print its time")
    args = parser.parse_args()
    DEVICE = torch.device(args.device)
    bench_grad_cam(args.repeat)
    if args.notebook:
        bench_notebook(args.notebook)


if __name__ == "__main__":
    main()

"""Benchmarks: reference implementations against independent ones, and the cost of
trusted grading. Every table compares timings measured in this one run, on this
machine, as ratios (ours / theirs: below 1 means ours is faster).

    python benchmarks/run.py [--repeat 5] [--device cuda]

With ``--device cuda`` the reference-vs-library tables run on the GPU (trusted grading
is timed on the CPU in either case).
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import statistics
import time

import torch
import torch.nn.functional as F


DEVICE = torch.device("cpu")


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def timed(fn, repeat):
    fn()  # warm-up
    samples = []
    for _ in range(repeat):
        _sync()
        start = time.perf_counter()
        fn()
        _sync()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def table(title, rows):
    print(f"\n{title}")
    width = max(len(r[0]) for r in rows)
    print(f"{'case':<{width}}  {'ours (s)':>10}  {'theirs (s)':>10}  {'ratio':>6}")
    for name, ours, theirs in rows:
        print(f"{name:<{width}}  {ours:10.4f}  {theirs:10.4f}  {ours / theirs:6.2f}")


def bench_filters(repeat):
    from cs_helpers.reference.filters import conv2d_im2col

    rows = []
    for label, (n, c, h, co, k, s, p) in {
        "stem 32x3x3x3 s2, 8x224": (8, 3, 225, 32, 3, 2, 0),
        "3x3 64->64, 8x56": (8, 64, 56, 64, 3, 1, 1),
        "5x5 16->32, 32x64": (32, 16, 64, 32, 5, 1, 2),
    }.items():
        x, w = torch.randn(n, c, h, h, device=DEVICE), torch.randn(co, c, k, k, device=DEVICE)
        rows.append((label, timed(lambda: conv2d_im2col(x, w, stride=s, padding=p), repeat),
                     timed(lambda: F.conv2d(x, w, stride=s, padding=p), repeat)))
    table(f"conv2d_im2col vs torch.nn.functional.conv2d ({DEVICE.type})", rows)


def bench_grading(repeat):
    from cs_helpers import grading
    from cs_helpers.grading import get_check, hidden_seed
    from cs_helpers.grading.sandbox import trusted_score
    from cs_helpers.reference import filters

    body = inspect.getsource(filters).replace("from __future__ import annotations\n", "")
    rows = []
    for name in ("normalize_filters", "conv2d_im2col", "linear_templates"):
        check = get_check(name)
        child = timed(lambda: trusted_score(check, [body], hidden_seed(name)), max(1, repeat // 2))
        kernel = timed(lambda: grading.score(name, getattr(filters, name), quiet=True), repeat)
        rows.append((name, child, kernel))
    table("trusted score (child process) vs in-kernel score, per graded function", rows)


def bench_saliency(repeat):
    try:
        saliency = importlib.import_module("cs_helpers.reference.saliency")
        import captum.attr as attr
    except ModuleNotFoundError:
        print("\n(saliency reference or captum not installed: skipped)")
        return
    from cs_helpers.data import sample_images, toyworld
    from cs_helpers.models import load_model

    model = load_model("efficientnet_lite0", device=DEVICE)
    images = torch.stack([p.image for p in sample_images()[:4]]).to(DEVICE)
    with torch.no_grad():
        targets = model(images).argmax(1)
    toynet = load_model("toynet", device=DEVICE)
    world = toyworld(256, seed=0)
    scenes, labels = world.images.to(DEVICE), world.labels.to(DEVICE)

    def forward_backward():  # the theoretical minimum of a gradient method: one forward, one backward pass
        x = images.clone().requires_grad_(True)
        torch.autograd.grad(model(x).gather(1, targets[:, None]).sum(), x)

    def softmaxed(x):
        return model(x).softmax(1)

    image, target = images[0], int(targets[0])
    segments = _slic_segments(image.cpu(), 20).to(DEVICE)
    rows = [("gradient_saliency, 4 photos",
             timed(lambda: saliency.gradient_saliency(model, images, targets), repeat),
             timed(lambda: attr.Saliency(model).attribute(images.clone().requires_grad_(), target=targets,
                                                          abs=True).amax(1), repeat)),
            ("guided_backprop, 4 photos (Captum hooks ReLU only)",
             timed(lambda: saliency.guided_backprop(model, images, targets), repeat),
             timed(lambda: attr.GuidedBackprop(model).attribute(images.clone().requires_grad_(), target=targets),
                   repeat)),
            ("guided_backprop, ToyNet, 256 scenes (both hook every ReLU)",
             timed(lambda: saliency.guided_backprop(toynet, scenes, labels), repeat),
             timed(lambda: attr.GuidedBackprop(toynet).attribute(scenes.clone().requires_grad_(), target=labels),
                   repeat)),
            # Batches of 16 for both: on a CPU, small batches are faster per image (cache).
            ("occlusion_map 16/8, one photo (729 windows)",
             timed(lambda: saliency.occlusion_map(model, image, target, batch_size=16), 1),
             timed(lambda: attr.Occlusion(softmaxed).attribute(image[None], target=target,
                                                               sliding_window_shapes=(3, 16, 16),
                                                               strides=(3, 8, 8), baselines=0.5,
                                                               perturbations_per_eval=16), 1)),
            (f"shapley_values, {int(segments.max()) + 1} SLIC segments, 6 permutations",
             timed(lambda: saliency.shapley_values(model, image, target, segments, 6, batch_size=16), 1),
             timed(lambda: attr.ShapleyValueSampling(softmaxed).attribute(
                 image[None], target=target, baselines=0.5, feature_mask=segments[None, None],
                 n_samples=6, perturbations_per_eval=16), 1))]
    table(f"saliency references vs Captum on EfficientNet-Lite0 ({DEVICE.type})", rows)
    table("gradient methods vs their minimum, one forward and one backward pass (4 photos)",
          [("gradient_saliency", rows[0][1], timed(forward_backward, repeat)),
           ("guided_backprop", rows[1][1], timed(forward_backward, repeat))])


def _slic_segments(image, n_segments):
    from skimage.segmentation import slic

    labels = slic(image.permute(1, 2, 0).double().numpy(), n_segments=n_segments, compactness=20, start_label=0)
    _, ids = torch.unique(torch.from_numpy(labels), return_inverse=True)
    return ids.long()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    torch.manual_seed(0)
    name = torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "cpu"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, device {name}")
    bench_filters(args.repeat)
    bench_grading(args.repeat)
    bench_saliency(args.repeat)


if __name__ == "__main__":
    main()

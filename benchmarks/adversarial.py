"""Benchmark of notebook 06's attacks: the reference ``pgd`` against (a) the same number
of bare forward-backward passes of the cross-entropy with respect to the input (the
theoretical minimum: the budget is at most 1.1x) and (b) torchattacks' ``PGD`` with the
same settings (the budget: not slower). Also ``fgsm`` against one pass and against
torchattacks' ``FGSM``.

    python benchmarks/adversarial.py [--repeat 5] [--device cuda] [--threads 1]

Timings are medians of ``--repeat`` runs after a warm-up, in this one process; ratios are
ours / theirs (below 1 means ours is faster).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, repeat, device):
    fn()  # warm-up
    samples = []
    for _ in range(repeat):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def bare_passes(model, images, labels, steps):
    """``steps`` forward-backward passes of the mean cross-entropy with respect to the
    input, nothing else: the floor for any PGD implementation."""
    x = images.clone()
    for _ in range(steps):
        x.requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x), labels), x)
        x = x.detach()
    return grad


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    from cs_helpers.models import load_model
    from cs_helpers.reference.adversarial import fgsm, pgd
    from cs_helpers.toyworld import toyworld

    try:
        import torchattacks
    except ImportError:  # pragma: no cover - a dev extra
        torchattacks = None
        print("torchattacks is not installed: only the floor comparison runs")

    world = toyworld(64, seed=0)
    photo = torch.nn.functional.interpolate(torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)),
                                            size=(160, 160), mode="bilinear", align_corners=False)
    settings = [("toynet", world.images, world.labels, "64 ToyWorld scenes, 64 px"),
                ("efficientnet_lite0", photo, torch.tensor([1, 2, 3, 4]), "4 images, 160 px")]
    eps, alpha, steps = 8 / 255, 2 / 255, 10
    print(f"device {device}, {torch.get_num_threads()} threads; PGD eps=8/255, alpha=2/255, {steps} steps, "
          f"no random start; median of {args.repeat}")
    print(f"{'model':20s} {'input':20s} {'pgd (s)':>9s} {'floor (s)':>10s} {'/floor':>7s} "
          f"{'torchattacks (s)':>17s} {'/ta':>6s}")
    results = {}
    for name, images, labels, what in settings:
        model = load_model(name, device=device)
        x, y = images.to(device), labels.to(device)
        ours = timed(lambda: pgd(model, x, y, eps, alpha, steps), args.repeat, device)
        floor = timed(lambda: bare_passes(model, x, y, steps), args.repeat, device)
        theirs = float("nan")
        if torchattacks is not None:
            attack = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=False)
            theirs = timed(lambda: attack(x, y), args.repeat, device)
        results[name, "pgd"] = (ours, floor, theirs)
        print(f"{name:20s} {what:20s} {ours:9.4f} {floor:10.4f} {ours / floor:7.3f} {theirs:17.4f} "
              f"{ours / theirs:6.3f}")
        one = timed(lambda: fgsm(model, x, y, eps), args.repeat, device)
        one_floor = timed(lambda: bare_passes(model, x, y, 1), args.repeat, device)
        one_theirs = float("nan")
        if torchattacks is not None:
            one_theirs = timed(lambda: torchattacks.FGSM(model, eps=eps)(x, y), args.repeat, device)
        results[name, "fgsm"] = (one, one_floor, one_theirs)
        print(f"{name + ' (FGSM)':20s} {what:20s} {one:9.4f} {one_floor:10.4f} {one / one_floor:7.3f} "
              f"{one_theirs:17.4f} {one / one_theirs:6.3f}")
    return results


if __name__ == "__main__":
    main()

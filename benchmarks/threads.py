"""PyTorch threads on shared cores: one forward and backward pass of EfficientNet-Lite0
(batch 8, 224 px) with 1 and with 2 intra-op threads, alone and while another process
keeps one or both cores busy, measured alternately in one run.

    python benchmarks/threads.py [--repeat 5]

What it decides: the threads of grading children, walkthrough kernels and test workers
(the Makefile runs two pytest workers with ``OMP_NUM_THREADS=1``).
"""
from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cs_helpers.models import load_model  # noqa: E402


def _burn(stop):
    x = 0
    while not stop.is_set():
        x = (x * 7 + 1) % 1000003


def _step(model, images, threads: int) -> float:
    torch.set_num_threads(threads)
    x = images.clone().requires_grad_(True)
    start = time.perf_counter()
    model(x)[:, 0].sum().backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    model = load_model("efficientnet_lite0", device="cpu")
    images = torch.rand(8, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    _step(model, images, 1)  # warm up
    print(f"| {'competing busy processes':<26} | 1 thread s | 2 threads s | 2 / 1 |")
    print(f"|{'-' * 28}|------------|-------------|-------|")
    for busy in (0, 1, 2):
        stop = multiprocessing.Event()
        burners = [multiprocessing.Process(target=_burn, args=(stop,)) for _ in range(busy)]
        for p in burners:
            p.start()
        times = {1: [], 2: []}
        try:
            for _ in range(args.repeat):
                for threads in (1, 2):
                    times[threads].append(_step(model, images, threads))
        finally:
            stop.set()
            for p in burners:
                p.join()
        one, two = statistics.median(times[1]), statistics.median(times[2])
        print(f"| {busy:<26} | {one:10.2f} | {two:11.2f} | {two / one:5.2f} |")


if __name__ == "__main__":
    main()

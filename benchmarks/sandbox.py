"""What the OS sandbox costs a submission: the same work with and without it, measured
alternately in one run.

    python benchmarks/sandbox.py [--repeat 5]

Rows: starting an interpreter; starting a Jupyter kernel until it answers (nbgrader's
execution); scoring notebook 01's functions in one grading server (import, fork per
function, compare). Budget (design): the sandbox adds at most 1 s per submission.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cs_helpers.grading import get_check, isolation  # noqa: E402
from cs_helpers.grading.sandbox import trusted_scores  # noqa: E402

SETUP = "import torch\n"
NORMALIZE = '''import torch

def normalize_filters(weights):
    flat = weights.detach().float().flatten(1)
    low, high = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    span = high - low
    out = torch.where(span > 0, (flat - low) / torch.where(span > 0, span, torch.ones_like(span)),
                      torch.full_like(flat, 0.5))
    return out.reshape(weights.shape)
'''


def _interpreter(sandboxed: bool) -> None:
    argv = [sys.executable, "-c", "pass"]
    subprocess.run(isolation.wrap(argv) if sandboxed else argv, check=True)


def _kernel(sandboxed: bool) -> None:
    from jupyter_client.manager import KernelManager

    if sandboxed:
        import asyncio

        manager = isolation._kernel_manager_class()(kernel_name="python3")

        async def cycle():
            await manager.start_kernel()
            client = manager.client()
            client.start_channels()
            await client._async_wait_for_ready(timeout=120)
            client.stop_channels()
            await manager.shutdown_kernel(now=True)

        asyncio.run(cycle())
        return
    manager = KernelManager(kernel_name="python3")
    manager.start_kernel()
    client = manager.client()
    client.start_channels()
    client.wait_for_ready(timeout=120)
    client.stop_channels()
    manager.shutdown_kernel(now=True)


def _scoring(sandboxed: bool) -> None:
    checks = [get_check("normalize_filters")] * 3
    reports = trusted_scores(checks, [SETUP, NORMALIZE], [1, 2, 3], [2, 2, 2], sandboxed=sandboxed)
    assert all(r.score == 2 for r in reports), [r.message for r in reports]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    isolation.require_sandbox()
    isolation.wrap(["true"])  # build the student package and font cache outside the timing
    rows = []
    for label, work in (("interpreter start", _interpreter), ("kernel start until ready", _kernel),
                        ("score 3 functions (one server)", _scoring)):
        times = {True: [], False: []}
        for _ in range(args.repeat):
            for sandboxed in (False, True):  # alternately, so load drifts hit both
                start = time.perf_counter()
                work(sandboxed)
                times[sandboxed].append(time.perf_counter() - start)
        plain, boxed = statistics.median(times[False]), statistics.median(times[True])
        rows.append((label, plain, boxed))
    print(f"| {'work':<32} | plain s | sandboxed s | added s | ratio |")
    print(f"|{'-' * 34}|---------|-------------|---------|-------|")
    for label, plain, boxed in rows:
        print(f"| {label:<32} | {plain:7.2f} | {boxed:11.2f} | {boxed - plain:7.2f} | {boxed / plain:5.2f} |")
    print("Per submission the sandbox adds the kernel row plus the scoring row's difference.")


if __name__ == "__main__":
    main()

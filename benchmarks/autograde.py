"""Parallel speed-up of ``cs-helpers autograde``: the same course of N submissions of
notebook 01 (graded cells only, each a distinct full-marks notebook) graded with an
embedded cluster of 1 and of 2 workers, each time into a fresh gradebook.

    python benchmarks/autograde.py [--submissions 4] [--workers 1 2] [--topic filters]

Prints, per worker count, the wall time of the whole run (cluster start and gradebook
included) and the time per submission (wall / N), and the speed-up over 1 worker. On a
2-core machine 2 workers can at best halve the time; anything else running on the
cores shows in the numbers.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import nbformat

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cs_helpers.classgrade import autograde  # noqa: E402
from cs_helpers.course import source_notebooks  # noqa: E402


def _course(root: Path, topic: str, count: int) -> str:
    source = next(p for p in source_notebooks() if p.stem == topic)
    nb = nbformat.read(source, as_version=4)
    nb.cells = [c for c in nb.cells if c.get("metadata", {}).get("nbgrader")]
    for i in range(count):
        nb.metadata["student_copy"] = i  # distinct contents, the same scores
        out = root / "submitted" / f"student{i:03d}" / source.parent.name / source.name
        out.parent.mkdir(parents=True)
        nbformat.write(nb, out)
    return source.parent.name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--submissions", type=int, default=4)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--topic", default="filters")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="cs-bench-autograde-") as tmp:
        root = Path(tmp)
        assignment = _course(root, args.topic, args.submissions)
        for workers in args.workers:
            for stale in ("gradebook.db", "autograded", "feedback"):
                path = root / stale
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            start = time.perf_counter()
            report = autograde(assignment, root, workers=workers, progress=False)
            wall = time.perf_counter() - start
            assert report.count("graded") == args.submissions, [(o.student, o.status, o.reason) for o in report.outcomes]
            busy = sum(o.seconds for o in report.outcomes)
            rows.append((workers, wall, wall / args.submissions, busy / args.submissions))
            print(f"{workers} worker(s): {wall:.1f} s for {args.submissions} submissions", flush=True)
    base = rows[0][1]
    print("\n| workers | wall (s) | wall per submission (s) | grading time per submission on a worker (s) | speed-up |")
    print("|---|---|---|---|---|")
    for workers, wall, per, busy in rows:
        print(f"| {workers} | {wall:.1f} | {per:.1f} | {busy:.1f} | {base / wall:.2f} |")


if __name__ == "__main__":
    main()

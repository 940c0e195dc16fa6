"""``cs-helpers``: the course's commands.

    cs-helpers walkthrough [--out DIR] [NOTEBOOK | NUMBER | TOPIC ...]
    cs-helpers release --out DIR
    cs-helpers grade SUBMISSION.ipynb ... [--json] [--no-sandbox]
    cs-helpers autograde ASSIGNMENT [--workers N | --scheduler ADDRESS] [--db URL] [--force] [--csv PATH]
                         [--source DIR] [--lost-workers-after SECONDS]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _walkthrough(args) -> int:
    from .course import walkthrough

    try:
        rows = walkthrough(args.out, args.notebooks or None)
    except ValueError as exc:
        print(f"cs-helpers walkthrough: {exc}", file=sys.stderr)
        return 2
    width = max([len(r.notebook) for r in rows] + [8])
    print(f"{'notebook':<{width}}  {'seconds':>8}  status")
    for r in rows:
        print(f"{r.notebook:<{width}}  {r.seconds:8.1f}  {r.status}")
    print(f"{'total':<{width}}  {sum(r.seconds for r in rows):8.1f}")
    print(f"Executed notebooks and HTML are in {args.out}")
    return 0 if all(r.status == "ok" for r in rows) else 1


def _release(args) -> int:
    from .course import release

    out = release(args.out)
    print(f"Student release written to {out}")
    return 0


def _grade(args) -> int:
    from .grading.isolation import SandboxUnavailable, require_sandbox, unsandboxed_allowed, warm_up

    sandboxed = not args.no_sandbox and not unsandboxed_allowed()
    if sandboxed:
        warm_up(start_kernel=True)  # the sandbox's pieces and the first kernel start while nbgrader imports
    from .course import grade_submission

    if sandboxed:
        try:
            require_sandbox()
        except SandboxUnavailable as exc:
            print(f"cs-helpers grade: {exc}", file=sys.stderr)
            return 2
    reports, failed = [], False
    for path in args.submissions:
        try:
            reports.append(grade_submission(path, sandboxed=not args.no_sandbox).as_dict())
        except (FileNotFoundError, ValueError, RuntimeError) as exc:
            failed = True
            reports.append({"notebook": str(path), "error": str(exc).splitlines()[0]})
    if args.json:
        print(json.dumps({"notebooks": reports}, indent=2))
    else:
        for report in reports:
            if "error" in report:
                print(f"{report['notebook']}: not graded: {report['error']}")
                continue
            print(f"{report['notebook']} ({report['assignment']}): "
                  f"{report['score']:g} / {report['max_score']:g}  [{report['seconds']} s]")
            for cell in report["cells"]:
                print(f"  {cell['grade_id']:<32} {cell['score']:g} / {cell['max_score']:g}")
    return 1 if failed else 0


def _autograde(args) -> int:
    from .classgrade import AutogradeError, autograde, summary

    try:
        report = autograde(args.assignment, args.course, workers=args.workers, scheduler=args.scheduler,
                           db=args.db, force=args.force, csv_path=args.csv, sandboxed=not args.no_sandbox,
                           execute_timeout_s=args.timeout, source_dir=args.source,
                           progress=not args.no_progress, course_id=args.course_id,
                           lost_workers_s=args.lost_workers_after)
    except AutogradeError as exc:
        print(f"cs-helpers autograde: {exc}", file=sys.stderr)
        return 2
    print(summary(report))
    if args.csv:
        print(f"One row per student in {args.csv}")
    return 1 if report.failed else 0


# jsonschema, which nbformat imports, loads the optional package rfc3987_syntax for its
# "iri" format checker, and that package builds a grammar at import: 2.3 s of every
# command here, on notebook 01 a quarter of a grading's overhead. No schema that the
# course validates (nbformat's, nbgrader's) uses that format; without the package
# jsonschema simply has no "iri" checker.
_SLOW_OPTIONAL_IMPORTS = ("rfc3987_syntax",)


def _skip_slow_optional_imports() -> None:
    for name in _SLOW_OPTIONAL_IMPORTS:
        sys.modules.setdefault(name, None)  # `import name` then raises ImportError


def main(argv=None) -> int:
    _skip_slow_optional_imports()
    parser = argparse.ArgumentParser(prog="cs-helpers", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    walk = sub.add_parser("walkthrough", help="execute the source notebooks into build/walkthrough")
    walk.add_argument("--out", type=Path, default=Path("build") / "walkthrough")
    walk.add_argument("notebooks", nargs="*",
                      help="notebook files, numbers (03) or topics (saliency); default: all of them")
    walk.set_defaults(run=_walkthrough)
    rel = sub.add_parser("release", help="write the student version")
    rel.add_argument("--out", type=Path, default=Path("build") / "release")
    rel.set_defaults(run=_release)
    grade = sub.add_parser("grade", help="autograde submitted notebooks")
    grade.add_argument("submissions", nargs="+", type=Path)
    grade.add_argument("--json", action="store_true", help="print a machine-readable report")
    grade.add_argument("--no-sandbox", action="store_true",
                       help="grade without the OS sandbox: only for your own, trusted work")
    grade.set_defaults(run=_grade)
    auto = sub.add_parser("autograde", help="grade every submission of an assignment in parallel (Dask)",
                          description="Grades submitted/<student>/ASSIGNMENT/ of the course root in parallel "
                          "on Dask, into nbgrader's gradebook, autograded/ and feedback/. Only new or changed "
                          "submissions are graded unless --force.")
    auto.add_argument("assignment", help="the assignment's folder name, e.g. 01_filters")
    auto.add_argument("--course", type=Path, default=Path("."), help="the course root (default: here)")
    where = auto.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int, default=None,
                       help="local single-threaded worker processes (default: the machine's cores)")
    where.add_argument("--scheduler", metavar="ADDRESS", help="an existing Dask scheduler, e.g. tcp://host:8786")
    auto.add_argument("--db", metavar="URL", help="the gradebook's SQLAlchemy URL (default: sqlite:///gradebook.db "
                      "in the course root; postgresql://user@host/dbname works the same)")
    auto.add_argument("--force", action="store_true", help="grade unchanged submissions again")
    auto.add_argument("--csv", type=Path, metavar="PATH", help="write one row per student")
    auto.add_argument("--timeout", type=float, metavar="SECONDS",
                      help="time limit of one cell in the student's kernel (default: the course's)")
    auto.add_argument("--source", type=Path, metavar="DIR", help="the source notebooks (default: the kit's)")
    auto.add_argument("--lost-workers-after", type=float, default=60.0, metavar="SECONDS",
                      help="fail the remaining submissions when the cluster has had no worker this long "
                      "(default: 60)")
    auto.add_argument("--course-id", default="course", help="nbgrader's course id in the gradebook")
    auto.add_argument("--no-progress", action="store_true", help="no progress bar")
    auto.add_argument("--no-sandbox", action="store_true",
                      help="grade without the OS sandbox: only for your own, trusted work")
    auto.set_defaults(run=_autograde)
    args = parser.parse_args(argv)
    return args.run(args)


def run() -> None:
    """The console script: :func:`main`, then a quick exit. With PyTorch loaded the
    interpreter's own teardown takes about half a second (measured on the course's
    2-core machine) and has nothing left to do once the output is flushed and the exit
    handlers (temporary folders) have run. Where a non-daemon thread is still running
    the exit is the usual one, which waits for it."""
    import atexit
    import os
    import threading

    code = main()
    if any(t is not threading.main_thread() and t.is_alive() and not t.daemon for t in threading.enumerate()):
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    atexit._run_exitfuncs()
    os._exit(code)


if __name__ == "__main__":
    run()

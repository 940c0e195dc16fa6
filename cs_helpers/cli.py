"""``cs-helpers``: the course's commands.

    cs-helpers walkthrough [--out DIR] [NOTEBOOK | NUMBER | TOPIC ...]
    cs-helpers release --out DIR
    cs-helpers grade SUBMISSION.ipynb ... [--json] [--no-sandbox]
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
    from .course import grade_submission
    from .grading.isolation import SandboxUnavailable, require_sandbox, unsandboxed_allowed

    if not args.no_sandbox and not unsandboxed_allowed():
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
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())

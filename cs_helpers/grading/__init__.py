"""Grading: checks that compare a student's function with the reference.

In a notebook's hidden test cell::

    from cs_helpers import grading
    grading.score("normalize_filters", normalize_filters)

prints which properties hold and evaluates to the partial-credit score (nbgrader reads
it from the cell's result). That in-kernel score is feedback only: when an instructor
autogrades, :class:`cs_helpers.grading.nbgrader_plugin.TrustedScores` recomputes every
score in the grader's own process, from what the student's code returned when run in a
separate child process (:mod:`cs_helpers.grading.sandbox`), and overwrites the cell's
outputs with it.

The student release has no reference. There :func:`score` is a self-check: it runs the
properties that need no reference (closed-form cases, shapes, invariances, manners: see
:attr:`cs_helpers.grading.core.Property.expect`), says which hold and which wait for
grading, and returns None, never a number that could pass for a grade.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import typing
import warnings

if typing.TYPE_CHECKING:
    from .core import Check, Report, SelfCheckReport

# Imported on first use: the checks import PyTorch, and the grading command reaches
# this package (its nbgrader settings, the sandbox) well before it needs them.
_LAZY = {"Check": "core", "Report": "core", "SelfCheckReport": "core",
         "get_check": "registry", "hidden_seed": "registry", "load_all": "registry"}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Check", "Report", "SelfCheckReport", "get_check", "has_reference", "hidden_seed", "load_all", "score",
           "self_check"]


def score(name: str, func, seed: int | None = None, *, device=None, quiet: bool = False) -> float | None:
    """Checks ``func`` against the reference of ``name`` in this process.

    Prints one message naming the properties that fail (never the expected numbers)
    and returns the score out of the check's points. Without the reference (the student
    release) it self-checks instead (:func:`self_check`): the message says which
    properties ran and which wait for grading, and the result is None. Never raises and
    never writes to stderr: anything the student's function raises or prints is
    contained.
    """
    from .registry import get_check, hidden_seed

    try:
        check = get_check(name)
    except Exception:
        if not quiet:
            print(f"{name}: no check is known for this function.")
        return None if not has_reference() else 0.0
    if not has_reference():
        report = _self_check_or_none(check, func, _self_check_seed(name) if seed is None else seed, device)
        if not quiet:
            print(report.message if report is not None else f"{name}: the self-check could not run.")
        return None
    try:
        report = _score_in_process(check, func, hidden_seed(name) if seed is None else seed, device)
    except Exception as exc:  # a failure of the grader itself: say so, without traceback
        if not quiet:
            print(f"{name}: the check could not run ({type(exc).__name__}).")
        return 0.0
    if not quiet:
        print(report.message)
    return report.score


def has_reference() -> bool:
    """Whether ``cs_helpers.reference`` is installed (the instructor's install; not the
    student release)."""
    import importlib.util

    try:
        return importlib.util.find_spec("cs_helpers.reference") is not None
    except (ImportError, ValueError):
        return False


def self_check(name: str, func, seed: int | None = None, *, device=None) -> SelfCheckReport:
    """The properties of ``name``'s check that need no reference, run on ``func`` in
    this process: a :class:`SelfCheckReport` (no score; the properties that need the
    reference listed as waiting for grading). Raises ``KeyError`` for an unknown name."""
    from .registry import get_check

    check = get_check(name)
    return _self_check(check, func, _self_check_seed(name) if seed is None else seed, device)


def _self_check_seed(name: str) -> int:
    """The public seed (no course secret: the self-check's cases hide nothing, and
    looking for a secret must not leave a file in the student's installation)."""
    from .registry import hidden_seed

    return hidden_seed(name, secret=b"")


def _self_check_or_none(check, func, seed, device):
    try:
        return _self_check(check, func, seed, device)
    except Exception:  # a failure of the checker itself, reported without traceback
        return None


def _self_check(check: Check, func, seed: int, device=None) -> SelfCheckReport:
    from .core import unique_cases

    props = check.properties(seed)
    runnable = [p for p in props if not p.needs_reference]
    got = _run_cases(func, unique_cases(runnable), device)
    return check.self_check(props, got, _device(device))


def _score_in_process(check: Check, func, seed: int, device=None) -> Report:
    from .core import unique_cases
    from .sandbox import reference_outcomes

    props = check.properties(seed)
    cases = unique_cases(props)
    expected = reference_outcomes(check, cases, device)
    return check.evaluate(props, expected, _run_cases(func, cases, device))


def _run_cases(func, cases, device=None) -> dict:
    """The outcomes of ``func`` on ``cases`` by ``id(case)``, with its output and
    warnings contained."""
    from .core import call_case

    got = {}
    sink = io.StringIO()
    cache: dict = {}
    with warnings.catch_warnings(), contextlib.redirect_stderr(sink), contextlib.redirect_stdout(sink):
        warnings.simplefilter("ignore")
        for case in cases:
            if not callable(func):
                break
            try:
                got[id(case)] = call_case(func, case, _device(device), cache)
            except BaseException as exc:  # KeyboardInterrupt aside, contain everything
                if isinstance(exc, KeyboardInterrupt):
                    raise
                from .core import Outcome

                got[id(case)] = Outcome(error=f"raised {type(exc).__name__}")
    return got


def _device(device):
    import torch

    from .. import device as default_device

    return torch.device(device) if device is not None else default_device()

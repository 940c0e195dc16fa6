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
"""
from __future__ import annotations

import contextlib
import io
import warnings

from .core import Check, Report
from .registry import get_check, hidden_seed, load_all

__all__ = ["Check", "Report", "get_check", "hidden_seed", "load_all", "score"]


def score(name: str, func, seed: int | None = None, *, device=None, quiet: bool = False) -> float:
    """Checks ``func`` against the reference of ``name`` in this process.

    Prints one message naming the properties that fail (never the expected numbers)
    and returns the score out of the check's points. Never raises and never writes to
    stderr: anything the student's function raises or prints is contained.
    """
    try:
        check = get_check(name)
    except Exception:
        if not quiet:
            print(f"{name}: no check is known for this function.")
        return 0.0
    try:
        report = _score_in_process(check, func, hidden_seed(name) if seed is None else seed, device)
    except ModuleNotFoundError:
        if not quiet:
            print(f"{name}: the hidden tests need the instructor's reference; they run when your work is graded.")
        return 0.0
    except Exception as exc:  # a failure of the grader itself: say so, without traceback
        if not quiet:
            print(f"{name}: the check could not run ({type(exc).__name__}).")
        return 0.0
    if not quiet:
        print(report.message)
    return report.score


def _score_in_process(check: Check, func, seed: int, device=None) -> Report:
    from .core import call_case, unique_cases
    from .sandbox import reference_outcomes

    props = check.properties(seed)
    cases = unique_cases(props)
    expected = reference_outcomes(check, cases, device)
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
    return check.evaluate(props, expected, got)


def _device(device):
    import torch

    from .. import device as default_device

    return torch.device(device) if device is not None else default_device()

"""The checks of every graded function, by function name."""
from __future__ import annotations

import importlib
import zlib

from .core import Check

TOPICS = ("filters", "features", "saliency", "cam", "synthesis", "adversarial", "tcav")
_CHECKS: dict[str, Check] = {}


def register(cls):
    """Class decorator: registers one instance of a :class:`Check` subclass."""
    check = cls()
    if check.name in _CHECKS:
        raise ValueError(f"two checks for {check.name}")
    _CHECKS[check.name] = check
    return cls


def load_all() -> dict[str, Check]:
    """Imports every topic's checks that exist and returns the registry."""
    for topic in TOPICS:
        try:
            importlib.import_module(f"cs_helpers.grading.checks.{topic}")
        except ModuleNotFoundError as exc:
            if exc.name != f"cs_helpers.grading.checks.{topic}":
                raise
    return _CHECKS


def get_check(name: str) -> Check:
    checks = load_all()
    if name not in checks:
        raise KeyError(f"no check for a function named {name!r}; known: {', '.join(sorted(checks))}")
    return checks[name]


def hidden_seed(name: str) -> int:
    """The seed of the hidden tests of one function: fixed, so that a regrade gives
    the same score, and different from the seeds the notebook shows."""
    return zlib.crc32(f"hidden-tests:{name}".encode()) % (2**31)

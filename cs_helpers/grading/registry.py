"""The checks of every graded function, by function name."""
from __future__ import annotations

import hashlib
import hmac
import importlib
import os
import secrets
import zlib
from pathlib import Path

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


#: The course secret: ``$CS_HELPERS_SECRET_FILE``, else ``.cs-helpers-secret`` at the
#: root of the instructor's course (the repository). Never released, never in git.
SECRET_ENV = "CS_HELPERS_SECRET_FILE"


def secret_path() -> Path:
    override = os.environ.get(SECRET_ENV)
    if override:
        return Path(override).expanduser()
    return Path(__file__).resolve().parent.parent.parent / ".cs-helpers-secret"


def course_secret(create: bool = True) -> bytes | None:
    """The per-course secret from which hidden cases are drawn, created (random, 256
    bits, readable by its owner only) the first time the instructor's tools need it.
    None where it cannot be read or made: in the student release and inside the
    grading sandbox, which never see it."""
    path = secret_path()
    try:
        return bytes.fromhex(path.read_text().strip())
    except (OSError, ValueError):
        pass
    if not create:
        return None
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return course_secret(create=False)
    except OSError:
        return None
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_hex(32) + "\n")
    return course_secret(create=False)


def hidden_seed(name: str, secret: bytes | None = None) -> int:
    """The seed of the hidden tests of one function: HMAC-SHA256 of the function's name
    under the course secret, so that nobody without the secret can rebuild the hidden
    cases, and a regrade gives the same score. Without a secret (the student release,
    the sandbox) a public seed that differs from the notebook's visible ones: scores
    computed there are feedback only."""
    secret = course_secret() if secret is None else secret
    if not secret:
        return zlib.crc32(f"hidden-tests:{name}".encode()) % (2**31)
    digest = hmac.new(secret, f"hidden-tests:{name}".encode(), hashlib.sha256).digest()
    return int.from_bytes(digest[:4], "big") % (2**31)

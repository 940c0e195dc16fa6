"""The child process in which student code runs during trusted grading.

Started by :mod:`cs_helpers.grading.sandbox` inside the OS sandbox
(:mod:`cs_helpers.grading.isolation`), with the student build of ``cs_helpers`` on its
path and the job folder bound read-only at ``JOB_DIR``: ``job.json`` names the function,
the cell sources to execute and the time limits, ``cases.pt`` holds the inputs. The
grader set the resource limits before the sandbox started; nothing here is a guard.

The child keeps its original standard output for the result and sends everything else
(the student's prints, C-level writes to fd 1) to a capped buffer or ``/dev/null``. It
writes one blob (:func:`cs_helpers.grading.encoding.pack_result`): plain JSON and plain
numeric arrays, which the grader reads with limits and compares with the reference in
its own process. Nothing the child computes is trusted.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import sys
import time
from pathlib import Path


class CellTimeout(BaseException):
    """Raised by the alarm when a cell or a call runs past its limit (a BaseException,
    so that a bare ``except Exception`` in student code does not swallow it)."""


def _alarm(_signum, _frame):
    raise CellTimeout()


def _strip_magics(source: str) -> str:
    """IPython line magics and shell escapes (``%matplotlib``, ``!pip``) have no meaning
    here: they become ``pass``."""
    lines = []
    for line in source.splitlines():
        stripped = line.lstrip()
        if stripped.startswith(("%", "!")):
            lines.append(line[: len(line) - len(stripped)] + "pass")
        else:
            lines.append(line)
    return "\n".join(lines) + "\n"


class _CappedBuffer(io.StringIO):
    def __init__(self, cap=20000):
        super().__init__()
        self.cap = cap

    def write(self, text):
        if self.tell() < self.cap:
            return super().write(text[: self.cap - self.tell()])
        return len(text)


def _private_result_channel():
    """Moves the result pipe away from fd 1; fd 1 then goes nowhere."""
    result = os.fdopen(os.dup(1), "wb")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    return result


def main(job_dir: str) -> int:
    job_path = Path(job_dir)
    job = json.loads((job_path / "job.json").read_text())
    result_channel = _private_result_channel()
    signal.signal(signal.SIGALRM, _alarm)

    # The grader's imports first, before any student code runs.
    import torch

    from cs_helpers.grading import core, encoding
    import cs_helpers.grading.tiny_models  # noqa: F401  (registers tiny seeded networks)

    device = torch.device(job["device"])
    raw_cases = torch.load(job_path / "cases.pt", weights_only=True)
    cache: dict = {}
    cases = [core.Case(args=tuple(core.materialize(c["args"], device, cache)),
                       kwargs=core.materialize(c["kwargs"], device, cache),
                       label=c["label"], count_calls=c["count_calls"],
                       record_torch_calls=c["record_torch_calls"]) for c in raw_cases]

    sys.stdin = io.StringIO("")
    captured = _CappedBuffer()

    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    cell_errors = []
    with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
        for index, source in enumerate(job["sources"]):
            signal.setitimer(signal.ITIMER_REAL, job["cell_timeout_s"])
            try:
                exec(compile(_strip_magics(source), f"<cell {index}>", "exec"), namespace)
            except CellTimeout:
                cell_errors.append(f"a cell ran past {job['cell_timeout_s']:g} s and was stopped")
            except BaseException as exc:  # noqa: BLE001 - any failure of a student cell
                cell_errors.append(f"a cell raised {type(exc).__name__}")
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)

        func = namespace.get(job["function"])
        outcomes = []
        # One time budget for all the calls: after a call runs out of it, the rest are
        # not attempted.
        budget = float(job["call_timeout_s"])
        for case in cases:
            if not callable(func):
                outcomes.append(core.Outcome(error=f"no function named {job['function']} was defined"))
                continue
            if budget <= 0:
                outcomes.append(core.Outcome(error="not run: the time limit was spent"))
                continue
            signal.setitimer(signal.ITIMER_REAL, budget)
            start = time.monotonic()
            try:
                outcomes.append(core.call_case(func, case, device, cache))
            except CellTimeout:
                outcomes.append(core.Outcome(error=f"ran past the time limit of {job['call_timeout_s']:g} s"))
                budget = 0
            except BaseException as exc:  # noqa: BLE001
                outcomes.append(core.Outcome(error=f"raised {type(exc).__name__}"))
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            budget -= time.monotonic() - start

    skeleton, arrays = encoding.encode_outcomes(outcomes)
    result_channel.write(encoding.pack_result(skeleton, cell_errors, arrays))
    result_channel.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

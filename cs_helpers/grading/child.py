"""The child process in which student code runs during trusted grading.

Run as ``python -I -m cs_helpers.grading.child JOB_DIR``. ``JOB_DIR/job.json`` names the
function, the cell sources to execute, the limits and the forbidden paths;
``JOB_DIR/cases.pt`` holds the inputs. The child writes ``JOB_DIR/result.json`` and
``JOB_DIR/arrays.npz``: plain JSON and plain numeric arrays, nothing the grader would
have to unpickle.

Before any student code runs, the child

* limits its memory, CPU time, file size and core dumps (``resource``);
* installs an audit hook (which Python code cannot remove) that refuses imports of
  ``cs_helpers.reference``, opening files under the forbidden paths (the reference,
  the instructor's source notebooks, the gradebook), starting processes, and loading
  native code through ``ctypes``;
* takes away stdin and sends the student's prints to a capped buffer.

Nothing the child computes is trusted: the grader compares its arrays with the
reference in its own process.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import signal
import sys
import time
from pathlib import Path

_BLOCKED_EVENTS = {
    "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
    "os.forkpty", "pty.spawn", "ctypes.dlopen", "ctypes.dlsym", "ctypes.addressof",
    "ctypes.call_function", "sys.settrace", "socket.connect", "socket.bind",
}
_REFERENCE_MODULE = "cs_helpers.reference"


class CellTimeout(BaseException):
    """Raised by the alarm when a cell or a call runs past its limit (a BaseException,
    so that a bare ``except Exception`` in student code does not swallow it)."""


def _alarm(_signum, _frame):
    raise CellTimeout()


def _limit_resources(memory_gb: float, cpu_s: int) -> None:
    if memory_gb > 0:
        limit = int(memory_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 5))
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 2**20, 256 * 2**20))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _install_guard(forbidden: list[str], allowed_writes: list[str]) -> None:
    roots = [os.path.realpath(p) for p in forbidden]
    writable = [os.path.realpath(p) for p in allowed_writes]

    def inside(path, folders):
        try:
            real = os.path.realpath(os.fspath(path))
        except Exception:
            return False
        return any(real == r or real.startswith(r + os.sep) for r in folders)

    def guard(event, args):
        if event in _BLOCKED_EVENTS:
            raise PermissionError(f"not allowed while grading: {event}")
        if event == "import":
            name = args[0] or ""
            if name == _REFERENCE_MODULE or name.startswith(_REFERENCE_MODULE + "."):
                raise ImportError("cs_helpers.reference is not available to graded code")
        elif event == "open":
            path, mode = args[0], args[1]
            if isinstance(path, int):
                return
            if inside(path, roots):
                raise PermissionError("this file is not readable while grading")
            writing = isinstance(mode, str) and any(c in mode for c in "wax+")
            if isinstance(mode, int):  # os.open flags
                writing = bool(mode & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC))
            if writing and not inside(path, writable):
                raise PermissionError("graded code may not write files")
        elif event in ("os.remove", "os.rename", "os.rmdir", "shutil.rmtree", "os.truncate", "os.chmod"):
            if not inside(args[0], writable):
                raise PermissionError(f"graded code may not change files ({event})")

    sys.addaudithook(guard)
    # Also drop an already imported reference, so nothing reaches it through sys.modules.
    for name in list(sys.modules):
        if name == _REFERENCE_MODULE or name.startswith(_REFERENCE_MODULE + "."):
            del sys.modules[name]


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


def main(job_dir: str) -> int:
    job_path = Path(job_dir)
    job = json.loads((job_path / "job.json").read_text())
    signal.signal(signal.SIGALRM, _alarm)
    _limit_resources(job["memory_gb"], job["cpu_s"])

    # Trusted imports first, while the interpreter is still ours.
    import numpy as np
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

    result_path = job_path / "result.json"
    arrays_path = job_path / "arrays.npz"
    _install_guard(job["forbidden"], [str(job_path)])
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
    np.savez(arrays_path, **arrays)
    result_path.write_text(json.dumps({"outcomes": skeleton, "cell_errors": cell_errors}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

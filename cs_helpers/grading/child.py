"""The child process in which student code runs during trusted grading.

Started by :mod:`cs_helpers.grading.sandbox` inside the OS sandbox
(:mod:`cs_helpers.grading.isolation`), with the student build of ``cs_helpers`` on its
path and the job folder bound read-only at ``JOB_DIR``: ``job.json`` names the functions,
the cell sources to execute and the time limits, ``cases_<i>.pt`` holds the inputs of
function ``i``. It is a small server: it imports PyTorch and builds the models once,
then forks one fresh process per function (:func:`main`). The
grader set the resource limits before the sandbox started; nothing here is a guard.

The server keeps its original standard output for the results and sends everything else
to ``/dev/null``; a function's process never holds that channel, only a pipe of its own,
and the student's prints go to a capped buffer. Each result is one blob
(:func:`cs_helpers.grading.encoding.pack_result`): plain JSON and plain numeric arrays,
which the grader reads with limits and compares with the reference in its own process.
Nothing the child computes is trusted.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import select
import signal
import struct
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


FRAME_MAGIC = b"CSR1"
FRAME_HEADER = struct.Struct("<4siQ")
#: Frame statuses besides a child's exit status.
TIMED_OUT, TOO_LARGE = -1000, -1001


def _run_function(job: dict, index: int, cases: list, device, cache: dict, result_fd: int) -> None:
    """In a freshly forked process: runs the student's cells, calls one function on its
    cases, writes the packed result to ``result_fd``. Never returns."""
    import torch

    from cs_helpers.grading import core, encoding

    signal.signal(signal.SIGALRM, _alarm)
    torch.set_num_threads(job["threads"])
    if device.type != "cpu":
        for model in cache.values():
            model.to(device)
    function = job["functions"][index]
    sys.stdin = io.StringIO("")
    captured = _CappedBuffer()
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    cell_errors = []
    with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
        for number, source in enumerate(job["sources"]):
            signal.setitimer(signal.ITIMER_REAL, job["cell_timeout_s"])
            try:
                exec(compile(_strip_magics(source), f"<cell {number}>", "exec"), namespace)
            except CellTimeout:
                cell_errors.append(f"a cell ran past {job['cell_timeout_s']:g} s and was stopped")
            except BaseException as exc:  # noqa: BLE001 - any failure of a student cell
                cell_errors.append(f"a cell raised {type(exc).__name__}")
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)

        func = namespace.get(function["name"])
        outcomes = []
        # One time budget for all the calls: after a call runs out of it, the rest are
        # not attempted.
        budget = float(function["call_timeout_s"])
        for case in cases:
            if not callable(func):
                outcomes.append(core.Outcome(error=f"no function named {function['name']} was defined"))
                continue
            if budget <= 0:
                outcomes.append(core.Outcome(error="not run: the time limit was spent"))
                continue
            signal.setitimer(signal.ITIMER_REAL, budget)
            start = time.monotonic()
            try:
                outcomes.append(core.call_case(func, case, device, cache))
            except CellTimeout:
                outcomes.append(core.Outcome(error=f"ran past the time limit of {function['call_timeout_s']:g} s"))
                budget = 0
            except BaseException as exc:  # noqa: BLE001
                outcomes.append(core.Outcome(error=f"raised {type(exc).__name__}"))
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            budget -= time.monotonic() - start

    skeleton, arrays = encoding.encode_outcomes(outcomes)
    blob = encoding.pack_result(skeleton, cell_errors, arrays)
    view = memoryview(blob)
    while view:
        written = os.write(result_fd, view)
        view = view[written:]
    os._exit(0)


def _collect(pid: int, read_fd: int, deadline: float, cap: int) -> tuple[int, bytes]:
    """The server's side of one function: reads its result (at most ``cap`` bytes)
    until EOF or the deadline, then reaps it. Returns ``(status, blob)``."""
    chunks, size, status = [], 0, None
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            status = TIMED_OUT
            break
        ready, _, _ = select.select([read_fd], [], [], min(left, 1.0))
        if not ready:
            continue
        chunk = os.read(read_fd, 1 << 16)
        if not chunk:
            break
        size += len(chunk)
        if size > cap:
            status = TOO_LARGE
            break
        chunks.append(chunk)
    os.close(read_fd)
    if status is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _, code = os.waitpid(pid, 0)
    if status is None:
        status = os.waitstatus_to_exitcode(code)
    return status, (b"".join(chunks) if status == 0 else b"")


def main(job_dir: str) -> int:
    """The grading server: imports once, prepares every function's cases, then forks a
    fresh process per function from that warm state, so that each function runs in a
    process of its own (its cells, its crash, its time limit) without paying for the
    imports again. Frames ``(magic, status, length)`` + result go to the grader in
    function order; a function whose process dies gets its exit status and no result."""
    job_path = Path(job_dir)
    job = json.loads((job_path / "job.json").read_text())
    result_channel = _private_result_channel()

    # The grader's imports first, before any student code runs.
    import torch

    from cs_helpers.grading import core, encoding
    import cs_helpers.grading.tiny_models  # noqa: F401  (registers tiny seeded networks)

    # OpenMP's thread team does not survive a fork (a forked process that uses the
    # parent's team hangs): the server computes on one thread and never starts a team;
    # each function's process gets the usual number of threads back.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    job["threads"] = threads
    device = torch.device(job["device"])
    # The modules the instructor's setup cell imports (job["preimport"]), loaded once
    # here so that no function's process imports them again.
    for name in job.get("preimport", []):
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a name that is not a module, or a missing one
            pass
    cache: dict = {}
    prepared = []
    for index in range(len(job["functions"])):
        raw_cases = torch.load(job_path / f"cases_{index}.pt", weights_only=True)
        # Models are built on the CPU here (CUDA does not survive a fork) and moved in
        # the function's own process.
        prepared.append([core.Case(args=tuple(core.materialize(c["args"], None, cache)),
                                   kwargs=core.materialize(c["kwargs"], None, cache),
                                   label=c["label"], count_calls=c["count_calls"],
                                   record_torch_calls=c["record_torch_calls"]) for c in raw_cases])
    limit = encoding.MAX_RESULT_BYTES
    for index, function in enumerate(job["functions"]):
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(read_fd)
                os.close(result_channel.fileno())
                _run_function(job, index, prepared[index], device, cache, write_fd)
            finally:
                os._exit(70)
        os.close(write_fd)
        deadline = time.monotonic() + function["wall_s"]
        status, blob = _collect(pid, read_fd, deadline, limit)
        result_channel.write(FRAME_HEADER.pack(FRAME_MAGIC, status, len(blob)) + blob)
        result_channel.flush()
    result_channel.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

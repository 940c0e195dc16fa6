"""Trusted scoring: student code runs in a sandboxed child, the score is computed here.

:func:`trusted_score` writes the check's inputs to a private folder, starts
``cs_helpers.grading.child`` on the student's cell sources inside the OS sandbox
(:mod:`cs_helpers.grading.isolation`: own namespaces, uid ``nobody``, a student build of
the package, resource limits) with a wall-clock limit, reads back at most a bounded
amount of plain arrays, and only then runs the reference in this process and compares.
Whatever happens in the child (an exception, an endless loop, a crash, exhausted memory,
a flood of output, a forged or oversized result) costs that one function its points and
nothing else.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

from .. import device as default_device
from .core import Check, Report, call_case, unique_cases
from .encoding import MAX_RESULT_BYTES, ResultRefused, decode_outcomes, encode_case_inputs, unpack_result
from .isolation import PACKAGE_MOUNT, Limits, require_sandbox, wrap

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
REFERENCE_DIR = PACKAGE_ROOT / "reference"
_JOB_MOUNT = "/job"
# The child puts the package folder first on its path, then runs the job.
_BOOT = ("import sys; sys.path.insert(0, sys.argv[1]); "
         "from cs_helpers.grading.child import main; sys.exit(main(sys.argv[2]))")
_STDERR_CAP = 16 * 1024


def _memory_gb(device: torch.device) -> float:
    value = os.environ.get("CS_HELPERS_CHILD_MEMORY_GB")
    if value is not None:
        return float(value)
    # A CUDA context reserves far more address space than it uses: no RLIMIT_AS then.
    return 0.0 if device.type == "cuda" else 6.0


class _CappedReader(threading.Thread):
    """Drains a pipe, keeping at most ``cap`` bytes (the rest is read and dropped, so
    the child never blocks and the grader never grows)."""

    def __init__(self, stream, cap: int):
        super().__init__(daemon=True)
        self.stream, self.cap = stream, cap
        self.chunks: list[bytes] = []
        self.size = 0
        self.overflow = False

    def run(self):
        while True:
            chunk = self.stream.read(1 << 16)
            if not chunk:
                break
            if self.size + len(chunk) > self.cap:
                self.overflow = True
                chunk = chunk[: max(0, self.cap - self.size)]
            if chunk:
                self.chunks.append(chunk)
                self.size += len(chunk)

    def data(self) -> bytes:
        return b"".join(self.chunks)


def _run_child(job_dir: Path, limits: Limits, sandboxed: bool, timeout_s: float):
    """Runs the child on ``job_dir``; returns ``(returncode or None on timeout,
    result bytes, result overflowed, last stderr line)``."""
    if sandboxed:
        job_dir.chmod(0o755)
        for path in job_dir.iterdir():
            path.chmod(0o644)
        cmd = wrap([sys.executable, "-I", "-c", _BOOT, PACKAGE_MOUNT, _JOB_MOUNT],
                   binds=((job_dir, _JOB_MOUNT, False),), limits=limits,
                   env={"MPLBACKEND": "Agg"})
        cwd = None
    else:  # trusted work, graded without a sandbox at the instructor's explicit request
        cmd = [sys.executable, "-I", "-c", _BOOT, str(PACKAGE_ROOT.parent), str(job_dir)]
        cwd = job_dir
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "MPLBACKEND": "Agg",
           "PYTHONDONTWRITEBYTECODE": "1"}
    for name in ("OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "CS_HELPERS_DATA", "HOME",
                 "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
        if name in os.environ:
            env[name] = os.environ[name]
    process = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               preexec_fn=limits.apply)
    result = _CappedReader(process.stdout, MAX_RESULT_BYTES)
    errors = _CappedReader(process.stderr, _STDERR_CAP)
    result.start()
    errors.start()
    try:
        returncode = process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()  # bwrap's death takes the whole sandbox with it
        process.wait()
        returncode = None
    result.join(10)
    errors.join(10)
    lines = errors.data().decode(errors="replace").strip().splitlines()
    return returncode, result.data(), result.overflow, (lines[-1] if lines else "")


def run_student_function(check: Check, sources: list[str], seed: int, *, device=None,
                         timeout_s: float | None = None, sandboxed: bool | None = None):
    """Runs the function ``check.name`` defined by ``sources`` on the check's cases in
    a sandboxed child process. Returns ``(properties, cases, outcomes by id(case),
    notes)``. ``sandboxed=None`` requires the sandbox unless the instructor explicitly
    allowed grading without one (:func:`cs_helpers.grading.isolation.require_sandbox`)."""
    device = torch.device(device) if device is not None else default_device()
    sandboxed = require_sandbox() if sandboxed is None else sandboxed
    props = check.properties(seed)
    cases = unique_cases(props)
    timeout_s = check.timeout_s if timeout_s is None else timeout_s
    job_dir = Path(tempfile.mkdtemp(prefix="cs-grade-"))
    notes: list[str] = []
    try:
        torch.save(encode_case_inputs(cases), job_dir / "cases.pt")
        job = {
            "function": check.name,
            "sources": list(sources),
            "device": str(device),
            "cell_timeout_s": min(30.0, timeout_s),
            "call_timeout_s": timeout_s,
        }
        (job_dir / "job.json").write_text(json.dumps(job))
        limits = Limits(memory_gb=_memory_gb(device), cpu_s=int(timeout_s * 4) + 120)
        returncode, blob, overflow, detail = _run_child(
            job_dir, limits, sandboxed, timeout_s + 30.0 * len(sources) + 60)
        got = {}
        if returncode is None:
            notes.append("the graded code stopped the grading process (the student's code ran past the time limit)")
        elif returncode != 0 or not blob:
            notes.append("the graded code stopped the grading process"
                         + (f" ({detail[:160]})" if detail and _safe_detail(detail) else ""))
        elif overflow:
            notes.append("the graded code's results were larger than the grader accepts")
        else:
            try:
                skeleton, cell_errors, arrays = unpack_result(blob)
                outcomes = decode_outcomes(skeleton, arrays)
                if len(outcomes) != len(cases):
                    raise ValueError("wrong number of outcomes")
                got = {id(c): o for c, o in zip(cases, outcomes)}
                notes += [str(e)[:200] for e in cell_errors][:5]
            except ResultRefused as exc:
                notes.append(f"the graded code's results were refused: {exc}")
            except Exception:
                notes.append("the graded code's results could not be read back")
        return props, cases, got, notes
    finally:
        shutil.rmtree(job_dir, ignore_errors=True)


def _safe_detail(line: str) -> bool:
    # Only a short reason from the interpreter (MemoryError, Killed), never a traceback.
    return line.startswith(("MemoryError", "RecursionError", "Killed")) or "limit" in line


def reference_outcomes(check: Check, cases, device=None) -> dict:
    """The reference's outcome on each case, computed in this process."""
    device = torch.device(device) if device is not None else default_device()
    reference = check.reference()
    cache: dict = {}
    expected = {}
    for case in cases:
        outcome = call_case(reference, case, device, cache)
        if not outcome.ok:
            raise RuntimeError(f"the reference {check.name} failed on {case.label}: {outcome.error}")
        expected[id(case)] = outcome
    return expected


def trusted_score(check: Check, sources: list[str], seed: int, points: float | None = None, *,
                  device=None, sandboxed: bool | None = None) -> Report:
    """The score of the function ``check.name`` defined by the cell ``sources``,
    computed across the trust boundary."""
    props, cases, got, notes = run_student_function(check, sources, seed, device=device,
                                                     sandboxed=sandboxed)
    expected = reference_outcomes(check, cases, device)
    report = check.evaluate(props, expected, got, points)
    report.errors = list(dict.fromkeys(report.errors + notes))
    return report

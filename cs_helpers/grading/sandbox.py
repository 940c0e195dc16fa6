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
from typing import Sequence

import torch

from .. import device as default_device
from .core import Check, Report, call_case, unique_cases
from .child import FRAME_HEADER, FRAME_MAGIC, TIMED_OUT, TOO_LARGE
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


def _run_server(job_dir: Path, limits: Limits, sandboxed: bool, timeout_s: float, cap: int):
    """Runs the grading server on ``job_dir``; returns ``(returncode or None on
    timeout, the bytes it sent (at most ``cap``), whether it sent more, the last line
    of its stderr)``."""
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
    result = _CappedReader(process.stdout, cap)
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


def _frames(data: bytes, count: int) -> list[tuple[int, bytes]]:
    """The server's frames, in order, as far as they are well formed."""
    frames, offset, size = [], 0, FRAME_HEADER.size
    while len(frames) < count and offset + size <= len(data):
        magic, status, length = FRAME_HEADER.unpack_from(data, offset)
        if magic != FRAME_MAGIC or length > MAX_RESULT_BYTES or offset + size + length > len(data):
            break
        frames.append((status, data[offset + size: offset + size + length]))
        offset += size + length
    return frames


def _status_note(status: int, detail: str) -> str:
    if status == TIMED_OUT:
        return "the graded code stopped the grading process (the student's code ran past the time limit)"
    if status == TOO_LARGE:
        return "the graded code's results were larger than the grader accepts"
    return ("the graded code stopped the grading process"
            + (f" ({detail[:160]})" if detail and _safe_detail(detail) else ""))


def run_student_functions(checks: list[Check], sources: list[str], seeds: list[int], *, device=None,
                          sandboxed: bool | None = None, preimport: Sequence[str] = ()) -> list[tuple]:
    """Runs the functions ``checks[i].name`` defined by ``sources``, each on the cases of
    its check drawn with ``seeds[i]``, in one sandboxed grading server that forks a
    fresh process per function (:mod:`cs_helpers.grading.child`). A function whose
    process or server dies costs only itself: the server is started again for the
    functions after it. Returns, per check, ``(properties, cases, outcomes by
    id(case), notes)``. ``sandboxed=None`` requires the sandbox unless the instructor
    explicitly allowed grading without one
    (:func:`cs_helpers.grading.isolation.require_sandbox`). ``preimport``: modules the
    server imports before it forks (the imports of the instructor's setup cell,
    :func:`setup_imports`), so that each function's process finds them loaded instead
    of importing them again (matplotlib's pyplot alone takes about 0.4 s)."""
    device = torch.device(device) if device is not None else default_device()
    sandboxed = require_sandbox() if sandboxed is None else sandboxed
    plans = []
    for check, seed in zip(checks, seeds):
        props = check.properties(seed)
        plans.append((check, props, unique_cases(props)))
    results: list[tuple | None] = [None] * len(plans)
    pending = list(range(len(plans)))
    while pending:
        job_dir = Path(tempfile.mkdtemp(prefix="cs-grade-"))
        try:
            functions = []
            for slot, index in enumerate(pending):
                check, _, cases = plans[index]
                torch.save(encode_case_inputs(cases), job_dir / f"cases_{slot}.pt")
                functions.append({"name": check.name, "call_timeout_s": check.timeout_s,
                                  "wall_s": check.timeout_s + 30.0 * len(sources) + 30})
            (job_dir / "job.json").write_text(json.dumps({
                "functions": functions, "sources": list(sources), "device": str(device),
                "preimport": list(preimport),
                "cell_timeout_s": min(30.0, min(f["call_timeout_s"] for f in functions)),
            }))
            limits = Limits(memory_gb=_memory_gb(device),
                            cpu_s=int(sum(4 * f["wall_s"] for f in functions)) + 120)
            returncode, data, _, detail = _run_server(
                job_dir, limits, sandboxed, sum(f["wall_s"] for f in functions) + 120,
                len(functions) * (MAX_RESULT_BYTES + FRAME_HEADER.size))
        finally:
            shutil.rmtree(job_dir, ignore_errors=True)
        frames = _frames(data, len(pending))
        for (status, blob), index in zip(frames, pending):
            results[index] = _outcomes(plans[index], status, blob, detail)
        if len(frames) < len(pending):
            # The server died while this function ran: it costs only that function.
            index = pending[len(frames)]
            status = TIMED_OUT if returncode is None else -1
            results[index] = _outcomes(plans[index], status, b"", detail)
            pending = pending[len(frames) + 1:]
        else:
            pending = []
    return results


def _outcomes(plan, status: int, blob: bytes, detail: str) -> tuple:
    _, props, cases = plan
    notes, got = [], {}
    if status != 0 or not blob:
        notes.append(_status_note(status, detail))
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


def run_student_function(check: Check, sources: list[str], seed: int, *, device=None,
                         sandboxed: bool | None = None):
    """:func:`run_student_functions` for one function."""
    return run_student_functions([check], sources, [seed], device=device, sandboxed=sandboxed)[0]


def setup_imports(source: str) -> list[str]:
    """The absolute modules that the cell ``source`` imports, in order: ``import a.b``
    gives ``a.b``; ``from a import b, c`` gives ``a``, ``a.b`` and ``a.c`` (names that
    are not modules fail to import in the server and are skipped there). Nothing for a
    cell that does not parse."""
    import ast

    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names if alias.name != "*"]
    return list(dict.fromkeys(names))


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
    return trusted_scores([check], sources, [seed], [points], device=device, sandboxed=sandboxed)[0]


def trusted_scores(checks: list[Check], sources: list[str], seeds: list[int], points: list, *,
                   device=None, sandboxed: bool | None = None, preimport: Sequence[str] = ()) -> list[Report]:
    """The scores of several functions of one submission: one grading server, one fresh
    process per function, each compared with the reference here."""
    runs = run_student_functions(checks, sources, seeds, device=device, sandboxed=sandboxed,
                                 preimport=preimport)
    reports = []
    for check, pts, (props, cases, got, notes) in zip(checks, points, runs):
        expected = reference_outcomes(check, cases, device)
        report = check.evaluate(props, expected, got, pts)
        report.errors = list(dict.fromkeys(report.errors + notes))
        reports.append(report)
    return reports

"""Trusted scoring: student code runs in a child process, the score is computed here.

:func:`trusted_score` writes the check's inputs to a private folder, starts
``python -I -m cs_helpers.grading.child`` on the student's cell sources with a wall-
clock limit, reads back plain arrays, and only then runs the reference in this process
and compares. Whatever happens in the child (an exception, an endless loop, a crash,
exhausted memory, garbage on disk) costs that one function its points and nothing else.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from .. import device as default_device
from .core import Check, Report, call_case, unique_cases
from .encoding import decode_outcomes, encode_case_inputs

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
REFERENCE_DIR = PACKAGE_ROOT / "reference"


def _memory_gb(device: torch.device) -> float:
    value = os.environ.get("CS_HELPERS_CHILD_MEMORY_GB")
    if value is not None:
        return float(value)
    # A CUDA context reserves far more address space than it uses: no RLIMIT_AS then.
    return 0.0 if device.type == "cuda" else 6.0


def _child_env() -> dict:
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS",
            "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "MKL_NUM_THREADS", "TMPDIR", "CS_HELPERS_DATA")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["MPLBACKEND"] = "Agg"
    return env


def run_student_function(check: Check, sources: list[str], seed: int, *,
                         forbidden: list[str] = (), device=None,
                         timeout_s: float | None = None):
    """Runs the function ``check.name`` defined by ``sources`` on the check's cases in
    a child process. Returns ``(properties, outcomes by id(case), notes)``."""
    device = torch.device(device) if device is not None else default_device()
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
            "memory_gb": _memory_gb(device),
            "cpu_s": int(timeout_s * 4) + 120,
            "cell_timeout_s": min(30.0, timeout_s),
            "call_timeout_s": timeout_s,
            "forbidden": [str(REFERENCE_DIR), *map(str, forbidden)],
        }
        (job_dir / "job.json").write_text(json.dumps(job))
        try:
            completed = subprocess.run(
                [sys.executable, "-I", "-m", "cs_helpers.grading.child", str(job_dir)],
                cwd=job_dir, env=_child_env(), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                timeout=timeout_s + 30.0 * len(sources) + 60,
            )
            crashed = completed.returncode != 0
            detail = completed.stderr.decode(errors="replace").strip().splitlines()[-1:] if crashed else []
        except subprocess.TimeoutExpired:
            crashed, detail = True, ["the student's code ran past the time limit"]
        got = {}
        result_file = job_dir / "result.json"
        if not crashed and result_file.is_file():
            try:
                result = json.loads(result_file.read_text())
                with np.load(job_dir / "arrays.npz", allow_pickle=False) as arrays:
                    outcomes = decode_outcomes(result["outcomes"], arrays)
                if len(outcomes) != len(cases):
                    raise ValueError("wrong number of outcomes")
                got = {id(c): o for c, o in zip(cases, outcomes)}
                notes += [str(e)[:200] for e in result.get("cell_errors", [])][:5]
            except Exception:
                notes.append("the graded code's results could not be read back")
        else:
            notes.append("the graded code stopped the grading process"
                         + (f" ({detail[0][:160]})" if detail and _safe_detail(detail[0]) else ""))
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
                  forbidden: list[str] = (), device=None) -> Report:
    """The score of the function ``check.name`` defined by the cell ``sources``,
    computed across the trust boundary."""
    props, cases, got, notes = run_student_function(check, sources, seed, forbidden=forbidden,
                                                     device=device)
    expected = reference_outcomes(check, cases, device)
    report = check.evaluate(props, expected, got, points)
    report.errors = list(dict.fromkeys(report.errors + notes))
    return report

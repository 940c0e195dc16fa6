"""nbgrader integration: the sandboxed execution and the trusted score of every graded
function.

:class:`SandboxedExecute` replaces nbgrader's ``Execute``: the notebook's kernel runs in
the OS sandbox (:mod:`cs_helpers.grading.isolation`), and a kernel that dies costs only
the cells it did not reach (the notebook is still graded, and the cell that ended the
kernel says so), where stock nbgrader fails the whole autograde.

:class:`TrustedScores` is an nbgrader preprocessor placed in
``Autograde.autograde_preprocessors`` just before ``SaveAutoGrades``. For every test
cell ``test_<name>`` whose function has a check, it takes the instructor's setup cell
from the gradebook and the student's solution cells from the submission, scores the
function across the trust boundary (:func:`cs_helpers.grading.sandbox.trusted_score`)
and replaces the cell's outputs with that score. Whatever the student's kernel printed
or computed in that cell (including a score it faked) is discarded.

The scores depend on the notebook's sources alone, which nbgrader has fixed (locked
cells restored from the gradebook) before these preprocessors run. So
:class:`StartTrustedScores`, placed first, starts the scoring in a thread of the grader
while the kernel executes the notebook, each in its own sandbox; :class:`TrustedScores`
waits for it. Nothing is shared between the two sandboxes, and the scores are the same
as when computed afterwards.

Importing this module imports every check and reference, so that the grader holds its
own code in memory before any student code runs.
"""
from __future__ import annotations

import threading

from nbformat.v4 import new_output
from nbgrader.api import Gradebook
from nbgrader.preprocessors import Execute, NbGraderPreprocessor
from traitlets import Bool, Unicode

from ..execution import SlicedReplyWait
from . import isolation, registry
from .sandbox import trusted_scores

SETUP_CELL_ID = "setup"
KERNEL_DIED = ("The kernel stopped while running this cell (the code ended the process, "
               "crashed it or exhausted its memory); the cells after it were not run. "
               "Every graded function is still scored on its own.")


def preload() -> None:
    """Imports every check and every reference implementation now."""
    import importlib

    for name, check in registry.load_all().items():
        try:
            importlib.import_module(f"cs_helpers.reference.{check.topic}")
        except ModuleNotFoundError:
            pass


preload()


def _grade_id(cell) -> str | None:
    return cell.get("metadata", {}).get("nbgrader", {}).get("grade_id")


class SandboxedExecute(SlicedReplyWait, Execute):
    """nbgrader's ``Execute`` with the kernel in the OS sandbox, surviving its death,
    waiting for replies in slices (:mod:`cs_helpers.execution`)."""

    def preprocess(self, nb, resources, retries=None):
        if isolation.require_sandbox():
            self.kernel_manager_class = isolation._kernel_manager_class()
        self._running = None
        try:
            return super().preprocess(nb, resources)
        except Exception as exc:  # the kernel died (or stopped answering) mid-notebook
            if self._running is None:
                raise
            index = self._running
            self.log.warning("The kernel died in cell %s (%s); the notebook is graded anyway.",
                             index, type(exc).__name__)
            cell = nb.cells[index]
            cell.outputs = list(cell.get("outputs", [])) + [new_output(
                "error", ename="KernelDied", evalue=KERNEL_DIED, traceback=[KERNEL_DIED])]
            resources.setdefault("cs_helpers", {})["kernel_died_in_cell"] = index
            return nb, resources

    def preprocess_cell(self, cell, resources, index):
        self._running = index
        return super().preprocess_cell(cell, resources, index)


def _scoring_plan(nb, resources) -> tuple[list[tuple], dict]:
    """The test cells of ``nb`` whose function has a check, as ``(cell, name)`` in
    notebook order, and the keyword arguments of
    :func:`cs_helpers.grading.sandbox.trusted_scores` that score those functions."""
    info = resources["nbgrader"]
    with Gradebook(info["db_url"]) as gb:
        source_nb = gb.find_notebook(info["notebook"], info["assignment"])
        sources = {c.name: c for c in source_nb.source_cells}
        max_scores = {c.name: c.max_score for c in source_nb.grade_cells}
        solution_ids = {c.name for c in source_nb.solution_cells
                        if sources.get(c.name) is not None and sources[c.name].cell_type == "code"}
    setup = sources[SETUP_CELL_ID].source if SETUP_CELL_ID in sources else ""
    student_cells = [cell.source for cell in nb.cells
                     if cell.cell_type == "code" and _grade_id(cell) in solution_ids]
    secret = registry.course_secret()
    checks = registry.load_all()
    graded = [(cell, _grade_id(cell)[len("test_"):]) for cell in nb.cells
              if cell.cell_type == "code" and (_grade_id(cell) or "").startswith("test_")]
    graded = [(cell, name) for cell, name in graded if name in checks and f"test_{name}" in max_scores]
    names = [name for _, name in graded]
    return graded, {"checks": [checks[name] for name in names], "sources": [setup, *student_cells],
                   "seeds": [registry.hidden_seed(name, secret) for name in names],
                   "points": [max_scores[f"test_{name}"] for name in names]}


class _Scoring(threading.Thread):
    """:func:`trusted_scores` in a thread; ``result()`` waits for it and returns its
    reports, or raises what it raised."""

    def __init__(self, names, kwargs):
        super().__init__(name="cs-helpers-trusted-scores", daemon=True)
        self.names, self.kwargs = names, kwargs
        self._reports, self._error = None, None

    def run(self):
        try:
            self._reports = trusted_scores(**self.kwargs)
        except BaseException as exc:  # handed to the thread that waits for the result
            self._error = exc

    def result(self):
        self.join()
        if self._error is not None:
            raise self._error
        return self._reports


_EARLY_SCORING = "trusted_scores_started"


class StartTrustedScores(NbGraderPreprocessor):
    """Starts :class:`TrustedScores`' scoring before the notebook is executed (placed
    first in ``Autograde.autograde_preprocessors``): it needs only the sources."""

    enabled = Bool(True, help="Whether to score while the notebook executes.").tag(config=True)
    device = Unicode("", help="Device for grading ('cpu', 'cuda'); empty picks CUDA when present.").tag(config=True)

    def preprocess(self, nb, resources):
        if not self.enabled:
            return nb, resources
        graded, kwargs = _scoring_plan(nb, resources)
        scoring = _Scoring([name for _, name in graded], {**kwargs, "device": self.device or None, "sandboxed": isolation.require_sandbox()})
        scoring.start()
        resources.setdefault("cs_helpers", {})[_EARLY_SCORING] = scoring
        return nb, resources


class TrustedScores(NbGraderPreprocessor):
    """Replaces the outputs of each autograded test cell with the score computed in
    the grader's own process (started early by :class:`StartTrustedScores` when it ran
    on these very sources)."""

    enabled = Bool(True, help="Whether to recompute scores across the trust boundary.").tag(config=True)
    device = Unicode("", help="Device for grading ('cpu', 'cuda'); empty picks CUDA when present.").tag(config=True)

    def preprocess(self, nb, resources):
        if not self.enabled:
            return nb, resources
        early = resources.get("cs_helpers", {}).pop(_EARLY_SCORING, None)
        graded, kwargs = _scoring_plan(nb, resources)
        names = [name for _, name in graded]
        if early is not None and early.names == names and early.kwargs["sources"] == kwargs["sources"] \
                and early.kwargs["device"] == (self.device or None):
            reports = early.result()
        else:
            if early is not None:
                early.join()  # sources changed since it started: score them again, one scoring at a time
            reports = trusted_scores(**kwargs, device=self.device or None, sandboxed=isolation.require_sandbox())
        died_in = resources.get("cs_helpers", {}).get("kernel_died_in_cell")
        positions = {id(cell): i for i, cell in enumerate(nb.cells)}
        told = False
        for (cell, name), report in zip(graded, reports):
            self.log.info("Trusted score of %s: %s / %s", name, report.score, report.points)
            count = cell.get("execution_count") or 1
            note = ""
            if died_in is not None and not told and positions[id(cell)] >= died_in:
                told = True  # said once, in the graded cell where the kernel stopped or the first after it
                note = (KERNEL_DIED if positions[id(cell)] == died_in else
                        f"The kernel stopped while running cell {died_in + 1} of the notebook, before this one; "
                        "the cells after it were not run. Every graded function is still scored on its own.") + "\n"
            cell.outputs = [
                new_output("stream", name="stdout", text=note + report.message + "\n"),
                new_output("execute_result", data={"text/plain": repr(float(report.score))},
                           execution_count=count),
            ]
        return nb, resources

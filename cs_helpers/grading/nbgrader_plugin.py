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

Importing this module does not import PyTorch: the scoring thread imports the checks and
every reference implementation (:func:`preload`) before it starts the grading server, so
that the grader's PyTorch import overlaps the kernel's start instead of delaying it. The
student's kernel cannot change what the grader imports: its sandbox mounts the Python
installation read-only and does not see the package's reference at all.
"""
from __future__ import annotations

import threading

from nbformat.v4 import new_output
from nbgrader.api import Gradebook
from nbgrader.preprocessors import Execute, NbGraderPreprocessor
from traitlets import Bool, Unicode

from ..execution import SlicedReplyWait
from . import isolation

SETUP_CELL_ID = "setup"
KERNEL_DIED = ("The kernel stopped while running this cell (the code ended the process, "
               "crashed it or exhausted its memory); the cells after it were not run. "
               "Every graded function is still scored on its own.")


def preload() -> None:
    """Imports every check and every reference implementation now."""
    import importlib

    from . import registry

    for name, check in registry.load_all().items():
        try:
            importlib.import_module(f"cs_helpers.reference.{check.topic}")
        except ModuleNotFoundError:
            pass


def _score(**kwargs):
    """:func:`cs_helpers.grading.sandbox.trusted_scores` (imported on first use)."""
    from .sandbox import trusted_scores

    return trusted_scores(**kwargs)


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


def _cells(nb) -> list[tuple[str, str | None, str]]:
    """``(cell_type, grade_id, source)`` of every cell of ``nb``: what the scoring
    depends on, copied so that a thread can plan while the kernel fills in outputs."""
    return [(cell.cell_type, _grade_id(cell), cell.source) for cell in nb.cells]


def _scoring_plan(cells, info) -> tuple[list[tuple[int, str]], dict]:
    """For the notebook whose cells are ``cells`` (:func:`_cells`) and nbgrader's
    ``resources["nbgrader"]`` ``info``: the test cells whose function has a check, as
    ``(cell index, function name)`` in notebook order, and the keyword arguments of
    :func:`cs_helpers.grading.sandbox.trusted_scores` that score those functions."""
    from . import registry
    from .sandbox import setup_imports

    with Gradebook(info["db_url"]) as gb:
        source_nb = gb.find_notebook(info["notebook"], info["assignment"])
        sources = {c.name: c for c in source_nb.source_cells}
        max_scores = {c.name: c.max_score for c in source_nb.grade_cells}
        solution_ids = {c.name for c in source_nb.solution_cells
                        if sources.get(c.name) is not None and sources[c.name].cell_type == "code"}
    setup = sources[SETUP_CELL_ID].source if SETUP_CELL_ID in sources else ""
    student_cells = [source for cell_type, grade_id, source in cells
                     if cell_type == "code" and grade_id in solution_ids]
    secret = registry.course_secret()
    checks = registry.load_all()
    graded = [(index, grade_id[len("test_"):]) for index, (cell_type, grade_id, _) in enumerate(cells)
              if cell_type == "code" and (grade_id or "").startswith("test_")]
    graded = [(index, name) for index, name in graded if name in checks and f"test_{name}" in max_scores]
    names = [name for _, name in graded]
    return graded, {"checks": [checks[name] for name in names], "sources": [setup, *student_cells],
                   "seeds": [registry.hidden_seed(name, secret) for name in names],
                   "points": [max_scores[f"test_{name}"] for name in names],
                   "preimport": setup_imports(setup)}


class _Scoring(threading.Thread):
    """Plans and scores in a thread (:func:`preload`, :func:`_scoring_plan`,
    :func:`_score`). ``join()``, then ``plan`` is ``(names, sources)`` of what it
    scored (None if planning failed) and ``result()`` returns the reports or raises
    what the thread raised."""

    def __init__(self, cells, info, device, sandboxed):
        super().__init__(name="cs-helpers-trusted-scores", daemon=True)
        self.cells, self.info, self.device, self.sandboxed = cells, info, device, sandboxed
        self.plan = None
        self._reports, self._error = None, None

    def run(self):
        try:
            preload()
            graded, kwargs = _scoring_plan(self.cells, self.info)
            self.plan = ([name for _, name in graded], kwargs["sources"])
            self._reports = _score(**kwargs, device=self.device, sandboxed=self.sandboxed)
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
        scoring = _Scoring(_cells(nb), resources["nbgrader"], self.device or None, isolation.require_sandbox())
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
        device = self.device or None
        if early is not None:
            early.join()
        preload()
        graded, kwargs = _scoring_plan(_cells(nb), resources["nbgrader"])
        names = [name for _, name in graded]
        if early is not None and early.plan == (names, kwargs["sources"]) and early.device == device:
            reports = early.result()
        else:  # the sources changed since it started (or it could not plan): score them again
            reports = _score(**kwargs, device=device, sandboxed=isolation.require_sandbox())
        died_in = resources.get("cs_helpers", {}).get("kernel_died_in_cell")
        told = False
        for (index, name), report in zip(graded, reports):
            cell = nb.cells[index]
            self.log.info("Trusted score of %s: %s / %s", name, report.score, report.points)
            count = cell.get("execution_count") or 1
            note = ""
            if died_in is not None and not told and index >= died_in:
                told = True  # said once, in the graded cell where the kernel stopped or the first after it
                note = (KERNEL_DIED if index == died_in else
                        f"The kernel stopped while running cell {died_in + 1} of the notebook, before this one; "
                        "the cells after it were not run. Every graded function is still scored on its own.") + "\n"
            cell.outputs = [
                new_output("stream", name="stdout", text=note + report.message + "\n"),
                new_output("execute_result", data={"text/plain": repr(float(report.score))},
                           execution_count=count),
            ]
        return nb, resources

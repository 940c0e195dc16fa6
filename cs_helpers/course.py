"""The course's commands: grade submissions, write the student release, run the
walkthrough. ``cs-helpers`` (cs_helpers.cli) and the tests call these functions.

Grading drives nbgrader's own pipeline through its Python API in a temporary course
directory: ``generate_assignment`` on the source notebook, then ``autograde`` on the
submission, then the scores are read from the gradebook.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
STUDENT_ID = "student"


def source_notebooks(notebooks_dir: Path = NOTEBOOKS_DIR) -> list[Path]:
    """The source notebooks, in course order (``NN_topic/topic.ipynb``)."""
    return sorted(p for p in Path(notebooks_dir).glob("[0-9][0-9]_*/*.ipynb")
                  if ".ipynb_checkpoints" not in p.parts)


def find_source(submission: Path, notebooks_dir: Path = NOTEBOOKS_DIR) -> Path:
    """The source notebook with the same file name as ``submission``."""
    matches = [p for p in source_notebooks(notebooks_dir) if p.name == Path(submission).name]
    if not matches:
        known = ", ".join(p.name for p in source_notebooks(notebooks_dir)) or "none"
        raise ValueError(f"no source notebook is named {Path(submission).name!r}; the course has: {known}")
    return matches[0]


@contextlib.contextmanager
def _venv_on_path():
    """nbgrader runs ``alembic`` from PATH when it creates a gradebook: put this
    interpreter's bin/ first. Kernels started meanwhile draw inline figures, whatever
    matplotlib backend the calling process chose (``MPLBACKEND=Agg`` would leave
    executed notebooks without pictures)."""
    old_path, old_backend = os.environ.get("PATH", ""), os.environ.pop("MPLBACKEND", None)
    os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + old_path
    try:
        yield
    finally:
        os.environ["PATH"] = old_path
        if old_backend is not None:
            os.environ["MPLBACKEND"] = old_backend


def fresh_gradebook(path: Path) -> Path:
    """Creates the empty SQLite gradebook ``path`` as nbgrader's ``Gradebook`` does on
    first use (its tables, and the ``alembic_version`` of nbgrader's newest migration),
    without the ``alembic heads`` subprocess nbgrader starts for the version (3.5 s per
    fresh gradebook here, most of a short notebook's grading overhead)."""
    from alembic.script import ScriptDirectory
    from nbgrader.api import Base
    from nbgrader.dbutil import ALEMBIC_DIR
    from sqlalchemy import create_engine, text

    path = Path(path)
    if path.exists():
        raise FileExistsError(f"a gradebook already exists at {str(path)!r}")
    engine = create_engine(f"sqlite:///{path}", future=True)
    try:
        Base.metadata.create_all(bind=engine)
        with engine.begin() as connection:
            connection.execute(text("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL);"))
            connection.execute(text("INSERT INTO alembic_version (version_num) VALUES (:head)"),
                               {"head": ScriptDirectory(ALEMBIC_DIR).get_current_head()})
    finally:
        engine.dispose()
    return path


def _api(root: Path, source_directory: str, trusted: bool = True, db_url: str | None = None,
         execute_timeout_s: float | None = None, course_id: str = "course"):
    """nbgrader's API on the course directory ``root``; ``db_url`` replaces the
    gradebook at ``root/gradebook.db``, ``execute_timeout_s`` the time limit of one
    cell in the student's kernel."""
    from nbgrader.apps import NbGraderAPI
    from traitlets.config import Config

    from .grading.nbgrader_settings import configure

    config = Config()
    configure(config, root=str(root), source_directory=source_directory)
    config.Exchange.root = str(root / "exchange")
    config.CourseDirectory.course_id = course_id
    config.TrustedScores.enabled = trusted
    config.StartTrustedScores.enabled = trusted
    if db_url is not None:
        config.CourseDirectory.db_url = db_url
    if execute_timeout_s is not None:
        config.Execute.timeout = int(execute_timeout_s)
    return NbGraderAPI(config=config)


def _check(result: dict, what: str) -> None:
    if not result.get("success"):
        log = ((result.get("error") or "") + "\n" + (result.get("log") or "")).strip()
        cause = _cause(log)
        raise RuntimeError(f"nbgrader {what} failed: {cause}\n{log[-3000:]}")


def _cause(log: str) -> str:
    """The line of an nbgrader log that says why it failed (the last error line)."""
    lines = [line.strip() for line in log.splitlines()
             if line.strip() and "Removing failed assignment" not in line]  # the consequence, not the cause
    for line in reversed(lines):
        if "Error" in line or "refusing" in line or "failed" in line.lower():
            return line[:500]
    return lines[-1][:500] if lines else "no reason given"


class GradebookTampered(RuntimeError):
    """A fresh autograde found scores that only a person or the student could have set."""


@contextlib.contextmanager
def _sandbox_choice(sandboxed: bool):
    """``sandboxed=False`` (``--no-sandbox``) lets this process grade without the OS
    sandbox: for one's own trusted work only."""
    from .grading import isolation

    if sandboxed:
        isolation.require_sandbox()
        yield
        return
    old = os.environ.get(isolation.UNSANDBOXED_ENV)
    os.environ[isolation.UNSANDBOXED_ENV] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(isolation.UNSANDBOXED_ENV, None)
        else:
            os.environ[isolation.UNSANDBOXED_ENV] = old


@dataclass
class NotebookScore:
    notebook: str
    assignment: str
    score: float
    max_score: float
    cells: list[dict] = field(default_factory=list)  # grade_id, score, max_score, message
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"notebook": self.notebook, "assignment": self.assignment, "score": self.score,
                "max_score": self.max_score, "seconds": round(self.seconds, 1), "cells": self.cells}


def _messages(autograded: Path) -> dict[str, str]:
    import nbformat

    out = {}
    if not autograded.is_file():
        return out
    nb = nbformat.read(autograded, as_version=4)
    for cell in nb.cells:
        grade_id = cell.get("metadata", {}).get("nbgrader", {}).get("grade_id")
        if grade_id and cell.cell_type == "code":
            out[grade_id] = "".join(o.get("text", "") for o in cell.get("outputs", [])
                                    if o.get("output_type") == "stream" and o.get("name") == "stdout").strip()
    return out


@dataclass
class GradedNotebook:
    """What grading one notebook produces: the scores, the autograded notebook (the
    bytes of its ``.ipynb`` file), the feedback page (HTML, empty unless asked for) and
    the values nbgrader saved in the gradebook (:func:`_gradebook_values`)."""
    score: NotebookScore
    autograded: bytes = b""
    feedback_html: str = ""
    gradebook: dict = field(default_factory=dict)


def _gradebook_values(gb, notebook: str, assignment: str, student: str) -> dict:
    """The values that nbgrader's autograde wrote for one submitted notebook: the
    submission's ``timestamp`` (ISO text or None), ``late_submission_penalty``,
    ``grades`` {cell name: {"auto_score", "needs_manual_grade"}} and ``comments``
    {cell name: auto_comment}."""
    nb = gb.find_submission_notebook(notebook, assignment, student)
    timestamp = nb.assignment.timestamp
    return {"timestamp": timestamp.isoformat() if timestamp is not None else None,
            "late_submission_penalty": nb.late_submission_penalty,
            "grades": {g.name: {"auto_score": g.auto_score, "needs_manual_grade": bool(g.needs_manual_grade)}
                       for g in nb.grades},
            "comments": {c.name: c.auto_comment for c in nb.comments}}


def grade_notebook(submission, source, workdir=None, trusted: bool = True, sandboxed: bool = True,
                   feedback: bool = False, execute_timeout_s: float | None = None,
                   timestamp: str | None = None) -> GradedNotebook:
    """Autogrades the notebook ``submission`` against the source notebook ``source``
    (``ASSIGNMENT/NAME.ipynb``; the submission is graded as ``NAME.ipynb``), as
    :func:`grade_submission` describes, and keeps what the temporary course held: the
    autograded notebook, the feedback page (``feedback=True``) and the gradebook's
    values. ``timestamp`` is the submission's ``timestamp.txt`` (nbgrader's late
    penalties), ``execute_timeout_s`` the limit of one cell in the student's kernel
    (default: the course's)."""
    from nbgrader.api import Gradebook

    submission, source = Path(submission), Path(source)
    if not submission.is_file():
        raise FileNotFoundError(f"no submission at {str(submission)!r}")
    assignment = source.parent.name
    start = time.perf_counter()
    with (_sandbox_choice(sandboxed), tempfile.TemporaryDirectory(prefix="cs-course-", dir=workdir) as tmp,
          _venv_on_path()):
        if sandboxed:
            from .grading.isolation import start_kernel_early

            start_kernel_early()  # it starts while nbgrader prepares the submission
        root = Path(tmp)
        shutil.copytree(source.parent, root / "source" / assignment,
                        ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__"))
        fresh_gradebook(root / "gradebook.db")
        api = _api(root, "source", trusted=trusted, execute_timeout_s=execute_timeout_s)
        _check(api.generate_assignment(assignment, force=True, create=True), "generate_assignment")
        target = root / "submitted" / STUDENT_ID / assignment
        target.mkdir(parents=True)
        shutil.copy(submission, target / source.name)
        if timestamp is not None:
            (target / "timestamp.txt").write_text(timestamp)
        _check(api.autograde(assignment, STUDENT_ID, force=True, create=True), "autograde")
        autograded = root / "autograded" / STUDENT_ID / assignment / source.name
        messages = _messages(autograded)
        with Gradebook(f"sqlite:///{root / 'gradebook.db'}") as gb:
            nb = gb.find_submission_notebook(source.stem, assignment, STUDENT_ID)
            cells = []
            for grade in sorted(nb.grades, key=lambda g: g.name):
                if grade.manual_score is not None or grade.extra_credit:
                    raise GradebookTampered(
                        f"refusing the scores of {submission}: the fresh gradebook holds a manual score "
                        f"or extra credit for {grade.name}, which only something other than the grader "
                        "could have written")
                if grade.cell.cell_type != "code":
                    continue  # written answers are graded by hand
                cells.append({"grade_id": grade.name, "score": float(grade.auto_score or 0.0),
                              "max_score": float(grade.max_score), "message": messages.get(grade.name, "")})
            result = GradedNotebook(NotebookScore(source.name, assignment, sum(c["score"] for c in cells),
                                                  sum(c["max_score"] for c in cells), cells),
                                    gradebook=_gradebook_values(gb, source.stem, assignment, STUDENT_ID))
        result.autograded = autograded.read_bytes() if autograded.is_file() else b""
        if feedback:
            _check(api.generate_feedback(assignment, STUDENT_ID, force=True), "generate_feedback")
            page = root / "feedback" / STUDENT_ID / assignment / source.with_suffix(".html").name
            result.feedback_html = page.read_text(encoding="utf-8")
    result.score.seconds = time.perf_counter() - start
    return result


def grade_submission(submission, notebooks_dir: Path = NOTEBOOKS_DIR, workdir=None,
                     trusted: bool = True, sandboxed: bool = True) -> NotebookScore:
    """Autogrades one submitted notebook against the source notebook of the same name.

    The submission is copied into a fresh temporary course directory; nothing is
    written next to it. Returns the trusted automatic score of every autograded test
    cell; a manual score or extra credit found in the fresh gradebook (which only a
    process other than the grader could have written) raises :class:`GradebookTampered`.
    ``sandboxed=False`` grades without the OS sandbox (own, trusted work only; without
    it a machine with no sandbox refuses). ``trusted=False`` turns off the trust
    boundary (stock nbgrader scoring); it exists to demonstrate what the boundary
    prevents, never for real grading."""
    submission = Path(submission)
    if not submission.is_file():
        raise FileNotFoundError(f"no submission at {str(submission)!r}")
    return grade_notebook(submission, find_source(submission, notebooks_dir), workdir=workdir,
                          trusted=trusted, sandboxed=sandboxed).score


def release(out_dir, notebooks_dir: Path = NOTEBOOKS_DIR) -> Path:
    """Writes the student release to ``out_dir``: every notebook without solutions or
    hidden tests (``nbgrader generate_assignment``), and ``cs_helpers`` without
    ``cs_helpers.reference``, with the files needed to install it."""
    out_dir = Path(out_dir).resolve()
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{str(out_dir)!r} exists and is not empty; choose a new folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cs-release-") as tmp, _venv_on_path():
        root = Path(tmp)
        shutil.copytree(notebooks_dir, root / "source",
                        ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__"))
        fresh_gradebook(root / "gradebook.db")
        api = _api(root, "source")
        for notebook in source_notebooks(root / "source"):
            _check(api.generate_assignment(notebook.parent.name, force=True, create=True), "generate_assignment")
        shutil.copytree(root / "release", out_dir / "notebooks")
    shutil.copytree(REPO_ROOT / "cs_helpers", out_dir / "cs_helpers",
                    ignore=shutil.ignore_patterns("reference", "__pycache__", "*.pyc"))
    data = REPO_ROOT / "data"
    if data.is_dir():
        shutil.copytree(data, out_dir / "data", ignore=shutil.ignore_patterns("downloads"))
    for name in ("pyproject.toml", "LICENSE"):
        if (REPO_ROOT / name).is_file():
            shutil.copy(REPO_ROOT / name, out_dir / name)
    # The students' own README (the instructor's describes make, tests and grading), and
    # the conda environment without the development tools, installing the folder itself.
    shutil.copy(STUDENT_README, out_dir / "README.md")
    # The student's JupyterLab settings (nbgrader's student-side tools only, no news
    # prompt): `jupyter lab --config=jupyter/jupyter_server_config.py` in the release.
    shutil.copytree(REPO_ROOT / "jupyter" / "student", out_dir / "jupyter",
                    ignore=shutil.ignore_patterns("__pycache__"))
    environment = REPO_ROOT / "environment.yml"
    if environment.is_file():
        (out_dir / "environment.yml").write_text(_student_environment(environment.read_text()))
    return out_dir


#: The README of the student release (install, JupyterLab, checks, what to submit).
STUDENT_README = REPO_ROOT / "docs" / "student-readme.md"


def _student_environment(text: str) -> str:
    """``environment.yml`` for the release: the dependencies without the development
    extra, and a regular install of the release folder (``.``) instead of ``-e .``."""
    lines = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") and "development" in stripped:
            break  # the [dev] extra follows, up to the editable install
        if stripped == "- -e .":
            break
        lines.append(line)
    indent = next((line[: len(line) - len(line.lstrip())] for line in reversed(lines)
                   if line.strip().startswith("- ")), "      ")
    lines.append(f"{indent}- .")
    return "\n".join(lines) + "\n"


def _notebook_path(name) -> Path:
    """A notebook given as a path, a topic (``saliency``), a number (``03``) or both
    (``03_saliency``)."""
    path = Path(name)
    if path.suffix == ".ipynb" and path.is_file():
        return path
    for source in source_notebooks():
        number, _, topic = source.parent.name.partition("_")
        if str(name) in (number, topic, source.parent.name, source.name):
            return source
    known = ", ".join(p.parent.name for p in source_notebooks())
    raise ValueError(f"no notebook {str(name)!r}: give a notebook file, or one of {known} "
                     "(the number or the topic alone will do)")


@dataclass
class WalkthroughRow:
    notebook: str
    seconds: float
    status: str


def walkthrough(out_dir=REPO_ROOT / "build" / "walkthrough", notebooks=None,
                timeout_s: int = 600) -> list[WalkthroughRow]:
    """Executes every source notebook (with solutions) on the embedded default and
    writes the executed notebook and its HTML to ``out_dir``."""
    import nbformat
    from nbconvert import HTMLExporter

    from .execution import CourseNotebookClient

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    paths = [_notebook_path(p) for p in notebooks] if notebooks else source_notebooks()
    with _venv_on_path():
        for path in paths:
            nb = nbformat.read(path, as_version=4)
            start = time.perf_counter()
            status = "ok"
            try:
                CourseNotebookClient(nb, timeout=timeout_s, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}}).execute()
            except Exception as exc:  # record and go on with the next notebook
                status = f"failed: {type(exc).__name__}"
            seconds = time.perf_counter() - start
            nbformat.write(nb, out_dir / path.name)
            html, _ = HTMLExporter().from_notebook_node(nb)
            (out_dir / path.with_suffix(".html").name).write_text(html, encoding="utf-8")
            rows.append(WalkthroughRow(path.name, seconds, status))
    return rows

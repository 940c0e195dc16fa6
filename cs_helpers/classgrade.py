"""Grading a whole class: ``cs-helpers autograde ASSIGNMENT``, run from the course root.

The coordinating process (this one) reads nbgrader's layout
``submitted/<student>/<assignment>/<notebook>.ipynb`` without following any link,
checks every submission, and hands each student's notebook, as bytes, to a Dask task.
A task (:func:`grade_task`) grades it on a worker exactly as ``cs-helpers grade`` does
(:func:`cs_helpers.course.grade_notebook`: a temporary course directory, the OS
sandbox, the trusted scores) and sends back data: the scores, the autograded notebook,
the feedback page and the values nbgrader saved. Only this process writes: the
gradebook (nbgrader's own, at any SQLAlchemy URL; one transaction per submission) and
the course's ``autograded/`` and ``feedback/`` folders.

A submission is graded again only when its content changed (SHA-256 of the notebook,
its ``timestamp.txt`` and the source assignment, kept in the table
``cs_helpers_autograde`` of the same database, written in the same transaction as the
grades) or with ``force=True``. A worker that dies mid-task costs a retry of that task
on another worker (Dask reschedules it); the results arrive here once each.
"""
from __future__ import annotations

import csv
import hashlib
import math
import os
import re
import shutil
import socket
import stat
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .course import NOTEBOOKS_DIR, _api, _check, _venv_on_path, fresh_gradebook

SUBMITTED = "submitted"
TIMESTAMP_FILE = "timestamp.txt"
CHECKPOINTS = ".ipynb_checkpoints"
HASH_TABLE = "cs_helpers_autograde"
MAX_NOTEBOOK_BYTES = 64 * 2**20
# A student id is a plain folder name: what nbgrader and a shell handle without quoting.
STUDENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,127}\Z")
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
PATIENT_CLUSTER = {"distributed.comm.timeouts.tcp": "300s", "distributed.comm.timeouts.connect": "120s",
                   "distributed.scheduler.worker-ttl": "30 minutes"}
# With no worker left a task waits for one forever: after this long without any, the
# remaining submissions fail ("the cluster lost all its workers") and the run ends.
LOST_WORKERS_S = 60.0
POLL_S = 0.2


class AutogradeError(Exception):
    """Input that stops the whole run before anything is graded or written."""


@dataclass
class Submission:
    """One student's submission of the assignment, read into memory."""
    student: str
    notebook: bytes
    timestamp: str | None
    digest: str = ""
    notes: list[str] = field(default_factory=list)


@dataclass
class Outcome:
    """What happened to one student's submission: ``status`` is ``graded``,
    ``unchanged`` (graded before, same content), ``failed`` (with ``reason``; no rows
    written) or ``not submitted``."""
    student: str
    status: str
    reason: str = ""
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)  # test cell -> points, from the gradebook
    total: float | None = None
    max_score: float | None = None


@dataclass
class Report:
    assignment: str
    cells: list[str]  # the assignment's autograded test cells, by name
    outcomes: list[Outcome]
    wall_s: float = 0.0

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == "failed"]

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)


# ---------------------------------------------------------------------------------------
# Reading the course, never through a link


def _name(name: str) -> str:
    """A file name as it may be printed (no control characters reach the terminal)."""
    return ascii(name)


def _kind(mode: int) -> str:
    for test, kind in ((stat.S_ISLNK, "symbolic link"), (stat.S_ISFIFO, "named pipe"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISDIR, "folder"), (stat.S_ISREG, "file")):
        if test(mode):
            return kind
    return "special file"


def _open_dir(name: str, dir_fd: int | None = None) -> int:
    return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)


def _read_file(name: str, dir_fd: int, limit: int) -> bytes:
    """The bytes of the regular file ``name`` in the folder ``dir_fd``; a link, a special
    file or a file over ``limit`` bytes raises ValueError (a link is never followed)."""
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{_name(name)} is a {_kind(info.st_mode)}, not a file")
        if info.st_size > limit:
            raise ValueError(f"{_name(name)} holds {info.st_size} bytes, more than the {limit} allowed")
        with os.fdopen(os.dup(fd), "rb") as handle:
            return handle.read(limit + 1)[:limit]
    finally:
        os.close(fd)


@dataclass
class Source:
    """The assignment's source folder: its one notebook and every file, as bytes."""
    assignment: str
    folder: Path
    notebook: str  # file name
    files: dict[str, bytes]
    graded_ids: list[str]  # grade_id of every nbgrader cell, in order
    digest: str


def load_source(assignment: str, source_dir=None) -> Source:
    """The source of ``assignment`` (``source_dir/<assignment>/<name>.ipynb``, default
    the kit's notebooks); an unknown assignment raises :class:`AutogradeError` naming
    the known ones."""
    import nbformat

    source_dir = Path(source_dir or NOTEBOOKS_DIR)
    known = sorted(p.name for p in source_dir.iterdir() if p.is_dir() and list(p.glob("*.ipynb"))) \
        if source_dir.is_dir() else []
    if not STUDENT_ID.match(assignment) or assignment not in known:
        raise AutogradeError(f"unknown assignment {_name(assignment)}: {source_dir} holds "
                             f"{', '.join(known) or 'no assignment'} (one folder with one notebook each)")
    folder = source_dir / assignment
    notebooks = sorted(folder.glob("*.ipynb"))
    if len(notebooks) != 1:
        raise AutogradeError(f"{folder} holds {len(notebooks)} notebooks; an assignment of this course "
                             "has exactly one")
    files = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and not path.is_symlink() and not {CHECKPOINTS, "__pycache__"} & set(rel.parts):
            files[rel.as_posix()] = path.read_bytes()
    nb = nbformat.reads(files[notebooks[0].name].decode("utf-8"), as_version=4)
    graded = [c.metadata["nbgrader"]["grade_id"] for c in nb.cells
              if c.get("metadata", {}).get("nbgrader", {}).get("grade_id")]
    digest = hashlib.sha256()
    for rel, data in files.items():
        digest.update(rel.encode() + b"\0" + hashlib.sha256(data).digest())
    return Source(assignment, folder, notebooks[0].name, files, graded, digest.hexdigest())


def _check_notebook(data: bytes, source: Source) -> list[str]:
    """Raises ValueError unless ``data`` is a Jupyter notebook; returns notes on its
    graded cells (duplicates and missing ones are graded as ``cs-helpers grade`` does:
    the last copy counts, a missing cell is restored from the source and earns 0)."""
    import nbformat

    try:
        nb = nbformat.reads(data.decode("utf-8"), as_version=4)
        nbformat.validate(nb)
    except Exception as exc:  # JSON, encoding or schema: all mean "not a notebook"
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{source.notebook} is not a readable Jupyter notebook ({reason})") from None
    ids = [c.metadata["nbgrader"].get("grade_id") for c in nb.cells
           if isinstance(c.get("metadata", {}).get("nbgrader"), dict)]
    notes = []
    duplicates = sorted({i for i in ids if i and ids.count(i) > 1})
    if duplicates:
        notes.append(f"cells appearing more than once (the last copy is graded): {', '.join(map(_name, duplicates))}")
    missing = [i for i in source.graded_ids if i not in ids]
    if missing:
        notes.append(f"graded cells missing (restored from the source, earning 0): {', '.join(map(_name, missing))}")
    return notes


def collect(root, source: Source) -> tuple[list[Submission], list[Outcome]]:
    """Every submission of ``source.assignment`` under ``root/submitted``, read without
    following links, with the students whose folder cannot be graded (``failed``, with
    the reason) or holds no submission of it (``not submitted``)."""
    root = Path(root)
    try:
        top = _open_dir(str(root / SUBMITTED))
    except FileNotFoundError:
        raise AutogradeError(f"no {SUBMITTED}/ folder in {root}: run from the course root, where "
                             f"{SUBMITTED}/<student>/{source.assignment}/{source.notebook} are") from None
    except NotADirectoryError:
        raise AutogradeError(f"{root / SUBMITTED} is not a folder (or is a link, which is not followed)") from None
    submissions, others = [], []
    try:
        with os.scandir(top) as entries:
            names = sorted(e.name for e in entries)
        for student in names:
            try:
                found = _read_submission(top, student, source)
            except ValueError as exc:
                others.append(Outcome(student, "failed", str(exc)))
                continue
            except PermissionError as exc:
                others.append(Outcome(student, "failed", f"cannot be read: {exc.strerror}"))
                continue
            if found is None:
                others.append(Outcome(student, "not submitted"))
            else:
                submissions.append(found)
    finally:
        os.close(top)
    for sub in submissions:
        digest = hashlib.sha256(b"cs-helpers autograde 1\0" + source.digest.encode() + b"\0")
        digest.update(hashlib.sha256(sub.notebook).digest())
        digest.update((sub.timestamp or "").encode())
        sub.digest = digest.hexdigest()
    return submissions, others


def _read_submission(top: int, student: str, source: Source) -> Submission | None:
    from nbgrader.utils import parse_utc

    info = os.stat(student, dir_fd=top, follow_symlinks=False)
    if not STUDENT_ID.match(student):
        raise ValueError(f"student id {_name(student)} is not a plain folder name (letters, digits, "
                         "'.', '_', '-', '@', starting with a letter or digit)")
    where = f"{SUBMITTED}/{student}"
    if not stat.S_ISDIR(info.st_mode):
        raise ValueError(f"{where} is a {_kind(info.st_mode)}, not a student's folder (links are never followed)")
    sfd = _open_dir(student, dir_fd=top)
    try:
        try:
            info = os.stat(source.assignment, dir_fd=sfd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        where = f"{where}/{source.assignment}"
        if not stat.S_ISDIR(info.st_mode):
            raise ValueError(f"{where} is a {_kind(info.st_mode)}, not a folder (links are never followed)")
        afd = _open_dir(source.assignment, dir_fd=sfd)
    finally:
        os.close(sfd)
    try:
        with os.scandir(afd) as entries:
            listing = {e.name: os.stat(e.name, dir_fd=afd, follow_symlinks=False).st_mode for e in entries}
        for name, mode in sorted(listing.items()):
            if stat.S_ISLNK(mode):
                raise ValueError(f"{where} holds a symbolic link {_name(name)}: links are never followed; "
                                 "a submission holds plain files only")
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise ValueError(f"{where} holds a {_kind(mode)} {_name(name)}; a submission holds plain files only")
            if name.endswith(".ipynb") and name != source.notebook:
                raise ValueError(f"{where} holds a notebook named {_name(name)}; this assignment's notebook "
                                 f"is {source.notebook}")
        if source.notebook not in listing:
            raise ValueError(f"{where} holds no {source.notebook} (the assignment's notebook)")
        if not stat.S_ISREG(listing[source.notebook]):
            raise ValueError(f"{where}/{source.notebook} is a {_kind(listing[source.notebook])}, not a file")
        notebook = _read_file(source.notebook, afd, MAX_NOTEBOOK_BYTES)
        timestamp = None
        if TIMESTAMP_FILE in listing:
            timestamp = _read_file(TIMESTAMP_FILE, afd, 1000).decode("utf-8", "replace").strip()
            try:
                parse_utc(timestamp)
            except Exception:
                raise ValueError(f"{where}/{TIMESTAMP_FILE} holds {timestamp[:60]!r}, not a date and time") from None
    finally:
        os.close(afd)
    notes = _check_notebook(notebook, source)
    return Submission(student, notebook, timestamp, notes=notes)


# ---------------------------------------------------------------------------------------
# The task, on a worker

_GRADING = threading.Lock()  # one grading at a time per worker process (it sets os.environ)


def secret_fingerprint() -> str:
    """SHA-256 of the course secret (never the secret itself): every worker must draw
    the same hidden cases as the coordinator, or the same notebook would get other scores."""
    from .grading import registry

    secret = registry.course_secret(create=False)
    return hashlib.sha256(b"cs-helpers course secret\0" + secret).hexdigest() if secret else ""


def grade_task(assignment: str, source_files: dict[str, bytes], notebook_name: str, notebook: bytes,
               timestamp: str | None, fingerprint: str, sandboxed: bool = True,
               execute_timeout_s: float | None = None) -> dict:
    """Grades one submission on this worker, single-threaded, in a temporary folder.
    Returns ``{"score": NotebookScore.as_dict(), "autograded": bytes, "feedback_html":
    str, "gradebook": dict, "worker": str, "seconds": float}``, or ``{"error": reason}``
    when the submission cannot be graded (a crash of this process raises instead, and
    Dask retries the task elsewhere)."""
    import warnings

    import torch
    from sqlalchemy.exc import SAWarning

    from .course import grade_notebook

    with _GRADING:
        for variable in THREAD_VARIABLES:
            os.environ[variable] = "1"
        torch.set_num_threads(1)
        # nbgrader's add_submission relies on a cascade that SQLAlchemy 2 dropped and says so
        # on every grading; its rows are still written (the gradebook's values are read back).
        warnings.filterwarnings("ignore", category=SAWarning, module="nbgrader")
        worker = f"{socket.gethostname()}:{os.getpid()}"
        if secret_fingerprint() != fingerprint:
            return {"error": f"worker {worker} has another course secret than the coordinator (or none): "
                             "point CS_HELPERS_SECRET_FILE on every worker to the course's secret",
                    "worker": worker}
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="cs-autograde-") as tmp:
            folder = Path(tmp) / "source" / assignment
            for rel, data in source_files.items():
                (folder / rel).parent.mkdir(parents=True, exist_ok=True)
                (folder / rel).write_bytes(data)
            submission = Path(tmp) / "submission" / notebook_name
            submission.parent.mkdir()
            submission.write_bytes(notebook)
            try:
                graded = grade_notebook(submission, folder / notebook_name, workdir=tmp, sandboxed=sandboxed,
                                        feedback=True, execute_timeout_s=execute_timeout_s, timestamp=timestamp)
            except (ValueError, RuntimeError, OSError) as exc:
                lines = str(exc).strip().splitlines()
                return {"error": lines[0] if lines else type(exc).__name__, "worker": worker}
    return {"score": graded.score.as_dict(), "autograded": graded.autograded,
            "feedback_html": graded.feedback_html, "gradebook": graded.gradebook, "worker": worker,
            "seconds": time.perf_counter() - start}


# ---------------------------------------------------------------------------------------
# The gradebook, written by the coordinator only


def database_url(db: str | None, root) -> str:
    """``db`` (an SQLAlchemy URL) checked, or the course's ``gradebook.db`` in SQLite."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    if db is None:
        return f"sqlite:///{Path(root).resolve() / 'gradebook.db'}"
    try:
        url = make_url(db)
    except ArgumentError:
        raise AutogradeError(f"--db {db!r} is not a database URL; expected e.g. sqlite:///gradebook.db or "
                             "postgresql://user@host/dbname") from None
    if url.get_backend_name() not in ("sqlite", "postgresql", "mysql"):
        raise AutogradeError(f"--db {url.render_as_string(hide_password=True)!r}: nbgrader's gradebook works on "
                             "sqlite, postgresql or mysql")
    return db


def _source_table(metadata):
    from sqlalchemy import Column, String, Table

    return Table(HASH_TABLE + "_source", metadata,
                 Column("assignment", String(128), primary_key=True),
                 Column("digest", String(64), nullable=False))


def _hash_table(metadata):
    from sqlalchemy import Column, String, Table

    return Table(HASH_TABLE, metadata,
                 Column("assignment", String(128), primary_key=True),
                 Column("student", String(128), primary_key=True),
                 Column("digest", String(64), nullable=False))


def _create_sqlite(db_url: str) -> None:
    """A new SQLite gradebook is created by :func:`cs_helpers.course.fresh_gradebook`
    (nbgrader's tables and newest migration without nbgrader's 3.5 s ``alembic``
    subprocess); any other database, or an existing file, is left to nbgrader."""
    from sqlalchemy.engine import make_url

    url = make_url(db_url)
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return
    path = Path(url.database)
    if path.parent.is_dir() and not path.exists():
        fresh_gradebook(path)


class Gradebook:
    """nbgrader's gradebook at ``db_url``, with the assignment's structure written by
    nbgrader's own ``generate_assignment`` (again only when the source changed) and the
    tables of graded contents."""

    def __init__(self, db_url: str, source: Source, course_id: str = "course"):
        from nbgrader.api import Gradebook as NbGradebook
        from sqlalchemy import MetaData, select
        from sqlalchemy.exc import SQLAlchemyError

        self.assignment, self.notebook = source.assignment, Path(source.notebook).stem
        metadata = MetaData()
        self.table, sources = _hash_table(metadata), _source_table(metadata)
        try:
            _create_sqlite(db_url)
            self.gb = NbGradebook(db_url, course_id=course_id)
            metadata.create_all(self.gb.engine, checkfirst=True)
            prepared = self.gb.db.execute(select(sources.c.digest)
                                          .where(sources.c.assignment == self.assignment)).scalar()
            prepared = prepared if self.assignment in {a.name for a in self.gb.assignments} else None
            self.gb.db.commit()  # no transaction left open while nbgrader writes below
        except SQLAlchemyError as exc:
            raise AutogradeError(f"cannot open the gradebook at {_safe_url(db_url)}: "
                                 f"{str(exc).strip().splitlines()[0]}") from None
        except ImportError as exc:
            raise AutogradeError(f"cannot open the gradebook at {_safe_url(db_url)}: its database driver "
                                 f"is not installed ({exc}); PostgreSQL needs psycopg") from None
        if prepared == source.digest:
            return
        with tempfile.TemporaryDirectory(prefix="cs-autograde-source-") as tmp, _venv_on_path():
            shutil.copytree(source.folder, Path(tmp) / "source" / source.assignment,
                            ignore=shutil.ignore_patterns(CHECKPOINTS, "__pycache__"))
            api = _api(Path(tmp), "source", db_url=db_url, course_id=course_id)
            try:
                _check(api.generate_assignment(source.assignment, force=True, create=True),
                       "generate_assignment")
            except RuntimeError as exc:
                self.gb.close()
                raise AutogradeError(f"cannot prepare the gradebook at {_safe_url(db_url)}: {exc}") from None
        db = self.gb.db
        db.execute(sources.delete().where(sources.c.assignment == self.assignment))
        db.execute(sources.insert().values(assignment=self.assignment, digest=source.digest))
        db.commit()

    def close(self):
        self.gb.close()

    def digests(self) -> dict[str, str]:
        from sqlalchemy import select

        rows = self.gb.db.execute(select(self.table.c.student, self.table.c.digest)
                                  .where(self.table.c.assignment == self.assignment)).all()
        self.gb.db.commit()
        return dict(rows)

    def record(self, student: str, digest: str, values: dict) -> None:
        """Writes one graded submission in one transaction: nbgrader's rows (created as
        nbgrader's ``add_submission`` does when missing; manual grades kept), the
        values the worker's nbgrader saved, and the content digest. On any error nothing
        of it is written."""
        from nbgrader.api import Comment, Grade, Student, SubmittedAssignment, SubmittedNotebook
        from nbgrader.utils import parse_utc

        db = self.gb.db
        try:
            if db.get(Student, student) is None:
                db.add(Student(id=student))
                db.flush()
            assignment = self.gb.find_assignment(self.assignment)
            submission = (db.query(SubmittedAssignment)
                          .filter(SubmittedAssignment.assignment_id == assignment.id,
                                  SubmittedAssignment.student_id == student).one_or_none())
            if submission is None:
                submission = SubmittedAssignment(assignment_id=assignment.id, student_id=student)
                db.add(submission)
                db.flush()
            submission.timestamp = parse_utc(values["timestamp"]) if values.get("timestamp") else None
            for notebook in assignment.notebooks:
                nb = (db.query(SubmittedNotebook)
                      .filter(SubmittedNotebook.assignment_id == submission.id,
                              SubmittedNotebook.notebook_id == notebook.id).one_or_none())
                if nb is None:
                    nb = SubmittedNotebook(assignment_id=submission.id, notebook_id=notebook.id)
                    db.add(nb)
                    db.flush()
                for model, cells in ((Grade, [*notebook.grade_cells, *notebook.task_cells]),
                                     (Comment, [*notebook.solution_cells, *notebook.task_cells])):
                    have = {row.cell_id for row in db.query(model).filter(model.notebook_id == nb.id)}
                    db.add_all(model(cell_id=cell.id, notebook_id=nb.id) for cell in cells if cell.id not in have)
                if notebook.name == self.notebook:
                    db.flush()
                    nb.late_submission_penalty = values.get("late_submission_penalty")
                    for grade in db.query(Grade).filter(Grade.notebook_id == nb.id):
                        saved = values["grades"][grade.cell.name]
                        grade.auto_score = saved["auto_score"]
                        grade.needs_manual_grade = saved["needs_manual_grade"]
                    for comment in db.query(Comment).filter(Comment.notebook_id == nb.id):
                        comment.auto_comment = values["comments"][comment.cell.name]
            db.execute(self.table.delete().where(self.table.c.assignment == self.assignment,
                                                 self.table.c.student == student))
            db.execute(self.table.insert().values(assignment=self.assignment, student=student, digest=digest))
            db.commit()
        except BaseException:
            db.rollback()
            raise

    def scores(self, student: str) -> dict[str, tuple[float, float]] | None:
        """{test cell: (score, max_score)} of the student's autograded cells, or None."""
        from nbgrader.api import MissingEntry

        try:
            nb = self.gb.find_submission_notebook(self.notebook, self.assignment, student)
        except MissingEntry:
            return None
        out = {g.cell.name: (float(g.score or 0.0), float(g.max_score)) for g in nb.grades
               if g.cell.cell_type == "code"}
        self.gb.db.commit()
        return out


def _safe_url(db_url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(db_url).render_as_string(hide_password=True)


def _write(path: Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` whole or not at all (a reader never sees half)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=".tmp-", delete=False)
    try:
        with handle:
            handle.write(data)
        os.replace(handle.name, path)
    except BaseException:
        os.unlink(handle.name)
        raise


# ---------------------------------------------------------------------------------------
# The run


def _client(workers: int | None, scheduler: str | None):
    """A Dask client: of the cluster at ``scheduler``, or of an embedded local cluster
    of ``workers`` single-threaded worker processes. Returns (client, cluster or None)."""
    from distributed import Client, LocalCluster

    if scheduler:
        try:
            return Client(scheduler, timeout="20s"), None
        except (OSError, TimeoutError, ValueError) as exc:
            raise AutogradeError(f"cannot reach the Dask scheduler at {scheduler!r}: {exc}") from None
    import dask

    workers = workers or os.cpu_count() or 1
    # A worker whose cores are all taken by grading answers late; it is still working, so
    # its connection and heartbeats get minutes, not Dask's default 30 s (a dropped
    # worker's task starts over elsewhere).
    with dask.config.set(PATIENT_CLUSTER):
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                               env={v: "1" for v in THREAD_VARIABLES})
    return Client(cluster), cluster


def autograde(assignment: str, root=".", *, workers: int | None = None, scheduler: str | None = None,
              db: str | None = None, force: bool = False, csv_path=None, sandboxed: bool = True,
              execute_timeout_s: float | None = None, source_dir=None, progress: bool = True,
              retries: int = 1, course_id: str = "course", lost_workers_s: float = LOST_WORKERS_S) -> Report:
    """Grades every new or changed submission of ``assignment`` under
    ``root/submitted`` on Dask (``workers`` local processes, or the cluster at
    ``scheduler``), records each in the gradebook ``db`` (SQLAlchemy URL; default
    ``root/gradebook.db``) and writes ``root/autograded`` and ``root/feedback``.
    ``force`` grades unchanged submissions again; ``csv_path`` gets one row per
    student. Bad input for the whole run raises :class:`AutogradeError` before anything
    is written; a submission that cannot be graded is a ``failed`` outcome."""
    from .grading.isolation import SandboxUnavailable, require_sandbox

    start = time.perf_counter()
    root = Path(root).resolve()
    source = load_source(assignment, source_dir)
    db_url = database_url(db, root)
    if workers is not None and workers < 1:
        raise AutogradeError(f"--workers {workers}: expected at least 1")
    if not lost_workers_s > 0:
        raise AutogradeError(f"--lost-workers-after {lost_workers_s:g}: expected a positive number of seconds")
    submissions, others = collect(root, source)
    if not submissions and not any(o.status == "failed" for o in others):
        raise AutogradeError(f"no submission of {assignment} under {root / SUBMITTED} "
                             f"(expected {SUBMITTED}/<student>/{assignment}/{source.notebook})")
    if sandboxed and not scheduler:
        try:
            require_sandbox()
        except SandboxUnavailable as exc:
            raise AutogradeError(str(exc)) from None
    fingerprint = secret_fingerprint()
    if not fingerprint:
        from .grading import registry

        registry.course_secret()  # the first grading of a course makes its secret
        fingerprint = secret_fingerprint()
    book = Gradebook(db_url, source, course_id=course_id)
    try:
        known = book.digests()
        outcomes = {o.student: o for o in others}
        todo = []
        for sub in submissions:
            if not force and known.get(sub.student) == sub.digest:
                outcomes[sub.student] = Outcome(sub.student, "unchanged", notes=sub.notes)
            else:
                todo.append(sub)
        if todo:
            _run(todo, source, book, root, outcomes, workers=workers, scheduler=scheduler,
                 fingerprint=fingerprint, sandboxed=sandboxed, execute_timeout_s=execute_timeout_s,
                 progress=progress, retries=retries, lost_workers_s=lost_workers_s)
        cells = sorted(name for name in source.graded_ids if name.startswith("test_"))
        for outcome in outcomes.values():
            if outcome.status in ("graded", "unchanged"):
                found = book.scores(outcome.student) or {}
                cells = sorted(set(cells) | set(found))
                outcome.scores = {name: score for name, (score, _) in found.items()}
                # fsum: the exactly rounded sum, whatever the order the gradebook lists the cells in
                outcome.total = math.fsum(score for score, _ in found.values())
                outcome.max_score = math.fsum(points for _, points in found.values())
    finally:
        book.close()
    report = Report(assignment, cells, [outcomes[s] for s in sorted(outcomes)], time.perf_counter() - start)
    if csv_path is not None:
        write_csv(report, csv_path)
    return report


def _run(todo, source, book, root, outcomes, *, workers, scheduler, fingerprint, sandboxed,
         execute_timeout_s, progress, retries, lost_workers_s=LOST_WORKERS_S) -> None:
    from distributed import as_completed
    from tqdm import tqdm

    client, cluster = _client(workers, scheduler)
    failed = 0
    try:
        futures = {}
        for sub in todo:
            future = client.submit(grade_task, source.assignment, source.files, source.notebook, sub.notebook,
                                   sub.timestamp, fingerprint, sandboxed, execute_timeout_s,
                                   key=f"autograde-{source.assignment}-{sub.student}-{sub.digest[:16]}",
                                   pure=False, retries=retries)
            futures[future] = sub
        watchdog = _Watchdog(client, lost_workers_s)
        with tqdm(total=len(todo), desc=f"autograde {source.assignment}", unit="submission",
                  file=sys.stderr, disable=not progress, dynamic_ncols=True) as bar:
            bar.set_postfix(done=0, failed=0, remaining=len(todo))
            done = as_completed(futures)
            while futures:
                ready = done.next_batch(block=False)
                if not ready:
                    if watchdog.expired():
                        reason = (f"not graded: the cluster lost all its workers (none for "
                                  f"{lost_workers_s:g} s while {len(futures)} submissions remained)")
                        print(f"cs-helpers autograde: {reason}", file=sys.stderr)
                        client.cancel(list(futures))
                        for sub in futures.values():
                            outcomes[sub.student] = Outcome(sub.student, "failed", reason, notes=sub.notes)
                        futures.clear()
                        break
                    time.sleep(POLL_S)
                    continue
                for future in ready:
                    sub = futures.pop(future)
                    outcome = _receive(future, sub, source, book, root)
                    outcomes[sub.student] = outcome
                    failed += outcome.status == "failed"
                    bar.update(1)
                    bar.set_postfix(done=bar.n - failed, failed=failed, remaining=bar.total - bar.n)
                    future.release()
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


class _Watchdog:
    """Says when the cluster has had no worker for ``after_s`` seconds (asked of the
    scheduler at most once a second; a scheduler that does not answer counts as one
    without workers). Tasks wait for a worker forever otherwise."""

    def __init__(self, client, after_s: float):
        self.client, self.after_s = client, after_s
        self.since: float | None = None
        self.checked = 0.0

    def expired(self) -> bool:
        now = time.monotonic()
        if now - self.checked < 1.0:
            return self.since is not None and now - self.since >= self.after_s
        self.checked = now
        try:
            alive = bool(self.client.sync(self.client.scheduler.ncores, callback_timeout=10))
        except Exception:  # scheduler unreachable or slow: no worker to be seen either way
            alive = False
        if alive:
            self.since = None
            return False
        if self.since is None:
            self.since = now
        return now - self.since >= self.after_s


def _receive(future, sub: Submission, source: Source, book: Gradebook, root: Path) -> Outcome:
    """The outcome of one task, written to the course when it graded."""
    from distributed import KilledWorker

    try:
        result = future.result()
    except KilledWorker:
        return Outcome(sub.student, "failed", "the workers that graded it died each time (a crash, memory "
                       "exhausted or killed from outside); see the workers' logs", notes=sub.notes)
    except Exception as exc:  # anything else the task raised, after its retries
        return Outcome(sub.student, "failed", f"{type(exc).__name__}: {str(exc).strip()[:300]}", notes=sub.notes)
    if "error" in result:
        return Outcome(sub.student, "failed", result["error"], notes=sub.notes)
    stem = Path(source.notebook).stem
    try:
        _write(root / "autograded" / sub.student / source.assignment / source.notebook, result["autograded"])
        _write(root / "feedback" / sub.student / source.assignment / f"{stem}.html",
               result["feedback_html"].encode("utf-8"))
        book.record(sub.student, sub.digest, result["gradebook"])
    except Exception as exc:
        return Outcome(sub.student, "failed", f"could not write its grades: {type(exc).__name__}: {exc}",
                       notes=sub.notes)
    return Outcome(sub.student, "graded", seconds=result["seconds"], notes=sub.notes)


def _number(x: float | None) -> str:
    """A score as written in the CSV: every digit the gradebook holds, no trailing ``.0``."""
    if x is None:
        return ""
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def write_csv(report: Report, path) -> None:
    """One row per student: student, status, each test cell's score, total, max_score,
    reason (and notes)."""
    rows = [["student", "status", *report.cells, "total", "max_score", "reason"]]
    for o in report.outcomes:
        scores = [_number(o.scores.get(name)) for name in report.cells]
        rows.append([o.student, o.status, *scores, _number(o.total), _number(o.max_score),
                     "; ".join([o.reason, *o.notes]).strip("; ")])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows(rows)


def summary(report: Report) -> str:
    """The table printed at the end of a run."""
    width = max([len(o.student) for o in report.outcomes] + [7])
    lines = [f"{'student':<{width}}  {'status':<13}  {'score':>11}  {'seconds':>7}  reason"]
    for o in report.outcomes:
        score = "" if o.total is None else f"{o.total:g} / {o.max_score:g}"
        seconds = f"{o.seconds:7.1f}" if o.status == "graded" else " " * 7
        lines.append(f"{o.student:<{width}}  {o.status:<13}  {score:>11}  {seconds}  "
                     + "; ".join([o.reason, *o.notes]).strip("; "))
    counts = ", ".join(f"{report.count(s)} {s}" for s in ("graded", "unchanged", "failed", "not submitted")
                       if report.count(s))
    lines.append(f"{report.assignment}: {counts or 'nothing'} in {report.wall_s:.1f} s")
    return "\n".join(lines)

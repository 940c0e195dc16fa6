"""`cs-helpers autograde`: a class graded in parallel on Dask, with real components
started here: an embedded local cluster of 2 workers, a `dask scheduler` with two
`dask worker` processes (one killed with SIGKILL mid-run; in another run all of them,
which the watchdog turns into failed submissions) and a PostgreSQL server.

The course's sources are two small assignments in its own `source/` folder (`--source`),
built from the real notebooks with two graded functions each and one written answer
(01 filters: normalize_filters and linear_templates; 02 features: nearest_neighbors and
pca), so that each grading runs little besides the pipeline under test. One course is
graded once for the module (01 into the default SQLite gradebook, 02 into PostgreSQL);
the tests read what that left and run again on it."""
import csv
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import nbformat
import pytest

from cs_helpers.classgrade import collect, load_source
from cs_helpers.cli import main
from cs_helpers.course import source_notebooks

sys.path.insert(0, str(Path(__file__).parent))
from test_nbgrader_pipeline import GLOBAL_NORMALIZATION, _with_solution  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("autograde")]

KIT = {p.stem: p for p in source_notebooks()}
FILTERS, FEATURES = "01_filters", "02_features"
ASSIGNMENTS = {"filters": FILTERS, "features": FEATURES}
# The graded functions each small assignment keeps, and its written answer.
KEEP = {"filters": (["linear_templates", "normalize_filters"], "question_linear_templates"),
        "features": (["nearest_neighbors", "pca"], "question_pca_tsne")}
SETUP = "import math\n\nimport torch\n\nfrom cs_helpers import grading\n"
TIMEOUT_S = "5"  # one cell of the student's kernel: the runaway loop ends here
CRASH = "import os\n\n\ndef normalize_filters(weights):\n    os._exit(3)\n"
RAISES = "def pca(features, k):\n    raise ValueError('a known-wrong pca')\n"
RUNAWAY = "while True:\n    pass\n"


def _grade_id(cell):
    return cell.get("metadata", {}).get("nbgrader", {}).get("grade_id")


def _small_source(topic: str, source_dir: Path) -> Path:
    """``source_dir/NN_topic/topic.ipynb``: the kit's notebook with its title, a setup cell
    of imports only, two graded functions with their tests and one written answer."""
    functions, question = KEEP[topic]
    keep = {*functions, *(f"test_{f}" for f in functions), question}
    nb = nbformat.read(KIT[topic], as_version=4)
    setup = [c for c in nb.cells if _grade_id(c) == "setup"][0]
    setup.source = SETUP
    nb.cells = [nb.cells[0], setup, *(c for c in nb.cells if _grade_id(c) in keep)]
    out = source_dir / ASSIGNMENTS[topic] / f"{topic}.ipynb"
    out.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, out)
    return out


def _points(root, topic):
    """{test cell: points} of the course's source notebook."""
    nb = nbformat.read(root / "source" / ASSIGNMENTS[topic] / f"{topic}.ipynb", as_version=4)
    return {c.metadata.nbgrader["grade_id"]: float(c.metadata.nbgrader["points"]) for c in nb.cells
            if c.get("metadata", {}).get("nbgrader", {}).get("grade") and c.cell_type == "code"}


def _stub(full: Path, out: Path) -> Path:
    """The student's version: solutions replaced by nbgrader's stub, hidden tests removed."""
    from nbgrader.preprocessors import ClearHiddenTests, ClearSolutions

    nb = nbformat.read(full, as_version=4)
    nb, _ = ClearSolutions(code_stub={"python": "# YOUR CODE HERE\nraise NotImplementedError()"}).preprocess(nb, {})
    nb, _ = ClearHiddenTests().preprocess(nb, {})
    out.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, out)
    return out


def _with_runaway_cell(full: Path, out: Path) -> Path:
    nb = nbformat.read(full, as_version=4)
    nb.cells.insert(2, nbformat.v4.new_code_cell(RUNAWAY))
    out.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, out)
    return out


def _build_course(root: Path) -> None:
    sub = root / "submitted"
    # 01 filters: full marks, empty, known-wrong, a kernel crasher, a runaway loop.
    full = sub / "full" / FILTERS / "filters.ipynb"
    full.parent.mkdir(parents=True)
    shutil.copy(_small_source("filters", root / "source"), full)
    _stub(full, sub / "empty" / FILTERS / "filters.ipynb")
    _with_solution(full, sub / "wrong" / FILTERS / "filters.ipynb", "normalize_filters", GLOBAL_NORMALIZATION)
    _with_solution(full, sub / "crasher" / FILTERS / "filters.ipynb", "normalize_filters", CRASH)
    _with_runaway_cell(full, sub / "runaway" / FILTERS / "filters.ipynb")
    # 02 features: full marks, empty, known-wrong (one function raises).
    ffull = sub / "full" / FEATURES / "features.ipynb"
    ffull.parent.mkdir(parents=True)
    shutil.copy(_small_source("features", root / "source"), ffull)
    _stub(ffull, sub / "empty" / FEATURES / "features.ipynb")
    _with_solution(ffull, sub / "wrong" / FEATURES / "features.ipynb", "pca", RAISES)
    # Bad input for 01 filters: reported, never graded, never read through a link.
    (sub / "linker" / FILTERS).mkdir(parents=True)
    (sub / "linker" / FILTERS / "filters.ipynb").symlink_to(sub / "full" / FILTERS / "filters.ipynb")
    (sub / "thief" / FILTERS).mkdir(parents=True)
    (sub / "thief" / FILTERS / "filters.ipynb").symlink_to(root / "source" / FILTERS / "filters.ipynb")
    (sub / "alias").symlink_to(sub / "full")
    (sub / "piper" / FILTERS).mkdir(parents=True)
    os.mkfifo(sub / "piper" / FILTERS / "filters.ipynb")
    (sub / "renamed" / FILTERS).mkdir(parents=True)
    shutil.copy(full, sub / "renamed" / FILTERS / "mine.ipynb")
    (sub / "garbage" / FILTERS).mkdir(parents=True)
    (sub / "garbage" / FILTERS / "filters.ipynb").write_text("print('not a notebook')\n")
    (sub / "nothing" / FILTERS).mkdir(parents=True)
    (sub / "nothing" / FILTERS / "notes.txt").write_text("I forgot the notebook\n")
    shutil.copytree(sub / "full", sub / "bad id")
    (sub / "late").mkdir()  # submitted 02 only: "not submitted" for 01
    shutil.copytree(sub / "full" / FEATURES, sub / "late" / "unrelated")


BAD = {"linker": "symbolic link", "thief": "symbolic link", "alias": "symbolic link", "piper": "named pipe",
       "renamed": "notebook named 'mine.ipynb'", "garbage": "not a readable Jupyter notebook",
       "nothing": "holds no filters.ipynb", "bad id": "not a plain folder name"}
GRADED = {FILTERS: ["crasher", "empty", "full", "runaway", "wrong"], FEATURES: ["empty", "full", "wrong"]}
# A bad student folder fails every assignment; the other bad cases are 01's only.
FAILED = {FILTERS: sorted(BAD), FEATURES: ["alias", "bad id"]}


# --------------------------------------------------------------------------------------
# A PostgreSQL server of our own


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres():
    """URL of a fresh database on a throwaway PostgreSQL server, stopped at the end."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"))
    if not found:
        pytest.skip("needs PostgreSQL (Debian: apt-get install postgresql; `make system` does it)")
    bin_dir = found[-1].parent
    data = Path(tempfile.mkdtemp(prefix="cs-pg-"))
    as_user = []
    if os.geteuid() == 0:  # initdb refuses root
        shutil.chown(data, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    run = lambda *cmd: subprocess.run([*as_user, *map(str, cmd)], check=True, capture_output=True, timeout=120)  # noqa: E731
    run(bin_dir / "initdb", "-D", data / "db", "-A", "trust", "-U", "postgres", "--no-sync")
    run(bin_dir / "pg_ctl", "-D", data / "db", "-l", data / "log", "-w", "-t", "60", "start",
        "-o", f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c fsync=off")
    try:
        run(bin_dir / "createdb", "-h", "127.0.0.1", "-p", port, "-U", "postgres", "gradebook")
        yield f"postgresql://postgres@127.0.0.1:{port}/gradebook"
    finally:
        subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data / "db"), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(data, ignore_errors=True)


# --------------------------------------------------------------------------------------
# The course, graded once


def _autograde(capsys, assignment, root, *args, source=None):
    """The command on the course ``root`` with the sources ``source`` (default: its own)."""
    source = source or Path(root) / "source"
    code = main(["autograde", assignment, "--course", str(root), "--source", str(source), *map(str, args),
                 "--no-progress", "--timeout", TIMEOUT_S])
    return code, capsys.readouterr()


def _counts(out, assignment):
    """The counts of the summary's last line: {status: number}."""
    line = re.search(rf"^{assignment}: (.*) in [0-9.]+ s$", out, re.M).group(1)
    return {status: int(n) for n, status in (part.split(" ", 1) for part in line.split(", "))}


def _csv(path):
    with open(path, newline="") as handle:
        return {row["student"]: row for row in csv.DictReader(handle)}


def _dump(db_url, assignment):
    """Every grade of the assignment in the gradebook, through nbgrader's Gradebook API:
    {(student, cell): (row id, auto_score, needs_manual_grade)}, and the students'
    submission ids."""
    from nbgrader.api import Gradebook

    grades, submissions = {}, {}
    with Gradebook(db_url, course_id="course") as gb:
        for sub in gb.find_assignment(assignment).submissions:
            submissions.setdefault(sub.student.id, []).append(sub.id)
            for nb in sub.notebooks:
                for g in nb.grades:
                    grades[(sub.student.id, g.name)] = (g.id, g.auto_score, g.needs_manual_grade)
    return grades, submissions


@pytest.fixture(scope="module")
def course(tmp_path_factory, postgres):
    root = tmp_path_factory.mktemp("class")
    _build_course(root)
    capsys = _Capture()
    runs = {}
    for assignment, db in ((FILTERS, None), (FEATURES, postgres)):
        extra = ["--db", db] if db else []
        with capsys:
            code = main(["autograde", assignment, "--course", str(root), "--source", str(root / "source"),
                         "--workers", "2", "--no-progress",
                         "--timeout", TIMEOUT_S, "--csv", str(root / f"{assignment}.csv"), *extra])
        runs[assignment] = (code, capsys.out)
    return {"root": root, "runs": runs, "pg": postgres, "sqlite": f"sqlite:///{root / 'gradebook.db'}"}


class _Capture:
    """stdout of an in-process command, for a module-scoped fixture (capsys is per test)."""

    def __enter__(self):
        import io

        self._old, sys.stdout = sys.stdout, io.StringIO()
        return self

    def __exit__(self, *exc):
        self.out = sys.stdout.getvalue()
        sys.stdout = self._old


def _expected(root, topic, student):
    """The exact score of each test cell where the submission determines it, None
    where only a bound is known (the wrong normalization earns partial credit)."""
    points = _points(root, topic)
    if student == "empty":
        return {c: 0.0 for c in points}
    if (topic, student) == ("filters", "crasher"):
        return {**points, "test_normalize_filters": 0.0}
    if (topic, student) == ("features", "wrong"):
        return {**points, "test_pca": 0.0}
    if (topic, student) == ("filters", "wrong"):
        return {**points, "test_normalize_filters": None}
    return points


def _assert_scores(root, topic, student, scores):
    expected = _expected(root, topic, student)
    assert set(scores) == set(expected), (student, scores)
    for cell, want in expected.items():
        if want is None:
            assert 0 < scores[cell] < _points(root, topic)[cell], (student, cell, scores[cell])
        else:
            assert scores[cell] == want, (student, cell, scores[cell])


def test_embedded_run_writes_exactly_the_expected_scores(course):
    root = course["root"]
    for assignment, topic, db in ((FILTERS, "filters", course["sqlite"]), (FEATURES, "features", course["pg"])):
        code, out = course["runs"][assignment]
        rows = _csv(root / f"{assignment}.csv")
        grades, submissions = _dump(db, assignment)
        assert sorted(submissions) == GRADED[assignment] and all(len(v) == 1 for v in submissions.values())
        for student in GRADED[assignment]:
            assert rows[student]["status"] == "graded", rows[student]
            from_db = {cell: score for (who, cell), (_, score, _) in grades.items()
                       if who == student and cell.startswith("test_")}
            _assert_scores(root, topic, student, from_db)
            from_csv = {cell: float(rows[student][cell]) for cell in from_db}
            assert from_csv == from_db and float(rows[student]["total"]) == math.fsum(from_db.values())
            assert float(rows[student]["max_score"]) == math.fsum(_points(root, topic).values())
            page = root / "feedback" / student / assignment / f"{topic}.html"
            assert page.is_file() and "BEGIN HIDDEN TESTS" not in page.read_text()
            graded_nb = nbformat.read(root / "autograded" / student / assignment / f"{topic}.ipynb", as_version=4)
            assert any(c.get("outputs") for c in graded_nb.cells)
        # Written answers wait for a person; an answer left as released earns 0 (nbgrader's rule).
        answers = {who: (score, manual) for (who, cell), (_, score, manual) in grades.items()
                   if cell.startswith("question_")}
        assert sorted(answers) == GRADED[assignment]
        assert all(manual for who, (_, manual) in answers.items() if who != "empty")
        assert answers["empty"] == (0.0, False)
        assert _counts(out, assignment) == {"graded": len(GRADED[assignment]), "failed": len(FAILED[assignment]),
                                            "not submitted": len(rows) - len(GRADED[assignment]) - len(FAILED[assignment])}
        assert sorted(s for s, r in rows.items() if r["status"] == "failed") == FAILED[assignment]
        assert code == 1  # nonzero: some submissions failed
        assert rows["late"]["status"] == "not submitted"


def test_bad_submissions_are_reported_and_change_nothing(course):
    root = course["root"]
    code, out = course["runs"][FILTERS]
    rows = _csv(root / f"{FILTERS}.csv")
    _, submissions = _dump(course["sqlite"], FILTERS)
    for student, reason in BAD.items():
        assert rows[student]["status"] == "failed" and reason in rows[student]["reason"], rows[student]
        assert rows[student]["total"] == "" and student not in submissions
        assert not (root / "autograded" / student).exists() and not (root / "feedback" / student).exists()
        assert reason in out
    # the link targets are untouched: the source notebook and the other student's work
    assert (root / "submitted" / "full" / FILTERS / "filters.ipynb").is_file()


def test_rerun_grades_nothing_and_changes_nothing(course, capsys):
    root = course["root"]
    before = _dump(course["sqlite"], FILTERS)
    mtime = (root / "feedback" / "full" / FILTERS / "filters.html").stat().st_mtime_ns
    code, captured = _autograde(capsys, FILTERS, root, "--workers", "2", "--csv", root / "again.csv")
    assert code == 1 and _counts(captured.out, FILTERS) == {
        "unchanged": len(GRADED[FILTERS]), "failed": len(FAILED[FILTERS]), "not submitted": 1}
    assert _dump(course["sqlite"], FILTERS) == before
    assert (root / "feedback" / "full" / FILTERS / "filters.html").stat().st_mtime_ns == mtime
    again, first = _csv(root / "again.csv"), _csv(root / f"{FILTERS}.csv")
    for student in GRADED[FILTERS]:
        assert again[student]["status"] == "unchanged"
        assert {k: v for k, v in again[student].items() if k != "status"} == \
            {k: v for k, v in first[student].items() if k != "status"}


def test_changed_submission_is_new_by_content_not_time(course, tmp_path):
    """What a rerun grades: a submission whose content changed (here: its timestamp.txt),
    not one whose file is merely newer."""
    source = load_source(FILTERS, course["root"] / "source")
    for student in ("empty", "full"):
        shutil.copytree(course["root"] / "submitted" / student / FILTERS, tmp_path / "submitted" / student / FILTERS)
    (tmp_path / "submitted" / "empty" / FILTERS / "timestamp.txt").write_text("2026-11-30 12:00:00.000000 UTC\n")
    os.utime(tmp_path / "submitted" / "full" / FILTERS / "filters.ipynb")
    old = {s.student: s.digest for s in collect(course["root"], source)[0]}
    new = {s.student: s.digest for s in collect(tmp_path, source)[0]}
    assert {student for student in new if new[student] != old[student]} == {"empty"}


def _start(cmd, env, log):
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


@contextmanager
def _dask_cluster(tmp_path, workers=("w1", "w2")):
    """A `dask scheduler` and `dask worker` processes (no nanny: a killed worker stays
    dead) on 127.0.0.1: yields (address, client, {worker address: pid}, env)."""
    from distributed import Client

    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("MPLBACKEND", None)
    file = tmp_path / "scheduler.json"
    log = open(tmp_path / "cluster.log", "w")
    procs = [_start([bin_dir / "dask", "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                     "--scheduler-file", file], env, log)]
    try:
        deadline = time.monotonic() + 60
        while not file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        address = json.loads(file.read_text())["address"]
        for name in workers:
            procs.append(_start([bin_dir / "dask", "worker", address, "--nthreads", "1", "--no-nanny",
                                 "--no-dashboard", "--host", "127.0.0.1", "--name", name], env, log))
        with Client(address, timeout="60s") as client:
            client.wait_for_workers(len(workers), timeout=120)
            yield address, client, client.run(os.getpid), env
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()


def _busy(client):
    return [w for w, tasks in client.processing().items() if tasks]


def test_force_on_a_cluster_with_a_killed_worker_regrades_each_once(course, tmp_path):
    """`--scheduler` on a `dask scheduler` and two `dask worker`s of 127.0.0.1; one worker
    is killed with SIGKILL while it grades; `--force` regrades the submissions into
    PostgreSQL to the same numbers, once each. (Two of the class's students, in a course
    folder of their own, so that the test grades two notebooks, not the whole class.)"""
    root, again = tmp_path / "course", ["full", "wrong"]
    for student in again:
        shutil.copytree(course["root"] / "submitted" / student / FEATURES, root / "submitted" / student / FEATURES)
    before = _dump(course["pg"], FEATURES)
    with _dask_cluster(tmp_path) as (address, client, pids, env):
        run = subprocess.Popen([sys.executable, "-m", "cs_helpers.cli", "autograde", FEATURES, "--course",
                                str(root), "--source", str(course["root"] / "source"), "--scheduler", address,
                                "--db", course["pg"], "--force", "--no-progress", "--timeout", TIMEOUT_S,
                                "--csv", str(tmp_path / "force.csv")],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        victim, held, busy_since = None, None, None
        while victim is None and run.poll() is None:
            busy = _busy(client)
            if busy and busy_since is None:
                busy_since = time.monotonic()
            if busy and time.monotonic() - busy_since > 3:  # mid-task: its kernel is running
                victim = busy[0]
                held = client.processing()[victim]
                os.kill(pids[victim], signal.SIGKILL)
            time.sleep(0.2)
        out, _ = run.communicate(timeout=600)
        survivors = list(client.scheduler_info()["workers"])
    print(f"killed {victim} (pid {pids.get(victim)}) while it held {held}; survivors {survivors}")
    print(out)
    assert victim is not None and held and victim not in survivors and len(survivors) == 1
    assert run.returncode == 0, out
    assert _counts(out, FEATURES) == {"graded": len(again)}
    rows = _csv(tmp_path / "force.csv")
    assert sorted(s for s, r in rows.items() if r["status"] == "graded") == again
    after = _dump(course["pg"], FEATURES)
    assert after == before  # the same rows (one submission each), the same numbers to the last digit


def test_a_cluster_that_lost_all_its_workers_fails_the_rest_instead_of_hanging(course, tmp_path):
    """Every worker of a `--scheduler` cluster is killed while it grades: after
    `--lost-workers-after` seconds without a worker the remaining submissions fail with
    the reason, nothing of them is written, and the command exits nonzero."""
    root, students = tmp_path / "course", ["empty", "full", "wrong"]
    for student in students:
        shutil.copytree(course["root"] / "submitted" / student / FILTERS, root / "submitted" / student / FILTERS)
    with _dask_cluster(tmp_path) as (address, client, pids, env):
        run = subprocess.Popen([sys.executable, "-m", "cs_helpers.cli", "autograde", FILTERS, "--course",
                                str(root), "--source", str(course["root"] / "source"), "--scheduler", address,
                                "--lost-workers-after", "3", "--no-progress", "--timeout", TIMEOUT_S,
                                "--csv", str(tmp_path / "lost.csv")],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        killed = False
        while not killed and run.poll() is None:
            if len(_busy(client)) == len(pids):  # every worker holds a grading
                for pid in pids.values():
                    os.kill(pid, signal.SIGKILL)
                killed = True
            time.sleep(0.1)
        start = time.monotonic()
        out, err = run.communicate(timeout=120)
        waited = time.monotonic() - start
    print(out, err, f"ended {waited:.1f} s after the kill")
    assert killed and run.returncode == 1, (out, err)
    assert waited < 60
    reason = "the cluster lost all its workers"
    assert reason in err
    rows = _csv(tmp_path / "lost.csv")
    assert sorted(rows) == students
    assert all(r["status"] == "failed" and reason in r["reason"] for r in rows.values()), rows
    assert _counts(out, FILTERS) == {"failed": len(students)}
    _, submissions = _dump(f"sqlite:///{root / 'gradebook.db'}", FILTERS)
    assert submissions == {}
    assert not (root / "autograded").exists()


def test_whole_run_refused_on_bad_arguments(course, capsys, tmp_path):
    root = course["root"]
    code, captured = _autograde(capsys, "03_nonsense", root)
    assert code == 2 and "unknown assignment '03_nonsense'" in captured.err and "01_filters" in captured.err
    code, captured = _autograde(capsys, "../01_filters", root)
    assert code == 2 and "unknown assignment" in captured.err
    code, captured = _autograde(capsys, FILTERS, tmp_path, source=root / "source")
    assert code == 2 and "no submitted/ folder" in captured.err
    code, captured = _autograde(capsys, FILTERS, root, "--db", "not a url")
    assert code == 2 and "not a database URL" in captured.err
    code, captured = _autograde(capsys, FILTERS, root, "--workers", "0")
    assert code == 2 and "at least 1" in captured.err
    code, captured = _autograde(capsys, FILTERS, root, "--lost-workers-after", "0")
    assert code == 2 and "positive number of seconds" in captured.err
    assert not list(tmp_path.iterdir())


def test_duplicate_and_missing_cells_are_named(tmp_path):
    """Graded as `cs-helpers grade` does (the last copy counts, a missing cell is
    restored and earns 0), and said in the report."""
    source = _small_source("filters", tmp_path / "source")
    full = tmp_path / "submitted" / "dup" / FILTERS / "filters.ipynb"
    full.parent.mkdir(parents=True)
    nb = nbformat.read(source, as_version=4)
    copy = [c for c in nb.cells if _grade_id(c) == "normalize_filters"][0]
    nb.cells.append(nbformat.from_dict(json.loads(json.dumps(copy))))
    nb.cells = [c for c in nb.cells if _grade_id(c) != "linear_templates"]
    nbformat.write(nb, full)
    subs, others = collect(tmp_path, load_source(FILTERS, tmp_path / "source"))
    assert not others and len(subs) == 1
    notes = " ".join(subs[0].notes)
    assert "more than once" in notes and "'normalize_filters'" in notes
    assert "missing" in notes and "'linear_templates'" in notes

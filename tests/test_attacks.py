"""The attack catalogue: submissions a determined student would write, graded through
the real pipeline (``nbgrader autograde`` with the course configuration, and
``cs-helpers grade``'s ``grade_submission``) in a temporary course whose small
assignment has two graded functions of notebook 01 and one written answer.

Each attack earns 0 for the function it is in, leaves the other function's score and
every other student's gradebook rows unchanged, lets the batch finish, and keeps the
grader's memory bounded. Classes (issue "grading that holds against a hostile
student"): 1 the notebook's own execution, 2 the scoring child, 3 forgeable evidence,
4 hidden cases, 5 what the child sends back, 6 a kernel that dies."""
import json
import resource
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from cs_helpers.grading import isolation

pytestmark = [pytest.mark.slow, pytest.mark.long_running, pytest.mark.xdist_group("attacks"),
              pytest.mark.skipif(isolation.sandbox_problem() is not None, reason="needs the OS sandbox")]

REPO = Path(__file__).resolve().parent.parent
ASSIGNMENT = "ps1"
NOTEBOOK = "filters.ipynb"

SETUP = "import torch\nfrom cs_helpers import grading\n"
NORMALIZE = '''import torch

def normalize_filters(weights):
    flat = weights.detach().float().flatten(1)
    low, high = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    span = high - low
    out = torch.where(span > 0, (flat - low) / torch.where(span > 0, span, torch.ones_like(span)),
                      torch.full_like(flat, 0.5))
    return out.reshape(weights.shape)
'''
TEMPLATES = '''import math
import torch

def linear_templates(W, image_shape):
    rows = W.detach().float()
    low, high = rows.min(1, keepdim=True).values, rows.max(1, keepdim=True).values
    span = high - low
    out = torch.where(span > 0, (rows - low) / torch.where(span > 0, span, torch.ones_like(span)),
                      torch.full_like(rows, 0.5))
    return out.reshape(W.shape[0], *image_shape)
'''


def _meta(grade_id, *, grade=False, solution=False, locked=False, points=None):
    meta = {"grade": grade, "grade_id": grade_id, "locked": locked, "schema_version": 3,
            "solution": solution, "task": False}
    if points is not None:
        meta["points"] = points
    return {"nbgrader": meta}


def _test_cell(name, visible):
    source = (f"{visible}\nprint('Visible checks passed.')\n"
              f"### BEGIN HIDDEN TESTS\ngrading.score({name!r}, {name})\n### END HIDDEN TESTS\n")
    return new_code_cell(source, metadata=_meta(f"test_{name}", grade=True, locked=True, points=2))


def _source_notebook():
    return new_notebook(cells=[
        new_markdown_cell("# Two graded functions"),
        new_code_cell(SETUP, metadata=_meta("setup", locked=True)),
        new_code_cell("### BEGIN SOLUTION\n" + NORMALIZE + "### END SOLUTION\n",
                      metadata=_meta("normalize_filters", solution=True)),
        _test_cell("normalize_filters", "out = normalize_filters(torch.tensor([0., 1, 2, 4]).view(1, 1, 2, 2))\n"
                                        "assert torch.allclose(out.flatten(), torch.tensor([0, .25, .5, 1]))"),
        new_code_cell("### BEGIN SOLUTION\n" + TEMPLATES + "### END SOLUTION\n",
                      metadata=_meta("linear_templates", solution=True)),
        _test_cell("linear_templates", "assert linear_templates(torch.eye(2), (2,)).shape == (2, 2)"),
        new_markdown_cell("Why min-max per filter?\n\n=== BEGIN MARK SCHEME ===\nper filter\n=== END MARK SCHEME ===",
                          metadata=_meta("question_why", grade=True, solution=True, points=1)),
    ], metadata={"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}})


def _submission(normalize=NORMALIZE, templates=TEMPLATES, extra_cells=()):
    nb = _source_notebook()
    nb.cells[2].source = normalize
    nb.cells[4].source = templates
    nb.cells[6].source = "Each filter has its own range."
    for index, source in extra_cells:
        nb.cells.insert(index, new_code_cell(source))
    return nb


# -- the attacks ----------------------------------------------------------------------

# Class 1: in nbgrader's execution of the notebook, an extra cell plants an IPython
# startup file in HOME that would rewrite the next student's grading, copies the
# reference where the scoring child might read it back, and writes extra credit into the
# gradebook; the graded function then relies on the copy.
KERNEL_ATTACK = '''import os, shutil, sqlite3
startup = os.path.expanduser("~/.ipython/profile_default/startup")
try:
    os.makedirs(startup, exist_ok=True)
    with open(os.path.join(startup, "00-cs-attack.py"), "w") as f:
        f.write("get_ipython().input_transformers_cleanup.append(lambda lines: ['pass\\\\n'])\\n")
except OSError:
    pass
try:
    import cs_helpers.reference.filters as ref
    shutil.copy(ref.__file__, "/tmp/stolen_reference.py")
except Exception:
    pass
try:
    db = sqlite3.connect("{gradebook}")
    db.execute("UPDATE grade SET extra_credit = 100")
    db.commit()
except Exception:
    pass
'''
USES_STOLEN_COPY = '''def normalize_filters(weights):
    import importlib.util
    spec = importlib.util.spec_from_file_location("stolen", "/tmp/stolen_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.normalize_filters(weights)
'''

# Class 2: the scoring child goes after the reference, the gradebook and the grader's
# environment by every route an audit hook missed.
CHILD_ATTACKS = '''def normalize_filters(weights):
    import os, sqlite3, subprocess, torch
    repo = "{repo}"
    routes = []
    def relative():
        fd = os.open(repo, os.O_RDONLY)
        return os.open("cs_helpers/reference/filters.py", os.O_RDONLY, dir_fd=fd)
    routes.append(relative)
    routes.append(lambda: torch.from_file(repo + "/cs_helpers/reference/filters.py", size=10))
    routes.append(lambda: sqlite3.connect("file:{gradebook}?mode=ro", uri=True).execute("select 1").fetchall())
    routes.append(lambda: subprocess.run(["cat", repo + "/cs_helpers/reference/filters.py"], check=True,
                                         capture_output=True).stdout[:1] or None)
    routes.append(lambda: os.link(repo + "/cs_helpers/reference/filters.py", "/tmp/linked.py"))
    routes.append(lambda: "CS_HELPERS" in open("/proc/1/environ").read() or None)
    routes.append(lambda: open(repo + "/.git/HEAD").read())
    routes.append(lambda: open(repo + "/.cs-helpers-secret").read())
    for route in routes:
        try:
            if route() is not None:
                return weights  # a route worked: the submission would now cheat
        except Exception:
            pass
    raise RuntimeError("every route was closed")
'''
KILL_THE_GRADER = '''import os, signal

def linear_templates(W, image_shape):
    for pid in range(1, 200):
        if pid != os.getpid():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    return W  # nobody died but this sandbox's own processes: the grader goes on
'''

# Class 5: an oversized allocation, and a decompression bomb written straight to the
# pipe that carries the result, bypassing the child's encoder.
EXHAUST_MEMORY = '''import torch

def normalize_filters(weights):
    hog = torch.ones(2**36, dtype=torch.uint8)  # 64 GiB
    return weights + hog[0]
'''
RESULT_BOMB = '''def linear_templates(W, image_shape):
    import io, os, zipfile
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        with archive.open("__result__.npy", "w", force_zip64=True) as member:
            for _ in range(256):
                member.write(bytes(2**24))
    for fd in range(3, 64):
        try:
            os.write(fd, buffer.getvalue())
        except OSError:
            pass
    os._exit(0)
'''

# Class 6: a function that ends its kernel when the visible test calls it.
KILLS_ITS_KERNEL = '''import os

def normalize_filters(weights):
    os._exit(3)
'''

# Monkeypatching IPython from a solution cell, and the reference imported directly.
TRANSFORMER_AND_IMPORT = '''get_ipython().input_transformers_cleanup.append(lambda lines: ['pass\\n'])
from cs_helpers.reference.filters import normalize_filters
'''
NOISY_TEMPLATES = TEMPLATES + "import sys\nprint('x' * 10**6, file=sys.stderr)\n"

FULL = {"test_normalize_filters": 2.0, "test_linear_templates": 2.0}
STUDENTS = {
    # student: (submission factory, expected scores)
    "alice": (lambda c: _submission(), FULL),
    "mallory": (lambda c: _submission(normalize=USES_STOLEN_COPY,
                                      extra_cells=[(2, KERNEL_ATTACK.format(gradebook=c / "gradebook.db"))]),
                {"test_normalize_filters": 0.0, "test_linear_templates": 2.0}),
    "oscar": (lambda c: _submission(normalize=CHILD_ATTACKS.format(repo=REPO, gradebook=c / "gradebook.db"),
                                    templates=KILL_THE_GRADER),
              {"test_normalize_filters": 0.0, "test_linear_templates": 0.0}),
    "greedy": (lambda c: _submission(normalize=EXHAUST_MEMORY, templates=RESULT_BOMB),
               {"test_normalize_filters": 0.0, "test_linear_templates": 0.0}),
    "crash": (lambda c: _submission(normalize=KILLS_ITS_KERNEL), {"test_normalize_filters": 0.0,
                                                                   "test_linear_templates": 2.0}),
    "trudy": (lambda c: _submission(normalize=TRANSFORMER_AND_IMPORT, templates=NOISY_TEMPLATES),
              {"test_normalize_filters": 0.0, "test_linear_templates": 2.0}),
    "bob": (lambda c: _submission(), FULL),  # graded last: nothing planted before reaches him
}


def _api(root: Path):
    from nbgrader.apps import NbGraderAPI
    from traitlets.config import Config

    from cs_helpers.grading.nbgrader_settings import configure

    config = Config()
    configure(config, root=str(root), source_directory="source")
    config.CourseDirectory.course_id = "attacks"
    config.Exchange.root = str(root / "exchange")
    config.Execute.timeout = 60
    return NbGraderAPI(config=config)


@pytest.fixture(scope="module")
def graded_course(tmp_path_factory):
    from nbgrader.api import Gradebook

    root = tmp_path_factory.mktemp("course")
    (root / "source" / ASSIGNMENT).mkdir(parents=True)
    nbformat.write(_source_notebook(), root / "source" / ASSIGNMENT / NOTEBOOK)
    api = _api(root)
    assert api.generate_assignment(ASSIGNMENT, force=True, create=True)["success"]
    with Gradebook(f"sqlite:///{root / 'gradebook.db'}") as gb:
        for student in STUDENTS:
            gb.update_or_create_student(student)
    paths = {}
    for student, (make, _) in STUDENTS.items():
        folder = root / "submitted" / student / ASSIGNMENT
        folder.mkdir(parents=True)
        nbformat.write(make(root), folder / NOTEBOOK)
        paths[student] = folder / NOTEBOOK
    startup = Path.home() / ".ipython" / "profile_default" / "startup" / "00-cs-attack.py"
    assert not startup.exists()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    results = {}
    for student in STUDENTS:  # in order: each later student could suffer from an earlier one
        results[student] = api.autograde(ASSIGNMENT, student, force=True, create=True)
    peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scores, extra = {}, {}
    with Gradebook(f"sqlite:///{root / 'gradebook.db'}") as gb:
        for student in STUDENTS:
            nb = gb.find_submission_notebook(NOTEBOOK[:-6], ASSIGNMENT, student)
            scores[student] = {g.name: g.auto_score for g in nb.grades if g.name.startswith("test_")}
            extra[student] = [(g.name, g.manual_score, g.extra_credit) for g in nb.grades
                              if g.manual_score is not None or g.extra_credit]
    return {"root": root, "results": results, "scores": scores, "extra": extra, "paths": paths,
            "grader_growth_kb": peak_after - peak_before, "startup_planted": startup.exists()}


@pytest.mark.parametrize("student", list(STUDENTS))
def test_nbgrader_autograde_gives_each_attack_nothing(graded_course, student):
    result = graded_course["results"][student]
    assert result["success"], result.get("log", "")[-2000:]
    assert graded_course["scores"][student] == STUDENTS[student][1]
    assert graded_course["extra"][student] == []  # no extra credit, no manual score, from anyone


def test_the_grader_and_the_grader_home_are_untouched(graded_course):
    assert not graded_course["startup_planted"]
    # The bombs and floods did not grow the grader (its own imports aside).
    assert graded_course["grader_growth_kb"] < 1_500_000


def test_a_dead_kernel_is_named_in_the_graded_notebook(graded_course):
    autograded = graded_course["root"] / "autograded" / "crash" / ASSIGNMENT / NOTEBOOK
    nb = nbformat.read(autograded, as_version=4)
    died = [c for c in nb.cells if c.cell_type == "code"
            and any("The kernel stopped while running this cell" in o.get("text", "") for o in c.get("outputs", []))]
    assert len(died) == 1
    assert died[0].metadata["nbgrader"]["grade_id"] == "test_normalize_filters"


@pytest.mark.parametrize("student", ["mallory", "crash"])
def test_cs_helpers_grade_gives_the_same_scores(graded_course, student, tmp_path):
    from cs_helpers.course import grade_submission

    source_dir = graded_course["root"] / "source"
    # grade_submission finds the source by file name under NN_topic folders.
    course = tmp_path / "notebooks" / "01_ps1"
    course.mkdir(parents=True)
    nbformat.write(_source_notebook(), course / NOTEBOOK)
    assert (source_dir / ASSIGNMENT / NOTEBOOK).is_file()
    submission = tmp_path / NOTEBOOK
    nbformat.write(STUDENTS[student][0](tmp_path / "course-that-does-not-exist"), submission)
    result = grade_submission(submission, notebooks_dir=tmp_path / "notebooks")
    assert {c["grade_id"]: c["score"] for c in result.cells} == STUDENTS[student][1]


def test_one_command_grades_attackers_and_the_student_after_them_apart(tmp_path, monkeypatch, capsys):
    """`cs-helpers grade` on several submissions starts each kernel while it prepares that
    submission (the first one in the background while it imports) and takes it over: a
    kernel that plants files, copies the reference or ends itself costs only its own
    submission, and the honest one graded after them, in a kernel of its own, earns
    everything. No kernel is left waiting afterwards."""
    from cs_helpers import course
    from cs_helpers.cli import main

    source = tmp_path / "notebooks" / "01_ps1" / NOTEBOOK
    source.parent.mkdir(parents=True)
    nbformat.write(_source_notebook(), source)
    monkeypatch.setattr(course, "find_source", lambda submission, notebooks_dir=None: source)
    order = ["mallory", "crash", "trudy", "bob"]
    paths = []
    for student in order:
        path = tmp_path / student / NOTEBOOK
        path.parent.mkdir()
        nbformat.write(STUDENTS[student][0](tmp_path / "course-that-does-not-exist"), path)
        paths.append(str(path))
    taken = []
    take = isolation._take_early_kernel

    def recorded():
        kernel = take()
        if kernel is not None:
            taken.append(kernel.process.pid)
        return kernel

    monkeypatch.setattr(isolation, "_take_early_kernel", recorded)
    startup = Path.home() / ".ipython" / "profile_default" / "startup" / "00-cs-attack.py"
    assert main(["grade", *paths, "--json"]) == 0
    reports = json.loads(capsys.readouterr().out)["notebooks"]
    assert [{c["grade_id"]: c["score"] for c in r["cells"]} for r in reports] == [STUDENTS[s][1] for s in order]
    assert len(taken) == len(order) == len(set(taken))  # a fresh kernel, started early, for each
    assert isolation._take_early_kernel() is None
    assert not startup.exists() and not (tmp_path / "stolen_reference.py").exists()


def test_points_in_the_gradebook_from_anyone_but_the_grader_are_refused(tmp_path, monkeypatch):
    """The sandbox keeps the gradebook out of a student's reach; should anything else
    write points into the fresh gradebook all the same (here: a compromised autograde
    step), `cs-helpers grade` refuses the scores instead of reporting them."""
    from nbgrader.api import Gradebook
    from nbgrader.apps import NbGraderAPI

    from cs_helpers.course import GradebookTampered, grade_submission

    real_autograde = NbGraderAPI.autograde

    def autograde_then_plant(self, assignment_id, student_id, **kwargs):
        result = real_autograde(self, assignment_id, student_id, **kwargs)
        with Gradebook(self.coursedir.db_url) as gb:
            grade = gb.find_submission_notebook(NOTEBOOK[:-6], assignment_id, student_id).grades[0]
            grade.manual_score = 5.0  # what the formgrader writes
            gb.db.commit()
        return result

    monkeypatch.setattr(NbGraderAPI, "autograde", autograde_then_plant)
    course = tmp_path / "notebooks" / "01_ps1"
    course.mkdir(parents=True)
    nbformat.write(_source_notebook(), course / NOTEBOOK)
    submission = tmp_path / NOTEBOOK
    nbformat.write(STUDENTS["alice"][0](tmp_path / "unused"), submission)
    with pytest.raises(GradebookTampered, match="manual score or extra credit"):
        grade_submission(submission, notebooks_dir=tmp_path / "notebooks")

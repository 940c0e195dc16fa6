"""The real nbgrader pipeline, driven through its API in a temporary course directory
per grading: source notebooks earn full marks, the student release earns nothing, a
wrong function loses its own points and no others, and the known attacks on stock
nbgrader earn nothing here."""
import json
from pathlib import Path

import nbformat
import pytest

from cs_helpers.cli import main
from cs_helpers.course import grade_submission, source_notebooks
from helpers import graded_cells_only

pytestmark = pytest.mark.slow

NOTEBOOKS = {p.stem: p for p in source_notebooks()}

# A typical mistake: normalizing the whole bank instead of each filter.
GLOBAL_NORMALIZATION = '''import torch

def normalize_filters(weights):
    """Normalized over the whole bank instead of per filter."""
    return (weights - weights.min()) / (weights.max() - weights.min())
'''


def _scores(result):
    return {c["grade_id"]: (c["score"], c["max_score"]) for c in result.cells}


def _with_solution(path: Path, out: Path, grade_id: str, source: str) -> Path:
    nb = nbformat.read(path, as_version=4)
    cells = [c for c in nb.cells if c.get("metadata", {}).get("nbgrader", {}).get("grade_id") == grade_id]
    assert len(cells) == 1, grade_id
    cells[0].source = source
    out.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, out)
    return out


@pytest.mark.parametrize("topic", sorted(NOTEBOOKS))
def test_source_notebook_earns_full_marks_through_the_command(topic, capsys):
    """`cs-helpers grade NOTEBOOK --json`, as an instructor runs it."""
    assert main(["grade", str(NOTEBOOKS[topic]), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)["notebooks"][0]
    assert report["notebook"] == NOTEBOOKS[topic].name and report["cells"]
    for cell in report["cells"]:
        assert cell["grade_id"].startswith("test_") and cell["score"] == cell["max_score"] > 0, cell
    assert report["score"] == report["max_score"] == sum(c["max_score"] for c in report["cells"])


@pytest.mark.parametrize("topic", sorted(NOTEBOOKS))
def test_student_release_earns_nothing(topic, student_release, tmp_path):
    notebook = student_release / "notebooks" / NOTEBOOKS[topic].parent.name / NOTEBOOKS[topic].name
    text = notebook.read_text()
    assert "BEGIN HIDDEN TESTS" not in text and "BEGIN SOLUTION" not in text
    result = grade_submission(graded_cells_only(notebook, tmp_path / notebook.name))
    assert result.cells and all(score == 0 for score, _ in _scores(result).values()), result.as_dict()


def test_student_release_has_no_reference(student_release):
    assert (student_release / "cs_helpers" / "grading").is_dir()
    assert not (student_release / "cs_helpers" / "reference").exists()
    assert not list(student_release.rglob("nbgrader_config.py"))


# Another: summing the gradient's colour channels instead of taking their maximum.
CHANNEL_SUM_SALIENCY = '''import torch

def gradient_saliency(model, images, targets):
    """Sums over the colour channels instead of taking the max."""
    x = images.detach().clone().requires_grad_(True)
    t = targets if isinstance(targets, torch.Tensor) else torch.full((len(x),), targets)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(model(x).gather(1, t[:, None]).sum(), x)
    return g.abs().sum(dim=1)
'''

WRONG_FUNCTIONS = [("filters", "normalize_filters", GLOBAL_NORMALIZATION),
                   ("saliency", "gradient_saliency", CHANNEL_SUM_SALIENCY)]


@pytest.mark.parametrize("topic, grade_id, source", [pytest.param(*w, id=w[1]) for w in WRONG_FUNCTIONS])
def test_one_wrong_function_loses_its_points_and_no_others(topic, grade_id, source, tmp_path):
    if topic not in NOTEBOOKS:
        pytest.skip(f"needs the {topic} notebook")
    path = graded_cells_only(NOTEBOOKS[topic], tmp_path / NOTEBOOKS[topic].name)
    path = _with_solution(path, path, grade_id, source)
    scores = _scores(grade_submission(path))
    for cell_id, (score, maximum) in scores.items():
        if cell_id == f"test_{grade_id}":
            assert 0 < score < maximum, cell_id
        else:
            assert score == maximum, cell_id


ATTACK = '''get_ipython().input_transformers_cleanup.append(lambda lines: ['pass\\n'])
import torch

def normalize_filters(weights):
    return weights
'''


IMPORT_REFERENCE = "from cs_helpers.reference.filters import conv2d_im2col\n"


def _attack_submission(tmp_path):
    """The input-transformer attack in one solution cell, the reference imported in
    another, and every test cell tagged for nbconvert to skip."""
    path = _with_solution(NOTEBOOKS["filters"], tmp_path / "filters.ipynb", "normalize_filters", ATTACK)
    path = _with_solution(path, path, "conv2d_im2col", IMPORT_REFERENCE)
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.get("metadata", {}).get("nbgrader", {}).get("grade"):
            cell.metadata["tags"] = ["skip-execution"]
    nbformat.write(nb, path)
    return path


@pytest.mark.skipif("filters" not in NOTEBOOKS, reason="needs notebook 01")
def test_the_attacks_fool_stock_nbgrader(tmp_path):
    """What the trust boundary is for: without it these submissions earn full marks."""
    scores = _scores(grade_submission(_attack_submission(tmp_path), trusted=False))
    # Every test cell after the input transformer passes without running; the honest
    # function before it earns nothing in stock scoring, since the sandboxed kernel has
    # no reference to score it with (only the trusted scores can).
    for name in ("test_normalize_filters", "test_im2col", "test_conv2d_im2col"):
        assert scores[name][0] == scores[name][1], name


@pytest.mark.skipif("filters" not in NOTEBOOKS, reason="needs notebook 01")
def test_the_attacks_earn_nothing_here(tmp_path):
    scores = _scores(grade_submission(_attack_submission(tmp_path)))
    assert scores["test_normalize_filters"][0] < scores["test_normalize_filters"][1] / 2
    assert scores["test_conv2d_im2col"][0] == 0
    # The function written honestly in the same submission keeps its points.
    assert scores["test_linear_templates"][0] == scores["test_linear_templates"][1]


@pytest.mark.skipif("filters" not in NOTEBOOKS, reason="needs notebook 01")
def test_walkthrough_writes_executed_notebooks_with_pictures(tmp_path, monkeypatch):
    from cs_helpers.course import walkthrough

    monkeypatch.setenv("MPLBACKEND", "Agg")  # as under `make test`: the kernel must still draw
    rows = walkthrough(tmp_path, [NOTEBOOKS["filters"]])
    assert [(r.notebook, r.status) for r in rows] == [("filters.ipynb", "ok")]
    html = (tmp_path / "filters.html").read_text()
    assert html.count("data:image/png") >= 5


def test_walkthrough_takes_numbers_and_topics_and_names_the_choices(tmp_path, capsys):
    from cs_helpers.cli import main
    from cs_helpers.course import _notebook_path

    assert _notebook_path("03") == _notebook_path("saliency") == _notebook_path("03_saliency") == NOTEBOOKS["saliency"]
    assert _notebook_path(NOTEBOOKS["filters"]) == NOTEBOOKS["filters"]
    assert main(["walkthrough", "--out", str(tmp_path), "99"]) == 2
    error = capsys.readouterr().err
    assert "no notebook '99'" in error and "01_filters" in error and "07_tcav" in error
    assert not any(tmp_path.iterdir())


def test_a_fresh_gradebook_is_the_one_nbgrader_would_create(tmp_path):
    """course.fresh_gradebook skips nbgrader's `alembic heads` subprocess: the same
    tables, columns and migration version as nbgrader's own first use."""
    import sqlite3

    from nbgrader.api import Gradebook, get_alembic_version

    from cs_helpers.course import _venv_on_path, fresh_gradebook

    def schema(path):
        with sqlite3.connect(path) as db:
            tables = sorted(r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'"))
            columns = {t: [c[1:3] for c in db.execute(f"PRAGMA table_info('{t}')")] for t in tables}
            return columns, db.execute("SELECT version_num FROM alembic_version").fetchall()

    ours = fresh_gradebook(tmp_path / "ours.db")
    with _venv_on_path():
        Gradebook(f"sqlite:///{tmp_path / 'theirs.db'}").close()
        head = get_alembic_version()
    assert schema(ours) == schema(tmp_path / "theirs.db")
    assert schema(ours)[1] == [(head,)]
    with pytest.raises(FileExistsError, match="already exists"):
        fresh_gradebook(ours)
    with Gradebook(f"sqlite:///{ours}", course_id="course") as gb:   # nbgrader opens it as its own
        gb.add_student("s1")
        assert [s.id for s in gb.students] == ["s1"]

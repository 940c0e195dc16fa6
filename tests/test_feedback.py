"""Feedback and the formgrader show the student's own sources and the grader's trusted
scores, all of it inert: unit tests of each preprocessor of cs_helpers.grading.feedback,
then a hostile submission through nbgrader's own API (generate_assignment, autograde,
generate_feedback) in a temporary course."""
import base64
import re
from html.parser import HTMLParser

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output, new_raw_cell
from traitlets.config import Config

from cs_helpers.grading import feedback as fb

PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 64).decode()


def _nbgrader(grade_id, **flags):
    meta = {"grade": False, "grade_id": grade_id, "locked": False, "schema_version": 3,
            "solution": False, "task": False}
    meta.update(flags)
    return {"nbgrader": meta}


class _Live(HTMLParser):
    """Elements and attributes that run code in a browser."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.found = []

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "iframe", "object", "embed", "form", "base", "meta", "link"):
            self.found.append(tag)
        for name, value in attrs:
            url = re.sub(r"\s", "", value or "").lower()
            if name.startswith("on") or url.startswith(("javascript:", "vbscript:", "data:text")):
                self.found.append(f"{tag} {name}={value}")


def _live_markup(html):
    parser = _Live()
    parser.feed(html)
    parser.close()
    return parser.found


def _run(pp, nb, resources=None):
    return pp.preprocess(nb, resources if resources is not None else {})


def _notes(nb):
    return [c.source for c in nb.cells if c.metadata.get(fb.NOTE_KEY)]


# ------------------------------------------------------------------ duplicated cells


def test_duplicated_solution_cell_keeps_the_last_copy_and_tells_the_student():
    first = new_code_cell("def f():\n    return 1\n", metadata=_nbgrader("f", solution=True))
    second = new_code_cell("def f():\n    return 2\n", metadata=_nbgrader("f", solution=True))
    empty = new_code_cell("x = 1", metadata={"nbgrader": {}})
    nb, _ = _run(fb.DeduplicateCells(), new_notebook(cells=[first, second, empty]))
    graded = [c for c in nb.cells if fb._grade_id(c) == "f"]
    assert len(graded) == 1 and "return 2" in graded[0].source
    assert "nbgrader" not in first.metadata and "nbgrader" not in empty.metadata
    notes = _notes(nb)
    assert len(notes) == 1 and "`f`" in notes[0] and "last copy" in notes[0]
    assert nb.cells.index(first) == nb.cells.index(graded[0]) - 1 == 1  # note, copy, graded


def test_deduplication_leaves_nbgraders_own_step_nothing_to_break_on():
    """nbgrader issue #1083: DeduplicateIds leaves `"nbgrader": {}` behind."""
    from nbgrader.preprocessors import DeduplicateIds

    cells = [new_code_cell("a", metadata=_nbgrader("f", solution=True)),
             new_code_cell("b", metadata=_nbgrader("f", solution=True))]
    nb, _ = _run(fb.DeduplicateCells(), new_notebook(cells=cells))
    nb, _ = _run(DeduplicateIds(), nb)
    assert all(c.metadata.get("nbgrader", {"grade_id": 1}).get("grade_id") for c in nb.cells)


# ------------------------------------------------------------------ attachments


def test_oversized_and_non_image_attachments_are_dropped_with_a_note():
    big = base64.b64encode(b"\0" * 1_500_000).decode()
    cells = [new_markdown_cell("![a](attachment:a.png) ![b](attachment:b.png) ![c](attachment:c.html)")]
    cells[0].attachments = {"a.png": {"image/png": PNG}, "b.png": {"image/png": big},
                            "c.html": {"text/html": "<script>alert(1)</script>"}}
    cells.append(new_markdown_cell("ok"))
    nb, _ = _run(fb.CapAttachments(), new_notebook(cells=cells))
    assert set(nb.cells[0].attachments) == {"a.png"}
    note = " ".join(_notes(nb))
    assert "`b.png` (1.5 MB) was removed" in note and "`c.html`" in note and "only images" in note
    assert "attachment:a.png" in nb.cells[0].source and "attachment:b.png" not in nb.cells[0].source
    fb.render_markdown(nb.cells[0].source, nb.cells[0].attachments)  # renders now


def test_a_link_to_a_missing_attachment_no_longer_breaks_rendering():
    from nbconvert.filters.markdown_mistune import InvalidNotebook

    source = "text ![x](attachment:missing.png) and ![y](<attachment:has space.png>)"
    with pytest.raises(InvalidNotebook):
        fb.render_markdown(source, {})
    nb, _ = _run(fb.CapAttachments(), new_notebook(cells=[new_markdown_cell(source)]))
    fb.render_markdown(nb.cells[0].source, {})
    assert "`missing.png`" in " ".join(_notes(nb))


def test_attachments_share_one_budget_per_notebook():
    half = base64.b64encode(b"\0" * 600_000).decode()
    cells = []
    for name in ("one.png", "two.png"):
        cell = new_markdown_cell(f"![i](attachment:{name})")
        cell.attachments = {name: {"image/png": half}}
        cells.append(cell)
    nb, _ = _run(fb.CapAttachments(), new_notebook(cells=cells))
    assert "attachments" in nb.cells[0] and "attachments" not in nb.cells[1]
    assert "`two.png`" in _notes(nb)[0]


# ------------------------------------------------------------------ markdown


HOSTILE_MARKDOWN = [
    "<script>alert(1)</script>", '<img src=x onerror="alert(1)">', "[x](javascript:alert(1))",
    "<javascript:alert(1)>", "[x](jav&#x61;script:alert(1))", "<iframe src=/x></iframe>",
    "<svg onload=alert(1)>", "<form action=/x><button>go</button></form>", "<style>*{}</style>",
    '<div class="navbar-fixed-top">x</div>', "[x](data:text/html,hi)",
]
BENIGN_MARKDOWN = [
    "# Title\n\nText with *emphasis*, `x < y` and $a < b$.", "```python\nprint(1 < 2)\n```",
    "| a | b |\n|:--|--:|\n| 1 | 2 |", "> a quote\n\n1. one\n2. two", "[d2l](https://d2l.ai)",
    "![a](attachment:a.png)",
]


@pytest.mark.parametrize("source", HOSTILE_MARKDOWN)
def test_markdown_with_live_markup_is_shown_as_plain_text(source):
    cell = new_markdown_cell(source, metadata=_nbgrader("question_q", grade=True, solution=True, points=1))
    nb, _ = _run(fb.SanitizeMarkdown(), new_notebook(cells=[cell]))
    assert nb.cells[0].source.startswith(f"**{fb.NOTE}**") and source in nb.cells[0].source
    rendered = fb.render_markdown(nb.cells[0].source)
    assert not fb.unsafe_markup(rendered)
    assert _live_markup(rendered) == []


@pytest.mark.parametrize("source", BENIGN_MARKDOWN)
def test_ordinary_markdown_is_left_alone(source):
    cell = new_markdown_cell(source)
    cell.attachments = {"a.png": {"image/png": PNG}}
    nb, _ = _run(fb.SanitizeMarkdown(), new_notebook(cells=[cell]))
    assert nb.cells[0].source == source


def test_raw_cells_are_escaped_and_locked_instructor_cells_kept():
    raw = new_raw_cell("<script>alert(1)</script>", metadata={"raw_mimetype": "text/html"})
    locked = new_markdown_cell("<b>instructions</b>", metadata=_nbgrader("intro", locked=True))
    nb, _ = _run(fb.SanitizeMarkdown(), new_notebook(cells=[raw, locked]))
    assert nb.cells[0].source == "&lt;script&gt;alert(1)&lt;/script&gt;" and not nb.cells[0].metadata
    assert nb.cells[1].source == "<b>instructions</b>"


# ------------------------------------------------------------------ outputs


def _graded_test_cell():
    cell = new_code_cell("grading.score('f', f)", metadata=_nbgrader("test_f", grade=True, locked=True, points=2))
    cell.outputs = [new_output("stream", name="stdout", text="kernel says full marks\n")]
    return cell


def test_only_outputs_rewritten_by_the_trusted_scorer_survive():
    student = new_code_cell("print(In)")
    student.outputs = [new_output("stream", name="stdout", text="### BEGIN HIDDEN TESTS\n"),
                       new_output("display_data", data={"text/html": "<script>x()</script>",
                                                        "application/javascript": "x()"})]
    rewritten, untouched = _graded_test_cell(), _graded_test_cell()
    untouched.metadata.nbgrader.grade_id = "test_g"
    nb = new_notebook(cells=[student, rewritten, untouched])
    resources = {}
    nb, resources = _run(fb.DropUntrustedOutputs(), nb, resources)
    assert student.outputs == [fb._note_output()]
    # What TrustedScores does to the test cells it scores:
    rewritten.outputs = [new_output("stream", name="stdout", text="f: every property checked holds.\n"),
                         new_output("execute_result", data={"text/plain": "2.0"}, execution_count=1)]
    nb, resources = _run(fb.DropUnscoredOutputs(), nb, resources)
    assert [o.get("text", o.get("data")) for o in rewritten.outputs] == [
        "f: every property checked holds.\n", {"text/plain": "2.0"}]
    assert untouched.outputs == [fb._note_output()]


def test_feedback_keeps_plain_text_outputs_only():
    cell = new_code_cell("x")
    cell.outputs = [new_output("stream", name="stdout", text="ok\n"),
                    new_output("execute_result", data={"text/plain": "1.0", "text/html": "<b>1</b>"}, execution_count=1),
                    new_output("display_data", data={"application/javascript": "alert(1)"}),
                    new_output("error", ename="E", evalue="v", traceback=["### BEGIN HIDDEN TESTS"])]
    nb, _ = _run(fb.PlainOutputs(), new_notebook(cells=[cell]))
    kinds = [(o.output_type, sorted(o.get("data", {}))) for o in nb.cells[0].outputs]
    assert kinds == [("stream", []), ("execute_result", ["text/plain"]), ("stream", [])]
    assert "HIDDEN" not in str(nb.cells[0].outputs)


# ------------------------------------------------------------------ wiring


def _configured(root="/tmp/course"):
    from cs_helpers.grading.nbgrader_settings import configure

    c = Config()
    configure(c, root)
    fb.configure_feedback(c)
    return c


def _names(classes):
    return [cls.__name__ for cls in classes]


def test_configure_feedback_places_each_step():
    c = _configured()
    assert _names(c.Autograde.sanitize_preprocessors) == [
        "ClearOutput", "CapAttachments", "DeduplicateCells", "DeduplicateIds", "OverwriteKernelspec",
        "OverwriteCells", "SanitizeMarkdown", "CheckCellMetadata"]
    autograde = _names(c.Autograde.autograde_preprocessors)
    assert autograde.count("DropUntrustedOutputs") == autograde.count("DropUnscoredOutputs") == 1
    assert autograde.index("DropUntrustedOutputs") == autograde.index("TrustedScores") - 1
    assert autograde.index("DropUnscoredOutputs") == autograde.index("SaveAutoGrades") + 1
    assert _names(c.GenerateFeedback.preprocessors) == [
        "GetGrades", "ClearHiddenTests", "CapAttachments", "SanitizeMarkdown", "PlainOutputs",
        "CSSHTMLHeaderPreprocessor"]
    before = {k: list(v) for k, v in c.Autograde.items()}
    fb.configure_feedback(c)  # twice changes nothing
    assert {k: list(v) for k, v in c.Autograde.items()} == before


def test_formgrader_page_gets_a_policy_after_its_own_scripts():
    """The formgrader builds HTMLExporter(config=...) with template 'formgrade'."""
    import os

    import nbgrader.server_extensions.formgrader.handlers as handlers
    from nbconvert.exporters import HTMLExporter

    c = _configured()
    c.HTMLExporter.template_name = "formgrade"
    c.HTMLExporter.extra_template_basedirs = [handlers.template_path]
    nb = new_notebook(cells=[new_markdown_cell("answer")])
    html, _ = HTMLExporter(config=c).from_notebook_node(nb, resources={
        "base_url": "", "submission_id": "s", "notebook_id": "n", "assignment_id": "a", "index": 0,
        "total": 1, "student": "x", "notebook_path": "p"})
    head, body = html.split("</head>", 1)
    policies = re.findall(r'<meta[^>]*Content-Security-Policy[^>]*>', head)
    assert len(policies) == 1 and head.rstrip().endswith(policies[0]) and "formgrade.js" in head
    assert "script-src 'unsafe-hashes'" in policies[0] and "object-src 'none'" in policies[0]
    allowed = re.findall(r"'(sha256-[^']+)'", policies[0])
    for script in re.findall(r"<script[^>]*>(.*?)</script>", body, flags=re.DOTALL):
        assert fb._hash_source(script).strip("'") in allowed  # nbgrader's own tooltips only
    assert os.path.basename(handlers.template_path) == "templates"


# ------------------------------------------------------------------ end to end

SETUP = "import torch\nfrom cs_helpers import grading\n"
SOLUTION = '''import torch


def normalize_filters(weights):
    """Scales every filter to [0, 1] on its own."""
    ### BEGIN SOLUTION
    flat = weights.detach().to(torch.float32).flatten(start_dim=1)
    low = flat.min(dim=1, keepdim=True).values
    span = flat.max(dim=1, keepdim=True).values - low
    safe = torch.where(span > 0, span, torch.ones_like(span))
    return torch.where(span > 0, (flat - low) / safe, torch.full_like(flat, 0.5)).reshape(weights.shape)
    ### END SOLUTION
'''
HIDDEN_MARKER = "hidden_marker_7f3a"
TEST = f'''out = normalize_filters(torch.tensor([0.0, 1.0, 2.0, 4.0]).view(1, 1, 2, 2))
assert torch.allclose(out.flatten(), torch.tensor([0.0, 0.25, 0.5, 1.0]))
### BEGIN HIDDEN TESTS
{HIDDEN_MARKER} = 1
grading.score("normalize_filters", normalize_filters)
### END HIDDEN TESTS
'''
QUESTION = "Why scale each filter on its own?\n\n### BEGIN SOLUTION\nBecause ranges differ.\n### END SOLUTION\n"

REFERENCE_DUMP = '''import inspect
try:
    import cs_helpers.reference.filters as ref
    print(inspect.getsource(ref))
except Exception as exc:
    print("no reference:", type(exc).__name__)
print(In)
from IPython.display import HTML, Javascript, display
display(HTML('<script>document.title="pwned-html"</script><img src=x onerror="alert(1)">'))
display(Javascript('document.title="pwned-js"'))
'''
HOSTILE_ANSWER = ('Because <script>fetch("/formgrader/api/grade")</script> '
                  '<img src=x onerror="alert(document.cookie)"> [click](javascript:alert(1))')


def _source_notebook():
    cells = [
        new_markdown_cell("# Tiny\n\nNormalize filters."),
        new_code_cell(SETUP, metadata=_nbgrader("setup", locked=True)),
        new_code_cell(SOLUTION, metadata=_nbgrader("normalize_filters", solution=True)),
        new_code_cell(TEST, metadata=_nbgrader("test_normalize_filters", grade=True, locked=True, points=2)),
        new_markdown_cell(QUESTION, metadata=_nbgrader("question_scale", grade=True, solution=True, points=1)),
    ]
    nb = new_notebook(cells=cells)
    nb.metadata.kernelspec = {"display_name": "Python 3", "language": "python", "name": "python3"}
    return nb


def _cell(nb, grade_id):
    return next(c for c in nb.cells if fb._grade_id(c) == grade_id)


@pytest.fixture(scope="module")
def course(tmp_path_factory):
    from nbgrader.apps import NbGraderAPI

    from cs_helpers.course import _check, _venv_on_path
    from cs_helpers.grading.nbgrader_settings import configure

    from cs_helpers.grading import isolation

    if isolation.sandbox_problem() is not None:  # only this test's own notebooks run here
        mp = pytest.MonkeyPatch()
        mp.setenv(isolation.UNSANDBOXED_ENV, "1")
    else:
        mp = None
    root = tmp_path_factory.mktemp("course")
    (root / "source" / "ps1").mkdir(parents=True)
    nbformat.write(_source_notebook(), root / "source" / "ps1" / "tiny.ipynb")
    config = Config()
    configure(config, root=str(root), source_directory="source")
    fb.configure_feedback(config)  # harmless when nbgrader_settings.configure already did
    config.Exchange.root = str(root / "exchange")
    config.CourseDirectory.course_id = "course"
    with _venv_on_path():
        api = NbGraderAPI(config=config)
        _check(api.generate_assignment("ps1", force=True, create=True), "generate_assignment")
        release = nbformat.read(root / "release" / "ps1" / "tiny.ipynb", as_version=4)

        # The hostile stub: the released stub, a reference-printing cell, an input-history
        # dump, HTML/JavaScript outputs, and script in the written answer.
        hostile = nbformat.from_dict(release)
        _cell(hostile, "question_scale").source = HOSTILE_ANSWER
        at = hostile.cells.index(_cell(hostile, "normalize_filters")) + 1
        hostile.cells.insert(at, new_code_cell(REFERENCE_DUMP))
        # A copied solution cell, a correct answer, an oversized attachment and a link
        # to an attachment that is not there.
        copied = nbformat.from_dict(release)
        solution = _cell(copied, "normalize_filters")
        solution.source = SOLUTION.replace("    ### BEGIN SOLUTION\n", "").replace("    ### END SOLUTION\n", "")
        stub = nbformat.from_dict(_cell(release, "normalize_filters"))
        copied.cells.insert(copied.cells.index(solution), stub)
        answer = _cell(copied, "question_scale")
        answer.source = "Ranges differ. ![big](attachment:big.png) ![gone](attachment:gone.png) ![ok](attachment:ok.png)"
        answer.attachments = {"big.png": {"image/png": base64.b64encode(b"\0" * 2_000_000).decode()},
                              "ok.png": {"image/png": PNG}}

        for student, nb in (("hostile", hostile), ("copied", copied)):
            target = root / "submitted" / student / "ps1"
            target.mkdir(parents=True)
            nbformat.write(nb, target / "tiny.ipynb")
            _check(api.autograde("ps1", student, force=True, create=True), f"autograde {student}")
            _check(api.generate_feedback("ps1", student), f"generate_feedback {student}")
    yield root, api
    if mp is not None:
        mp.undo()


def _scores(root, student):
    from nbgrader.api import Gradebook

    with Gradebook(f"sqlite:///{root / 'gradebook.db'}") as gb:
        nb = gb.find_submission_notebook("tiny", "ps1", student)
        return {g.name: (g.auto_score, g.max_score) for g in nb.grades}


def _outputs(root, student):
    return (root / "autograded" / student / "ps1" / "tiny.ipynb").read_text(), \
        (root / "feedback" / student / "ps1" / "tiny.html").read_text()


def _body(html):
    return html.split("</head>", 1)[1]


@pytest.mark.slow
def test_hostile_stub_earns_nothing_and_its_feedback_is_inert(course):
    root, _ = course
    scores = _scores(root, "hostile")
    assert scores["test_normalize_filters"] == (0, 2)
    autograded, html = _outputs(root, "hostile")
    nb = nbformat.reads(autograded, as_version=4)
    for text in (html, "\n".join(str(c.get("outputs", "")) for c in nb.cells)):
        assert HIDDEN_MARKER not in text  # the hidden test, read back from `In`
        assert "_min_max_rows" not in text and "def normalize_filters(weights: torch.Tensor)" not in text
        assert "application/javascript" not in text
    assert "pwned" not in "\n".join(str(c.get("outputs", "")) for c in nb.cells)
    assert HIDDEN_MARKER not in html  # hidden tests cleared from the feedback's sources
    assert _live_markup(_body(html)) == []
    policy = re.findall(r'<meta[^>]*Content-Security-Policy[^>]*>', html.split("</head>", 1)[0])
    assert len(policy) == 1 and "default-src 'none'" in policy[0] and "script-src" not in policy[0]
    assert "not kept" in html  # the student is told why their outputs are gone
    answer = _cell(nb, "question_scale").source
    assert answer.startswith(f"**{fb.NOTE}**") and "```text" in answer


@pytest.mark.slow
def test_duplicated_cell_and_oversized_attachment_are_graded_around(course):
    root, _ = course
    scores = _scores(root, "copied")
    autograded, html = _outputs(root, "copied")
    nb = nbformat.reads(autograded, as_version=4)
    assert scores["test_normalize_filters"] == (2, 2), _cell(nb, "test_normalize_filters").outputs
    notes = " ".join(_notes(nb))
    assert "`normalize_filters`" in notes and "last copy" in notes
    assert "`big.png` (2.0 MB) was removed" in notes and "`gone.png`" in notes
    assert set(_cell(nb, "question_scale").attachments) == {"ok.png"}
    assert "last copy" in html and "big.png" in html and len(html) < 800_000
    assert _live_markup(_body(html)) == []

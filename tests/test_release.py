"""The student release, as a student gets it: built by ``cs-helpers release``, installed
with a plain (not editable) ``pip install`` of the release folder into a fresh virtual
environment, and its notebooks executed there.

The fresh environment reuses the dependencies of the running one through a ``.pth``
line (as in tests/test_packaging.py: nothing is downloaded, and the instructor's
editable install, itself a ``.pth`` hook of a real site directory, is not run), and
the tests check that the ``cs_helpers`` imported is the installed copy, without
``cs_helpers.reference``.

Every release notebook is executed twice, in a kernel of the fresh environment: as
released (stubs that raise NotImplementedError), where each test cell must fail with the
student's own stub or the visible check's message, never with a traceback into the
package or torch; and with the source notebook's solutions pasted into the solution
cells, where every visible check passes, no cell writes to stderr, and nothing is read
from the instructor's tree. To fit the CI budget the executed notebooks are trimmed to
their graded cells (setup, solution and test cells, by ``graded_cells_only`` of
tests/helpers.py): the demonstration cells run in the walkthrough, and
the test cells do not depend on them. For the same reason the fourteen runs share one
kernel, one after the other, each starting with an emptied namespace (``%reset -f``) in
its notebook's folder: only the imports are shared, so the packages load once.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from types import SimpleNamespace

import nbformat
import pytest

from cs_helpers.course import source_notebooks
from helpers import graded_cells_only
from test_visible_checks import solution_code

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
SOURCES = {p.name: p for p in source_notebooks()}
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _run(args, timeout=300, **kwargs):
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert result.returncode == 0, f"{args[:4]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-4000:]}"
    return result


@pytest.fixture(scope="module")
def student(student_release, tmp_path_factory):
    """The release, installed with ``pip install <release folder>`` into a fresh venv
    (from a copy: building the package in place leaves files in the folder)."""
    root = tmp_path_factory.mktemp("student")
    course = Path(shutil.copytree(student_release, root / "course"))
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (site / "zz_reuse_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # A regular install of the folder, as the README says (no -e); offline, so the build
    # uses the setuptools the .pth line reaches and no dependency is fetched.
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-build-isolation",
          "--quiet", str(course)])
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "CS_HELPERS_DATA", "CS_HELPERS_SECRET_FILE",
                        "MPLBACKEND")}
    env.update(OMP_NUM_THREADS="1", PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
               JUPYTER_PLATFORM_DIRS="1")
    return SimpleNamespace(course=course, python=python, site=site, env=env, root=root)


def test_the_release_holds_the_students_readme_and_no_instructor_files(student):
    course = student.course
    readme = (course / "README.md").read_text()
    assert readme == (REPO / "docs" / "student-readme.md").read_text()
    for instructor_only in ("make ", "Makefile", "pytest", "nbgrader", "cs-helpers release", "cs-helpers grade",
                            "docs/", "tests/", "walkthrough", "-e ."):
        assert instructor_only not in readme, instructor_only
    for absent in ("Makefile", "tests", "docs", "nbgrader_config.py", "cs_helpers/reference", "benchmarks"):
        assert not (course / absent).exists(), absent
    environment = (course / "environment.yml").read_text()
    assert "-e ." not in environment and "pytest" not in environment
    assert environment.rstrip().endswith("- .")


SELF_CHECK = """
import json, torch
import torch.nn.functional as F
import cs_helpers
from cs_helpers import grading

def conv_right(x, weight, bias=None, stride=1, padding=0):
    cols = F.unfold(x, weight.shape[-2:], stride=stride, padding=padding)
    n, h, w = x.shape[0], x.shape[2], x.shape[3]
    s = (stride, stride) if isinstance(stride, int) else stride
    p = (padding, padding) if isinstance(padding, int) else padding
    out_h = (h + 2 * p[0] - weight.shape[2]) // s[0] + 1
    out_w = (w + 2 * p[1] - weight.shape[3]) // s[1] + 1
    out = weight.flatten(1) @ cols
    if bias is not None:
        out = out + bias[:, None]
    return out.view(n, weight.shape[0], out_h, out_w)

def conv_no_bias(x, weight, bias=None, stride=1, padding=0):
    return conv_right(x, weight, None, stride, padding)

reports = {}
for label, func in (("right", conv_right), ("no_bias", conv_no_bias), ("none", None)):
    report = grading.self_check("conv2d_im2col", func)
    reports[label] = {"passed": report.passed, "failed": report.failed, "waiting": report.waiting,
                      "score": report.score, "returned": grading.score("conv2d_im2col", func, quiet=True)}
extract = grading.self_check("extract_features", None)
reports["extract_features"] = {"ran": len(extract.passed) + len(extract.failed), "waiting": len(extract.waiting),
                               "message": extract.message}
print("SELFCHECK" + json.dumps({"package": cs_helpers.__file__, "has_reference": grading.has_reference(),
                                "reports": reports}))
"""

PCA_STUB = """
import torch

def pca(features, k):
    n, d = features.shape
    return torch.zeros(n, k), torch.zeros(k, d), torch.zeros(k)
"""


def _fresh_python_cells(student) -> list:
    """Cells for the end of the shared kernel's session (the kernel runs the fresh
    environment's Python, outside the release folder): import what the README's
    JupyterLab command needs, run the README's Python snippet on a pca that returns zeros
    of the right shapes, then :data:`SELF_CHECK`."""
    readme = (student.course / "README.md").read_text()
    (snippet,) = re.findall(r"```python\n(.*?)```", readme, re.S)
    program = ("import json, os\nos.chdir(" + repr(str(student.root)) + ")\nimport jupyterlab, ipykernel\n"
               "from cs_helpers import grading\n" + PCA_STUB + f"\nresult = {snippet.strip()}\n"
               "print('README' + json.dumps({'result': result}))\n")
    return [nbformat.v4.new_code_cell("%reset -f"), nbformat.v4.new_code_cell(program),
            nbformat.v4.new_code_cell("%reset -f"), nbformat.v4.new_code_cell(SELF_CHECK)]


@pytest.fixture(scope="module")
def fresh_python(executed):
    """What the cells of :func:`_fresh_python_cells` printed."""
    return "".join(_text(o) for cell in executed[("fresh_python", "")] for o in cell.get("outputs", []))


def test_every_command_and_path_of_the_readme_works_in_the_release(student, fresh_python):
    readme = (student.course / "README.md").read_text()
    commands = [line.strip() for block in re.findall(r"```bash\n(.*?)```", readme, re.S)
                for line in block.splitlines() if line.strip()]
    assert commands == ["python3 -m venv .venv", ".venv/bin/pip install .",
                        ".venv/bin/jupyter lab --config=jupyter/jupyter_server_config.py "
                        "notebooks/01_filters/filters.ipynb"], commands
    # `python3 -m venv` and `pip install .` are what the fixture did (pip offline, without
    # dependencies); JupyterLab comes with the dependencies (imported by fresh_python),
    # and the configuration and the notebook it opens exist.
    assert (student.course / "jupyter" / "jupyter_server_config.py").is_file()
    assert (student.course / "notebooks" / "01_filters" / "filters.ipynb").is_file()
    for path in re.findall(r"`((?:notebooks|cs_helpers|jupyter)/[^`*]*?|pyproject\.toml|environment\.yml)`", readme):
        if "NN_topic" not in path:
            assert (student.course / path).exists(), path
    # The Python the README shows: the self-check of a function, as a notebook cell runs it.
    printed, rest = fresh_python.split("README", 1)
    assert json.loads(rest.splitlines()[0]) == {"result": None}
    assert "pca (self-check, no score): 1 of 5 properties need no reference and ran here; all hold." in printed
    assert "Waiting for grading (they need the instructor's reference):" in printed
    assert "points" not in printed


def test_the_self_check_runs_what_needs_no_reference_and_returns_no_grade(student, fresh_python):
    result = json.loads(fresh_python.split("SELFCHECK", 1)[1].splitlines()[0])
    assert Path(result["package"]).resolve().is_relative_to(student.site.resolve()), result["package"]
    assert result["has_reference"] is False
    right, no_bias, none = (result["reports"][k] for k in ("right", "no_bias", "none"))
    assert right["failed"] == [] and len(right["passed"]) == 7 and right["waiting"] == []
    assert no_bias["failed"] == ["adds the bias to every output position", "handles batches and many channels"]
    assert none["passed"] == [] and len(none["failed"]) == 7
    assert all(r["score"] is None and r["returned"] is None for r in (right, no_bias, none))
    extract = result["reports"]["extract_features"]
    assert extract["ran"] == 0 and extract["waiting"] == 5
    assert "none of its properties can be checked without the instructor's reference" in extract["message"]


# -- the notebooks, executed in the fresh environment ------------------------------------

PROBE = """
import os, sys, types
if "_release_probe" not in sys.modules:
    _probe = sys.modules["_release_probe"] = types.ModuleType("_release_probe")
    _probe.reads = []

    # Everything the hook uses is bound now: the namespace it was defined in is emptied later.
    def _record_instructor_reads(event, args, _reads=_probe.reads, _root={root!r} + os.sep,
                                 _venv={venv!r} + os.sep, _path=os.path, _fsdecode=os.fsdecode,
                                 _names=(str, bytes, os.PathLike)):
        if event == "open" and args and isinstance(args[0], _names):
            path = _path.abspath(_fsdecode(args[0]))
            if path.startswith(_root) and not path.startswith(_venv):
                _reads.append(path)

    sys.addaudithook(_record_instructor_reads)
sys.modules["_release_probe"].reads.clear()
os.chdir({cwd!r})
"""

REPORT = """
import importlib.util as _util, json as _json, sys as _sys
import cs_helpers as _cs
print("PROBE" + _json.dumps({"package": _cs.__file__, "python": _sys.executable,
                             "reference": _util.find_spec("cs_helpers.reference") is not None,
                             "reads": sorted(set(_sys.modules["_release_probe"].reads))}))
"""

EXECUTE = """
import sys
import nbformat
from nbclient import NotebookClient
nb = nbformat.read(sys.argv[1], as_version=4)
NotebookClient(nb, timeout=600, kernel_name="python3", allow_errors=True,
               resources={"metadata": {"path": sys.argv[2]}}).execute()
nbformat.write(nb, sys.argv[1])
"""


def _grade_id(cell) -> str:
    return cell.get("metadata", {}).get("nbgrader", {}).get("grade_id", "")


def _prepared(student, notebook: Path, mode: str) -> list:
    """The cells of one run: the release notebook trimmed to its graded cells, with the
    source solutions in its solution cells when ``mode`` is "solutions", after a cell
    that empties the namespace (``%reset -f``: each run starts as in a fresh kernel),
    moves to the notebook's folder and records reads of the instructor's tree, and
    before a cell that reports them."""
    nb = nbformat.read(graded_cells_only(notebook, student.root / mode / notebook.name), as_version=4)
    if mode == "solutions":
        source = nbformat.read(SOURCES[notebook.name], as_version=4)
        solutions = {_grade_id(c): c.source for c in source.cells
                     if c.get("metadata", {}).get("nbgrader", {}).get("solution") and c.cell_type == "code"}
        for cell in nb.cells:
            if cell.cell_type == "code" and _grade_id(cell) in solutions:
                cell.source = solution_code(solutions[_grade_id(cell)])
    probe = PROBE.format(root=str(REPO.resolve()), venv=str((REPO / ".venv").resolve()), cwd=str(notebook.parent))
    return ([nbformat.v4.new_code_cell("%reset -f"), nbformat.v4.new_code_cell(probe)] + nb.cells
            + [nbformat.v4.new_code_cell(REPORT)])


def _text(output) -> str:
    if output.get("output_type") == "stream":
        return output.get("text", "")
    if output.get("output_type") == "error":
        return _ANSI.sub("", "\n".join(output.get("traceback", [])))
    return ""


@pytest.fixture(scope="module")
def executed(student):
    """Every release notebook executed as released and with the solutions:
    ``{(notebook name, mode): cells}``, and ``("fresh_python", "")``: the cells of
    :func:`_fresh_python_cells`. The runs share one kernel of the fresh
    environment, one after the other, each in an emptied namespace, so that the
    packages are imported once (the setup cells of later runs then take no time)."""
    notebooks = sorted((student.course / "notebooks").glob("[0-9][0-9]_*/*.ipynb"))
    assert sorted(n.name for n in notebooks) == sorted(SOURCES)
    runs, cells = [], []
    for mode in ("stubs", "solutions"):
        for notebook in notebooks:
            run_cells = _prepared(student, notebook, mode)
            runs.append((notebook.name, mode, len(cells), len(cells) + len(run_cells)))
            cells += run_cells
    extra = _fresh_python_cells(student)
    runs.append(("fresh_python", "", len(cells), len(cells) + len(extra)))
    cells += extra
    for index, cell in enumerate(cells):
        cell.id = f"run-{index}"  # the same cells appear in several runs
    path = student.root / "all_runs.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=cells), path)
    _run([str(student.python), "-c", EXECUTE, str(path), str(student.root)], timeout=900, env=student.env,
         cwd=student.root)
    executed_cells = nbformat.read(path, as_version=4).cells
    return {(name, mode): executed_cells[first:last] for name, mode, first, last in runs}


def _probe(cells) -> dict:
    text = "".join(_text(o) for o in cells[-1].get("outputs", []))
    assert "PROBE" in text, text
    return json.loads(text.split("PROBE", 1)[1])


@pytest.mark.parametrize("mode", ["stubs", "solutions"])
def test_the_notebooks_run_on_the_installed_release_only(executed, student, mode):
    for (name, run), cells in executed.items():
        if run != mode:
            continue
        probe = _probe(cells)
        assert Path(probe["package"]).resolve().is_relative_to(student.site.resolve()), (name, probe)
        assert Path(probe["python"]).parent == student.python.parent, (name, probe)
        assert probe["reference"] is False, name
        assert probe["reads"] == [], (name, probe["reads"])


def test_with_the_stubs_each_test_cell_stops_at_the_stub_or_a_visible_check(executed):
    for (name, run), cells in executed.items():
        if run != "stubs":
            continue
        tests = 0
        for cell in cells:
            errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
            if not _grade_id(cell).startswith("test_"):
                assert not errors, (name, _grade_id(cell) or cell.source[:80], [_text(e) for e in errors])
                continue
            tests += 1
            assert len(errors) == 1, (name, _grade_id(cell))
            error = errors[0]
            assert error["ename"] in ("NotImplementedError", "AssertionError"), (name, _grade_id(cell), _text(error))
            trace = _text(error)
            assert "site-packages" not in trace and "/cs_helpers/" not in trace, (name, _grade_id(cell), trace)
        assert tests, name


def test_with_the_solutions_every_visible_check_passes_quietly(executed):
    for (name, run), cells in executed.items():
        if run != "solutions":
            continue
        tests = 0
        for cell in cells:
            outputs = cell.get("outputs", [])
            label = (name, _grade_id(cell) or cell.source[:60])
            assert not [o for o in outputs if o.get("output_type") == "error"], \
                (label, [_text(o) for o in outputs if o.get("output_type") == "error"])
            assert not [o for o in outputs if o.get("name") == "stderr"], \
                (label, [o.get("text") for o in outputs if o.get("name") == "stderr"])
            if _grade_id(cell).startswith("test_"):
                tests += 1
                assert "Visible checks passed." in "".join(_text(o) for o in outputs), label
        assert tests, name

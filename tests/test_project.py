"""The project's own contracts: dependencies in sync, notebooks stored clean, graded
cells named per the contract, nbgrader hardened."""
import json
import re
import tomllib
from pathlib import Path

import pytest
import yaml

from cs_helpers.course import source_notebooks
from cs_helpers.grading import get_check, load_all

REPO = Path(__file__).resolve().parent.parent


def _requirement_names(requirements):
    return {re.split(r"[<>=!~ ;\[]", r, maxsplit=1)[0].lower().replace("_", "-"): r.replace(" ", "")
            for r in requirements}


def test_environment_yml_lists_the_same_dependencies_as_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["dev"]
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    listed = [r for r in pip_section if not r.startswith("-e")]
    assert _requirement_names(listed) == _requirement_names(wanted)


def test_torch_is_asked_for_by_range_not_pinned():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "torch>=2.2" in deps and "torchvision>=0.17" in deps


@pytest.mark.parametrize("path", source_notebooks(), ids=lambda p: p.name)
def test_source_notebooks_are_stored_without_outputs(path):
    nb = json.loads(path.read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None


@pytest.mark.parametrize("path", source_notebooks(), ids=lambda p: p.name)
def test_each_graded_function_has_its_solution_and_test_cell(path):
    nb = json.loads(path.read_text())
    meta = {c["metadata"]["nbgrader"]["grade_id"]: c for c in nb["cells"] if "nbgrader" in c["metadata"]}
    topic = path.stem
    checks = {name: c for name, c in load_all().items() if c.topic == topic}
    assert checks, f"no checks for {topic}"
    assert "setup" in meta and meta["setup"]["metadata"]["nbgrader"]["locked"]
    for name, check in checks.items():
        solution, test = meta[name], meta[f"test_{name}"]
        assert solution["metadata"]["nbgrader"]["solution"] and f"def {name}(" in "".join(solution["source"])
        nbg = test["metadata"]["nbgrader"]
        assert nbg["grade"] and nbg["locked"] and nbg["points"] == check.points
        source = "".join(test["source"]).rstrip()
        assert source.endswith(f'### BEGIN HIDDEN TESTS\ngrading.score("{name}", {name})\n### END HIDDEN TESTS')


def test_nbgrader_config_is_hardened():
    from traitlets.config import Config

    from cs_helpers.grading.nbgrader_plugin import SandboxedExecute, StartTrustedScores, TrustedScores
    from cs_helpers.grading.nbgrader_settings import configure
    from nbgrader.preprocessors import Execute, SaveAutoGrades

    first, second = Config(), Config()
    configure(first, root=str(REPO))
    configure(second, root=str(REPO))
    assert first.CourseDirectory.source_directory == "notebooks"
    skip_tag = first.Execute.skip_cells_with_tag
    assert skip_tag != "skip-execution" and skip_tag != second.Execute.skip_cells_with_tag
    assert first.OverwriteCells.add_missing_cells is True
    assert first.Execute.timeout >= 120 and first.Execute.kernel_name == "python3"
    steps = first.Autograde.autograde_preprocessors
    assert steps.index(TrustedScores) == steps.index(SaveAutoGrades) - 1
    # The notebook executes only in the sandboxed kernel, never in nbgrader's own; the
    # scoring starts just before it.
    assert steps[:2] == [StartTrustedScores, SandboxedExecute] and Execute not in steps


def test_points_in_checks_are_positive():
    for name, check in load_all().items():
        assert check.points > 0 and get_check(name) is check


GROUPED_MODULE = '''
import os, pytest
pytestmark = pytest.mark.xdist_group("shared")

@pytest.fixture(scope="module")
def course():
    with open(os.environ["SETUPS_FILE"], "a") as f:
        f.write(os.environ.get("PYTEST_XDIST_WORKER", "main") + "\\n")

@pytest.mark.parametrize("student", list("abcdefgh"))
def test_student(course, student):
    pass
'''


def test_an_xdist_group_shares_its_module_fixture_on_one_worker(tmp_path):
    """`make test` runs `-n 2 --dist loadgroup`: the slow modules that build one graded
    course for all their tests (test_attacks) rely on their group staying on one
    worker. Some pytest / pytest-xdist pairs silently break it (pytest 9.2 with
    xdist 3.8 spread the group over both workers, building the course twice)."""
    import os
    import subprocess
    import sys

    (tmp_path / "test_grouped.py").write_text(GROUPED_MODULE)
    for i in range(6):
        (tmp_path / f"test_other{i}.py").write_text(f"def test_other{i}():\n    pass\n")
    setups = tmp_path / "setups"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "2", "--dist", "loadgroup",
                           "-p", "no:cacheprovider", str(tmp_path)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "SETUPS_FILE": str(setups)})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert setups.read_text().split() in (["gw0"], ["gw1"]), setups.read_text()

"""The course as an instructor uses it, in JupyterLab in headless Chromium: two
submissions autograded in a temporary nbgrader course (the course's own settings, as
`nbgrader_config.py` applies them), nbgrader's formgrader opened from JupyterLab, a
manual score given to an inline question and found in the gradebook; and a hostile stub
(script and event handlers in its written answer, HTML/JavaScript outputs, an attack on
the formgrader's API) opened in the formgrader with the instructor logged in, which runs
none of it and changes no score.
"""
from __future__ import annotations

import base64
import time

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_output

from labdriver import JUPYTER_DIR, LabServer, browser_binaries, chromium, shot, wait_for

try:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
except ImportError:
    pass

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.xdist_group("browser_instructor")]

NBGRADER_CONFIG = '''import os

from cs_helpers.grading.nbgrader_settings import configure

c = get_config()  # noqa: F821
root = os.path.dirname(os.path.abspath(__file__))
configure(c, root=root, source_directory="source")
c.CourseDirectory.course_id = "course"
c.Exchange.root = os.path.join(root, "exchange")
'''

# What a student's script would do with the instructor's session: mark itself, then set
# every grade of the submission to full marks plus extra credit through the formgrader's
# API (the page defines base_url and submission_id; the XSRF token is in a cookie).
ATTACK = ("window.__pwned = (window.__pwned || 0) + 1; document.title = 'pwned';"
          "var t = decodeURIComponent((document.cookie.match(/_xsrf=([^;]+)/) || ['', ''])[1]);"
          "fetch(base_url + '/api/grades?submission_id=' + submission_id).then(r => r.json())"
          ".then(gs => gs.forEach(g => fetch(base_url + '/api/grade/' + g.id, {method: 'PUT',"
          " headers: {'X-CSRFToken': t, 'Content-Type': 'application/json'},"
          " body: JSON.stringify({manual_score: g.max_score, extra_credit: 5})})));")
ATTACK_B64 = base64.b64encode(ATTACK.encode()).decode()
HOSTILE_ANSWER = (f"Because <script>{ATTACK}</script> "
                  f'<img src=x onerror="eval(atob(\'{ATTACK_B64}\'))"> '
                  f"<svg onload=\"eval(atob('{ATTACK_B64}'))\"></svg> [click](javascript:window.__pwned=1)")
HOSTILE_OUTPUTS = f'''from IPython.display import HTML, Javascript, display
display(HTML("<script>{ATTACK}</script><img src=x onerror=\\"eval(atob('{ATTACK_B64}'))\\">"))
display(Javascript({ATTACK!r}))
'''
HONEST_ANSWER = "Each filter has its own range; one scale for the bank would wash out the weak filters."


def _outputs_with_script():
    """Outputs already in the submitted file (never executed by the grader)."""
    return [new_output("display_data", data={"text/html": f"<script>{ATTACK}</script>",
                                             "application/javascript": ATTACK}),
            new_output("execute_result", execution_count=1,
                       data={"text/html": f'<img src=x onerror="eval(atob(\'{ATTACK_B64}\'))">'})]


@pytest.fixture(scope="module")
def course(tmp_path_factory):
    """A course with the tiny notebook of tests/test_feedback.py, autograded for two
    students: "honest" (the function and the answer written) and "hostile"."""
    from nbgrader.apps import NbGraderAPI
    from traitlets.config import Config

    from cs_helpers.course import _check, _venv_on_path
    from cs_helpers.grading import isolation
    from cs_helpers.grading.nbgrader_settings import configure
    from test_feedback import SOLUTION, _cell, _source_notebook

    browser_binaries()
    root = tmp_path_factory.mktemp("instructor-lab") / "course"
    (root / "source" / "ps1").mkdir(parents=True)
    nbformat.write(_source_notebook(), root / "source" / "ps1" / "tiny.ipynb")
    (root / "nbgrader_config.py").write_text(NBGRADER_CONFIG)
    config = Config()
    configure(config, root=str(root), source_directory="source")
    config.Exchange.root = str(root / "exchange")
    config.CourseDirectory.course_id = "course"
    mp = pytest.MonkeyPatch()
    if isolation.sandbox_problem() is not None:  # only this test's own notebooks run here
        mp.setenv(isolation.UNSANDBOXED_ENV, "1")
    try:
        with _venv_on_path():
            api = NbGraderAPI(config=config)
            _check(api.generate_assignment("ps1", force=True, create=True), "generate_assignment")
            released = nbformat.read(root / "release" / "ps1" / "tiny.ipynb", as_version=4)
            honest = nbformat.from_dict(released)
            _cell(honest, "normalize_filters").source = SOLUTION.replace(
                "    ### BEGIN SOLUTION\n", "").replace("    ### END SOLUTION\n", "")
            _cell(honest, "question_scale").source = HONEST_ANSWER
            hostile = nbformat.from_dict(released)
            _cell(hostile, "question_scale").source = HOSTILE_ANSWER
            extra = new_code_cell(HOSTILE_OUTPUTS, outputs=_outputs_with_script())
            hostile.cells.insert(hostile.cells.index(_cell(hostile, "normalize_filters")) + 1, extra)
            _cell(hostile, "test_normalize_filters").outputs = _outputs_with_script()
            for student, nb in (("honest", honest), ("hostile", hostile)):
                target = root / "submitted" / student / "ps1"
                target.mkdir(parents=True)
                nbformat.write(nb, target / "tiny.ipynb")
                _check(api.autograde("ps1", student, force=True, create=True), f"autograde {student}")
    finally:
        mp.undo()
    return root


def _grades(root, student):
    from nbgrader.api import Gradebook

    with Gradebook(f"sqlite:///{root / 'gradebook.db'}") as gb:
        nb = gb.find_submission_notebook("tiny", "ps1", student)
        return nb.id, {g.name: (g.auto_score, g.manual_score, g.extra_credit, g.max_score) for g in nb.grades}


@pytest.fixture(scope="module")
def lab(course, tmp_path_factory):
    """JupyterLab as `make lab` starts it (jupyter/instructor), on the course folder."""
    state = tmp_path_factory.mktemp("instructor-lab-state")
    server = LabServer(course, JUPYTER_DIR / "instructor" / "jupyter_server_config.py", state).start()
    try:
        driver = chromium(state)
    except BaseException:
        server.stop()
        raise
    try:
        yield server, driver
    finally:
        driver.quit()
        server.stop()


def test_formgrader_opens_from_jupyterlab(lab):
    server, driver = lab
    driver.get(f"{server.url}/lab?token={server.token}&reset")
    wait_for(lambda: driver.find_elements(
        By.XPATH, "//div[contains(@class, 'lm-MenuBar-itemLabel') and text()='Nbgrader']"), 60, "the menu bar")[0].click()
    wait_for(lambda: [e for e in driver.find_elements(By.CSS_SELECTOR, ".lm-Menu-itemLabel") if e.text == "Formgrader"],
             10, "the Formgrader menu item")[0].click()
    frame = wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, "iframe[src*='formgrader']"), 30, "the formgrader tab")[0]
    driver.switch_to.frame(frame)
    try:
        wait_for(lambda: "ps1" in driver.find_element(By.TAG_NAME, "body").text, 30, "assignment ps1 in the formgrader")
    finally:
        driver.switch_to.default_content()
    shot(driver, "instructor_01_formgrader_in_jupyterlab")


def _open_submission(server, driver, submission_id):
    driver.get(f"{server.url}/formgrader/submissions/{submission_id}/")
    wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, "input.score"), 30, "the formgrader's score fields")


def test_manual_points_for_an_inline_question_reach_the_gradebook(lab, course):
    server, driver = lab
    submission, before = _grades(course, "honest")
    assert before["question_scale"][:3] == (None, None, None) and before["test_normalize_filters"][0] == 2
    _open_submission(server, driver, submission)
    assert HONEST_ANSWER in driver.find_element(By.TAG_NAME, "body").text
    field = driver.find_element(By.CSS_SELECTOR, "input.score#question_scale")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", field)
    field.click()
    field.send_keys("1", Keys.TAB)  # leaving the field saves it
    wait_for(lambda: _grades(course, "honest")[1]["question_scale"][1] == 1, 20,
             "the manual score in the gradebook")
    shot(driver, "instructor_02_manual_score_given")
    after = _grades(course, "honest")[1]
    assert after["question_scale"][1:] == (1, None, 1)
    assert after["test_normalize_filters"] == before["test_normalize_filters"]


def test_hostile_submission_runs_nothing_and_changes_no_score(lab, course):
    server, driver = lab
    submission, before = _grades(course, "hostile")
    assert before["test_normalize_filters"][:3] == (0, None, None)
    assert all(manual is None and not extra for _, manual, extra, _ in before.values())
    _open_submission(server, driver, submission)
    page = driver.find_element(By.TAG_NAME, "body").text
    assert "Because" in page and "<script>" in page  # the answer is shown, as text
    answer = driver.find_element(By.CSS_SELECTOR, "input.score#question_scale")
    driver.execute_script("arguments[0].scrollIntoView({block: 'start'})", answer)
    time.sleep(3)  # what the script would do it does as soon as the page loads
    shot(driver, "instructor_03_hostile_submission")
    marker, title = driver.execute_script("return [window.__pwned || 0, document.title]")
    assert marker == 0 and title != "pwned"
    live = driver.execute_script("""
        return [...document.querySelectorAll('script, [onerror], [onload], a[href^="javascript"]')]
            .map(e => e.outerHTML).filter(h => h.includes('pwned') || h.includes('atob'));""")
    assert live == []
    assert _grades(course, "hostile")[1] == before

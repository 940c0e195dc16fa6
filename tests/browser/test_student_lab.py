"""The course as a student uses it, in JupyterLab in headless Chromium: the student
release (written by `cs_helpers.course.release`, launched with the course's student
settings `jupyter/jupyter_server_config.py`), the release's own `cs_helpers` on the
kernel's path.

- Every notebook's explorer renders as a live widget (no "Error displaying widget"), and
  moving one of its controls from the keyboard redraws the figure under it.
- A test cell run against a function that is still a stub shows the visible check's
  message, with no traceback into the package.
- JupyterLab shows only nbgrader's student-side tools, and no question about Jupyter news.

To stay within its time budget each explorer runs in a trimmed copy of its release
notebook: the setup cell, the functions the explorer calls (filled in with the model
solutions, as a student who finished them would have), a short cell building the inputs
the explorer reads (small versions of what the notebook computes before it), and the
explorer cell itself, verbatim from the release.
"""
from __future__ import annotations

import ast
import re
import time
from concurrent.futures import ThreadPoolExecutor

import nbformat
import pytest
from nbformat.v4 import new_code_cell

from labdriver import (JUPYTER_DIR, LabServer, browser_binaries, chromium, code_cells, open_notebook,
                       output_text, retry_stale, run_cell, shot, wait_for)

try:  # imported here so that the names read plainly below; without selenium every test skips
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.select import Select
except ImportError:
    pass

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.xdist_group("browser_student")]

DEVICE = "torch.manual_seed(0)\ndevice = cs_helpers.device()\n"
# One EfficientNet-Lite0 for every explorer (none of them changes its weights).
LITE0 = ('model = lite0 = globals().get("lite0") or load_model("efficientnet_lite0", device=device)\n'
         "classes = imagenet_classes()\n")


def _imports(*names):
    return "".join(f"from cs_helpers.{module} import {name}\n" for module, name in
                   (n.split(":") for n in names))


# topic folder -> (graded functions the explorer calls, helper functions of the notebook
# it calls, code that builds the names it reads). The helpers are taken from the
# notebook itself, so a change there is tested here.
EXPLORERS = {
    "01_filters": (["normalize_filters"], [], DEVICE + _imports("models:imagenet_classes") + LITE0 + (
        "w_trained = model.stem.conv.weight\n"
        'random_model = load_model("efficientnet_lite0", pretrained=False, device=device)\n'
        "w_random = random_model.stem.conv.weight\n")),
    "02_features": ([], [], DEVICE + (
        'toynet = load_model("toynet", device=device)\nclass_names = toynet.class_names\n'
        "world = toyworld(8, seed=1)\n"
        'lite0 = globals().get("lite0") or load_model("efficientnet_lite0", device=device)\n'
        'photos = sample_images(["chelsea"])\n')),
    "03_saliency": (["occlusion_map"], ["show_signed"], DEVICE + LITE0 + (
        'photos = sample_images(["coffee"])\nimages = torch.stack([p.image for p in photos]).to(device)\n'
        "with torch.no_grad():\n    predicted = model(images).argmax(dim=1)\n"
        "occlusions = [occlusion_map(model, images[0], int(predicted[0]), window=64, stride=40, batch_size=16)]\n")),
    "04_cam": (["class_activation_map"], ["show_signed"], DEVICE + LITE0 + (
        'photo_names = ["astronaut"]\nphotos = sample_images(photo_names)\n'
        "images = torch.stack([p.image for p in photos]).to(device)\n"
        'with torch.no_grad(), capture(model, "head") as head:\n    probabilities = model(images).softmax(dim=1)\n'
        "head_features = head.output\n")),
    "05_synthesis": (["class_visualization_step", "clip_small_values", "clip_small_contributions"],
                     ["gaussian_blur", "visualize", "score_of"], DEVICE + LITE0 + (
        "notebook_start = time.perf_counter()\n"
        'lite_classes = [classes.index(name) for name in ("flamingo", "goldfish")]\n'
        'toynet = load_model("toynet", device=device)\ntoy_classes = list(toynet.class_names)\n')),
    "06_adversarial": (["fgsm", "pgd"], [], DEVICE + LITE0 + (
        'photos = sample_images(["coffee"], size=160)\nimages = torch.stack([p.image for p in photos]).to(device)\n'
        "with torch.no_grad():\n    predicted = model(images).argmax(dim=1)\n")),
    "07_tcav": (["train_cav", "directional_derivatives", "tcav_score"],
                ["flat_activations", "class_gradients", "sweep_layer"], DEVICE + (
        'toynet = load_model("toynet", device=device)\nworld = toyworld(150, seed=7)\n'
        "targets = {name: world.images[world.labels == CLASS_NAMES.index(name)][:8]\n"
        '           for name in ("zebra", "leopard", "circle")}\n'
        'concepts = {name: concept_images(name, 8, seed=100 + k) for k, name in enumerate(["stripes", "dots"])}\n'
        'SWEEP_LAYERS = ["pool1", "pool2"]\n'
        'sweep_pairs = [("zebra", "stripes"), ("leopard", "dots"), ("circle", "stripes")]\n'
        'sweep_randoms = [concept_images("random", 8, seed=1000 + i) for i in range(3)]\n'
        "sweep = {layer: sweep_layer(layer) for layer in SWEEP_LAYERS}\n")),
}
STUB = ("01_filters", "normalize_filters")
STUDENT_CONFIG = JUPYTER_DIR / "student" / "jupyter_server_config.py"


def _grade_id(cell):
    return cell.get("metadata", {}).get("nbgrader", {}).get("grade_id")


def _topic_notebook(folder):
    from cs_helpers.course import NOTEBOOKS_DIR

    return next((NOTEBOOKS_DIR / folder).glob("*.ipynb"))


def _is_explorer(cell):
    return cell.cell_type == "code" and "import ipywidgets" in cell.source


def _trimmed_source(folder, functions):
    """The source notebook with only its setup cell, the solution cells of ``functions``
    (and, for the stub check, its test cell) and the explorer."""
    nb = nbformat.read(_topic_notebook(folder), as_version=4)
    keep = {"setup", *functions}
    if folder == STUB[0]:
        keep |= {STUB[1], f"test_{STUB[1]}"}
    nb.cells = [c for c in nb.cells if _grade_id(c) in keep or _is_explorer(c)]
    return nb


def _helper_source(nb, names):
    """The definitions of ``names`` as the notebook writes them."""
    found = {}
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        try:
            tree = ast.parse(cell.source)
        except SyntaxError:
            continue
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in names:
                found[node.name] = ast.get_source_segment(cell.source, node)
    missing = set(names) - set(found)
    assert not missing, f"the notebook no longer defines {sorted(missing)}"
    return "\n\n\n".join(found[n] for n in names) + "\n"


def _model_solution(source_nb, grade_id):
    cell = next(c for c in source_nb.cells if _grade_id(c) == grade_id)
    return re.sub(r"^[ \t]*### (BEGIN|END) SOLUTION[ \t]*(\n|$)", "", cell.source, flags=re.MULTILINE)


def build_release(tmp):
    """The student release of notebook 01, trimmed to its setup cell and one function with
    its test cell, written by `cs_helpers.course.release`; then, appended to it, one
    explorer of every notebook: its setup cell, a cell that builds what the explorer reads,
    and the explorer cell as the notebook has it (ungraded cells, which the release copies
    verbatim). Returns the release folder; the notebook's metadata ``browser_test`` maps
    each topic to the indices of its code cells."""
    from cs_helpers.course import release

    folder, function = STUB
    source = nbformat.read(_topic_notebook(folder), as_version=4)
    source.cells = [c for c in source.cells if _grade_id(c) in ("setup", function, f"test_{function}")]
    (tmp / "source" / folder).mkdir(parents=True)
    nbformat.write(source, tmp / "source" / folder / _topic_notebook(folder).name)
    root = release(tmp / "release", notebooks_dir=tmp / "source")
    path = root / "notebooks" / folder / _topic_notebook(folder).name
    nb = nbformat.read(path, as_version=4)
    assert [_grade_id(c) for c in nb.cells] == ["setup", function, f"test_{function}"]
    index = {"stub": [0, 1, 2]}
    for topic, (functions, helpers, prelude) in EXPLORERS.items():
        topic_nb = nbformat.read(_topic_notebook(topic), as_version=4)
        code = "".join(_model_solution(topic_nb, grade_id) + "\n\n\n" for grade_id in functions)
        code += (_helper_source(topic_nb, helpers) + "\n\n" if helpers else "") + prelude
        explorer = [c for c in topic_nb.cells if _is_explorer(c)]
        assert len(explorer) == 1, f"{topic}: expected one explorer cell (importing ipywidgets)"
        cells = [] if topic == folder else [
            new_code_cell(next(c.source for c in topic_nb.cells if _grade_id(c) == "setup"))]
        cells += [new_code_cell(code), new_code_cell(explorer[0].source)]
        index[topic] = list(range(len(nb.cells), len(nb.cells) + len(cells)))
        nb.cells += cells
    nb.metadata["browser_test"] = index
    nbformat.write(nb, path)
    return root


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """The release (see build_release), JupyterLab on it started as the release's README
    says, and a browser. The server and the browser start while the release is written."""
    browser_binaries()
    tmp = tmp_path_factory.mktemp("student-lab")
    with ThreadPoolExecutor(1) as pool:
        writing = pool.submit(build_release, tmp)
        # The kernel imports the release's cs_helpers (no reference inside), as after
        # `pip install -e .` in the release folder.
        server = LabServer(tmp, STUDENT_CONFIG, tmp / "state", extra_env={"PYTHONPATH": str(tmp / "release")})
        try:
            server.start()
            driver = chromium(tmp / "state")
        except BaseException:
            server.stop()
            raise
        try:
            root = writing.result()
            shipped = root / "jupyter"
            assert shipped.is_dir(), "the release ships the student's JupyterLab settings as jupyter/"
            for path in STUDENT_CONFIG.parent.rglob("*.json*"):
                assert (shipped / path.relative_to(STUDENT_CONFIG.parent)).read_text() == path.read_text()
            assert (shipped / STUDENT_CONFIG.name).read_text() == STUDENT_CONFIG.read_text()
            yield server, driver
        finally:
            driver.quit()
            server.stop()


@pytest.fixture(scope="module")
def notebook(lab):
    """The release's notebook 01 open in the browser: one page and one kernel for every
    test of this module, in order."""
    server, driver = lab
    folder = STUB[0]
    relpath = f"release/notebooks/{folder}/{_topic_notebook(folder).name}"
    opened = time.monotonic()
    open_notebook(driver, server, relpath)
    index = nbformat.read(server.root / relpath, as_version=4).metadata["browser_test"]
    return driver, index, opened


def test_student_sees_only_student_side_nbgrader(lab, notebook):
    server, driver = lab
    driver.find_element(By.XPATH, "//div[contains(@class, 'lm-MenuBar-itemLabel') and text()='Nbgrader']").click()
    items = wait_for(lambda: [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".lm-Menu-itemLabel") if e.text],
                     10, "the Nbgrader menu")
    shot(driver, "student_01_nbgrader_menu")
    assert items == ["Assignment List"], items
    ActionChains(driver).send_keys(Keys.ESCAPE).perform()
    right = [t.get_attribute("title") or t.text
             for t in driver.find_elements(By.CSS_SELECTOR, ".jp-SideBar.jp-mod-right .lm-TabBar-tab")]
    assert right and not any("Create Assignment" in t for t in right), right
    # The instructor's server extensions are not loaded at all.
    assert "nbgrader.server_extensions.formgrader" not in server.log_text()
    assert "nbgrader.server_extensions.assignment_list | extension was successfully loaded" in server.log_text()


def test_a_stub_function_gets_the_visible_checks_message(lab, notebook):
    server, driver = lab
    driver, index, _ = notebook
    setup, stub, test = index["stub"]
    assert "raise NotImplementedError" in code_cells(driver)[stub].text
    run_cell(driver, setup)
    run_cell(driver, stub)
    out = output_text(run_cell(driver, test))
    shot(driver, "student_02_stub_as_released")
    # As released: the stub's own NotImplementedError, raised in the student's cell.
    assert "NotImplementedError" in out, out
    assert "site-packages" not in out and "cs_helpers" not in out, out
    # The raise deleted and the body left empty: the visible check says what is wrong.
    editor = code_cells(driver)[stub].find_element(By.CSS_SELECTOR, ".cm-content")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", editor)
    editor.click()
    ActionChains(driver).key_down(Keys.CONTROL).send_keys(Keys.END).key_up(Keys.CONTROL).perform()
    ActionChains(driver).key_down(Keys.SHIFT).send_keys(Keys.HOME).key_up(Keys.SHIFT).send_keys("pass").perform()
    wait_for(lambda: "raise NotImplementedError" not in code_cells(driver)[stub].text, 10, "the edited stub")
    run_cell(driver, stub)
    out = output_text(run_cell(driver, test))
    shot(driver, "student_03_empty_function_message")
    assert "AssertionError" in out and "return a torch.Tensor" in out, out
    assert "site-packages" not in out and "cs_helpers" not in out, out


def _control(cell):
    """The explorer's first slider (its keyboard handle) or, without one, its first dropdown."""
    handles = cell.find_elements(By.CSS_SELECTOR, ".widget-slider .noUi-handle")
    if handles:
        return "slider", handles[0]
    return "dropdown", cell.find_elements(By.CSS_SELECTOR, ".widget-dropdown select")[0]


def _figure(cell):
    images = cell.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output img")
    return images[-1].get_attribute("src") if images else None


@pytest.mark.parametrize("topic", list(EXPLORERS))
def test_explorer_renders_and_redraws_when_a_control_moves(topic, notebook):
    driver, index, _ = notebook
    *before_explorer, explorer = index[topic]
    for i in before_explorer:
        out = output_text(run_cell(driver, i, timeout_s=120))
        assert "Traceback" not in out and "Error" not in out, out

    def cell():
        return code_cells(driver)[explorer]

    def drawn():
        text = output_text(cell())
        return _figure(cell()) or "Error" in text or "Traceback" in text

    run_cell(driver, explorer, timeout_s=120)
    wait_for(drawn, 60, f"the explorer of {topic} to draw")
    text = retry_stale(lambda: output_text(cell()))
    assert "Error displaying widget" not in text and "Traceback" not in text, text
    assert retry_stale(lambda: cell().find_elements(By.CSS_SELECTOR, ".jupyter-widgets, .widget-interact")), \
        "no widget rendered"
    before = retry_stale(lambda: _figure(cell()))
    kind, control = retry_stale(lambda: _control(cell()))
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", control)
    shot(driver, f"explorer_{topic}_1_drawn")
    if kind == "slider":  # by keyboard: focus the handle, one step to the right
        control.click()
        ActionChains(driver).send_keys(Keys.ARROW_RIGHT).perform()
    else:  # by pointer: another option
        menu = Select(control)
        current = menu.first_selected_option.text
        menu.select_by_visible_text(next(o.text for o in menu.options if o.text != current))

    def redrawn():
        text = output_text(cell())
        src = _figure(cell())
        return "Traceback" in text or (src and src != before)

    wait_for(redrawn, 60, f"the figure of {topic}'s explorer to change after moving its {kind}")
    shot(driver, f"explorer_{topic}_2_after_{kind}")
    text = retry_stale(lambda: output_text(cell()))
    assert "Traceback" not in text and "Error" not in text, text
    assert retry_stale(lambda: _figure(cell())) != before


def test_no_news_prompt(lab, notebook):
    """Without the course's settings JupyterLab asks about Jupyter news in a toast a few
    seconds after the page loads (within 6 s here); this runs last, long after."""
    _, driver = lab
    _, _, opened = notebook
    time.sleep(max(0.0, 10 - (time.monotonic() - opened)))
    toasts = [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".Toastify__toast")]
    shot(driver, "student_04_no_news_prompt")
    assert not any("news" in t.lower() for t in toasts), toasts

"""JupyterLab in headless Chromium for the browser tests: a server on 127.0.0.1 (a free
port, a random token, private Jupyter folders) and a Selenium driver for Debian's
``chromium`` and ``chromium-driver``, with the few page operations the tests share.

Nothing is downloaded: the browser and its driver are the Debian packages (``make
system`` installs them), and Selenium is pointed at them so that its own manager never
looks for another.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHOTS = REPO / "build" / "browser"
JUPYTER_DIR = REPO / "jupyter"
CHROMIUM_NAMES = ("chromium", "chromium-browser")
DRIVER_NAMES = ("chromedriver", "chromium-driver")


def browser_binaries() -> tuple[str, str]:
    """(chromium, chromedriver), or the test is skipped saying what to install."""
    browser = next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)
    driver = next((p for p in map(shutil.which, DRIVER_NAMES) if p), None)
    if browser is None or driver is None:
        missing = [name for name, path in (("chromium", browser), ("chromium-driver", driver)) if path is None]
        pytest.skip(f"no headless browser: the Debian package(s) {', '.join(missing)} are not installed "
                    "(`make system` installs them as root; CI does)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.skip("selenium is not installed (it is in the [dev] extra: pip install -e '.[dev]')")
    return browser, driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LabServer:
    """A JupyterLab server on ``root`` (a folder the test owns), started with the given
    ``--config`` file. Its Jupyter folders (user settings, workspaces, runtime, IPython)
    are private to it, so nothing of the machine's user leaks in or out."""

    def __init__(self, root: Path, config: Path | None, state: Path, extra_args=(), extra_env=None):
        self.root, self.config, self.state = Path(root), config, Path(state)
        self.port, self.token = _free_port(), secrets.token_hex(24)
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra_args = list(extra_args)
        self.extra_env = dict(extra_env or {})
        self.process = None

    def env(self) -> dict:
        env = dict(os.environ)
        env.pop("MPLBACKEND", None)  # kernels draw inline figures
        for key, sub in (("JUPYTER_CONFIG_DIR", "config"), ("JUPYTERLAB_SETTINGS_DIR", "user-settings"),
                         ("JUPYTERLAB_WORKSPACES_DIR", "workspaces"), ("JUPYTER_RUNTIME_DIR", "runtime"),
                         ("IPYTHONDIR", "ipython")):
            (self.state / sub).mkdir(parents=True, exist_ok=True)
            env[key] = str(self.state / sub)
        # Every cell in the page, not only those in view: the tests find cells by position.
        tracker = self.state / "user-settings" / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings"
        tracker.parent.mkdir(parents=True, exist_ok=True)
        tracker.write_text(json.dumps({"windowingMode": "none"}))
        env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
        env.setdefault("OMP_NUM_THREADS", "1")
        env.update(self.extra_env)
        return env

    def start(self, timeout_s: float = 90) -> "LabServer":
        args = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
                f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0",
                f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={self.root}",
                *self.extra_args]
        if os.geteuid() == 0:  # CI runs as root
            args.append("--allow-root")
        if self.config is not None:
            args.append(f"--config={self.config}")
        self.state.mkdir(parents=True, exist_ok=True)
        self.log = open(self.state / "server.log", "wb")
        self.process = subprocess.Popen(args, cwd=self.root, env=self.env(), stdout=self.log,
                                        stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"JupyterLab exited with {self.process.returncode}:\n{self.log_text()[-3000:]}")
            with contextlib.suppress(OSError, urllib.error.URLError):
                if self.api("GET", "/api/status") is not None:
                    return self
            time.sleep(0.3)
        raise RuntimeError(f"JupyterLab did not answer in {timeout_s} s:\n{self.log_text()[-3000:]}")

    def log_text(self) -> str:
        return (self.state / "server.log").read_text(errors="replace")

    def api(self, method: str, path: str, body=None):
        request = urllib.request.Request(self.url + path, method=method,
                                         data=None if body is None else json.dumps(body).encode(),
                                         headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            data = response.read()
        return json.loads(data) if data else {}

    def stop(self) -> None:
        if self.process is None:
            return
        with contextlib.suppress(Exception):
            for kernel in self.api("GET", "/api/kernels"):
                self.api("DELETE", f"/api/kernels/{kernel['id']}")
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=15)
        self.log.close()


def chromium(download_dir: Path):
    """A headless Chromium driven through Debian's chromedriver."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = browser_binaries()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1400,1000", "--no-first-run", "--disable-extensions",
                 "--disable-background-networking", "--disable-component-update",
                 f"--user-data-dir={download_dir / 'chromium-profile'}"):
        options.add_argument(flag)
    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager look online
    service = Service(executable_path=driver, log_output=str(download_dir / "chromedriver.log"))
    drv = webdriver.Chrome(service=service, options=options)
    drv.set_page_load_timeout(60)
    global current_driver
    current_driver = drv
    return drv


def shot(driver, name: str) -> Path:
    """Saves a screenshot of the whole window as build/browser/<name>.png."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    driver.save_screenshot(str(path))
    return path


#: The driver whose window a timed-out wait saves (build/browser/timeout_*.png).
current_driver = None


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.2):
    """Polls ``predicate`` until it returns something truthy; fails saying ``what``
    (and saves a screenshot of the browser window as it was then)."""
    deadline = time.monotonic() + timeout_s
    last_error = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except Exception as exc:  # the page is changing under us: try again
            last_error, value = exc, None
        if value:
            return value
        time.sleep(interval_s)
    if current_driver is not None:
        with contextlib.suppress(Exception):
            shot(current_driver, "timeout_" + "".join(ch if ch.isalnum() else "_" for ch in what)[:60])
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}"
                         + (f" (last error: {last_error!r})" if last_error else ""))


# ------------------------------------------------------------------ notebook operations

def open_notebook(driver, server: LabServer, relpath: str, timeout_s: float = 60):
    """Opens a notebook in JupyterLab and waits until its cells are shown and its
    kernel is idle."""
    from selenium.webdriver.common.by import By

    driver.get(f"{server.url}/lab/tree/{relpath}?token={server.token}&reset")
    wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, ".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Cell"),
             timeout_s, f"the cells of {relpath}")
    wait_for(lambda: kernel_idle(driver), timeout_s, f"the kernel of {relpath} to start")


def kernel_idle(driver) -> bool:
    from selenium.webdriver.common.by import By

    status = driver.find_elements(By.CSS_SELECTOR, ".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook-ExecutionIndicator")
    return bool(status) and status[0].get_attribute("data-status") == "idle"


def code_cells(driver):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, ".jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell")


def run_cell(driver, index: int, timeout_s: float = 90):
    """Runs the ``index``-th code cell as a person does (click into it, Shift+Enter)
    and waits until it has finished; returns the cell element."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    def prompt():
        return code_cells(driver)[index].find_element(By.CSS_SELECTOR, ".jp-InputPrompt").text

    before = prompt()
    cell = code_cells(driver)[index]
    driver.execute_script("arguments[0].scrollIntoView({block: 'start'})", cell)
    editor = cell.find_element(By.CSS_SELECTOR, ".jp-InputArea-editor")
    ActionChains(driver).click(editor).key_down(Keys.SHIFT).send_keys(Keys.ENTER).key_up(Keys.SHIFT).perform()

    def finished():
        # "[7]:" once run; "[*]:" while it runs; "[ ]:" before.
        now = prompt()
        return re.search(r"\[\d+\]", now) and now != before and kernel_idle(driver)

    wait_for(finished, timeout_s, f"code cell {index} to finish")
    return code_cells(driver)[index]


def retry_stale(read, attempts: int = 25, interval_s: float = 0.2):
    """``read()``, again while the page replaces the elements it reads (an explorer
    redrawing its output): Selenium then raises StaleElementReferenceException."""
    from selenium.common.exceptions import StaleElementReferenceException

    for attempt in range(attempts):
        try:
            return read()
        except StaleElementReferenceException:
            if attempt == attempts - 1:
                raise
            time.sleep(interval_s)


def output_text(cell) -> str:
    from selenium.webdriver.common.by import By

    return "\n".join(o.text for o in cell.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output"))

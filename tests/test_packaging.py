"""A regular (non-editable) install carries everything the package needs at run time.

A wheel is built from a copy of the repository, installed without dependencies into a
fresh virtual environment, and every model is loaded from a folder outside the
repository. The fresh environment reuses the dependencies of the running one through a
``.pth`` file that appends the running environment's site-packages to ``sys.path``;
lines in a ``.pth`` file are plain paths, so the editable install found there (itself a
``.pth`` hook, only run for real site directories) does not shadow the wheel's copy,
and the test checks which ``cs_helpers`` was imported.
"""
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow

LOAD_EVERY_MODEL = """
import json, sys
import cs_helpers
from cs_helpers.models import load_model
from cs_helpers.models import EMBEDDED_DEFAULT, TOYWORLD_NAMES
from cs_helpers.toydecoder import load_decoder
from cs_helpers.toynet import data_dir
loaded = {}
for name in (EMBEDDED_DEFAULT, *TOYWORLD_NAMES):   # every model shipped with the package (torchvision's download)
    model = load_model(name, device="cpu")
    loaded[name] = sum(p.numel() for p in model.parameters())
loaded["toy_decoder"] = sum(p.numel() for p in load_decoder(device="cpu").parameters())
print(json.dumps({"package": cs_helpers.__file__, "weights": str(data_dir()), "loaded": loaded,
                  "reference": __import__("importlib").util.find_spec("cs_helpers.reference") is not None}))
"""


def _run(args, **kwargs):
    result = subprocess.run(args, capture_output=True, text=True, timeout=240, **kwargs)
    assert result.returncode == 0, f"{args[:4]} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


def _copy_sources(destination: Path) -> Path:
    """What a wheel is built from, without build outputs or caches (building in the
    working tree would leave build/ behind)."""
    source = destination / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    shutil.copytree(REPO / "cs_helpers", source / "cs_helpers",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    return source


def test_a_built_wheel_installed_elsewhere_loads_every_model(tmp_path):
    source = _copy_sources(tmp_path)
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
          "--wheel-dir", str(wheels), str(source)])
    (wheel,) = wheels.glob("cs_helpers-*.whl")

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--quiet", str(wheel)])
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (site / "zz_reuse_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {key: value for key, value in os.environ.items()
           if key not in ("PYTHONPATH", "CS_HELPERS_DATA", "PYTHONHOME", "VIRTUAL_ENV")}
    env["OMP_NUM_THREADS"] = "1"
    report = json.loads(_run([str(python), "-c", LOAD_EVERY_MODEL], cwd=outside, env=env).stdout.strip().splitlines()[-1])

    # The wheel's copy was imported, and its weights are the wheel's package data.
    assert Path(report["package"]).resolve().is_relative_to(site.resolve()), report
    assert Path(report["weights"]).resolve() == (site / "cs_helpers" / "weights").resolve(), report
    assert not Path(report["package"]).resolve().is_relative_to(REPO), report
    assert set(report["loaded"]) == {"efficientnet_lite0", "toynet", "toynet_shortcut", "toynet_robust",
                                     "toy_decoder"}
    assert all(count > 0 for count in report["loaded"].values()), report

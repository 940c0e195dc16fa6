import os
import sys
from pathlib import Path

import matplotlib
import pytest
import torch

matplotlib.use("Agg")

# nbgrader runs `alembic` from PATH when it creates a gradebook.
os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")

REPO = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def lite0():
    from cs_helpers.models import load_model

    return load_model("efficientnet_lite0", device="cpu")


@pytest.fixture(scope="session")
def photos():
    from cs_helpers.data import sample_images

    return sample_images()

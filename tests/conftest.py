import os
import sys
import tempfile
from pathlib import Path

import matplotlib
import pytest
import torch

matplotlib.use("Agg")

# nbgrader runs `alembic` from PATH when it creates a gradebook.
os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")

REPO = Path(__file__).resolve().parent.parent

# Hidden cases come from the course secret (cs_helpers.grading.registry). The tests use
# a fixed one, so that every run, on any machine, draws the same hidden cases; a real
# course gets a random secret of its own on first use.
_TEST_SECRET = Path(tempfile.mkdtemp(prefix="cs-test-secret-")) / "secret"
_TEST_SECRET.write_text("33e6f223a9cbd3f88ad8f1555733c874d0c67dffa4c01592ea64cc92c5f8e368\n")
_TEST_SECRET.chmod(0o600)
os.environ.setdefault("CS_HELPERS_SECRET_FILE", str(_TEST_SECRET))


def pytest_collection_modifyitems(config, items):
    # The longest tests first: started last, one of them would keep a worker busy after
    # the other has finished.
    items.sort(key=lambda item: "long_running" not in item.keywords)
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


@pytest.fixture(scope="module")
def one_thread():
    """Tests on tiny networks and small images: a second intra-op thread only adds
    synchronization (and, on a busy 2-core machine, makes them several times slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def toynet():
    from cs_helpers.models import load_model

    return load_model("toynet", device="cpu")


@pytest.fixture(scope="session")
def student_release(tmp_path_factory):
    """The student release of the course (``cs_helpers.course.release``), built once per
    test process; tests that change it work on a copy."""
    from cs_helpers.course import release

    return release(tmp_path_factory.mktemp("release") / "course")

"""Small builders shared by the test files: seeded tiny networks and inputs, a count of
the hooks left on a model, and a notebook trimmed to its graded cells."""
from pathlib import Path

import nbformat
import torch

from cs_helpers.grading import tiny_models  # noqa: F401  (registers the tiny networks)
from cs_helpers.grading.core import ModelSpec, build_model


def tiny(name="tiny_relu_cnn", seed=0):
    """A tiny network of :mod:`cs_helpers.grading.tiny_models`, on CPU, seeded."""
    return build_model(ModelSpec(name, seed), device="cpu")


def rand(*shape, seed=0):
    """Uniform ``[0, 1)`` values of ``shape`` from a generator of its own."""
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def hook_count(model):
    """Every forward, forward-pre, backward and backward-pre hook on any module."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               + len(getattr(m, "_backward_pre_hooks", {})) for m in model.modules())


def graded_cells_only(path: Path, out: Path) -> Path:
    """The notebook at ``path`` with only its nbgrader cells (setup, solutions, tests,
    answers), written to ``out``: what is scored is unchanged, the demonstration cells
    are not run again. For tests whose point is scoring or checking; the source
    notebooks themselves are executed in full elsewhere."""
    nb = nbformat.read(path, as_version=4)
    nb.cells = [c for c in nb.cells if c.get("metadata", {}).get("nbgrader")]
    out.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, out)
    return out

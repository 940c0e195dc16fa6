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


_REFERENCE_OUTCOMES: dict = {}


def grade_in_process(name, func):
    """The report of ``func`` on the hidden seed's cases of the check ``name``, as
    ``grading.score`` computes it in this process. The reference's outcomes are computed
    once per check and reused; every call gets freshly built models, so hooks or a
    batch-norm switch a function leaves behind stay with it. Warnings are silenced."""
    import warnings

    from cs_helpers.grading import get_check, hidden_seed
    from cs_helpers.grading.core import call_case, unique_cases
    from cs_helpers.grading.sandbox import reference_outcomes

    if name not in _REFERENCE_OUTCOMES:
        check = get_check(name)
        props = check.properties(hidden_seed(name))
        cases = unique_cases(props)
        _REFERENCE_OUTCOMES[name] = (check, props, cases, reference_outcomes(check, cases, "cpu"))
    check, props, cases, expected = _REFERENCE_OUTCOMES[name]
    models: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = {id(c): call_case(func, c, torch.device("cpu"), models) for c in cases}
    return check.evaluate(props, expected, got)


def assert_costs_only(report, fragments, *, earns_some=True, nothing_else=True):
    """A mistake's report: below full points (and above zero when ``earns_some``);
    every fragment names a failed property, and (``nothing_else``) no other property
    failed; no tensor is printed in the message."""
    assert report.score < report.points, report.message
    if earns_some:
        assert report.score > 0, report.message
    for fragment in fragments:
        assert any(fragment in d for d in report.failed), (fragment, report.message)
    if nothing_else:
        unexpected = [d for d in report.failed if not any(f in d for f in fragments)]
        assert not unexpected, (unexpected, report.message)
    assert "tensor(" not in report.message
    return report

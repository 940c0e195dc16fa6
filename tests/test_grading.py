"""Checks score the reference fully and take points from real mistakes; the trusted
path scores student code run in a child process and resists tampering."""
import pytest
import torch
import torch.nn.functional as F

from cs_helpers import grading
from cs_helpers.grading import get_check, hidden_seed
from cs_helpers.grading.sandbox import trusted_score
from cs_helpers.reference import filters as ref

SETUP = "import math\nimport torch\nimport torch.nn.functional as F\nfrom cs_helpers import grading\n"


def student_source(name):
    """A student's cell: the reference's source text, as a student might write it."""
    import inspect

    helpers = [ref._min_max_rows, ref._pair, ref._output_size] + ([ref.im2col] if name == "conv2d_im2col" else [])
    return "".join(inspect.getsource(f) for f in helpers) + inspect.getsource(getattr(ref, name))


def test_every_filters_check_gives_the_reference_full_points(capsys):
    for name in ("normalize_filters", "conv2d_im2col", "linear_templates"):
        check = get_check(name)
        assert grading.score(name, getattr(ref, name)) == check.points
    out = capsys.readouterr()
    assert "every property checked holds" in out.out and out.err == ""


def test_global_normalization_loses_points_and_the_message_names_it(capsys):
    def global_minmax(weights):
        return (weights - weights.min()) / (weights.max() - weights.min())

    score = grading.score("normalize_filters", global_minmax)
    assert 0 < score < get_check("normalize_filters").points
    out = capsys.readouterr().out
    assert "on its own (per filter" in out
    assert "tensor(" not in out and "expected" not in out.lower()


def test_a_pixel_loop_is_advised_against_without_losing_points(capsys):
    def loop_conv(x, weight, bias=None, stride=1, padding=0):
        s = stride if isinstance(stride, tuple) else (stride, stride)
        p = padding if isinstance(padding, tuple) else (padding, padding)
        xp = F.pad(x, (p[1], p[1], p[0], p[0]))
        co, _, kh, kw = weight.shape
        oh, ow = (xp.shape[2] - kh) // s[0] + 1, (xp.shape[3] - kw) // s[1] + 1
        out = x.new_zeros(x.shape[0], co, oh, ow)
        for i in range(oh):
            for j in range(ow):
                patch = xp[:, :, i * s[0]:i * s[0] + kh, j * s[1]:j * s[1] + kw].reshape(x.shape[0], -1)
                out[:, :, i, j] = patch @ weight.reshape(co, -1).T
        return out if bias is None else out + bias.view(1, -1, 1, 1)

    # Python call counts are recorded in the graded process, which could forge them: advice only.
    points = get_check("conv2d_im2col").points
    assert grading.score("conv2d_im2col", loop_conv) == points
    assert "no Python loop" in capsys.readouterr().out.split("advice, no points")[1]


def test_forgotten_bias_and_transposed_templates_lose_points():
    def no_bias(x, weight, bias=None, stride=1, padding=0):
        return ref.conv2d_im2col(x, weight, None, stride, padding)

    def column_major(W, image_shape):
        return ref.linear_templates(W, image_shape[::-1]).transpose(-1, -2)

    assert grading.score("conv2d_im2col", no_bias, quiet=True) < get_check("conv2d_im2col").points
    assert grading.score("linear_templates", column_major, quiet=True) < get_check("linear_templates").points


def test_crashing_mutating_and_missing_functions_are_contained(capsys):
    def crashes(weights):
        raise RuntimeError("oops")

    def mutates(weights):
        weights.sub_(weights.amin(dim=(1, 2, 3), keepdim=True))
        return ref.normalize_filters(weights)

    assert grading.score("normalize_filters", crashes) == 0
    assert grading.score("normalize_filters", mutates) == get_check("normalize_filters").points  # advice only
    assert grading.score("normalize_filters", None) == 0
    assert grading.score("no_such_function", ref.normalize_filters) == 0
    out = capsys.readouterr()
    assert out.err == "" and "Traceback" not in out.out and "raised RuntimeError: oops" in out.out


def test_hidden_seed_is_stable_and_differs_between_functions():
    assert hidden_seed("pca") == hidden_seed("pca") != hidden_seed("fgsm")


# -- across the trust boundary ------------------------------------------------------


def test_trusted_score_of_correct_and_wrong_student_code():
    check = get_check("normalize_filters")
    good = trusted_score(check, [SETUP, student_source("normalize_filters")], hidden_seed(check.name))
    assert good.score == check.points
    wrong = "def normalize_filters(weights):\n    return (weights - weights.min()) / (weights.max() - weights.min())\n"
    assert 0 < trusted_score(check, [SETUP, wrong], 1).score < check.points


def test_importing_or_reading_the_reference_earns_nothing():
    check = get_check("normalize_filters")
    imports = "from cs_helpers.reference.filters import normalize_filters\n"
    reads = ("import os, cs_helpers\n"
             "path = os.path.join(os.path.dirname(cs_helpers.__file__), 'reference', 'filters.py')\n"
             "exec(open(path).read())\n")
    shell = "import subprocess\nsrc = subprocess.check_output(['cat', 'cs_helpers/reference/filters.py'])\nexec(src)\n"
    for attack in (imports, reads, shell):
        assert trusted_score(check, [SETUP, attack], 1).score == 0


def test_faking_the_score_in_the_kernel_earns_nothing():
    check = get_check("normalize_filters")
    identity = "def normalize_filters(weights):\n    return weights\n"
    fake = "import cs_helpers.grading as g\ng.score = lambda *a, **k: 2.0\n" + identity
    honest = trusted_score(check, [SETUP, identity], 1).score
    assert trusted_score(check, [SETUP, fake], 1).score == honest < check.points


def test_a_runaway_cell_costs_only_its_own_function():
    check = get_check("linear_templates")
    looping = "def normalize_filters(weights):\n    while True:\n        pass\n"
    sources = [SETUP, looping, student_source("linear_templates")]
    assert trusted_score(check, sources, 1).score == check.points
    stuck = trusted_score(get_check("normalize_filters"), sources, 1)
    assert stuck.score == 0 and any("time limit" in e for e in stuck.errors)


# Memory exhaustion and a child that kills itself: tests/test_attacks.py (greedy, oscar),
# through the real pipeline.


# -- every registered check, whatever the topic ---------------------------------------


def _all_checks():
    return sorted(grading.load_all().items())


def test_every_check_gives_its_reference_full_points_on_the_cpu():
    for name, check in _all_checks():
        assert grading.score(name, check.reference(), device="cpu", quiet=True) == check.points, name


def test_no_check_gives_points_to_a_function_that_returns_nothing():
    for name, check in _all_checks():
        assert grading.score(name, lambda *args, **kwargs: None, quiet=True) == 0, name



@pytest.mark.cuda
def test_every_check_gives_its_reference_full_points_on_cuda():
    for name, check in _all_checks():
        assert grading.score(name, check.reference(), device="cuda", quiet=True) == check.points, name


@pytest.mark.cuda
def test_trusted_score_on_cuda():
    check = get_check("conv2d_im2col")
    report = trusted_score(check, [SETUP, student_source("conv2d_im2col")], 1, device="cuda")
    assert report.score == check.points


def test_calling_a_convolution_routine_is_advised_against_without_losing_points(capsys):
    def delegates(x, weight, bias=None, stride=1, padding=0):
        return F.conv2d(x, weight, bias, stride=stride, padding=padding)

    def module(x, weight, bias=None, stride=1, padding=0):
        conv = torch.nn.Conv2d(weight.shape[1], weight.shape[0], weight.shape[2:], stride=stride,
                               padding=padding, bias=bias is not None)
        with torch.no_grad():
            conv.weight.copy_(weight)
            if bias is not None:
                conv.bias.copy_(bias)
            return conv(x)

    # Which torch functions ran is recorded in the graded process, which could forge it: the
    # points of the exercise now come from im2col's returned patch matrix.
    points = get_check("conv2d_im2col").points
    for cheat in (delegates, module):
        assert grading.score("conv2d_im2col", cheat) == points
        assert "convolution routine" in capsys.readouterr().out.split("advice, no points")[1]
    child = trusted_score(get_check("conv2d_im2col"), [SETUP, CONV_BY_TORCH], 1)
    assert child.score == points


CONV_BY_TORCH = """def conv2d_im2col(x, weight, bias=None, stride=1, padding=0):
    return F.conv2d(x, weight, bias, stride=stride, padding=padding)
"""


def test_scores_started_before_execution_are_used_only_for_the_same_sources(monkeypatch):
    """StartTrustedScores scores while the kernel runs; TrustedScores takes those reports
    only when the notebook's graded sources and the device are still the ones scored, and
    otherwise scores again (after the first scoring has ended)."""
    from types import SimpleNamespace

    from nbformat.v4 import new_code_cell, new_notebook

    from cs_helpers.grading import nbgrader_plugin as plugin

    scored = []

    def fake_score(checks, sources, seeds, points, device=None, sandboxed=None):
        scored.append(list(sources))
        return [SimpleNamespace(score=float(len(scored)), points=2.0, message=f"scoring {len(scored)}")]

    def plan(cells, info):
        assert info == "the notebook's nbgrader resources"
        return [(1, "f")], {"checks": [None], "sources": [source for kind, _, source in cells if kind == "code"][:1],
                            "seeds": [0], "points": [2.0]}

    monkeypatch.setattr(plugin, "_score", fake_score)
    monkeypatch.setattr(plugin, "_scoring_plan", plan)
    monkeypatch.setattr(plugin.isolation, "require_sandbox", lambda: True)
    test_cell = new_code_cell("f()", metadata={"nbgrader": {"grade_id": "test_f", "grade": True}})
    nb = new_notebook(cells=[new_code_cell("def f(): pass", metadata={"nbgrader": {"grade_id": "f"}}), test_cell])

    resources = {"nbgrader": "the notebook's nbgrader resources"}
    nb, resources = plugin.StartTrustedScores().preprocess(nb, resources)
    nb, resources = plugin.TrustedScores().preprocess(nb, resources)
    assert scored == [["def f(): pass"]] and nb.cells[1].outputs[0]["text"] == "scoring 1\n"

    nb, resources = plugin.StartTrustedScores().preprocess(nb, resources)
    nb.cells[0].source = "def f(): return 1"          # changed after the early start
    nb, resources = plugin.TrustedScores().preprocess(nb, resources)
    assert scored[1:] == [["def f(): pass"], ["def f(): return 1"]]
    assert nb.cells[1].outputs[0]["text"] == "scoring 3\n" and nb.cells[1].outputs[1]["data"]["text/plain"] == "3.0"
    assert "trusted_scores_started" not in resources.get("cs_helpers", {})

    nb, resources = plugin.StartTrustedScores().preprocess(nb, resources)   # on the default device
    nb, resources = plugin.TrustedScores(device="cpu").preprocess(nb, resources)
    assert len(scored) == 5 and nb.cells[1].outputs[0]["text"] == "scoring 5\n"

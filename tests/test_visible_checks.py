"""The visible checks of notebooks 01-03 name the mistake a student made.

Each case plants one common mistake into the source notebook's solution of a function
(a textual edit of the solution cell, asserted to apply), then runs, in this process, the
notebook's graded cells in order as the student's kernel would: the setup cell, every
solution cell (the planted one in its place) and the visible part of the test cells up
to the function's own (earlier test cells define helpers that later ones use). The
first exception of the function's test cell must be the check's own AssertionError with
the message that names the mistake, never an error from inside torch or the package.

The visible code is read from the notebook, never copied here, so a reordered or
rewritten check is what is tested.
"""
from __future__ import annotations

import contextlib
import functools
import io
import re
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = {p.parent.name[3:]: p for p in sorted((REPO / "notebooks").glob("0[1-3]_*/*.ipynb"))}

_HIDDEN = re.compile(r"### BEGIN HIDDEN TESTS.*?### END HIDDEN TESTS\n?", re.S)
_SOLUTION_MARKERS = re.compile(r"(?m)^[ \t]*### (BEGIN|END) SOLUTION[ \t]*\n?")


@functools.lru_cache(maxsize=None)
def graded_code_cells(path: Path) -> tuple[tuple[str, str], ...]:
    """``(grade_id, source)`` of the code cells of a notebook that nbgrader grades or
    locks (setup, solutions, tests), in notebook order."""
    nb = nbformat.read(path, as_version=4)
    return tuple((c.metadata["nbgrader"]["grade_id"], c.source) for c in nb.cells
                 if c.cell_type == "code" and c.metadata.get("nbgrader", {}).get("grade_id"))


def visible_part(test_source: str) -> str:
    """A test cell without its hidden tests (what the student release holds)."""
    return _HIDDEN.sub("", test_source)


def solution_code(source: str) -> str:
    """A source notebook's solution cell without nbgrader's solution markers."""
    return _SOLUTION_MARKERS.sub("", source)


def first_failure(topic: str, name: str, replacements=()) -> str | None:
    """``"ExceptionType: message"`` of the first exception raised by the visible checks
    of ``name``, with ``replacements`` (``(old, new)`` pairs) applied to its solution;
    None when they pass."""
    namespace: dict = {}
    with contextlib.redirect_stdout(io.StringIO()):
        for grade_id, source in graded_code_cells(NOTEBOOKS[topic]):
            if grade_id == f"test_{name}":
                try:
                    exec(compile(visible_part(source), grade_id, "exec"), namespace)
                except Exception as exc:  # the first failure is the point of the test
                    return f"{type(exc).__name__}: {exc}"
                return None
            if grade_id.startswith("test_"):
                source = visible_part(source)
            else:
                source = solution_code(source)
                if grade_id == name:
                    for old, new in replacements:
                        assert old in source, f"the planted mistake no longer applies to {name}: {old!r}"
                        source = source.replace(old, new)
            exec(compile(source, grade_id, "exec"), namespace)
    raise AssertionError(f"{NOTEBOOKS[topic].name} has no test cell test_{name}")


# (topic, function, the mistake, edits of the solution, what the first message must say)
PLANTS = [
    ("filters", "normalize_filters", "one min and max for the whole bank",
     [("flat.min(dim=1, keepdim=True).values", "flat.min()"),
      ("flat.max(dim=1, keepdim=True).values - low", "flat.max() - low")],
     "you scaled the whole bank with one min and max: scale each filter on its own"),
    ("filters", "normalize_filters", "min-max per colour channel",
     [("flatten(start_dim=1)", "flatten(start_dim=2)"), ("flat.min(dim=1, keepdim=True)", "flat.min(dim=2, keepdim=True)"),
      ("flat.max(dim=1, keepdim=True)", "flat.max(dim=2, keepdim=True)")],
     "scale the channels of a filter together, not one by one"),
    ("filters", "normalize_filters", "no guard for a constant filter",
     [("torch.where(span > 0, (flat - low) / safe_span, torch.full_like(flat, 0.5))", "(flat - low) / span")],
     "a constant filter gave NaN: guard against dividing by zero"),
    ("filters", "linear_templates", "one min and max for the whole matrix",
     [("rows.min(dim=1, keepdim=True).values", "rows.min()"),
      ("rows.max(dim=1, keepdim=True).values - low", "rows.max() - low")],
     "you scaled the whole matrix with one min and max: scale each row (template) on its own"),
    ("filters", "linear_templates", "column-major reshape",
     [("return scaled.reshape(W.shape[0], *image_shape)",
       "return scaled.reshape(W.shape[0], *image_shape[::-1]).transpose(-1, -2)")],
     "the row fills the image column by column: reshape it in row-major order"),
    ("filters", "im2col", "a patch flattened offset first, then channel",
     [("patches = torch.stack(slices, dim=2)", "patches = torch.stack(slices, dim=1)")],
     "three channels (order: channel, row, column): the patch matrix differs from F.unfold's"),
    ("filters", "im2col", "padding ignored",
     [("p_h, p_w = (padding, padding) if isinstance(padding, int) else tuple(padding)", "p_h, p_w = 0, 0")],
     "padding=1 keeps 4 x 4 positions"),
    ("filters", "im2col", "calls F.unfold",
     [("    k_h, k_w = (kernel_size",
       "    return F.unfold(x, kernel_size, stride=stride, padding=padding)\n    k_h, k_w = (kernel_size")],
     "im2col must build the patch matrix itself (F.pad and slicing), not call unfold"),
    ("filters", "conv2d_im2col", "bias forgotten", [("out = out + bias.view(1, c_out, 1)", "pass")],
     "with a bias: values differ from F.conv2d"),
    ("filters", "conv2d_im2col", "calls F.conv2d",
     [("    columns = im2col(", "    return F.conv2d(x, weight, bias, stride=stride, padding=padding)\n    columns = im2col(")],
     "conv2d_im2col must not call F.conv2d / torch.conv2d"),
    ("features", "extract_features", "batch_size ignored", [("images.split(batch_size)", "[images]")],
     "a forward pass held more than batch_size=2 images: run the model on batches of at most batch_size images"),
    ("features", "extract_features", "the last, smaller batch dropped",
     [("for batch in images.split(batch_size):",
       "for batch in [b for b in images.split(batch_size) if b.shape[0] == batch_size]:")],
     "4 rows for 5 images: one row per image; with batch_size=2 the last batch is smaller"),
    ("features", "extract_features", "the output not flattened",
     [("record.output.reshape(batch.shape[0], -1)", "record.output")], "expected (5, 144) after flattening"),
    ("features", "extract_features", "no torch.no_grad()",
     [("with torch.no_grad(), capture(model, layer) as record:", "with capture(model, layer) as record:")],
     "the features carry a graph: run the model under torch.no_grad()"),
    ("features", "nearest_neighbors", "the expanded square in float32",
     [("q = queries.double()", "q = queries"), ("x = database.to(q.device).double()", "x = database.to(q.device)")],
     "large, nearly equal float32 vectors: compute the distances in float64"),
    ("features", "nearest_neighbors", "a Python loop over the queries",
     [("return torch.sort(squared, dim=1, stable=True).indices[:, :k]",
       "return torch.stack([torch.sort(((x - q[r]) ** 2).sum(1), stable=True).indices[:k] "
       "for r in range(q.shape[0])])")],
     "the number of torch operations grows with the number of queries"),
    ("features", "nearest_neighbors", "furthest first",
     [("torch.sort(squared, dim=1, stable=True)", "torch.sort(squared, dim=1, descending=True, stable=True)")],
     "3.2 is closest to 3 (index 2), then 4 (index 4)"),
    ("features", "nearest_neighbors", "int32 indices",
     [("indices[:, :k]", "indices[:, :k].int()")], "return a LongTensor (torch.int64)"),
    ("features", "pca", "projections computed before the sign fix",
     [("projected = centred @ components.T", "projected = centred @ vh[:k].T")],
     "some columns of projected have the wrong sign: project with the components after their sign fix"),
    ("features", "pca", "no sign fix",
     [("components = components * torch.where(signs == 0, torch.ones_like(signs), signs)", "pass")],
     "flip each component so that its entry of largest absolute value is positive"),
    ("features", "pca", "features not centred", [("centred = x - x.mean(dim=0, keepdim=True)", "centred = x")],
     "did you centre the data?"),
    ("features", "pca", "ratio over the k components kept",
     [("ratio = power[:k] / power.sum()", "ratio = power[:k] / power[:k].sum()")],
     "over the total variance of all directions"),
    ("features", "pca", "singular values instead of their squares", [("power = s ** 2", "power = s")],
     "a component's variance is its squared singular value s_i^2, not s_i"),
    ("features", "pca", "float64 results for float32 features",
     [("return projected.to(dtype), components.to(dtype), ratio.to(dtype)", "return projected, components, ratio")],
     "float32 features give float32 results"),
    ("features", "pca", "no guard for features that do not vary",
     [("ratio = power[:k] / power.sum() if power.sum() > 0 else torch.zeros_like(power[:k])",
       "ratio = power[:k] / power.sum()")],
     "features that do not vary: every explained variance ratio is 0 (guard the division)"),
    ("features", "top_activating_patches", "row and column from the height instead of the width",
     [("(flat // (h * w), (flat // w) % h, flat % w, float(value))",
       "(flat // (h * w), (flat % (h * w)) // h, flat % h, float(value))")],
     "turn the flat position back into image, row and column with the map's height and width"),
    ("features", "top_activating_patches", "ties in decreasing (n, i, j)",
     [("ordered = torch.sort(values, descending=True, stable=True)",
       "ordered = torch.sort(values.flip(0), descending=True, stable=True)\n"
       "    ordered = type(ordered)((ordered.values, values.numel() - 1 - ordered.indices))")],
     "equal values must come in increasing (n, i, j)"),
    ("features", "top_activating_patches", "smallest first",
     [("ordered = torch.sort(values, descending=True, stable=True)", "ordered = torch.sort(values, stable=True)")],
     "the first entry is not the channel's largest value: sort in decreasing order"),
    ("features", "top_activating_patches", "every channel at once",
     [("values = activations[:, channel].reshape(-1)", "values = activations.reshape(-1)")],
     "these values come from another channel: read activations[:, channel] only"),
    ("features", "receptive_field", "padding ignored",
     [("start += ((kernel - 1) / 2 - padding) * jump", "start += ((kernel - 1) / 2) * jump")],
     "padding moves the centre of output 0 back by padding x the jump"),
    ("features", "receptive_field", "the jump multiplied before the size grows",
     [("        size += (kernel - 1) * jump\n        jump *= stride", "        jump *= stride\n        size += (kernel - 1) * jump")],
     "grows the size by (kernel - 1) times the jump of the layers before it"),
    ("saliency", "gradient_saliency", "no absolute value", [("return grad.abs().amax(dim=1)", "return grad.amax(dim=1)")],
     "saliency is never negative: take the absolute value of the gradient"),
    ("saliency", "gradient_saliency", "sum over the channels",
     [("return grad.abs().amax(dim=1)", "return grad.abs().sum(dim=1)")], "you summed over the colour channels"),
    ("saliency", "gradient_saliency", "the softmax probability", [("scores = model(x)  ", "scores = model(x).softmax(1)  ")],
     "differentiate the logit (not the softmax probability)"),
    ("saliency", "gradient_saliency", "the first image's target for every image",
     [("selected = scores.gather(1, targets[:, None]).sum()", "selected = scores[:, targets[0]].sum()")],
     "use each image's own target"),
    ("saliency", "gradient_saliency", "not detached",
     [("return grad.abs().amax(dim=1)", "return (x * 0 + grad).abs().amax(dim=1)")], "return a detached tensor"),
    ("saliency", "gradient_saliency", "no torch.enable_grad()", [("with torch.enable_grad():", "if True:")],
     "gradient_saliency fails when called inside torch.no_grad(): build the graph under torch.enable_grad()"),
    ("saliency", "guided_backprop", "the plain gradient through the ReLUs",
     [("return grad_output.clamp(min=0) * active", "return grad_output * active")], "this is the plain gradient"),
    ("saliency", "guided_backprop", "the deconvnet rule",
     [("return grad_output.clamp(min=0) * active", "return grad_output.clamp(min=0)")], "the deconvnet rule"),
    ("saliency", "guided_backprop", "ReLU6 treated as a ReLU",
     [("active = (z > 0) & (z < 6) if isinstance(module, nn.ReLU6) else z > 0", "active = z > 0")],
     "no gradient may pass through a ReLU6 whose input is 6 or more"),
    ("saliency", "occlusion_map", "logits",
     [("clean = model(x[None]).softmax(dim=1)[0, target]", "clean = model(x[None])[0, target]"),
      ("model(occluded).softmax(dim=1)[:, target]", "model(occluded)[:, target]")],
     "your map holds logit drops: use softmax probabilities"),
    ("saliency", "occlusion_map", "the reverse difference",
     [("drops = clean - model(occluded).softmax(dim=1)[:, target]",
       "drops = model(occluded).softmax(dim=1)[:, target] - clean")],
     "the sign is reversed"),
    ("saliency", "occlusion_map", "the sum over the windows", [("return (total / count).to(image.dtype)", "return total.to(image.dtype)")],
     "take the mean over the windows that cover a pixel (not the sum)"),
    ("saliency", "occlusion_map", "no window flush with the border", [("            starts.append(size - window)", "            pass")],
     "add a window flush with the border"),
    ("saliency", "occlusion_map", "batch_size ignored",
     [("for start in range(0, len(positions), batch_size):\n            chunk = positions[start:start + batch_size]",
       "for start in range(0, 1):\n            chunk = positions")],
     "at most batch_size=5"),
    ("saliency", "occlusion_map", "windows filled with 0 instead of the baseline",
     [("torch.tensor(float(baseline), device=device)", "torch.tensor(0.0, device=device)")],
     "fill the window with `baseline`"),
    ("saliency", "shapley_values", "logits",
     [("values.append(model(batch).softmax(dim=1)[:, target])", "values.append(model(batch)[:, target])")],
     "the values add up to the change of the logit"),
    ("saliency", "shapley_values", "the sum over the orders, not their mean", [("return phi / n_permutations", "return phi")],
     "average the marginal contributions over the orders"),
    ("saliency", "shapley_values", "an unseeded generator",
     [("gen = torch.Generator().manual_seed(seed)", "gen = torch.Generator()")],
     "draw the orders from the seeded generator"),
    ("saliency", "shapley_values", "batch_size ignored",
     [("for start in range(0, distinct.shape[0], batch_size):\n            pixels = distinct[start:start + batch_size][:, seg]",
       "for start in range(0, 1):\n            pixels = distinct[:, seg]")],
     "at most batch_size=4"),
]


@pytest.mark.parametrize("topic, name, mistake, replacements, message", PLANTS,
                         ids=[f"{p[1]}: {p[2]}" for p in PLANTS])
def test_the_first_message_names_the_planted_mistake(topic, name, mistake, replacements, message):
    failure = first_failure(topic, name, replacements)
    assert failure is not None, f"{name} with {mistake!r} passes its visible checks"
    assert failure.startswith("AssertionError: "), f"{name} with {mistake!r}: not the check's own message: {failure}"
    assert message in failure, f"{name} with {mistake!r}: the first message is {failure!r}"


@pytest.mark.parametrize("topic", sorted(NOTEBOOKS))
def test_the_solutions_pass_every_visible_check(topic):
    names = [g[len("test_"):] for g, _ in graded_code_cells(NOTEBOOKS[topic]) if g.startswith("test_")]
    assert names
    for name in names:
        assert first_failure(topic, name) is None, name


def test_every_graded_function_of_notebooks_01_to_03_has_a_planted_mistake():
    planted = {name for _, name, *_ in PLANTS}
    for path in NOTEBOOKS.values():
        for grade_id, _ in graded_code_cells(path):
            if grade_id.startswith("test_"):
                assert grade_id[len("test_"):] in planted, grade_id

"""The pieces every check is made of.

A :class:`Check` grades one student function. It owns a list of :class:`Property`
objects; each property names one thing the function must get right ("each filter is
normalized on its own"), carries a weight, and is tested on a few :class:`Case` inputs
built fresh from a seed. The function's output on a case is compared with the
reference's output on the same case. A property holds when its comparison holds on
every one of its cases; the score is the weighted share of properties that hold.

The same check runs in two places:

* in the student's kernel (:func:`cs_helpers.grading.score`), for feedback;
* across the trust boundary (:mod:`cs_helpers.grading.sandbox`): the student's code
  runs in a child process that only hands back plain arrays, and the grader's own
  process compares them with the reference. That score is the one that counts.

Messages name the failed properties, never the expected numbers, and never show a
traceback into the grader.
"""
from __future__ import annotations

import importlib
import contextlib
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

__all__ = [
    "Case", "Check", "ModelSpec", "Outcome", "Property", "Report", "SelfCheckReport",
    "build_model", "register_model_builder", "same_values", "same_shape",
]


@dataclass(frozen=True)
class ModelSpec:
    """A model described by name and seed, so that the grader and the child process
    each build the same one without passing a module between processes.

    ``name`` is a name of :func:`cs_helpers.models.load_model` or of a builder
    registered with :func:`register_model_builder` (tiny seeded networks)."""

    name: str
    seed: int = 0
    pretrained: bool = True

    def encode(self) -> dict:
        return {"__model_spec__": [self.name, int(self.seed), bool(self.pretrained)]}


_MODEL_BUILDERS: dict[str, Callable[[int], torch.nn.Module]] = {}


def register_model_builder(name: str):
    """Registers ``builder(seed) -> nn.Module`` under ``name`` for :class:`ModelSpec`."""
    def decorator(builder):
        _MODEL_BUILDERS[name] = builder
        return builder
    return decorator


def build_model(spec: ModelSpec, device=None) -> torch.nn.Module:
    """The model a spec describes, frozen, in eval mode, on ``device``."""
    from .. import models
    from . import tiny_models  # noqa: F401  (registers the tiny networks)

    if spec.name in _MODEL_BUILDERS:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            model = _MODEL_BUILDERS[spec.name](spec.seed)
        model = models.freeze(model)
        return model.to(device if device is not None else torch.device("cpu"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        return models.load_model(spec.name, pretrained=spec.pretrained, device=device)


@dataclass
class Case:
    """One call of the graded function: positional and keyword arguments.

    Arguments may be tensors, numbers, strings, tuples/lists/dicts of those, or
    :class:`ModelSpec`. ``label`` describes the input in words for messages
    ("a bank of 8 filters 3x5x5")."""

    args: tuple
    kwargs: dict = field(default_factory=dict)
    label: str = ""
    count_calls: bool = False
    record_torch_calls: bool = False


@dataclass
class Outcome:
    """What one call produced: its return value (plain tensors and numbers), the
    tensor arguments as they were after the call, and what it left on the model."""

    value: Any = None
    error: str | None = None
    inputs_after: list | None = None
    hooks_left: int = 0
    mode_changed: bool = False
    params_changed: bool = False
    python_calls: int = -1
    torch_calls: tuple = ()

    @property
    def ok(self) -> bool:
        return self.error is None


Comparison = Callable[[Case, Any, Outcome], bool]


@dataclass
class Property:
    """One thing the function must get right, tested on ``cases``.

    ``feedback_only`` marks a property whose evidence is recorded inside the process
    that runs the graded code (hooks left on the model, its mode, the inputs after the
    call, counts of Python or torch calls): that code can forge such evidence, so the
    property earns no points anywhere. It is still checked, and its message shown, as
    advice. Points come only from what a function returns.

    ``expect`` marks a property that needs no reference: called like the graded function
    on each of the property's cases, it returns a value that ``holds`` accepts as the
    expected one there, from a closed form (F.conv2d's output, v(all) - v(none)) or from
    what the inputs imply (the output's shape). It only has to be right for what this
    property compares, on these cases. The student release, which has no reference,
    self-checks such properties with it (:meth:`Check.self_check`); grading always
    compares with the reference's outputs and never calls it."""

    description: str
    weight: float
    cases: list[Case]
    holds: Comparison
    feedback_only: bool = False
    expect: Callable | None = None

    @property
    def needs_reference(self) -> bool:
        return self.expect is None


@dataclass
class Report:
    """The result of a check: the score out of ``points`` and a message."""

    name: str
    score: float
    points: float
    passed: list[str]
    failed: list[str]
    errors: list[str] = field(default_factory=list)
    advice: list[str] = field(default_factory=list)  # feedback-only properties that fail

    @property
    def message(self) -> str:
        head = f"{self.name}: {self.score:g} / {self.points:g} points"
        if not self.failed:
            return "\n".join([head + " - every property checked holds."] + self._advice_lines())
        lines = [head + f" - {len(self.passed)} of {len(self.passed) + len(self.failed)} properties hold.",
                 "Not yet right:"]
        lines += [f"  - {d}" for d in self.failed]
        lines += [f"  ({e})" for e in self.errors[:3]]
        return "\n".join(lines + self._advice_lines())

    def _advice_lines(self) -> list[str]:
        if not self.advice:
            return []
        return ["Also worth fixing (advice, no points):"] + [f"  - {d}" for d in self.advice]

    def __str__(self):
        return self.message


@dataclass
class SelfCheckReport(Report):
    """A self-check without the reference (the student release): which properties that
    need no reference hold, and which wait for grading. It is no grade: ``score`` is
    None, and the message counts properties, never points."""

    waiting: list[str] = field(default_factory=list)

    @property
    def message(self) -> str:
        ran = len(self.passed) + len(self.failed)
        if ran == 0:
            lines = [f"{self.name} (self-check, no score): none of its properties can be checked without the "
                     "instructor's reference; they are all checked when your work is graded."]
        else:
            verdict = "all hold" if not self.failed else f"{len(self.passed)} hold"
            lines = [f"{self.name} (self-check, no score): {ran} of {ran + len(self.waiting)} properties need no "
                     f"reference and ran here; {verdict}."]
            lines += ["Holds:"] + [f"  - {d}" for d in self.passed] if self.passed else []
            if self.failed:
                lines += ["Not yet right:"] + [f"  - {d}" for d in self.failed]
                lines += [f"  ({e})" for e in self.errors[:3]]
        lines += self._advice_lines()
        if self.waiting:
            lines += ["Waiting for grading (they need the instructor's reference):"]
            lines += [f"  - {d}" for d in self.waiting]
        return "\n".join(lines)


class Check:
    """Base class: subclasses set ``name``, ``topic`` and ``points`` and implement
    :meth:`properties`."""

    name: str = ""
    topic: str = ""
    points: float = 1.0
    #: wall-clock seconds for all the calls of one grading, on the CPU
    timeout_s: float = 30.0

    def properties(self, seed: int) -> list[Property]:  # pragma: no cover - abstract
        raise NotImplementedError

    def reference(self) -> Callable:
        module = importlib.import_module(f"cs_helpers.reference.{self.topic}")
        return getattr(module, self.name)

    # -- running ---------------------------------------------------------------


    def evaluate(self, props: list[Property], expected: dict[int, Outcome],
                 got: dict[int, Outcome], points: float | None = None) -> Report:
        """Scores outcomes; ``expected`` and ``got`` map ``id(case)`` to outcomes."""
        points = self.points if points is None else points
        total = sum(p.weight for p in props if not p.feedback_only)
        earned, passed, failed, errors, advice = 0.0, [], [], [], []
        for prop in props:
            ok = True
            for case in prop.cases:
                outcome = got.get(id(case))
                if outcome is None or not outcome.ok:
                    ok = False
                    if outcome is not None and outcome.error not in errors:
                        errors.append(outcome.error)
                    break
                try:
                    if not prop.holds(case, expected[id(case)].value, outcome):
                        ok = False
                        break
                except Exception:
                    ok = False  # a malformed return value fails the property, quietly
                    break
            if prop.feedback_only:
                if not ok:
                    advice.append(prop.description)
                continue
            (passed if ok else failed).append(prop.description)
            earned += prop.weight if ok else 0.0
        score = round(points * earned / total, 4) if total else 0.0
        return Report(self.name, score, points, passed, failed, errors, advice)

    def self_check(self, props: list[Property], got: dict[int, Outcome], device=None) -> SelfCheckReport:
        """Judges ``got`` (outcomes by ``id(case)``) on the properties that need no
        reference, each against its own :attr:`Property.expect`; the others are listed
        as waiting for grading. Used where the reference is absent; a grade never comes
        from here."""
        runnable = [p for p in props if not p.needs_reference]
        waiting = [p.description for p in props if p.needs_reference and not p.feedback_only]
        passed, failed, errors, advice, cache = [], [], [], [], {}
        for prop in runnable:
            expected = {}
            for case in prop.cases:
                outcome = call_case(prop.expect, case, device, cache)
                if not outcome.ok:
                    raise RuntimeError(f"the closed form of {prop.description!r} failed on {case.label}: "
                                       f"{outcome.error}")
                expected[id(case)] = outcome
            report = self.evaluate([prop], expected, got)
            if prop.feedback_only:
                advice += report.advice
                continue
            passed += report.passed
            failed += report.failed
            errors += [e for e in report.errors if e not in errors]
        return SelfCheckReport(self.name, None, self.points, passed, failed, errors, advice, waiting)


def unique_cases(props: Sequence[Property]) -> list[Case]:
    """All distinct cases of the properties, in order (a case object shared by
    several properties is run once)."""
    seen, out = set(), []
    for prop in props:
        for case in prop.cases:
            if id(case) not in seen:
                seen.add(id(case))
                out.append(case)
    return out


# -- running a function on a case, in whichever process --------------------------


def materialize(value, device=None, cache=None):
    """Replaces ModelSpecs (also encoded ones) by models and moves tensors to
    ``device``; containers are rebuilt, tensors cloned."""
    cache = {} if cache is None else cache
    if isinstance(value, dict) and "__model_spec__" in value:
        value = ModelSpec(*value["__model_spec__"])
    if isinstance(value, ModelSpec):
        if value not in cache:
            cache[value] = build_model(value, device=device)
        return cache[value]
    if isinstance(value, torch.Tensor):
        return value.detach().clone().to(device) if device is not None else value.detach().clone()
    if isinstance(value, tuple):
        return tuple(materialize(v, device, cache) for v in value)
    if isinstance(value, list):
        return [materialize(v, device, cache) for v in value]
    if isinstance(value, dict):
        return {k: materialize(v, device, cache) for k, v in value.items()}
    return value


class _CallCounter:
    """A profile function counting Python and C calls made during one call: a loop
    over pixels makes a number of calls that grows with the image, a vectorized
    implementation does not."""

    def __init__(self):
        self.calls = 0

    def __call__(self, frame, event, arg):
        if event in ("call", "c_call"):
            self.calls += 1


class _TorchCallRecorder(TorchFunctionMode):
    """Records the names of the torch functions called (``conv2d``, ``matmul``, …)."""

    def __init__(self):
        super().__init__()
        self.names: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.add(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def _models_in(values) -> list[torch.nn.Module]:
    return [v for v in values if isinstance(v, torch.nn.Module)]


def _hook_count(model: torch.nn.Module) -> int:
    count = 0
    for m in model.modules():
        count += len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        count += len(getattr(m, "_backward_pre_hooks", {}))
    return count


def to_plain(value):
    """Detached CPU copies of tensors inside ``value``; numpy arrays become tensors."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu").clone()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.array(value))
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple):
        return tuple(to_plain(v) for v in value)
    if isinstance(value, list):
        return [to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    return value


@contextlib.contextmanager
def full_float32():
    """Float32 convolutions and matrix products at full precision on CUDA for the
    duration of the block (no TF32, which cuDNN uses for convolutions by default on
    Ampere and later GPUs, with about 1e-3 relative error): a function graded on a
    GPU then agrees with the reference, computed in another order or on the CPU, to
    float32 tolerance. Restores the previous settings."""
    cudnn = torch.backends.cudnn
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        with cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic,
                         allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32


def call_case(func: Callable, case: Case, device=None, cache=None) -> Outcome:
    """Calls ``func`` on a fresh copy of the case's inputs and records what it did."""
    args = materialize(case.args, device, cache)
    kwargs = materialize(case.kwargs, device, cache)
    models = _models_in(list(args) + list(kwargs.values()))
    before = [(m.training, _hook_count(m), [p.detach().clone() for p in m.parameters()][:4]) for m in models]
    counter = _CallCounter() if case.count_calls else None
    recorder = _TorchCallRecorder() if case.record_torch_calls else contextlib.nullcontext()
    try:
        if counter is not None:
            sys.setprofile(counter)
        try:
            with recorder, full_float32():
                value = func(*args, **kwargs)
        finally:
            if counter is not None:
                intact = sys.getprofile() is counter
                sys.setprofile(None)
    except Exception as exc:  # the student's own exception, summarized without traceback
        text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        return Outcome(error=f"raised {type(exc).__name__}" + (f": {text}" if text else "")
                       + (f" on {case.label}" if case.label else ""))
    outcome = Outcome(value=to_plain(value), inputs_after=[to_plain(a) for a in args])
    if counter is not None:
        outcome.python_calls = counter.calls if intact else 10**9
    if case.record_torch_calls:
        outcome.torch_calls = tuple(sorted(recorder.names))
    for model, (training, hooks, params) in zip(models, before):
        outcome.hooks_left += max(0, _hook_count(model) - hooks)
        outcome.mode_changed |= model.training != training
        now = [p.detach() for p in model.parameters()][:4]
        outcome.params_changed |= any(not torch.equal(a, b) for a, b in zip(params, now))
        # Undo what the function left behind, so that the next case starts clean.
        model.train(training)
    return outcome


# -- comparisons ------------------------------------------------------------------


def _as_tensor(value) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu")
    if isinstance(value, (int, float, bool, np.generic, np.ndarray, list, tuple)):
        try:
            return torch.as_tensor(np.asarray(value))
        except Exception:
            return None
    return None


def same_shape(expected, got) -> bool:
    e, g = _as_tensor(expected), _as_tensor(got)
    return e is not None and g is not None and tuple(e.shape) == tuple(g.shape)


def same_values(expected, got, rtol: float = 1e-4, atol: float = 1e-5) -> bool:
    """Shapes equal and values close (fp32 tolerance), compared in float64."""
    e, g = _as_tensor(expected), _as_tensor(got)
    if e is None or g is None or tuple(e.shape) != tuple(g.shape):
        return False
    if g.is_complex() or e.is_complex():
        return False
    e, g = e.double(), g.double()
    if not torch.isfinite(g).all() and not torch.equal(torch.isfinite(e), torch.isfinite(g)):
        return False
    return bool(torch.allclose(g, e, rtol=rtol, atol=atol, equal_nan=True))


def same_structure(expected, got, rtol: float = 1e-3, atol: float = 1e-4) -> bool:
    """Like :func:`same_values`, also for tuples, lists and dicts of values (the
    ``(projected, components, ratio)`` of PCA, a list of ``(n, i, j, value)``)."""
    if isinstance(expected, (tuple, list)) and not _numeric_sequence(expected):
        return (isinstance(got, (tuple, list)) and len(got) == len(expected)
                and all(same_structure(e, g, rtol, atol) for e, g in zip(expected, got)))
    if isinstance(expected, dict):
        return (isinstance(got, dict) and set(got) == set(expected)
                and all(same_structure(expected[k], got[k], rtol, atol) for k in expected))
    return same_values(expected, got, rtol, atol)


def _numeric_sequence(value) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)


def values_close(rtol=1e-4, atol=1e-5) -> Comparison:
    return lambda case, expected, got: same_values(expected, got.value, rtol, atol)


def shape_matches(case, expected, got) -> bool:
    return same_shape(expected, got.value)


def inputs_unchanged(case: Case, expected, got: Outcome) -> bool:
    """Returns the right values, and the tensor arguments after the call equal the
    ones given (a function that returns nothing useful earns no credit for this)."""
    if not same_structure(expected, got.value):
        return False
    originals = [to_plain(a) for a in case.args]
    if got.inputs_after is None or len(got.inputs_after) != len(originals):
        return False
    for before, after in zip(originals, got.inputs_after):
        if isinstance(before, torch.Tensor) and not torch.equal(before, after):
            return False
    return True


def good_citizen(case: Case, expected, got: Outcome) -> bool:
    """Returns the right values, leaves no hook on the model, and leaves its mode and
    parameters as they were."""
    return (same_structure(expected, got.value) and got.hooks_left == 0
            and not got.mode_changed and not got.params_changed)


def calls_do_not_grow(small: Case, large: Case, correct: Comparison, factor: float = 2.0,
                      slack: int = 20) -> Comparison:
    """A comparison for two ``count_calls`` cases of different sizes: holds when the
    values are right by ``correct`` and the larger input makes at most
    ``factor * calls(small) + slack`` Python-level calls (no Python loop over pixels,
    rows or images)."""
    counts: dict[int, int] = {}

    def holds(case, expected, got):
        if case is small:
            counts.clear()  # a new evaluation starts (the properties may be reused for another function)
        if not correct(case, expected, got):
            return False
        counts[id(case)] = got.python_calls
        if id(small) in counts and id(large) in counts:
            return 0 <= counts[id(large)] <= factor * counts[id(small)] + slack
        return got.python_calls >= 0

    return holds


def fresh_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


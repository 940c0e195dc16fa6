"""Pieces every topic's checks use: the grading device, seeded ToyWorld cases, a
tolerance scaled to the expected values, and the reference's mistake variants computed
once per case.

A *variant* is what a private ``_..._variant`` helper of a reference returns for a
setting of its knobs (the sum over channels instead of the max, logits instead of
probabilities, ...). A comparison built with :func:`accepts` holds when a student's
output equals the reference's or one of those variants, so that a mistake costs only
the property that names it."""
from __future__ import annotations

import importlib
import itertools
from typing import Callable

import torch

from ..core import Case, full_float32, materialize, same_shape, same_values

__all__ = ["grading_device", "toyworld_cases", "close_scaled", "ReferenceVariants", "knob_grid", "accepts",
           "manners"]


def grading_device() -> torch.device:
    """The device graded calls run on (CUDA when present)."""
    from ... import device

    return device()


def toyworld_cases(n: int, seed: int, size: int = 64):
    """``n`` ToyWorld scenes of ``size`` pixels drawn from a (hidden) grading seed."""
    from ...toyworld import toyworld

    return toyworld(n, seed=int(seed) % (2**31 - 1), size=size)


def close_scaled(expected, got, rtol: float = 1e-3, rel_atol: float = 1e-5, atol: float = 1e-7) -> bool:
    """Same shape and values, with an absolute tolerance of ``rel_atol`` times the
    largest expected magnitude plus ``atol`` (maps of tiny networks are small numbers)."""
    if not isinstance(expected, torch.Tensor) or not same_shape(expected, got):
        return False
    scale = float(expected.detach().abs().max().cpu()) if expected.numel() else 0.0
    return same_values(expected, got, rtol=rtol, atol=rel_atol * scale + atol)


class ReferenceVariants:
    """``reference.<helper>(*case.args, **case.kwargs, **knobs)`` for the reference
    module ``module`` (e.g. ``"cs_helpers.reference.cam"``), computed once per case and
    knob setting in the grader's process, on CPU afterwards.

    ``none_on_error``: a variant that raises counts as ``None`` (matches nothing)
    instead of failing the check. ``defaults_when_none``: knobs whose value ``None``
    means "keep the case's own argument"."""

    def __init__(self, module: str, *, none_on_error: bool = False, defaults_when_none: tuple = ()):
        self.module = module
        self.none_on_error = none_on_error
        self.defaults_when_none = tuple(defaults_when_none)
        self.models: dict = {}
        self.values: dict = {}

    def get(self, case: Case, helper: str, **knobs):
        slot = (id(case), helper, tuple(sorted(knobs.items())))
        if slot not in self.values:
            device = grading_device()
            args = materialize(case.args, device, self.models)
            kwargs = dict(materialize(case.kwargs, device, self.models))
            kwargs.update({k: v for k, v in knobs.items() if not (v is None and k in self.defaults_when_none)})
            try:
                with full_float32():
                    value = getattr(importlib.import_module(self.module), helper)(*args, **kwargs)
            except Exception:
                if not self.none_on_error:
                    raise
                value = None
            self.values[slot] = value.detach().cpu() if isinstance(value, torch.Tensor) else value
        return self.values[slot]


def knob_grid(**choices):
    """Every combination of the knobs, each ranging over ``choices[knob]``, as dicts."""
    names = list(choices)
    for values in itertools.product(*(choices[n] for n in names)):
        yield dict(zip(names, values))


def accepts(variants: ReferenceVariants, helper: str, close: Callable = close_scaled, **choices):
    """A comparison that holds when the output is ``close`` to the reference's or to
    the variant of ``helper`` for some combination of the knob ``choices``; variants
    are computed only as far as needed."""
    def holds(case, expected, got):
        candidates = itertools.chain([expected], (variants.get(case, helper, **knobs)
                                                  for knobs in knob_grid(**choices)))
        return any(close(candidate, got.value) for candidate in candidates)
    return holds


def manners(recognized):
    """No hook left, model mode and parameters as they were, tensor inputs unchanged,
    for an output that ``recognized(case, expected, got)`` accepts. (The core
    comparisons also demand the reference's exact values; they get the function's own
    value as "expected" so that only ``recognized`` judges the values.)"""
    from ..core import good_citizen, inputs_unchanged

    def holds(case, expected, got):
        return (recognized(case, expected, got) and inputs_unchanged(case, got.value, got)
                and good_citizen(case, got.value, got))
    return holds

"""Plain data across the trust boundary: a JSON skeleton plus numeric arrays.

The child encodes what the student's function returned; the grader decodes it with
``json`` and ``numpy.load(allow_pickle=False)``, so nothing the child wrote can run
code in the grader. Anything that is not a tensor, array, number, string, bool, None,
or a list/tuple/dict of those arrives as an ``Unsupported`` marker and fails the
properties that look at it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .core import Outcome

MAX_DEPTH = 6
MAX_ITEMS = 10000


@dataclass(frozen=True)
class Unsupported:
    type_name: str


def _encode(value, arrays: dict, depth: int = 0):
    if depth > MAX_DEPTH:
        return {"__unsupported__": "nesting too deep"}
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value if abs(value) < 2**53 else float(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else {"__float__": repr(value)}
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16 or value.dtype == torch.float16:
            value = value.float()
        if value.is_complex() or value.dtype not in _TORCH_DTYPES:
            return {"__unsupported__": f"tensor of {value.dtype}"}
        key = f"a{len(arrays)}"
        arrays[key] = value.numpy()
        return {"__tensor__": key}
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            return {"__unsupported__": f"array of {value.dtype}"}
        key = f"a{len(arrays)}"
        arrays[key] = value
        return {"__tensor__": key}
    if isinstance(value, (list, tuple)):
        if len(value) > MAX_ITEMS:
            return {"__unsupported__": "too many items"}
        items = [_encode(v, arrays, depth + 1) for v in value]
        return {"__tuple__": items} if isinstance(value, tuple) else items
    if isinstance(value, dict):
        if len(value) > MAX_ITEMS or not all(isinstance(k, str) for k in value):
            return {"__unsupported__": "dict with non-string keys"}
        return {"__dict__": [[k, _encode(v, arrays, depth + 1)] for k, v in value.items()]}
    return {"__unsupported__": type(value).__name__}


_TORCH_DTYPES = {torch.float32, torch.float64, torch.int64, torch.int32, torch.int16, torch.int8,
                 torch.uint8, torch.bool}


def _decode(node, arrays):
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if isinstance(node, list):
        return [_decode(v, arrays) for v in node]
    if isinstance(node, dict):
        if "__tensor__" in node:
            return torch.from_numpy(np.array(arrays[node["__tensor__"]]))
        if "__tuple__" in node:
            return tuple(_decode(v, arrays) for v in node["__tuple__"])
        if "__dict__" in node:
            return {str(k): _decode(v, arrays) for k, v in node["__dict__"]}
        if "__float__" in node:
            return float(node["__float__"]) if node["__float__"] in ("nan", "inf", "-inf") else None
        return Unsupported(str(node.get("__unsupported__", "unknown")))
    return Unsupported(type(node).__name__)


def encode_outcomes(outcomes: list[Outcome]):
    arrays: dict = {}
    skeleton = []
    for o in outcomes:
        skeleton.append({
            "error": o.error,
            "value": _encode(o.value, arrays),
            "inputs_after": _encode(o.inputs_after, arrays) if o.inputs_after is not None else None,
            "hooks_left": int(o.hooks_left),
            "mode_changed": bool(o.mode_changed),
            "params_changed": bool(o.params_changed),
            "python_calls": int(o.python_calls),
            "torch_calls": [str(n)[:80] for n in o.torch_calls][:500],
        })
    return skeleton, arrays


def decode_outcomes(skeleton, arrays) -> list[Outcome]:
    if not isinstance(skeleton, list):
        raise ValueError("malformed result")
    out = []
    for node in skeleton:
        error = node.get("error")
        out.append(Outcome(
            value=_decode(node.get("value"), arrays),
            error=str(error)[:300] if error is not None else None,
            inputs_after=_decode(node.get("inputs_after"), arrays) if node.get("inputs_after") is not None else None,
            hooks_left=int(node.get("hooks_left", 0)),
            mode_changed=bool(node.get("mode_changed", False)),
            params_changed=bool(node.get("params_changed", False)),
            python_calls=int(node.get("python_calls", -1)),
            torch_calls=tuple(str(n) for n in node.get("torch_calls", []) if isinstance(n, str)),
        ))
    return out


def encode_case_inputs(cases) -> list[dict]:
    """Cases as plain containers for ``torch.save`` (ModelSpecs become dicts)."""
    from .core import ModelSpec

    def plain(value):
        if isinstance(value, ModelSpec):
            return value.encode()
        if isinstance(value, tuple):
            return tuple(plain(v) for v in value)
        if isinstance(value, list):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, torch.Tensor):
            return value.detach().cpu().clone()
        return value

    return [{"args": plain(tuple(c.args)), "kwargs": plain(dict(c.kwargs)), "label": c.label,
             "count_calls": bool(c.count_calls), "record_torch_calls": bool(c.record_torch_calls)}
            for c in cases]

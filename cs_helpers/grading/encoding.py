"""Plain data across the trust boundary: a JSON skeleton plus numeric arrays.

The child encodes what the student's function returned and sends it to the grader as
one uncompressed ``.npz`` blob on a pipe (:func:`pack_result`); the grader reads at
most :data:`MAX_RESULT_BYTES` of it and decodes it with :func:`unpack_result`, which
checks every count, size, depth and dtype before it allocates anything, and reads the
arrays with ``allow_pickle=False``: nothing the child sends can run code in the grader
or make it grow past a fixed bound. Anything that is not a tensor, array, number,
string, bool, None, or a list/tuple/dict of those arrives as an ``Unsupported`` marker
and fails the properties that look at it.
"""
from __future__ import annotations

import io
import json
import math
import zipfile
from dataclasses import dataclass

import numpy as np
import torch

from .core import Outcome

MAX_DEPTH = 6
MAX_ITEMS = 10000
#: The most the grader reads from one child: a larger result is refused unread.
MAX_RESULT_BYTES = 256 * 2**20
MAX_ARRAYS = 4096
MAX_SKELETON_BYTES = 4 * 2**20
_RESULT_KEY = "__result__"


class ResultRefused(ValueError):
    """The child's result breaks a limit or is malformed."""


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


def _decode(node, arrays, depth: int = 0):
    if depth > MAX_DEPTH + 2:
        return Unsupported("nesting too deep")
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if isinstance(node, list):
        return [_decode(v, arrays, depth + 1) for v in node[:MAX_ITEMS]]
    if isinstance(node, dict):
        if "__tensor__" in node:
            key = node["__tensor__"]
            if not isinstance(key, str) or key not in arrays:
                return Unsupported("missing array")
            return torch.from_numpy(np.array(arrays[key]))
        if "__tuple__" in node and isinstance(node["__tuple__"], list):
            return tuple(_decode(v, arrays, depth + 1) for v in node["__tuple__"][:MAX_ITEMS])
        if "__dict__" in node and isinstance(node["__dict__"], list):
            return {str(k): _decode(v, arrays, depth + 1) for k, v in
                    (kv for kv in node["__dict__"][:MAX_ITEMS] if isinstance(kv, list) and len(kv) == 2)}
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
        if not isinstance(node, dict):
            raise ValueError("malformed result")
        error = node.get("error")
        out.append(Outcome(
            value=_decode(node.get("value"), arrays),
            error=str(error)[:300] if error is not None else None,
            inputs_after=_decode(node.get("inputs_after"), arrays) if node.get("inputs_after") is not None else None,
            hooks_left=int(node.get("hooks_left", 0)),
            mode_changed=bool(node.get("mode_changed", False)),
            params_changed=bool(node.get("params_changed", False)),
            python_calls=int(node.get("python_calls", -1)),
            torch_calls=tuple(str(n) for n in list(node.get("torch_calls", []))[:500] if isinstance(n, str)),
        ))
    return out


def pack_result(skeleton, cell_errors: list[str], arrays: dict) -> bytes:
    """The child's side: one uncompressed ``.npz`` holding the JSON skeleton (as bytes)
    and the arrays."""
    header = json.dumps({"outcomes": skeleton, "cell_errors": [str(e)[:300] for e in cell_errors][:20]})
    buffer = io.BytesIO()
    np.savez(buffer, **{_RESULT_KEY: np.frombuffer(header.encode(), dtype=np.uint8)}, **arrays)
    return buffer.getvalue()


def _depth_ok(node, limit: int = 64) -> bool:
    stack = [(node, 0)]
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            return False
        if isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
        elif isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
    return True


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
    with archive.open(info) as handle:
        version = np.lib.format.read_magic(handle)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle, max_header_size=1024)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle, max_header_size=1024)
        else:
            raise ResultRefused("unknown array format")
        if dtype.kind not in "biuf" or dtype.hasobject:
            raise ResultRefused(f"arrays of {dtype} are not accepted")
        count = 1
        for dim in shape:
            if not isinstance(dim, int) or dim < 0:
                raise ResultRefused("malformed array shape")
            count *= dim
        if count * dtype.itemsize > info.file_size:
            raise ResultRefused("an array is larger than its stored data")
        data = handle.read(count * dtype.itemsize)
        if len(data) != count * dtype.itemsize:
            raise ResultRefused("an array's data is cut short")
    array = np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")
    return array


def unpack_result(blob: bytes):
    """The grader's side: ``(skeleton, cell_errors, arrays)`` from a child's blob,
    refusing (:class:`ResultRefused`) anything over a limit: total size, number of
    arrays, compressed members (no decompression ever happens), sizes that do not add
    up, non-numeric dtypes, an oversized or too deeply nested skeleton."""
    if len(blob) > MAX_RESULT_BYTES:
        raise ResultRefused("the result is larger than the grader accepts")
    try:
        archive = zipfile.ZipFile(io.BytesIO(blob))
        infos = archive.infolist()
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise ResultRefused(f"the result is not a readable archive ({type(exc).__name__})") from None
    if len(infos) > MAX_ARRAYS + 1:
        raise ResultRefused("the result holds too many arrays")
    if sum(i.file_size for i in infos) > len(blob):
        raise ResultRefused("the result's declared sizes exceed its length")
    arrays, header = {}, None
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size:
            raise ResultRefused("compressed arrays are not accepted")
        if not info.filename.endswith(".npy"):
            raise ResultRefused("unexpected file in the result")
        key = info.filename[:-4]
        if key == _RESULT_KEY:
            if info.file_size > MAX_SKELETON_BYTES:
                raise ResultRefused("the result's description is too large")
            header = _read_member(archive, info)
        else:
            arrays[key] = _read_member(archive, info)
    if header is None or header.dtype != np.uint8 or header.ndim != 1:
        raise ResultRefused("the result has no description")
    try:
        parsed = json.loads(header.tobytes().decode("utf-8"))
    except (ValueError, RecursionError):
        raise ResultRefused("the result's description is not valid JSON") from None
    if not isinstance(parsed, dict) or not _depth_ok(parsed):
        raise ResultRefused("the result's description is malformed or too deeply nested")
    errors = parsed.get("cell_errors", [])
    errors = [str(e)[:300] for e in errors[:20]] if isinstance(errors, list) else []
    return parsed.get("outcomes"), errors, arrays


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

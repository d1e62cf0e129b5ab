"""The gradserve wire format (PROTOCOL.md): pytrees of arrays <-> JSON documents and npz.

numpy only, so the light client and the server share this one implementation. A *document* is
the JSON body as Python objects; in it an array leaf is one of

* plain: a number, bool or nested list (dtype from the model's spec, else float32);
* explicit: ``{"dtype", "shape", "data"}`` (complex: ``"real"`` and ``"imag"``);
* base64: ``{"dtype", "shape", "base64"}``, little-endian, C order;
* an ``np.ndarray``: what an npz ``{"$npz": name}`` reference becomes once loaded.

Nothing here unpickles: npz members are parsed from their npy headers and refused when they
hold objects.
"""

from __future__ import annotations

import binascii
import io
import json
import math
import zipfile
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from client import _npy, _zip
from client.errors import InvalidInput, PayloadTooLarge
from client.specs import ArraySpec, SpecTree, dtype_from_name, dtype_name

try:
    import orjson
except ImportError:  # the light client works without it, only slower
    orjson = None

JSON = "application/json"
NPZ = "application/x-npz"
PROBLEM_JSON = "application/problem+json"

_DATA_KEYS = ("data", "real", "imag", "base64")
_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
_JSON_MEMBER = "__json__"


def _bad(msg: str, code: str = "invalid_body", loc: tuple = ()) -> InvalidInput:
    return InvalidInput(msg, code=code, status=400, loc=loc or None)


def is_leaf_object(obj: Mapping) -> bool:
    """An object whose keys are dtype, shape and data keys is a leaf, never a dict."""
    return (
        "dtype" in obj
        and any(k in obj for k in _DATA_KEYS)
        and obj.keys()
        <= {
            "dtype",
            "shape",
            *_DATA_KEYS,
        }
    )


# ---------------------------------------------------------------------------- JSON leaves


def encode_array(x: Any, binary: bool = False) -> dict[str, Any]:
    """An explicit (or, with `binary`, base64) leaf. Non-finite floats become strings."""
    x = np.asarray(x)
    head = {"dtype": dtype_name(x.dtype), "shape": list(x.shape)}
    if binary:
        raw = np.ascontiguousarray(x, dtype=x.dtype.newbyteorder("<")).tobytes()
        head["base64"] = binascii.b2a_base64(raw, newline=False).decode("ascii")
    elif x.dtype.kind == "c":
        head["real"] = _float_data(x.real.ravel())
        head["imag"] = _float_data(x.imag.ravel())
    else:
        # bfloat16 is kind "V" to numpy, yet a float: it needs the non-finite spelling too.
        is_float = x.dtype.kind == "f" or x.dtype.name == "bfloat16"
        head["data"] = _float_data(x.ravel()) if is_float else x.ravel().tolist()
    return head


def _float_data(flat: np.ndarray) -> Any:
    if flat.dtype.name == "bfloat16":  # no JSON library knows it; float32 holds it exactly
        flat = flat.astype(np.float32)
    finite = bool(np.isfinite(flat).all())
    if finite and orjson is not None and flat.dtype in (np.float16, np.float32, np.float64):
        # orjson writes the shortest repr of each float32, so 0.070650816 stays short.
        return np.ascontiguousarray(flat)
    values = flat.tolist()
    if not finite:
        values = [
            v if math.isfinite(v) else ("NaN" if v != v else "Infinity" if v > 0 else "-Infinity")
            for v in values
        ]
    return values


def _numeric(values: Any, dtype: np.dtype, loc: tuple) -> np.ndarray:
    try:
        arr = np.asarray(values)
    except ValueError as e:  # ragged nesting
        raise _bad(f"array data is not rectangular: {e}", loc=loc) from None
    if arr.dtype.kind in "US":  # "NaN"/"Infinity" strings among the numbers
        arr = np.asarray(_replace_nonfinite(values, loc))
    if arr.dtype.kind not in "biufc" or arr.dtype == object:
        raise _bad("array data must be numbers, bools, or 'NaN'/'Infinity'/'-Infinity'", loc=loc)
    if (arr.dtype.kind in "fc" and dtype.kind in "iub") and (
        not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr))
    ):
        raise _bad(f"non-integer data for an array of dtype {dtype_name(dtype)}", loc=loc)
    try:
        if dtype.kind in "iu" and arr.dtype.kind in "fO":
            # Python ints beyond int64 (uint64 data) came through as floats: convert afresh.
            return np.asarray(values, dtype=dtype)
        return arr.astype(dtype, copy=False)
    except (OverflowError, ValueError, TypeError) as e:
        raise _bad(f"cannot convert data to {dtype_name(dtype)}: {e}", loc=loc) from None


def _replace_nonfinite(values: Any, loc: tuple) -> Any:
    if isinstance(values, list):
        return [_replace_nonfinite(v, loc) for v in values]
    if isinstance(values, str):
        if values not in _NONFINITE:
            raise _bad(f"unexpected string {values[:20]!r} in array data", loc=loc)
        return _NONFINITE[values]
    return values


def _shape(obj: Mapping, loc: tuple) -> tuple[int, ...] | None:
    shape = obj.get("shape")
    if shape is None:
        return None
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise _bad(f"shape must be a list of non-negative ints, got {shape!r}", loc=loc)
    return tuple(shape)


def _reshape(arr: np.ndarray, shape: tuple[int, ...] | None, loc: tuple) -> np.ndarray:
    if shape is None:
        return arr
    if arr.size != math.prod(shape):
        raise _bad(
            f"data has {arr.size} element(s) but shape {list(shape)} needs {math.prod(shape)}",
            code="data_length_mismatch",
            loc=loc,
        )
    return arr.reshape(shape)


def decode_array(obj: Any, dtype: np.dtype | None = None, loc: tuple = ()) -> np.ndarray:
    """One leaf of any of the forms above -> ndarray. `dtype` applies to plain leaves."""
    if isinstance(obj, np.ndarray) and not isinstance(obj, JSONNumbers):
        return obj
    if not isinstance(obj, Mapping):
        return _numeric(obj, dtype or np.dtype(np.float32), loc)
    leaf_dtype = dtype_from_name(obj.get("dtype"))
    shape = _shape(obj, loc)
    if "base64" in obj:
        return _decode_base64(obj["base64"], leaf_dtype, shape, loc)
    if leaf_dtype.kind == "c":
        if "real" not in obj or "imag" not in obj:
            raise _bad("a complex leaf needs 'real' and 'imag'", loc=loc)
        real = _numeric(obj["real"], np.dtype(leaf_dtype.char.lower()), loc).ravel()
        imag = _numeric(obj["imag"], real.dtype, loc).ravel()
        if real.size != imag.size:
            raise _bad("'real' and 'imag' differ in length", code="data_length_mismatch", loc=loc)
        arr = np.empty(real.size, leaf_dtype)
        arr.real, arr.imag = real, imag
        return _reshape(arr, shape, loc)
    if "data" not in obj:
        raise _bad(f"a {dtype_name(leaf_dtype)} leaf needs 'data'", loc=loc)
    arr = _numeric(obj["data"], leaf_dtype, loc)
    if shape is not None and arr.ndim > 1 and arr.shape != shape:
        raise _bad(
            f"nested data has shape {list(arr.shape)}, not {list(shape)}",
            code="data_length_mismatch",
            loc=loc,
        )
    return _reshape(arr, shape, loc)


def _decode_base64(text: Any, dtype: np.dtype, shape: Any, loc: tuple) -> np.ndarray:
    if not isinstance(text, str):
        raise _bad("'base64' must be a string", code="invalid_base64", loc=loc)
    if shape is None:
        raise _bad("a base64 leaf needs 'shape'", loc=loc)
    try:
        raw = binascii.a2b_base64(text, strict_mode=True)
    except (binascii.Error, ValueError) as e:
        raise _bad(f"bad base64: {e}", code="invalid_base64", loc=loc) from None
    want = math.prod(shape) * dtype.itemsize
    if len(raw) != want:
        raise _bad(
            f"base64 holds {len(raw)} bytes but {dtype_name(dtype)}{list(shape)} needs {want}",
            code="data_length_mismatch",
            loc=loc,
        )
    arr = np.frombuffer(raw, dtype.newbyteorder("<")).reshape(shape)
    return arr.astype(dtype, copy=False)


# ---------------------------------------------------------------------------- pytrees


class JSONNumbers(np.ndarray):
    """A JSON list of numbers parsed straight into an array (`service.json_offload`): exactly
    `np.asarray(the_list)`, and decoded like the list it was (the spec picks the dtype)."""


def encode_tree(tree: Any, binary: bool = False) -> Any:
    """Pytree of arrays -> document: every array leaf explicit (or base64)."""
    if isinstance(tree, Mapping):
        return {str(k): encode_tree(v, binary) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [encode_tree(v, binary) for v in tree]
    if tree is None:
        return None
    return encode_array(tree, binary)


def _is_plain_array(obj: list) -> bool:
    # Looking down the first elements is enough: np.asarray refuses the ragged or mixed rest.
    while isinstance(obj, list) and obj:
        obj = obj[0]
    if isinstance(obj, JSONNumbers):
        return True
    return not isinstance(obj, (Mapping, np.ndarray, type(None)))


def decode_tree(
    obj: Any, spec: SpecTree = None, *, default_dtype: Any = np.float32, loc: tuple = ()
) -> Any:
    """Document -> pytree of ndarrays, guided by the model's `spec` where one is declared.

    The spec decides what the document cannot say by itself: the dtype of plain leaves,
    tuple versus list, and whether a list of numbers is one array or a list of scalars.
    """
    if isinstance(obj, JSONNumbers):
        if isinstance(spec, (list, tuple)):  # a list the spec splits: what the list held
            obj = list(obj) if obj.ndim > 1 else obj.tolist()
    elif isinstance(obj, np.ndarray):
        return obj
    if isinstance(obj, Mapping):
        if is_leaf_object(obj):
            return decode_array(obj, loc=loc)
        sub = spec if isinstance(spec, Mapping) else {}
        return {
            k: decode_tree(v, sub.get(k), default_dtype=default_dtype, loc=(*loc, k))
            for k, v in obj.items()
        }
    if isinstance(obj, list) and isinstance(spec, (list, tuple)):
        items = [
            decode_tree(
                v, spec[i] if i < len(spec) else None, default_dtype=default_dtype, loc=(*loc, i)
            )
            for i, v in enumerate(obj)
        ]
        return tuple(items) if isinstance(spec, tuple) else items
    if isinstance(obj, list) and not isinstance(spec, ArraySpec) and not _is_plain_array(obj):
        return [
            decode_tree(v, default_dtype=default_dtype, loc=(*loc, i)) for i, v in enumerate(obj)
        ]
    if obj is None:
        return None
    if isinstance(obj, (bool, int, float, list, JSONNumbers)):
        dtype = np.dtype(default_dtype)
        if isinstance(spec, ArraySpec) and spec.dtype is not None:
            dtype = dtype_from_name(spec.dtype)
        return _numeric(obj, dtype, loc)
    raise _bad(f"expected an array or a dict/list of arrays, got {type(obj).__name__}", loc=loc)


# ---------------------------------------------------------------------------- bodies


def dumps(doc: Any) -> bytes:
    """Document -> JSON bytes (orjson when installed; numpy leaves serialised directly)."""
    if orjson is not None:
        return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    return json.dumps(doc, default=_json_default, separators=(",", ":")).encode()


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.ndarray, np.generic)):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def loads(body: bytes | str) -> Any:
    """JSON bytes -> document; malformed JSON is a 400 `invalid_json`."""
    try:
        return orjson.loads(body) if orjson is not None else json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise _bad(f"malformed JSON: {e}", code="invalid_json") from None


def dump_npz(doc: Any) -> bytes:
    """Document with ndarray leaves -> npz: each array its own member, the rest `__json__`.

    Members are stored uncompressed and their data is written straight from the arrays.
    """
    return b"".join(dump_npz_parts(doc))


def dump_npz_parts(doc: Any) -> list[bytes | memoryview]:
    """`dump_npz` as the buffers it would join, array data as views of the arrays: for a
    sender that writes them one by one (the client's bulk path), never copying the data."""
    members: list[tuple[str, list]] = []

    def lift(node: Any) -> Any:
        if isinstance(node, np.ndarray | np.generic):
            name = f"a{len(members)}"
            arr = np.asarray(node)
            ref: dict[str, str] = {"$npz": name}
            if arr.dtype.name == "bfloat16":  # npy cannot name it: raw bits, dtype beside
                arr, ref["dtype"] = arr.view(np.uint16), "bfloat16"
            members.append((name + ".npy", _npy_buffers(arr)))
            return ref
        if isinstance(node, Mapping):
            return {k: lift(v) for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return [lift(v) for v in node]
        return node

    header = dumps(lift(doc))
    json_member = (_JSON_MEMBER + ".npy", _npy_buffers(np.frombuffer(header, np.uint8)))
    return _zip.write_parts([json_member, *members])


def _npy_buffers(arr: np.ndarray) -> list:
    """An npy file as [header, data], the data a view of the array (no copy if contiguous)."""
    arr = np.require(arr, requirements="C")  # not ascontiguousarray: it makes 0-d arrays 1-d
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, np.lib.format.header_data_from_array_1_0(arr))
    return [head.getvalue(), memoryview(arr).cast("B") if arr.size else b""]


def open_npz(body: bytes | bytearray | memoryview) -> _zip.Reader:
    """An npz body's zip directory (nothing read or inflated yet); malformed: `invalid_npz`."""
    try:
        return _zip.Reader(body)
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise _bad(f"malformed npz: {e}", code="invalid_npz") from None


def load_npz(
    body: bytes | bytearray | memoryview | _zip.Reader,
    *,
    max_members: int = 1024,
    max_bytes: int = 2**31,
    check_json: Callable[[bytes], None] | None = None,
) -> Any:
    """npz body -> document with its `{"$npz": name}` leaves replaced by ndarrays.

    Each member's declared size is checked against what is left of `max_bytes` and its npy
    header is read and checked (no objects) before a byte of its data is inflated. Arrays of
    stored members are read-only views of `body`. `body` may be `open_npz(body)` already.
    """
    archive = body if isinstance(body, _zip.Reader) else open_npz(body)
    if len(archive.members) > max_members:
        raise PayloadTooLarge(
            f"npz has {len(archive.members)} members; the limit is {max_members}",
            code="too_many_members",
        )
    budget = max_bytes
    arrays: dict[str, np.ndarray] = {}
    for member in archive.members:
        name = member.name.removesuffix(".npy")
        if member.size > budget:
            raise PayloadTooLarge(
                f"npz member {name!r} inflates to {member.size} bytes, over the "
                f"{max_bytes}-byte limit",
                code="payload_too_large",
            )
        budget -= member.size
        arrays[name] = _read_member(archive, member, name)
    if _JSON_MEMBER not in arrays:
        raise _bad("npz has no __json__ member", code="invalid_npz")
    text = arrays.pop(_JSON_MEMBER).tobytes()
    if check_json is not None:  # the server's depth and element limits, before parsing
        check_json(text)
    return _resolve(loads(text), arrays)


def npz_is_stored(archive: _zip.Reader) -> bool:
    """Whether every member is stored, not deflated: decoding them then makes views, with no
    work per byte."""
    return all(m.info.compress_type == zipfile.ZIP_STORED for m in archive.members)


def _read_member(archive: _zip.Reader, member: _zip.Member, name: str) -> np.ndarray:
    try:
        data = archive.read(member, limit=member.size)
        shape, fortran, dtype, offset = _npy.read_header(data)
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise _bad(f"malformed npz member {name!r}: {e}", code="invalid_npz") from None
    if dtype.hasobject:
        raise _bad(f"npz member {name!r} holds Python objects", code="invalid_npz")
    count = math.prod(shape)
    if offset + count * dtype.itemsize != len(data):
        raise _bad(f"npz member {name!r} does not match its header", code="invalid_npz")
    arr = np.frombuffer(data, dtype, count, offset)
    return arr.reshape(shape[::-1]).T if fortran else arr.reshape(shape)


def _resolve(node: Any, arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(node, Mapping):
        if "$npz" in node and node.keys() <= {"$npz", "dtype"}:
            ref = node["$npz"]
            if not isinstance(ref, str) or ref not in arrays:
                raise _bad(f"$npz reference {ref!r} names no member", code="invalid_npz")
            if node.get("dtype") == "bfloat16" and arrays[ref].dtype == np.uint16:
                return arrays[ref].view(dtype_from_name("bfloat16"))
            return arrays[ref]
        if is_leaf_object(node):
            return node
        return {k: _resolve(v, arrays) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve(v, arrays) for v in node]
    return node


def npz_ready(tree: Any) -> Any:
    """Pytree -> document leaves for npz: arrays stay arrays (tuples become lists)."""
    if isinstance(tree, Mapping):
        return {str(k): npz_ready(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [npz_ready(v) for v in tree]
    return None if tree is None else np.asarray(tree)

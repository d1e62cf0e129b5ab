"""Input specs: the shape and dtype a model declares for each positional argument.

Lives in the light client (numpy only) because both sides check arguments against a spec with
the same words: the server before it computes, the client before it sends.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from client.errors import InvalidInput

try:  # bfloat16 ships with JAX (ml_dtypes); the numpy-only client simply lacks it.
    import ml_dtypes as _ml_dtypes

    _BFLOAT16: np.dtype | None = np.dtype(_ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - exercised only without ml_dtypes
    _BFLOAT16 = None

DTYPE_NAMES = (
    "bool",
    "int8", "int16", "int32", "int64",
    "uint8", "uint16", "uint32", "uint64",
    "float16", "bfloat16", "float32", "float64",
    "complex64", "complex128",
)  # fmt: skip

# JAX without x64 computes in 32 bits and silently narrows wider inputs; the server does the
# same, so a client sending numpy's default float64 gets what local JAX would give.
_NARROWED = {
    np.dtype("float64"): np.dtype("float32"),
    np.dtype("int64"): np.dtype("int32"),
    np.dtype("uint64"): np.dtype("uint32"),
    np.dtype("complex128"): np.dtype("complex64"),
}


def dtype_from_name(name: Any) -> np.dtype:
    """The numpy dtype for a protocol dtype name; `InvalidInput` for anything else."""
    if not isinstance(name, str) or name not in DTYPE_NAMES:
        raise InvalidInput(
            f"unknown dtype {name!r}; expected one of {', '.join(DTYPE_NAMES)}",
            code="invalid_dtype",
            status=400,
        )
    if name == "bfloat16":
        if _BFLOAT16 is None:
            raise InvalidInput("bfloat16 needs the ml_dtypes package", code="invalid_dtype")
        return _BFLOAT16
    return np.dtype(name)


def dtype_name(dtype: np.dtype) -> str:
    """The protocol name of a numpy dtype (`InvalidInput` for object, string, ... dtypes)."""
    known = _NAMES.get(dtype)  # per leaf of every request: numpy's `.name` is slow
    if known is not None:
        return known
    dtype = np.dtype(dtype)
    # `dtype == None` is True for float64 (numpy reads None as the default dtype), so without
    # ml_dtypes the comparison must not run at all.
    name = "bfloat16" if _BFLOAT16 is not None and dtype == _BFLOAT16 else dtype.name
    if name not in DTYPE_NAMES:
        raise InvalidInput(f"dtype {dtype} cannot cross the wire", code="invalid_dtype")
    _NAMES[dtype] = name
    return name


_NAMES: dict[np.dtype, str] = {}  # dtype -> wire name; bounded by the few wire dtypes


def canonical_dtype(dtype: np.dtype, x64: bool) -> np.dtype:
    """The dtype JAX computes in for an input of `dtype` (64-bit types narrow without x64)."""
    return np.dtype(dtype) if x64 else _NARROWED.get(np.dtype(dtype), np.dtype(dtype))


@dataclass(frozen=True)
class ArraySpec:
    """What one array argument must look like. `None` means any: any shape, any dtype, or a
    dimension of any size."""

    shape: tuple[int | None, ...] | None = None
    dtype: str | None = None

    def __post_init__(self) -> None:
        if self.dtype is not None:
            dtype_from_name(self.dtype)

    def describe(self) -> str:
        dtype = self.dtype or "any"
        if self.shape is None:
            return f"{dtype}[...]"
        return f"{dtype}[{','.join('*' if d is None else str(d) for d in self.shape)}]"

    def to_json(self) -> dict[str, Any]:
        return {"shape": None if self.shape is None else list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> ArraySpec:
        shape = obj.get("shape")
        return cls(None if shape is None else tuple(shape), obj.get("dtype"))


SpecTree = Any  # ArraySpec | dict[str, SpecTree] | list | tuple | None (None: anything)


def describe_array(x: np.ndarray) -> str:
    """`float32[3,4]`, the notation the protocol's error details use."""
    return f"{dtype_name(x.dtype)}[{','.join(str(d) for d in x.shape)}]"


def spec_to_json(spec: SpecTree) -> Any:
    """Spec tree -> JSON (tuples become lists, as everywhere on the wire)."""
    if isinstance(spec, ArraySpec):
        return spec.to_json()
    if isinstance(spec, Mapping):
        return {k: spec_to_json(v) for k, v in spec.items()}
    if isinstance(spec, (list, tuple)):
        return [spec_to_json(v) for v in spec]
    return None


def spec_from_json(obj: Any) -> SpecTree:
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        if set(obj) <= {"shape", "dtype"} and obj:
            return ArraySpec.from_json(obj)
        return {k: spec_from_json(v) for k, v in obj.items()}
    return [spec_from_json(v) for v in obj]


def parse_spec(obj: Any) -> SpecTree:
    """Accept the shorthand a model author writes: `(3,)`/`"float32"` pairs or ArraySpecs.

    A leaf may be an `ArraySpec`, or a tuple `(shape, dtype)` where shape is a tuple of ints
    and Nones (or None for any shape). Dicts, lists and tuples of those make trees.
    """
    if obj is None or isinstance(obj, ArraySpec):
        return obj
    if (
        isinstance(obj, tuple)
        and len(obj) == 2
        and (obj[0] is None or isinstance(obj[0], tuple))
        and (obj[1] is None or isinstance(obj[1], str))
    ):
        return ArraySpec(obj[0], obj[1])
    if isinstance(obj, Mapping):
        return {k: parse_spec(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(parse_spec(v) for v in obj)
    raise TypeError(f"cannot read {obj!r} as an input spec")


def _where(model: str, path: Sequence[Any], what: str) -> str:
    arg, *rest = path
    keys = "".join(f"[{k!r}]" for k in rest)
    return f"{what} {arg}{keys} of '{model}'"


def _leaves_with_path(tree: Any, spec: SpecTree, path: tuple) -> Iterator[tuple]:
    """(path, value, spec leaf) for every array leaf, after checking the containers match."""
    if isinstance(spec, Mapping):
        if not isinstance(tree, Mapping):
            raise _tree_mismatch(path, "a dict", tree)
        if set(tree) != set(spec):
            raise _tree_mismatch(path, f"a dict with keys {sorted(spec)}", tree)
        for key in spec:
            yield from _leaves_with_path(tree[key], spec[key], (*path, key))
    elif isinstance(spec, (list, tuple)):
        kind = "a tuple" if isinstance(spec, tuple) else "a list"
        if not isinstance(tree, (list, tuple)) or len(tree) != len(spec):
            raise _tree_mismatch(path, f"{kind} of {len(spec)}", tree)
        for i, (item, sub) in enumerate(zip(tree, spec, strict=True)):
            yield from _leaves_with_path(item, sub, (*path, i))
    elif isinstance(spec, ArraySpec):
        if not _is_array(tree):
            raise _tree_mismatch(path, f"an array {spec.describe()}", tree)
        yield path, tree, spec


class _Mismatch(Exception):
    def __init__(self, path: tuple, msg: str, code: str) -> None:
        self.path, self.msg, self.code = path, msg, code


def _is_array(x: Any) -> bool:
    # Duck-typed: numpy arrays, and shape-only stand-ins such as the per-example view of a
    # vmapped argument.
    return hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, (Mapping, list, tuple))


def _describe_tree(tree: Any) -> str:
    if _is_array(tree):
        return f"an array {describe_array(tree)}"
    if isinstance(tree, Mapping):
        return f"a dict with keys {sorted(tree)}"
    if isinstance(tree, (list, tuple)):
        return f"a {type(tree).__name__} of {len(tree)}"
    return type(tree).__name__


def _tree_mismatch(path: tuple, expected: str, tree: Any) -> _Mismatch:
    return _Mismatch(path, f"expects {expected}, got {_describe_tree(tree)}", "tree_mismatch")


def check_args(
    model: str, specs: Sequence[SpecTree] | None, args: Sequence[Any], what: str = "argument"
) -> None:
    """Raise `InvalidInput` (422) unless `args` fit the model's declared `specs`.

    The detail names the model, the argument, and expected against received, e.g.
    ``argument 0 of 'logistic_loss' expects float32[3], got float32[4]``.
    """
    if specs is None:
        return
    field = "args" if what == "argument" else f"{what}s"
    if len(args) != len(specs):
        raise InvalidInput(
            f"'{model}' takes {len(specs)} positional {what}(s), got {len(args)}",
            code="arity_mismatch",
            loc=(field,),
        )
    for i, (arg, spec) in enumerate(zip(args, specs, strict=True)):
        try:
            for path, x, leaf in _leaves_with_path(arg, spec, (i,)):
                _check_leaf(path, x, leaf)
        except _Mismatch as m:
            raise InvalidInput(
                f"{_where(model, m.path, what)} {m.msg}", code=m.code, loc=(field, *m.path)
            ) from None


def _check_leaf(path: tuple, x: np.ndarray, spec: ArraySpec) -> None:
    want = spec.describe()
    if spec.dtype is not None and dtype_name(x.dtype) != spec.dtype:
        raise _Mismatch(path, f"expects {want}, got {describe_array(x)}", "dtype_mismatch")
    if spec.shape is None:
        return
    if len(x.shape) != len(spec.shape) or any(
        d is not None and d != n for d, n in zip(spec.shape, x.shape, strict=True)
    ):
        raise _Mismatch(path, f"expects {want}, got {describe_array(x)}", "shape_mismatch")

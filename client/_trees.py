"""Pytrees on the client: user inputs -> arrays, and wire results -> JAX's own structure.

JSON has lists only, so a result comes back without its tuples. The client knows enough to
restore them: the arguments it sent, the transform chain, and the model's output spec. It
computes a *template* of the result (the structure JAX would give) and rebuilds the decoded
answer along it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from client.specs import ArraySpec, SpecTree, canonical_dtype, dtype_name


class _Marker:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


LEAF = _Marker("LEAF")  # an array
UNKNOWN = _Marker("UNKNOWN")  # structure not declared: lists become tuples, as JAX returns them


class Grafted:
    """A tree of unknown structure whose leaves are `inner` trees (a Jacobian of an undeclared
    output): found by matching `inner` while walking down."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner


# JAX without x64 gives Python scalars these dtypes (weakly typed: a declared dtype wins).
_SCALAR_DTYPES = {bool: "bool", int: "int32", float: "float32", complex: "complex64"}


# ---------------------------------------------------------------------------- inputs


def _scalar_dtype(x: Any) -> str:
    for kind, name in _SCALAR_DTYPES.items():
        if type(x) is kind:
            return name
    return dtype_name(canonical_dtype(np.asarray(x).dtype, x64=False))


def to_array(x: Any, spec: ArraySpec | None) -> np.ndarray:
    """One leaf -> ndarray, in the dtype JAX would compute in for the model's declaration."""
    want = spec.dtype if spec is not None else None
    if isinstance(x, (bool, int, float, complex, list)) and not isinstance(x, np.generic):
        # Python values are weakly typed in JAX: the declared dtype, else JAX's default.
        arr = np.asarray(x)
        return arr.astype(want or _scalar_dtype(arr if isinstance(x, list) else x))
    arr = np.asarray(x)  # numpy, jax.Array (via __array__), numpy scalars
    if (
        want is not None
        and arr.dtype.name != want
        and canonical_dtype(arr.dtype, False).name == want
    ):
        arr = arr.astype(want)  # float64 -> float32, as the server (and JAX) would narrow it
    return arr


def prepare(tree: Any, spec: SpecTree = None) -> Any:
    """User input -> pytree of ndarrays. A list is an array where the spec declares one, else a
    pytree node, as in JAX."""
    if isinstance(tree, Mapping):
        sub = spec if isinstance(spec, Mapping) else {}
        return {k: prepare(v, sub.get(k)) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)) and not isinstance(spec, ArraySpec):
        subs = (
            spec
            if isinstance(spec, (list, tuple)) and len(spec) == len(tree)
            else [None] * len(tree)
        )
        return type(tree)(prepare(v, s) for v, s in zip(tree, subs, strict=True))
    if tree is None:
        return None
    return to_array(tree, spec if isinstance(spec, ArraySpec) else None)


def dtype_specs(tree: Any) -> Any:
    """Specs that only fix dtypes, from prepared primals: tangents take their primals' dtypes."""
    if isinstance(tree, Mapping):
        return {k: dtype_specs(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(dtype_specs(v) for v in tree)
    if tree is None:
        return None
    inexact = tree.dtype.kind in "fc"
    return ArraySpec(None, dtype_name(tree.dtype) if inexact else None)


def leaves(tree: Any) -> list[np.ndarray]:
    if isinstance(tree, Mapping):
        return [x for v in tree.values() for x in leaves(v)]
    if isinstance(tree, (list, tuple)):
        return [x for v in tree for x in leaves(v)]
    return [] if tree is None else [tree]


def tree_map(fn: Any, tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: tree_map(fn, v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(tree_map(fn, v) for v in tree)
    return None if tree is None else fn(tree)


def nbytes(tree: Any) -> int:
    return sum(x.nbytes for x in leaves(tree))


# ---------------------------------------------------------------------------- templates


def template_of(tree: Any) -> Any:
    """The structure of a prepared pytree, arrays as LEAF."""
    if isinstance(tree, Mapping):
        return {k: template_of(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(template_of(v) for v in tree)
    return None if tree is None else LEAF


def spec_template(spec: SpecTree) -> Any:
    """A declared output spec -> template. Sequences are tuples: JAX models return tuples."""
    if isinstance(spec, ArraySpec):
        return LEAF
    if isinstance(spec, Mapping):
        return {k: spec_template(v) for k, v in spec.items()}
    if isinstance(spec, (list, tuple)):
        return tuple(spec_template(v) for v in spec)
    return UNKNOWN


def graft(outer: Any, inner: Any) -> Any:
    """Each LEAF of `outer` replaced by `inner`: the structure of a Jacobian."""
    if outer is LEAF:
        return inner
    if outer is UNKNOWN or isinstance(outer, Grafted):
        return inner if inner is LEAF and outer is UNKNOWN else Grafted(inner)
    if isinstance(outer, Mapping):
        return {k: graft(v, inner) for k, v in outer.items()}
    if isinstance(outer, (list, tuple)):
        return type(outer)(graft(v, inner) for v in outer)
    return outer


def wrt(args: Sequence[Any], argnums: int | tuple[int, ...]) -> Any:
    """Template of the gradient's structure: the differentiated argument(s)."""
    if isinstance(argnums, int):
        return args[argnums]
    return tuple(args[n] for n in argnums)


def _pair(tmpl: Any, i: int) -> Any:
    return tmpl[i] if isinstance(tmpl, tuple) and len(tmpl) == 2 else UNKNOWN


def transformed(op: str, options: Mapping[str, Any], out: Any, args: Sequence[Any]) -> Any:
    """The template of `op(f)`'s output, given `f`'s output template `out`."""
    has_aux = bool(options.get("has_aux"))
    if op == "vmap":
        return out
    w = wrt(args, options.get("argnums", 0))
    if op == "grad":
        return (w, _pair(out, 1)) if has_aux else w
    if op == "value_and_grad":
        return (out, w)
    if op == "hessian":  # jacfwd(jacrev(f)): any output, each leaf out.shape + in + in
        return graft(graft(out, w), w)
    # jacfwd, jacrev, jacobian
    if has_aux:
        return (graft(_pair(out, 0), w), _pair(out, 1))
    return graft(out, w)


def restore(value: Any, tmpl: Any) -> Any:
    """A decoded answer (lists, str-keyed dicts, ndarrays) rebuilt along a template."""
    if tmpl is LEAF:
        return np.asarray(value)
    if tmpl is UNKNOWN:
        return _tuplify(value)
    if isinstance(tmpl, Grafted):
        return _find(value, tmpl.inner)
    if tmpl is None or value is None:
        return None
    if isinstance(tmpl, Mapping):
        return {k: restore(value[str(k)], t) for k, t in tmpl.items()}
    return type(tmpl)(restore(v, t) for v, t in zip(value, tmpl, strict=True))


def _tuplify(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _tuplify(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return tuple(_tuplify(v) for v in value)
    return value


def _matches(value: Any, tmpl: Any) -> bool:
    if tmpl is LEAF:
        return isinstance(value, np.ndarray)
    if isinstance(tmpl, Mapping):
        return isinstance(value, Mapping) and set(value) == {str(k) for k in tmpl}
    if isinstance(tmpl, (list, tuple)):
        return isinstance(value, (list, tuple)) and len(value) == len(tmpl)
    return True


def _find(value: Any, inner: Any) -> Any:
    if _matches(value, inner):
        return restore(value, inner)
    if isinstance(value, Mapping):
        return {k: _find(v, inner) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return tuple(_find(v, inner) for v in value)
    return value

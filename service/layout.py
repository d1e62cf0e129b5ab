"""The argument layout of a transform chain: what the model itself sees of a chain's arguments.

`vmap` adds an axis to the arguments it maps; `jvp` and `vjp` inside a chain change the arity
(n primals then tangents, n primals then one cotangent). The model's declared specs describe
its own arguments, one example each, so checks peel the chain from the outside in to find that
view, and decoding walks it from the inside out to know which spec each outer argument follows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from client._trees import tree_map
from client.errors import InvalidInput
from client.specs import ArraySpec, SpecTree

if TYPE_CHECKING:
    from service.transforms import Transform


class FrozenDict(tuple):
    """A dict of vmap axes, hashable so the `Program` can key the compile cache."""


def freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return FrozenDict(sorted((k, freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    return value


def thaw(value: Any) -> Any:
    """Frozen vmap axes -> what `jax.vmap` takes."""
    if isinstance(value, FrozenDict):
        return {k: thaw(v) for k, v in value}
    if isinstance(value, tuple):
        return tuple(thaw(v) for v in value)
    return value


def conform(axes: Any, tree: Any) -> Any:
    """vmap axes given as JSON lists, shaped like the argument's own containers (JAX tells a
    list from a tuple; the wire cannot)."""
    if isinstance(axes, tuple) and isinstance(tree, (list, tuple)) and len(axes) == len(tree):
        return type(tree)(conform(a, x) for a, x in zip(axes, tree, strict=True))
    if isinstance(axes, dict) and isinstance(tree, Mapping):
        return {k: conform(a, tree.get(k)) for k, a in axes.items()}
    return axes


@dataclass(frozen=True)
class Aval:
    """Shape and dtype only: the per-example view of a vmapped argument, and what lets
    `describe_array` describe tracers and ShapeDtypeStructs."""

    shape: tuple[int, ...]
    dtype: np.dtype

    @classmethod
    def of(cls, x: Any) -> Aval:
        return cls(tuple(x.shape), np.dtype(x.dtype))


def product_argnums(t: Transform, nprimals: int) -> tuple[int, ...]:
    """The primals a chain `jvp`/`vjp` differentiates (all without `argnums`), normalised."""
    if t.argnums is None:
        return tuple(range(nprimals))
    nums = (t.argnums,) if isinstance(t.argnums, int) else t.argnums
    return tuple(n % nprimals if -nprimals <= n < nprimals else n for n in nums)


def primal_count(t: Transform, nargs: int, where: str) -> int:
    """How many of the `nargs` arguments of `t(f)` are primals (`t` a chain jvp or vjp)."""
    if t.op == "vjp":
        n = nargs - 1
    elif t.argnums is None:
        if nargs % 2:
            raise InvalidInput(
                f"jvp of {where} takes n primals followed by n tangents; got {nargs} "
                "arguments, an odd count",
                code="invalid_transform",
                loc=("args",),
            )
        n = nargs // 2
    else:
        n = nargs - (1 if isinstance(t.argnums, int) else len(t.argnums))
    if n < 1:
        extra = "one cotangent" if t.op == "vjp" else "their tangents"
        raise InvalidInput(
            f"{t.op} of {where} takes the primals followed by {extra}; got {nargs} argument(s)",
            code="invalid_transform",
            loc=("args",),
        )
    for k in product_argnums(t, n):
        if not 0 <= k < n:
            raise InvalidInput(
                f"{t.op} of {where}: argnums {k} is out of range; it has {n} primal(s)",
                code="argnums_out_of_range",
                loc=("transforms",),
            )
    return n


def _drop_axis(tree: Any, axes: Any) -> Any:
    if isinstance(axes, FrozenDict) and isinstance(tree, Mapping):
        axes_by_key = dict(axes)
        return {k: _drop_axis(v, axes_by_key.get(k)) for k, v in tree.items()}
    if isinstance(axes, tuple) and isinstance(tree, (list, tuple)):
        return type(tree)(_drop_axis(v, a) for v, a in zip(tree, axes, strict=False))
    if isinstance(tree, Mapping):
        return {k: _drop_axis(v, axes) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_drop_axis(v, axes) for v in tree)
    if tree is None or not isinstance(axes, int) or not tree.shape:
        return tree
    shape = list(tree.shape)
    if not -len(shape) <= axes < len(shape):  # a client's value: a 422, not an IndexError
        raise InvalidInput(
            f"vmap in_axes {axes} is out of range for an argument with {len(shape)} dimension(s)",
            code="invalid_transform",
            loc=("transforms",),
        )
    del shape[axes]
    return Aval(tuple(shape), tree.dtype)


def per_example(args: tuple, transforms: Sequence[Transform], model: str = "model") -> tuple:
    """What the model itself sees of `args`: each vmap in the chain strips its mapped axis, each
    jvp/vjp keeps only its primals.

    The model's specs describe one example, so they are checked against this view.
    """
    for depth in range(len(transforms) - 1, -1, -1):
        t = transforms[depth]
        if t.op == "vmap":
            axes = t.in_axes if isinstance(t.in_axes, tuple) else (t.in_axes,) * len(args)
            args = tuple(_drop_axis(a, ax) for a, ax in zip(args, axes, strict=False))
        elif t.op in ("jvp", "vjp"):
            where = "".join(f"{s.op} of " for s in reversed(transforms[:depth])) + f"'{model}'"
            args = args[: primal_count(t, len(args), where)]
    return args


def outer_specs(specs: Sequence[SpecTree] | None, transforms: Sequence[Transform]) -> Any:
    """The spec each argument of the whole chain follows when decoded (None: the default).

    Mapped arguments keep only their dtype; a tangent follows its primal (any dtype for an
    integer primal, whose tangent is ignored); a cotangent follows nothing declared.
    """
    if specs is None:
        return None
    specs = list(specs)
    for t in transforms:
        if t.op == "vmap":
            specs = [tree_map(lambda s: ArraySpec(None, s.dtype), s) for s in specs]
        elif t.op == "jvp":
            nums = product_argnums(t, len(specs))
            specs += [
                tree_map(_tangent_spec, specs[k]) if 0 <= k < len(specs) else None for k in nums
            ]
        elif t.op == "vjp":
            specs.append(None)
    return specs


def _tangent_spec(s: ArraySpec) -> ArraySpec:
    inexact = s.dtype is None or s.dtype == "bfloat16" or np.dtype(s.dtype).kind in "fc"
    return s if inexact else ArraySpec(s.shape, None)

"""The argument layout of a transform chain, on the client (numpy only).

`jvp` and `vjp` inside a chain change the arity of the function (n primals then tangents, n
primals then one cotangent), and `vmap` maps an axis. The client needs the layout three ways:
which spec each argument it sends follows, what the model itself sees (to check the model's
specs before sending), and the arguments each level of the chain sees (to rebuild the result's
tuples). The server's twin is `service.layout`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from client import _trees
from client.specs import ArraySpec, SpecTree

if TYPE_CHECKING:
    from client._core import Transform


def product_argnums(t: Transform, nprimals: int) -> tuple[int, ...]:
    """The primals a chain `jvp`/`vjp` differentiates (all without `argnums`)."""
    argnums = t.opts.get("argnums")
    if argnums is None:
        return tuple(range(nprimals))
    nums = (argnums,) if isinstance(argnums, int) else argnums
    return tuple(n % nprimals if nprimals else n for n in nums)


def primal_count(t: Transform, nargs: int) -> int:
    """How many of `nargs` arguments of a chain `jvp`/`vjp` are primals (the server checks)."""
    if t.op == "vjp":
        return nargs - 1
    argnums = t.opts.get("argnums")
    if argnums is None:
        return nargs // 2
    return nargs - (1 if isinstance(argnums, int) else len(argnums))


def outer_specs(specs: Sequence[SpecTree] | None, chain: Sequence[Transform]) -> list | None:
    """The spec each argument of the chain follows: a mapped one keeps its dtype, a tangent
    follows its primal, a cotangent nothing declared."""
    if specs is None:
        return None
    out = list(specs)
    for t in chain:
        if t.op == "vmap":
            out = [_trees.tree_map(lambda s: ArraySpec(None, s.dtype), s) for s in out]
        elif t.op == "jvp":
            out += [out[k] if 0 <= k < len(out) else None for k in product_argnums(t, len(out))]
        elif t.op == "vjp":
            out.append(None)
    return out


def levels(args: Sequence[Any], chain: Sequence[Transform]) -> list[list[Any]]:
    """The arguments each function of the chain takes: `levels[k]` are those of the model
    under `chain[:k]` (so `levels[-1]` is `args`); mapped axes are kept."""
    found = [list(args)]
    for t in reversed(chain):
        current = found[0]
        if t.op in ("jvp", "vjp"):
            current = current[: max(primal_count(t, len(current)), 0)]
        found.insert(0, current)
    return found


def model_view(args: Sequence[Any], chain: Sequence[Transform]) -> list[Any] | None:
    """What the model itself sees of `args` under the chain (vmapped axes removed, tangents
    and cotangents dropped), or None where an `in_axes` form is beyond this simple reading."""
    views = [_trees.tree_map(lambda x: np.empty(x.shape, x.dtype), a) for a in args]
    for t in reversed(chain):
        if t.op in ("jvp", "vjp"):
            views = views[: max(primal_count(t, len(views)), 0)]
        elif t.op == "vmap":
            axes = t.opts.get("in_axes", 0)
            per_arg = axes if isinstance(axes, tuple) else (axes,) * len(views)
            if len(per_arg) != len(views) or not all(
                a is None or isinstance(a, int) for a in per_arg
            ):
                return None
            try:
                views = [
                    v if a is None else _trees.tree_map(lambda x, a=a: np.take(x, 0, axis=a), v)
                    for v, a in zip(views, per_arg, strict=True)
                ]
            except (IndexError, ValueError):  # an axis out of range: the server words it
                return None
    return views

"""`jvp` and `vjp` as steps of a transform chain (PROTOCOL.md v1.1).

After a chain `jvp` the function takes n primals, then a tangent for each primal `argnums`
names (all by default), and returns `[output, tangent]`; after a chain `vjp`, n primals then one
cotangent, returning `[output, cotangents]`. With `value=False` either returns the product
alone, which is what a derivative of a product wants (no wasted derivative of the value).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from client.errors import InvalidInput
from client.specs import describe_array
from service.layout import Aval, primal_count, product_argnums

if TYPE_CHECKING:
    from service.transforms import Transform


def partial(f: Callable, primals: tuple, nums: Sequence[int]) -> Callable:
    """`f` as a function of the primals `nums` names only, the others held at their values."""

    def part(*chosen: Any) -> Any:
        full = list(primals)
        for k, x in zip(nums, chosen, strict=True):
            full[k] = x
        return f(*full)

    return part


def product(f: Callable, t: Transform, where: str) -> Callable:
    """A chain `jvp` (n primals, then a tangent per differentiated primal -> [out, tangent])
    or `vjp` (n primals, then one cotangent -> [out, cotangents]); `value=False` drops out."""
    label = f"{t.op} of {where}"

    def transformed(*args: Any) -> Any:
        n = primal_count(t, len(args), where)
        nums = product_argnums(t, n)
        primals, rest = args[:n], args[n:]
        chosen = tuple(primals[k] for k in nums)
        part = partial(f, primals, nums)
        if t.op == "jvp":
            tangents = tuple(
                _like(x, v, label, f"tangent {k}", ("args", n + i))
                for i, (k, x, v) in enumerate(zip(nums, chosen, rest, strict=True))
            )
            out, result = jax.jvp(part, chosen, tangents)
        else:
            out, pullback = jax.vjp(part, *chosen)
            result = pullback(_like(out, rest[0], label, "cotangent", ("args", n)))
            result = result[0] if isinstance(t.argnums, int) else list(result)
        return (out, result) if t.value else result

    return transformed


def _like(primal: Any, given: Any, label: str, what: str, loc: tuple) -> Any:
    """A tangent or cotangent for `primal`: its tree and shapes, its dtype (float or complex
    widths may differ: cast), float0 zeros for integer leaves (JAX's, which no client can send).
    """
    want, treedef = jax.tree.flatten(primal)
    got = jax.tree.leaves(given)
    if len(got) != len(want):
        raise InvalidInput(
            f"{label}: {what} expects a tree of {len(want)} array(s) like "
            f"{[describe_array(Aval.of(x)) for x in want]}, got {len(got)}",
            code="tree_mismatch",
            loc=loc,
        )
    out = []
    for x, v in zip(want, got, strict=True):
        if not jnp.issubdtype(x.dtype, jnp.inexact):
            out.append(np.zeros(x.shape, jax.dtypes.float0))
            continue
        same_kind = jnp.issubdtype(v.dtype, jnp.complexfloating) == jnp.issubdtype(
            x.dtype, jnp.complexfloating
        ) and jnp.issubdtype(v.dtype, jnp.inexact)
        if tuple(v.shape) != tuple(x.shape) or not same_kind:
            raise InvalidInput(
                f"{label}: {what} expects {describe_array(Aval.of(x))}, "
                f"got {describe_array(Aval.of(v))}",
                code="shape_mismatch" if same_kind else "dtype_mismatch",
                loc=loc,
            )
        out.append(v.astype(x.dtype) if v.dtype != x.dtype else v)
    return jax.tree.unflatten(treedef, out)

"""Ops and transform chains -> one composed JAX function, checked in JAX's words.

Every request becomes a `Program`: a chain of function transforms (innermost first) and how the
result is applied (`eval`, `jvp`, `vjp`, `hvp`). A named op is the same program as its
one-element `call`, so both share one compiled executable and give the same numbers.

Checks run at trace time inside each transform, where the abstract values the transform really
sees are known, so `grad(grad(f))` is checked at both levels and names the level in its error.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from client.errors import InvalidInput
from client.specs import describe_array

FUNCTION_TRANSFORMS = ("grad", "value_and_grad", "jacfwd", "jacrev", "jacobian", "hessian", "vmap")
APPLICATIONS = ("eval", "jvp", "vjp", "hvp")
OPS = (
    "eval",
    "grad",
    "value_and_grad",
    "jacfwd",
    "jacrev",
    "jacobian",
    "hessian",
    "jvp",
    "vjp",
    "hvp",
    "call",
)
HVP_MODES = ("fwd_rev", "rev_fwd", "rev_rev")
_NEEDS_SCALAR = ("grad", "value_and_grad", "hessian")
_DIFFERENTIATES = ("grad", "value_and_grad", "jacfwd", "jacrev", "jacobian", "hessian")


@dataclass(frozen=True)
class Transform:
    """One function transform with its (hashable) options."""

    op: str
    argnums: int | tuple[int, ...] = 0
    has_aux: bool = False
    holomorphic: bool = False
    mode: str = "auto"  # jacobian only: fwd | rev | auto
    in_axes: Any = 0  # vmap only
    out_axes: Any = 0

    @classmethod
    def of(cls, op: str, **options: Any) -> Transform:
        """Normalise options so equal computations get equal (cache-sharing) transforms."""
        if "argnums" in options and isinstance(options["argnums"], list):
            options["argnums"] = tuple(options["argnums"])
        for key in ("in_axes", "out_axes"):
            if key in options:
                options[key] = _freeze(options[key])
        if op == "jacobian" and options.get("mode", "auto") != "auto":
            op = "jacfwd" if options.pop("mode") == "fwd" else "jacrev"
        return cls(op, **options)


class _FrozenDict(tuple):
    """A dict of vmap axes, hashable so the `Program` can key the compile cache."""


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return _FrozenDict(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def thaw(value: Any) -> Any:
    """Frozen vmap axes -> what `jax.vmap` takes."""
    if isinstance(value, _FrozenDict):
        return {k: thaw(v) for k, v in value}
    if isinstance(value, tuple):
        return tuple(thaw(v) for v in value)
    return value


@dataclass(frozen=True)
class _Aval:
    """Shape and dtype only: the per-example view of a vmapped argument, and what lets
    `describe_array` describe tracers and ShapeDtypeStructs."""

    shape: tuple[int, ...]
    dtype: np.dtype

    @classmethod
    def of(cls, x: Any) -> _Aval:
        return cls(tuple(x.shape), np.dtype(x.dtype))


def _drop_axis(tree: Any, axes: Any) -> Any:
    if isinstance(axes, _FrozenDict) and isinstance(tree, Mapping):
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
    return _Aval(tuple(shape), tree.dtype)


def per_example(args: tuple, transforms: Sequence[Transform]) -> tuple:
    """What the model itself sees of `args`: each vmap in the chain strips its mapped axis.

    The model's specs describe one example, so they are checked against this view.
    """
    for t in reversed(transforms):
        if t.op == "vmap":
            axes = t.in_axes if isinstance(t.in_axes, tuple) else (t.in_axes,) * len(args)
            args = tuple(_drop_axis(a, ax) for a, ax in zip(args, axes, strict=False))
    return args


@dataclass(frozen=True)
class Program:
    """What one request computes; hashable, so it keys the compile cache."""

    transforms: tuple[Transform, ...] = ()
    apply: str = "eval"
    batched: bool = False
    hvp_mode: str = "fwd_rev"


def build_program(op: str, options: Mapping[str, Any], chain: Sequence[Transform] = ()) -> Program:
    """The program of a named op. `chain` is applied to the model first (the `transforms` field)."""
    chain = tuple(chain)
    if op in ("eval", "call"):
        return Program(chain)
    if op in ("jvp", "vjp", "hvp"):
        return Program(
            chain, op, bool(options.get("batched", False)), options.get("mode") or "fwd_rev"
        )
    return Program((*chain, Transform.of(op, **options)))


def package(op: str, program: Program, out: Any) -> dict[str, Any]:
    """Raw program output -> the response fields PROTOCOL.md names for `op`."""
    has_aux = bool(program.transforms) and program.transforms[-1].has_aux
    if op in ("eval", "call"):
        return {"value": out}
    if op == "grad":
        return {"grad": out[0], "aux": out[1]} if has_aux else {"grad": out}
    if op == "value_and_grad":
        (value, aux), grad = out if has_aux else ((out[0], None), out[1])
        return {"value": value, "grad": grad, **({"aux": aux} if has_aux else {})}
    if op in ("jacfwd", "jacrev", "jacobian"):
        return {"jacobian": out[0], "aux": out[1]} if has_aux else {"jacobian": out}
    if op == "hessian":
        return {"hessian": out}
    if op == "jvp":
        return {"value": out[0], "tangent": out[1]}
    if op == "vjp":
        return {"value": out[0], "cotangents": list(out[1])}
    return {"hvp": list(out)}


# ---------------------------------------------------------------------------- checks


def _label(model: str, transforms: Sequence[Transform]) -> str:
    return "".join(f"{t.op} of " for t in reversed(transforms)) + f"'{model}'"


def _argnums(t: Transform, nargs: int, where: str) -> tuple[int, ...]:
    nums = (t.argnums,) if isinstance(t.argnums, int) else t.argnums
    for n in nums:
        if not -nargs <= n < nargs:
            raise InvalidInput(
                f"{t.op} of {where}: argnums {n} is out of range; it takes {nargs} "
                "positional argument(s)",
                code="argnums_out_of_range",
                loc=("argnums",),
            )
    return tuple(n % nargs for n in nums)


def _check_inputs(t: Transform, args: Sequence[Any], where: str) -> None:
    for n in _argnums(t, len(args), where):
        for x in jax.tree.leaves(args[n]):
            dtype = np.dtype(x.dtype)
            if not jnp.issubdtype(dtype, jnp.inexact):
                raise InvalidInput(
                    f"{t.op} of {where} differentiates argument {n}, which is "
                    f"{describe_array(_Aval.of(x))}; {t.op} needs real or complex inputs. "
                    "Pick float arguments with argnums.",
                    code="integer_input",
                    loc=("args", n),
                )
            if t.holomorphic and not jnp.issubdtype(dtype, jnp.complexfloating):
                raise InvalidInput(
                    f"{t.op} of {where} with holomorphic=True needs complex inputs; argument "
                    f"{n} is {describe_array(_Aval.of(x))}",
                    code="holomorphic_real_input",
                    loc=("args", n),
                )


def _check_scalar(t: Transform, f: Callable, args: Sequence[Any], where: str) -> None:
    out = jax.eval_shape(f, *args)
    if t.has_aux:
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            raise InvalidInput(
                f"{t.op} of {where} with has_aux=True needs the model to return (output, aux)",
                code="invalid_transform",
            )
        out = out[0]
    if not hasattr(out, "shape") or out.shape != ():
        got = describe_array(_Aval.of(out)) if hasattr(out, "shape") else type(out).__name__
        fix = {
            "hessian": "Use call with transforms [jacrev, jacfwd] for each output's Hessian.",
            "hvp": "hvp is the Hessian-vector product of a scalar function; use jvp or vjp.",
        }.get(t.op, "Use jacrev, or vjp with a cotangent.")
        raise InvalidInput(
            f"{t.op} of {where} needs a scalar output; it returned {got}. {fix}",
            code="non_scalar_output",
        )


def _size(tree: Any) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


# ---------------------------------------------------------------------------- composition


def apply_transform(f: Callable, t: Transform, where: str) -> Callable:
    """`t` applied to `f`, with the checks of its level run when traced."""
    if t.op == "vmap":
        return jax.vmap(f, in_axes=thaw(t.in_axes), out_axes=thaw(t.out_axes))

    def transformed(*args: Any) -> Any:
        argnums = _argnums(t, len(args), where)
        _check_inputs(t, args, where)
        if t.op in _NEEDS_SCALAR:
            _check_scalar(t, f, args, where)
        nums = argnums[0] if isinstance(t.argnums, int) else argnums
        op = t.op
        if op == "jacobian":
            out = jax.eval_shape(f, *args)
            inputs = _size([args[n] for n in argnums])
            op = "jacfwd" if inputs < _size(out[0] if t.has_aux else out) else "jacrev"
        options: dict[str, Any] = {"argnums": nums, "holomorphic": t.holomorphic}
        if op != "hessian":
            options["has_aux"] = t.has_aux
        return getattr(jax, op)(f, **options)(*args)

    return transformed


def compose(f: Callable, transforms: Sequence[Transform], model: str) -> Callable:
    """Apply `transforms` innermost first, so `[grad, grad]` is `grad(grad(f))`."""
    for depth, t in enumerate(transforms):
        f = apply_transform(f, t, _label(model, transforms[:depth]))
    return f


def _vdot(a: Any, b: Any) -> Any:
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _hvp(f: Callable, args: tuple, tangents: tuple, mode: str) -> Any:
    every = tuple(range(len(args)))
    if mode == "fwd_rev":
        return jax.jvp(jax.grad(f, argnums=every), args, tangents)[1]
    if mode == "rev_fwd":
        return jax.grad(lambda *a: jax.jvp(f, a, tangents)[1], argnums=every)(*args)
    return jax.grad(lambda *a: _vdot(jax.grad(f, argnums=every)(*a), tangents), argnums=every)(
        *args
    )


def _tangent_axes(args: tuple) -> Any:
    """vmap axes for batched tangents: integer primals get float0 zeros, never a batch axis."""
    return jax.tree.map(lambda x: 0 if jnp.issubdtype(x.dtype, jnp.inexact) else None, args)


def with_float0(args: tuple, tangents: tuple) -> tuple:
    """JAX wants float0 tangents for integer primals; clients cannot send that dtype."""
    return jax.tree.map(
        lambda x, t: (
            t if jnp.issubdtype(x.dtype, jnp.inexact) else np.zeros(x.shape, jax.dtypes.float0)
        ),
        args,
        tangents,
    )


def program_function(fn: Callable, program: Program, model: str) -> Callable:
    """`(params, args, extra) -> output`: the function the engine jit-compiles for `program`.

    `fn(params, *args)` is the model; `extra` holds tangents or the cotangent.
    """

    def run(params: Any, args: tuple, extra: Any) -> Any:
        f = compose(lambda *a: fn(params, *a), program.transforms, model)
        if program.apply == "eval":
            return f(*args)
        if program.apply == "jvp":
            if not program.batched:
                return jax.jvp(f, args, with_float0(args, extra))
            value, f_jvp = jax.linearize(f, *args)
            axes = _tangent_axes(args)
            return value, jax.vmap(lambda t: f_jvp(*with_float0(args, t)), in_axes=(axes,))(extra)
        if program.apply == "vjp":
            value, pullback = jax.vjp(f, *args)
            # JSON has no tuples: give the cotangent the output's own tree structure.
            treedef = jax.tree.structure(value)

            def pull(cotangent: Any) -> Any:
                return pullback(jax.tree.unflatten(treedef, jax.tree.leaves(cotangent)))

            return value, (jax.vmap(pull)(extra) if program.batched else pull(extra))
        label = _label(model, program.transforms)
        every = Transform("hvp", argnums=tuple(range(len(args))))
        _check_inputs(every, args, label)
        _check_scalar(every, f, args, label)
        if not program.batched:
            return _hvp(f, args, extra, program.hvp_mode)
        return jax.vmap(lambda t: _hvp(f, args, t, program.hvp_mode))(extra)

    return run

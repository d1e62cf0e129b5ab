"""Ops and transform chains -> one composed JAX function, checked in JAX's words.

Every request becomes a `Program`: a chain of function transforms (innermost first) and how the
result is applied (`eval`, `jvp`, `vjp`, `hvp`). A named op is the same program as its
one-element `call`, so both share one compiled executable and give the same numbers. `jvp` and
`vjp` may also sit inside a chain (PROTOCOL.md v1.1), where they change the arity of the function
(`service.layout`).

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

from client.errors import APIError, InvalidInput
from client.specs import describe_array
from service.layout import Aval, conform, freeze, primal_count, product_argnums, thaw

FUNCTION_TRANSFORMS = (
    "grad",
    "value_and_grad",
    "jacfwd",
    "jacrev",
    "jacobian",
    "hessian",
    "vmap",
    "jvp",
    "vjp",
)
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
_NEEDS_SCALAR = ("grad", "value_and_grad")
_DIFFERENTIATES = ("grad", "value_and_grad", "jacfwd", "jacrev", "jacobian", "hessian")


@dataclass(frozen=True)
class Transform:
    """One function transform with its (hashable) options."""

    op: str
    argnums: int | tuple[int, ...] | None = 0  # chain jvp/vjp: None for every primal
    has_aux: bool = False
    holomorphic: bool = False
    mode: str = "auto"  # jacobian only: fwd | rev | auto
    in_axes: Any = 0  # vmap only
    out_axes: Any = 0
    value: bool = True  # chain jvp/vjp only: False returns the product without the value

    @classmethod
    def of(cls, op: str, **options: Any) -> Transform:
        """Normalise options so equal computations get equal (cache-sharing) transforms."""
        if "argnums" in options and isinstance(options["argnums"], list):
            options["argnums"] = tuple(options["argnums"])
        for key in ("in_axes", "out_axes"):
            if key in options:
                options[key] = freeze(options[key])
        if op in ("jvp", "vjp"):
            options.setdefault("argnums", None)
        if op == "jacobian" and options.get("mode", "auto") != "auto":
            op = "jacfwd" if options.pop("mode") == "fwd" else "jacrev"
        return cls(op, **options)


@dataclass(frozen=True)
class Program:
    """What one request computes; hashable, so it keys the compile cache."""

    transforms: tuple[Transform, ...] = ()
    apply: str = "eval"
    batched: bool = False
    hvp_mode: str = "fwd_rev"
    hvp_argnums: int | tuple[int, ...] | None = None  # None: every argument, a block each


def build_program(op: str, options: Mapping[str, Any], chain: Sequence[Transform] = ()) -> Program:
    """The program of a named op. `chain` is applied to the model first (the `transforms` field)."""
    chain = tuple(chain)
    if op in ("eval", "call"):
        return Program(chain)
    if op in ("jvp", "vjp", "hvp"):
        argnums = options.get("argnums") if op == "hvp" else None
        return Program(
            chain,
            op,
            bool(options.get("batched", False)),
            options.get("mode") or "fwd_rev",
            tuple(argnums) if isinstance(argnums, list) else argnums,
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
    return {"hvp": out if isinstance(program.hvp_argnums, int) else list(out)}


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
                    f"{describe_array(Aval.of(x))}; {t.op} needs real or complex inputs. "
                    "Pick float arguments with argnums.",
                    code="integer_input",
                    loc=("args", n),
                )
            if t.holomorphic and not jnp.issubdtype(dtype, jnp.complexfloating):
                raise InvalidInput(
                    f"{t.op} of {where} with holomorphic=True needs complex inputs; argument "
                    f"{n} is {describe_array(Aval.of(x))}",
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
        got = describe_array(Aval.of(out)) if hasattr(out, "shape") else type(out).__name__
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
    """`t` applied to `f`, with the checks of its level run when traced.

    An error JAX raises at this level (not one already worded by a level inside) is reworded
    to name the transform, so a refused chain says which of its steps refused.
    """
    inner = (
        _vmap(f, t)
        if t.op == "vmap"
        else _product(f, t, where)
        if t.op in ("jvp", "vjp")
        else _derivative(f, t, where)
    )

    def transformed(*args: Any) -> Any:
        try:
            return inner(*args)
        except APIError:
            raise
        except Exception as e:  # JAX refusing the transform, or the model's own code
            lines = [line for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
            code = "invalid_transform" if isinstance(e, TypeError) else "model_error"
            raise InvalidInput(f"{t.op} of {where} failed: {lines[0][:500]}", code=code) from None

    return transformed


def _vmap(f: Callable, t: Transform) -> Callable:
    def mapped(*args: Any) -> Any:
        axes = thaw(t.in_axes)
        return jax.vmap(f, in_axes=conform(axes, args), out_axes=thaw(t.out_axes))(*args)

    return mapped


def _derivative(f: Callable, t: Transform, where: str) -> Callable:
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


def _partial(f: Callable, primals: tuple, nums: Sequence[int]) -> Callable:
    """`f` as a function of the primals `nums` names only, the others held at their values."""

    def part(*chosen: Any) -> Any:
        full = list(primals)
        for k, x in zip(nums, chosen, strict=True):
            full[k] = x
        return f(*full)

    return part


def _product(f: Callable, t: Transform, where: str) -> Callable:
    """A chain `jvp` (n primals, then a tangent per differentiated primal -> [out, tangent])
    or `vjp` (n primals, then one cotangent -> [out, cotangents]); `value=False` drops out."""
    label = f"{t.op} of {where}"

    def transformed(*args: Any) -> Any:
        n = primal_count(t, len(args), where)
        nums = product_argnums(t, n)
        primals, rest = args[:n], args[n:]
        chosen = tuple(primals[k] for k in nums)
        part = _partial(f, primals, nums)
        if t.op == "jvp":
            tangents = tuple(
                _like(x, v, label, f"tangent {k}", ("args", n + i))
                for i, (k, x, v) in enumerate(zip(nums, chosen, rest, strict=True))
            )
            out, product = jax.jvp(part, chosen, tangents)
        else:
            out, pullback = jax.vjp(part, *chosen)
            product = pullback(_like(out, rest[0], label, "cotangent", ("args", n)))
            product = product[0] if isinstance(t.argnums, int) else list(product)
        return (out, product) if t.value else product

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


def _hvp_of(f: Callable, args: tuple, extra: tuple, program: Program, label: str) -> Any:
    """The `hvp` application: blocks of H @ v for the arguments `argnums` names (all without)."""
    nums = program.hvp_argnums
    t = Transform("hvp", argnums=tuple(range(len(args))) if nums is None else nums)
    chosen_nums = _argnums(t, len(args), label)
    _check_inputs(t, args, label)
    part = _partial(f, args, chosen_nums)
    chosen = tuple(args[k] for k in chosen_nums)
    _check_scalar(t, part, chosen, label)
    tangents = tuple(extra[k] for k in chosen_nums)
    mode = program.hvp_mode
    if program.batched:
        blocks = jax.vmap(lambda v: _hvp(part, chosen, v, mode))(tangents)
    else:
        blocks = _hvp(part, chosen, tangents, mode)
    return blocks[0] if isinstance(nums, int) else tuple(blocks)


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
        return _hvp_of(f, args, extra, program, _label(model, program.transforms))

    return run

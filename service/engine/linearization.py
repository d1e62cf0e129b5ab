"""Sessions' programs: linearize once, then products that take the residuals as arguments.

`jax.linearize` gives a linear function closing over the residuals of the forward pass. Traced
inside the compiled `linearize` program, that function becomes a jaxpr whose constants are the
residuals: the program returns them (they stay on the device, in the session store), and the
jaxpr, recorded once per trace in a `Linearization`, is what every product program evaluates
with the residuals passed back in as arguments. So one executable serves every session at the
same (model, chain, argnums, avals): a new session compiles nothing.

A residual that is one of the model's server-held parameters is not copied into the session:
products read the parameters the device already holds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax.extend.core import ClosedJaxpr, jaxpr_as_fun

from client.errors import InvalidInput, PayloadTooLarge
from client.specs import ArraySpec, describe_array, dtype_name
from service.calls import Call
from service.transforms import Program, compose

__all__ = ["Linearization", "LinearizeCall", "LinearizeProgram", "ProductProgram", "check_argnums"]


@dataclass(frozen=True)
class LinearizeProgram:
    """`jax.linearize` of the model under `base.transforms`, in the arguments `argnums`.

    Quacks like a `Program` where the engine looks (`transforms`, `apply`, `batched`).
    """

    base: Program
    argnums: tuple[int, ...]
    apply: str = "linearize"
    batched: bool = False

    @property
    def transforms(self) -> tuple:
        return self.base.transforms


@dataclass(frozen=True)
class LinearizeCall(Call):
    """A `linearize` request: the session it opens belongs to `owner` and lives `ttl_s`."""

    owner: str = ""
    ttl_s: float = 0.0


@dataclass(frozen=True)
class ProductProgram:
    """A product at a linearization: `jvp` (its tangent map) or `vjp` (the transpose).

    Called as `(params, residuals, extra)`. Its `Linearization` compares by identity, so each
    trace of a linearize program has its own product executables, built for its own jaxpr.
    """

    linearization: Linearization
    kind: str  # "jvp" | "vjp"
    batched: bool = False
    transforms: tuple = ()
    shares_args: bool = True  # batches stack only tangents: the residuals are the same

    @property
    def apply(self) -> str:
        return f"session_{self.kind}"

    def function(self) -> Callable:
        lin = self.linearization
        single = lin.jvp if self.kind == "jvp" else lin.vjp
        if not self.batched:
            return single
        return lambda params, residuals, extra: jax.vmap(lambda e: single(params, residuals, e))(
            extra
        )


def check_argnums(model: str, argnums: Any, args: tuple) -> tuple[int, ...]:
    """The linearized argument indices (default: all), refused like `grad` refuses them."""
    n = len(args)
    nums = (
        tuple(range(n)) if argnums is None else (argnums,) if isinstance(argnums, int) else argnums
    )
    if not nums:
        raise InvalidInput(
            f"linearize of '{model}': argnums is empty; name at least one argument",
            code="argnums_out_of_range",
            loc=("argnums",),
        )
    for k in nums:
        if not -n <= k < n:
            raise InvalidInput(
                f"linearize of '{model}': argnums {k} is out of range; it takes {n} positional "
                "argument(s)",
                code="argnums_out_of_range",
                loc=("argnums",),
            )
    nums = tuple(k % n for k in nums)
    if len(set(nums)) != len(nums):
        raise InvalidInput(
            f"linearize of '{model}': argnums {list(nums)} names an argument twice",
            code="argnums_out_of_range",
            loc=("argnums",),
        )
    for k in nums:
        for x in jax.tree.leaves(args[k]):
            if not np.issubdtype(x.dtype, np.inexact):
                raise InvalidInput(
                    f"linearize of '{model}' differentiates argument {k}, which is "
                    f"{describe_array(x)}; it needs real or complex inputs. Pick float "
                    "arguments with argnums.",
                    code="integer_input",
                    loc=("args", k),
                )
    return nums


@dataclass(eq=False)
class Linearization:
    """One traced linearization: the linear jaxpr and where each of its constants comes from.

    Filled in while the linearize program is traced; afterwards immutable and shared by every
    session opened with that program's executable.
    """

    executable: Any = None
    jaxpr: Any = None
    # Per jaxpr constant: ("param", i) a parameter leaf, ("residual", i) a program output,
    # ("const", array) a constant of the model's own code.
    layout: tuple = ()
    residual_avals: tuple[jax.ShapeDtypeStruct, ...] = ()
    tangent_tree: Any = None  # treedef of the tuple of linearized arguments
    tangent_avals: tuple[jax.ShapeDtypeStruct, ...] = ()
    out_tree: Any = None
    out_avals: tuple[jax.ShapeDtypeStruct, ...] = ()

    @property
    def nbytes(self) -> int:
        """Bytes a session of this linearization holds on its device."""
        return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in self.residual_avals)

    # -- tracing --------------------------------------------------------------------------

    def tracer(self, fn: Callable, program: LinearizeProgram, model: str) -> Callable:
        """`(params, args, extra) -> (value, residuals)`, recording the structure as it traces."""

        def run(params: Any, args: tuple, extra: Any) -> Any:
            f = compose(lambda *a: fn(params, *a), program.transforms, model)
            nums = program.argnums

            def at(*primals: Any) -> Any:
                full = list(args)
                for k, x in zip(nums, primals, strict=True):
                    full[k] = x
                return f(*full)

            primals = tuple(args[k] for k in nums)
            value, f_jvp = jax.linearize(at, *primals)
            closed = jax.make_jaxpr(f_jvp)(*primals)
            param_ids = {id(p): i for i, p in enumerate(jax.tree.leaves(params))}
            layout, residuals = [], []
            for c in closed.consts:
                if id(c) in param_ids:
                    layout.append(("param", param_ids[id(c)]))
                elif isinstance(c, jax.core.Tracer):
                    layout.append(("residual", len(residuals)))
                    residuals.append(c)
                else:
                    layout.append(("const", c))
            flat_t, tangent_tree = jax.tree.flatten(primals)
            flat_out, out_tree = jax.tree.flatten(value)
            self.jaxpr, self.layout = closed.jaxpr, tuple(layout)
            self.residual_avals = tuple(_aval(r) for r in residuals)
            self.tangent_tree, self.tangent_avals = tangent_tree, tuple(map(_aval, flat_t))
            self.out_tree, self.out_avals = out_tree, tuple(map(_aval, flat_out))
            return value, residuals

        return run

    # -- products -------------------------------------------------------------------------

    def _consts(self, params: Any, residuals: Any) -> list:
        flat_params = jax.tree.leaves(params)
        return [
            flat_params[v] if k == "param" else residuals[v] if k == "residual" else v
            for k, v in self.layout
        ]

    def _linear(self, params: Any, residuals: Any) -> Callable:
        fun = jaxpr_as_fun(ClosedJaxpr(self.jaxpr, self._consts(params, residuals)))

        def linear(*tangents: Any) -> Any:
            return jax.tree.unflatten(self.out_tree, fun(*tangents))

        return linear

    def jvp(self, params: Any, residuals: Any, tangents: Any) -> Any:
        """The output tangent for `tangents` (the tuple of linearized arguments' tangents)."""
        return self._linear(params, residuals)(*jax.tree.leaves(tangents))

    def vjp(self, params: Any, residuals: Any, cotangent: Any) -> Any:
        """The tuple of cotangents of the linearized arguments: the transpose, no forward pass."""
        transpose = jax.linear_transpose(self._linear(params, residuals), *self.tangent_avals)
        # Integer outputs have float0 tangents, which no client can send: zeros stand in.
        flat = [
            c if np.issubdtype(a.dtype, np.inexact) else np.zeros(a.shape, jax.dtypes.float0)
            for c, a in zip(jax.tree.leaves(cotangent), self.out_avals, strict=True)
        ]
        flat = transpose(jax.tree.unflatten(self.out_tree, flat))
        return jax.tree.unflatten(self.tangent_tree, flat)

    # -- checks ---------------------------------------------------------------------------

    def check_size(self, model: str, budget: int) -> None:
        """413 before anything runs: a session larger than the device's whole budget."""
        if self.nbytes > budget:
            raise PayloadTooLarge(
                f"a linearization of '{model}' at these shapes holds {self.nbytes} bytes of "
                f"residuals, over the session memory of {budget} bytes per device "
                "(GRADSERVE_SESSION_MEMORY). Use the stateless jvp/vjp/hvp ops instead.",
                code="session_too_large",
            )

    def tangent_specs(self, batched: bool) -> list:
        """Spec trees the tangents of a product must follow (one per linearized argument)."""
        specs = jax.tree.unflatten(
            self.tangent_tree, [_spec(a, batched) for a in self.tangent_avals]
        )
        return list(specs)

    def cotangent_spec(self, batched: bool) -> Any:
        """The spec tree of a cotangent: the output's; integer leaves accept any dtype."""
        return jax.tree.unflatten(self.out_tree, [_spec(a, batched) for a in self.out_avals])


def _aval(x: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(x.shape), x.dtype)


def _spec(aval: jax.ShapeDtypeStruct, batched: bool) -> ArraySpec:
    shape = (None, *aval.shape) if batched else tuple(aval.shape)
    inexact = np.issubdtype(aval.dtype, np.inexact)
    return ArraySpec(shape, dtype_name(np.dtype(aval.dtype)) if inexact else None)

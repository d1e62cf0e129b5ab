"""A request document -> a `Call`: decoded, canonicalised, checked inputs and the program to run.

Host-side only (numpy and pydantic, no JAX tracing), so it is cheap and safe to run anywhere;
everything that needs a trace (output shapes, cotangent checks) happens in the engine.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import jax
import numpy as np
from pydantic import ValidationError

from client._trees import leaves, tree_map
from client.errors import InvalidInput
from client.specs import ArraySpec, canonical_dtype, check_args, dtype_name
from client.wire import decode_tree
from service import limits
from service.layout import outer_specs, per_example
from service.registry import Config, Model
from service.schemas import OP_OPTIONS, REQUESTS
from service.settings import Settings
from service.transforms import Program, Transform, build_program


@dataclass(frozen=True)
class Call:
    """One unit of work for the engine."""

    model: Model
    op: str
    program: Program
    args: tuple
    extra: Any  # tangents (tuple), cotangent (tree) or None
    binary: bool = False
    config: Config = ()  # the model's static options (Model.resolve_config)

    @cached_property
    def signature(self) -> tuple:
        """What decides a compile: the program, the inputs' structure, shapes and dtypes, and
        the model's config.

        Requests with equal signatures share an executable, and may be batched together.
        """
        return self.program, avals_key((self.args, self.extra)), self.config

    @property
    def batch_size(self) -> int | None:
        """B of batched tangents/cotangents (None when not batched)."""
        if not self.program.batched:
            return None
        found = leaves(self.extra)
        return int(found[0].shape[0]) if found else None


def avals_key(tree: Any) -> tuple:
    """Structure, shapes and dtypes: what an executable is specialised to."""
    flat, treedef = jax.tree.flatten(tree)
    return treedef, tuple((x.shape, np.dtype(x.dtype).str) for x in flat)


def _validation_error(e: ValidationError) -> InvalidInput:
    errors = [{"loc": list(err["loc"]), "msg": err["msg"]} for err in e.errors()]
    first = errors[0]
    where = ".".join(str(p) for p in first["loc"]) or "body"
    return InvalidInput(f"{where}: {first['msg']}", code="invalid_request", errors=errors)


def _aval_spec(args: Any, batched: bool) -> Any:
    """The spec tangents must follow: each primal's shape and dtype (plus a batch axis)."""

    def leaf(x: np.ndarray) -> ArraySpec:
        shape = (None, *x.shape) if batched else x.shape
        return ArraySpec(tuple(shape), dtype_name(x.dtype))

    return tree_map(leaf, args)


_OPTIONS_OF = {op: [k for k in OP_OPTIONS if k in m.model_fields] for op, m in REQUESTS.items()}


def prepare(model: Model, op: str, doc: Any, settings: Settings) -> Call:
    """Validate and decode a request document for `op` on `model`."""
    if not isinstance(doc, Mapping):
        raise InvalidInput("the request body must be a JSON object", code="invalid_request")
    try:
        request = REQUESTS[op].model_validate(doc)
    except ValidationError as e:
        raise _validation_error(e) from None

    default = np.float64 if settings.x64 else np.float32
    specs = model.spec.inputs

    def canonical(x: np.ndarray) -> np.ndarray:
        return x.astype(canonical_dtype(x.dtype, settings.x64), copy=False)

    def decode(values: list, spec_list: Any, field: str) -> tuple:
        return tuple(
            tree_map(
                canonical,
                decode_tree(
                    v,
                    spec_list[i] if spec_list is not None and i < len(spec_list) else None,
                    default_dtype=default,
                    loc=(field, i),
                ),
            )
            for i, v in enumerate(values)
        )

    chain = [Transform.of(t.op, **t.options()) for t in request.transforms]
    options = {k: getattr(request, k) for k in _OPTIONS_OF[op]}
    program = build_program(op, options, chain)
    # Mapped arguments carry extra axes (only the declared dtypes guide decoding); tangents of
    # a chain's jvp follow their primals.
    args = decode(request.args, outer_specs(specs, chain), "args")
    check_args(model.name, specs, per_example(args, program.transforms, model.name))
    depth = len(program.transforms) + (program.apply != "eval")
    if depth > settings.max_transform_depth:
        raise InvalidInput(
            f"{depth} nested transforms; the server allows at most {settings.max_transform_depth}",
            code="transform_depth",
            loc=("transforms",),
        )

    extra: Any = None
    if op in ("jvp", "hvp"):
        tangent_specs = list(_aval_spec(args, program.batched))
        extra = decode(request.tangents, tangent_specs, "tangents")
        if op == "hvp" and program.hvp_argnums is not None:
            # Tangents outside argnums are ignored: neither checked nor part of the signature.
            keep = _chosen(program.hvp_argnums, len(args))
            extra = tuple(t if i in keep else None for i, t in enumerate(extra))
            tangent_specs = [s if i in keep else None for i, s in enumerate(tangent_specs)]
        _check_tangents(model.name, tangent_specs, args, extra, program.batched)
    elif op == "vjp":
        extra = tree_map(
            canonical, decode_tree(request.cotangent, default_dtype=default, loc=("cotangent",))
        )
        check_batch(model.name, leaves(extra), "cotangent", program.batched)
    config = model.spec.resolve_config(request.config)
    call = Call(model, op, program, args, extra, request.binary, config)
    limits.check_batch(call, settings)
    return call


def _chosen(argnums: int | tuple[int, ...], nargs: int) -> set[int]:
    """The argument indices `argnums` names (out-of-range ones are refused at trace time)."""
    nums = (argnums,) if isinstance(argnums, int) else argnums
    return {n % nargs for n in nums if -nargs <= n < nargs}


def _check_tangents(model: str, specs: list, args: tuple, tangents: tuple, batched: bool) -> None:
    # Integer primals take float0 tangents, which no client can send: skip their dtype check.
    relaxed = [
        tree_map(lambda s: s if np.dtype(s.dtype).kind in "fc" else ArraySpec(s.shape), spec)
        for spec in specs
    ]
    check_args(model, relaxed, tangents, what="tangent")
    check_batch(model, leaves(tangents), "tangents", batched)


def check_batch(model: str, leaves: list[np.ndarray], field: str, batched: bool) -> None:
    """Batched (co)tangents: one leading axis of the same size on every leaf (422)."""
    if not batched:
        return
    sizes = {x.shape[0] if x.ndim else None for x in leaves}
    if len(sizes) != 1 or None in sizes:
        raise InvalidInput(
            f"batched {field} of '{model}' need one leading batch axis of the same size on "
            f"every leaf; got leading sizes {sorted(map(str, sizes))}",
            code="batch_mismatch",
            loc=(field,),
        )

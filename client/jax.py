"""Remote models inside local JAX programs, differentiable to any order (needs the ``jax`` extra).

`as_jax(m)` wraps a remote function as one JAX primitive, ``gradserve_remote``, whose params
carry a *remote chain*: the transforms (PROTOCOL.md's `call` chain, v1.1 `jvp`/`vjp` included)
that the server applies to the model. Every rule JAX asks of the primitive answers with the same
primitive and a longer chain, so every derivative of a remote model is again a remote model:

* JVP: the value is the primitive itself; the tangent is the chain plus
  ``{"op": "jvp", "argnums": <arguments with nonzero tangents>, "value": false}``, a primitive
  linear in its tangents. Its JVP is the same rule again (jvp of jvp), to any order.
* transpose (reverse mode): a chain ending in such a ``jvp`` becomes the chain plus ``vjp``
  instead (and a ``vjp`` ending becomes ``jvp``); any other linear use, the chain plus a ``vjp``
  in the linear arguments. So ``jax.grad`` costs one remote pullback, ``jax.grad(jax.grad)``
  one chain ``[vjp, vjp]``.
* batching: the chain plus ``{"op": "vmap", "in_axes": <each leaf's batch axis or null>}``, so
  ``jax.vmap`` of anything (``vmap(vmap(f))``, ``vmap(grad(f))``, ``jacfwd``'s basis) is one
  request, never a loop over the batch.
* abstract evaluation: shapes from the model's output spec (one probe request per input
  signature where the spec leaves them open); every derived primitive's shapes follow locally,
  so tracing a derivative sends nothing.

Under ``jax.jit`` each primitive is a host callback that XLA drops when its result is unused,
so ``jax.jit(jax.grad(f))`` sends only the pullback. Eagerly, ``jax.grad(f)`` sends the value
and the pullback, through a session so that the pullback skips the forward pass
(`client._jax_sessions`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from client import _jax_sessions
from client._client import Client
from client._core import Transform
from client._remote import RemoteFunction
from client.specs import ArraySpec

__all__ = ["as_jax"]

Avals = tuple[tuple[tuple[int, ...], np.dtype], ...]

# Params of every bind:
#   fn         the RemoteFunction (a model and the chain the user built, e.g. grad(m))
#   chain      transforms added by JAX's rules, applied on the server after fn's own
#   in_tree    the structure of the chained function's positional arguments (a tuple)
#   out_tree   the structure of its output;  out_avals  its output leaves' shapes and dtypes
remote_p = Primitive("gradserve_remote")
remote_p.multiple_results = True


def _inexact(dtype: Any) -> bool:
    return jnp.issubdtype(dtype, jnp.inexact)


def _aval(x: Any) -> tuple[tuple[int, ...], np.dtype]:
    aval = x.aval if ad.is_undefined_primal(x) else jax.typeof(x)
    return tuple(aval.shape), np.dtype(aval.dtype)


def _bind(flat: Sequence[Any], args: tuple, fn: RemoteFunction, chain: tuple, out: Any) -> Any:
    """Bind the primitive on `args` (positional pytrees whose leaves are `flat`), the chained
    function returning the tree `out` of `(shape, dtype)` leaves."""
    out_leaves, out_tree = jax.tree.flatten(out, is_leaf=_is_aval)
    return remote_p.bind(
        *flat,
        fn=fn,
        chain=chain,
        in_tree=jax.tree.structure(args),
        out_tree=out_tree,
        out_avals=tuple(out_leaves),
    )


def _is_aval(x: Any) -> bool:
    return isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], np.dtype)


# ---------------------------------------------------------------------------- host side


def _host(fn: RemoteFunction, chain: tuple, in_tree: Any, out_avals: Avals) -> Callable:
    """The blocking request the primitive makes: flat numpy in, flat numpy out."""
    client, full = fn._client, (*fn.chain, *chain)

    def call(*flat: Any) -> list[np.ndarray]:
        args = jax.tree.unflatten(in_tree, [np.asarray(x) for x in flat])
        core = client._core

        def flow() -> Any:
            info = yield from core.info(fn.model)
            prepared = core.prepare_args(info, full, args)
            op = "call" if full else "eval"
            fields = {"transforms": [t.to_json() for t in full]} if full else {}
            guess = core._guess_out(op, prepared)
            answer = yield from core.post(fn.model, op, prepared, None, fields, guess)
            return answer["value"]

        return _outputs(fn, chain, jax.tree.leaves(client._run(flow())), out_avals)

    return call


def _outputs(fn: RemoteFunction, chain: tuple, leaves: list, out_avals: Avals) -> list:
    if len(leaves) != len(out_avals):
        raise ValueError(
            f"remote {fn!r} under {[t.op for t in chain]} returned {len(leaves)} arrays, "
            f"expected {len(out_avals)}"
        )
    return [
        np.asarray(x).astype(d, copy=False) for x, (_, d) in zip(leaves, out_avals, strict=True)
    ]


def _impl(*flat: Any, fn: Any, chain: tuple, in_tree: Any, out_tree: Any, out_avals: Avals) -> list:
    # Eagerly, a product at the primals of an earlier linearization goes to its session.
    served = _jax_sessions.serve(fn, chain, jax.tree.unflatten(in_tree, list(flat)))
    if served is not None:
        return [jnp.asarray(x) for x in _outputs(fn, chain, served, out_avals)]
    return [jnp.asarray(x) for x in _host(fn, chain, in_tree, out_avals)(*flat)]


def _abstract(*flat: Any, out_avals: Avals, **params: Any) -> list:
    return [jax.core.ShapedArray(shape, dtype) for shape, dtype in out_avals]


def _lowered(*flat: Any, fn: Any, chain: tuple, in_tree: Any, out_tree: Any, out_avals: Avals):
    shapes = [jax.ShapeDtypeStruct(s, d) for s, d in out_avals]
    return jax.pure_callback(_host(fn, chain, in_tree, out_avals), shapes, *flat)


remote_p.def_impl(_impl)
remote_p.def_abstract_eval(_abstract)
mlir.register_lowering(remote_p, mlir.lower_fun(_lowered, multiple_results=True))


# ---------------------------------------------------------------------------- rules


def _jvp(primals: Sequence[Any], tangents: Sequence[Any], **params: Any) -> tuple:
    """Value: the primitive. Tangent: the chain plus a jvp in the arguments that move."""
    in_tree, out_avals = params["in_tree"], params["out_avals"]
    args = jax.tree.unflatten(in_tree, list(primals))
    moving = jax.tree.unflatten(
        in_tree,
        [
            type(t) is not ad.Zero and _inexact(p.dtype)
            for p, t in zip(primals, tangents, strict=True)
        ],
    )
    active = [i for i, m in enumerate(moving) if any(jax.tree.leaves(m))]
    zeros = [ad.Zero(jax.core.ShapedArray(s, _tangent_dtype(d))) for s, d in out_avals]
    out = None
    if active and _jax_sessions.linearizing(primals, tangents):
        # Eager jax.vjp/jax.grad: a session gives the value, and its pullback later.
        raw = _jax_sessions.open_session(params["fn"], params["chain"], args, tuple(active))
        if raw is not None:
            leaves = _outputs(params["fn"], params["chain"], jax.tree.leaves(raw), out_avals)
            out = [jnp.asarray(x) for x in leaves]
    if out is None:
        out = remote_p.bind(*primals, **params)
    if not active:
        return out, zeros
    dots = jax.tree.unflatten(
        in_tree,
        [
            ad.instantiate_zeros(t) if _inexact(p.dtype) else jnp.zeros(p.shape, p.dtype)
            for p, t in zip(primals, tangents, strict=True)
        ],
    )
    new_args = (*args, *(dots[i] for i in active))
    step = Transform.of("jvp", argnums=tuple(active), value=False)
    out_shapes = jax.tree.unflatten(params["out_tree"], list(out_avals))
    flat = jax.tree.leaves(new_args)
    tangent = _bind(flat, new_args, params["fn"], (*params["chain"], step), out_shapes)
    # Integer outputs have no tangent: JAX's float0 zeros, symbolically.
    return out, [
        t if _inexact(d) else z for t, z, (_, d) in zip(tangent, zeros, out_avals, strict=True)
    ]


def _tangent_dtype(dtype: np.dtype) -> Any:
    return dtype if _inexact(dtype) else jax.dtypes.float0


def _transpose(cts: Sequence[Any], *flat: Any, **params: Any) -> list:
    """Reverse mode: the pullback of the linear arguments, one request."""
    fn, chain, in_tree = (params[k] for k in ("fn", "chain", "in_tree"))
    if all(type(c) is ad.Zero for c in cts):
        return [None] * len(flat)
    cts = [ad.instantiate_zeros(c) for c in cts]
    ct_tree = jax.tree.unflatten(params["out_tree"], cts)
    args = jax.tree.unflatten(in_tree, list(flat))
    undefined = jax.tree.unflatten(in_tree, [bool(ad.is_undefined_primal(x)) for x in flat])
    linear = [i for i, u in enumerate(undefined) if any(jax.tree.leaves(u))]
    last = chain[-1] if chain else None
    n = len(args) - len(linear)
    if (
        last is not None
        and last.op in ("jvp", "vjp")
        and not last.opts.get("value", True)
        and linear == list(range(n, len(args)))
        and len(linear) == (1 if last.op == "vjp" else len(last.opts["argnums"]))
    ):
        # transpose(jvp) = vjp and transpose(vjp) = jvp: one transform, not two.
        argnums = tuple(last.opts["argnums"])
        if last.op == "jvp":
            step = Transform.of("vjp", argnums=argnums, value=False)
            new_args = (*args[:n], ct_tree)
        else:
            step = Transform.of("jvp", argnums=argnums, value=False)
            new_args = (*args[:n], *ct_tree)
        base = chain[:-1]
    else:
        point = [jnp.zeros(*_aval(x)) if ad.is_undefined_primal(x) else x for x in flat]
        step = Transform.of("vjp", argnums=tuple(linear), value=False)
        new_args = (*jax.tree.unflatten(in_tree, point), ct_tree)
        base = chain
    # UndefinedPrimal is a pytree without children: walk leaf indices, not the leaves.
    index = jax.tree.unflatten(in_tree, list(range(len(flat))))
    wanted = [jax.tree.map(lambda j: _aval(flat[j]), index[i]) for i in linear]
    grads = _bind(jax.tree.leaves(new_args), new_args, fn, (*base, step), wanted)
    result: list[Any] = [None] * len(flat)
    positions = [j for i in linear for j in jax.tree.leaves(index[i])]
    for j, g in zip(positions, grads, strict=True):
        x = flat[j]
        if ad.is_undefined_primal(x) and _inexact(x.aval.dtype):
            result[j] = g
    return result


def _batch(args: Sequence[Any], dims: Sequence[Any], **params: Any) -> tuple:
    """Any batched argument: the chain plus a vmap with each leaf's axis, one request."""
    in_tree = params["in_tree"]
    size = next(x.shape[d] for x, d in zip(args, dims, strict=True) if d is not None)
    axes = [None if d is None else int(d) for d in dims]
    per_arg = [_collapse(a) for a in jax.tree.unflatten(in_tree, axes)]
    step = Transform.of("vmap", in_axes=tuple(per_arg), out_axes=0)
    out = [((size, *s), d) for s, d in params["out_avals"]]
    outs = remote_p.bind(
        *args, **{**params, "chain": (*params["chain"], step), "out_avals": tuple(out)}
    )
    return outs, [0] * len(outs)


def _collapse(axes: Any) -> Any:
    """One int/None for an argument whose leaves share it, else its tree (lists for tuples)."""
    leaves = jax.tree.leaves(axes, is_leaf=lambda x: x is None)
    if len(set(leaves)) == 1:
        return leaves[0]
    if isinstance(axes, dict):
        return {k: _collapse(v) for k, v in axes.items()}
    if isinstance(axes, (list, tuple)):
        return [_collapse(v) for v in axes]
    return axes


ad.primitive_jvps[remote_p] = _jvp
ad.primitive_transposes[remote_p] = _transpose
batching.primitive_batchers[remote_p] = _batch


# ---------------------------------------------------------------------------- as_jax


def _declared(spec: Any) -> Any:
    """An example output built from a fully declared spec; LookupError where anything is open."""
    if isinstance(spec, ArraySpec):
        if spec.shape is None or None in spec.shape or spec.dtype is None:
            raise LookupError
        return np.zeros(spec.shape, spec.dtype)
    if isinstance(spec, dict):
        return {k: _declared(v) for k, v in spec.items()}
    if isinstance(spec, (list, tuple)):
        return tuple(_declared(v) for v in spec)
    raise LookupError


def _signature(fun: RemoteFunction, in_tree: Any, in_avals: Avals) -> tuple[Any, Avals]:
    """(out_tree, out_avals): from the spec when it says everything, else by one probe."""
    try:
        if fun.chain:
            raise LookupError
        example = _declared(fun.info.output)
    except LookupError:
        zeros = [np.zeros(s, d) for s, d in in_avals]
        example = fun(*jax.tree.unflatten(in_tree, zeros))
    leaves, out_tree = jax.tree.flatten(example)
    return out_tree, tuple((np.shape(x), np.asarray(x).dtype) for x in leaves)


def as_jax(fun: RemoteFunction) -> Callable[..., Any]:
    """A remote function as a local JAX function, differentiable to any order.

    Args:
      fun: a remote function of a blocking `Client` (``client.model(name)``, or a transform).

    Returns:
      A function of the same arguments that works under every composition of ``jax.jit``,
      ``jax.grad``, ``jax.jvp``, ``jax.vjp``, ``jax.jacfwd``, ``jax.jacrev``, ``jax.hessian``
      and ``jax.vmap``, inside larger local programs. Each derivative is computed by the server
      as one `call` chain (``jax.hessian`` of it: ``[vjp, vmap, jvp, vmap]``), each ``vmap`` is
      one request, and under ``jax.jit`` only the requests the result needs are sent.

    >>> f = as_jax(client.model("tanh_sq_sum"))
    >>> jax.jit(jax.grad(lambda x: 2 * f(x) + jnp.sum(x)))(x)  # one request: the pullback
    >>> jax.hessian(f)(x)  # one request
    """
    if not isinstance(fun, RemoteFunction):
        raise TypeError(f"as_jax takes a remote function (client.model(name)), got {fun!r}")
    if not isinstance(fun._client, Client):
        raise TypeError("as_jax needs a remote function of a blocking Client, not AsyncClient")
    signatures: dict[tuple, tuple[Any, Avals]] = {}

    def wrapped(*args: Any) -> Any:
        flat, in_tree = jax.tree.flatten(args)
        flat = [jnp.asarray(x) for x in flat]
        in_avals = tuple(_aval(x) for x in flat)
        key = (in_tree, in_avals)
        if key not in signatures:
            signatures[key] = _signature(fun, in_tree, in_avals)
        out_tree, out_avals = signatures[key]
        outs = remote_p.bind(
            *flat, fn=fun, chain=(), in_tree=in_tree, out_tree=out_tree, out_avals=out_avals
        )
        return jax.tree.unflatten(out_tree, outs)

    wrapped.__name__ = f"as_jax_{fun.model}"
    wrapped.__doc__ = f"{fun!r} as a local JAX function."
    return wrapped

"""Remote models inside local JAX programs (needs the ``jax`` extra).

`as_jax(m)` wraps a remote function as a JAX primitive, so local `jax.jit`, `jax.grad`,
`jax.vjp`, `jax.jvp`, `jax.jacfwd`, `jax.jacrev` and `jax.vmap` work through it:

* abstract evaluation comes from the model's output spec (no request at trace time when the spec
  declares every shape and dtype; otherwise one probe per input signature, cached);
* its JVP rule asks the server for a `jvp`, whose transpose asks for a `vjp`, so reverse mode
  costs one remote pullback;
* its batching rules send one request per `vmap`: a batched `jvp`/`vjp`, or a `vmap` transform
  of the remote function when the primals themselves are batched.

Differentiating the remote part twice locally is refused: ask the server for second order
(`client.hessian`, `client.hvp`, `client.grad(client.grad(m))`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from client._client import Client
from client._remote import Pullback, Pushforward, RemoteFunction
from client.specs import ArraySpec
from client.transforms import vmap as remote_vmap

__all__ = ["as_jax"]

Avals = tuple[tuple[tuple[int, ...], np.dtype], ...]

# One primitive per kind of request. Their params are the same for all three:
#   fn        the RemoteFunction;   in_tree / out_tree  its argument / output structure
#   in_avals  its argument leaves;  out_avals           its output leaves
#   batch     None, or B when the linear inputs (tangents, cotangent) carry a leading batch axis
# call(*primals) -> outputs;  jvp(*primals, *tangents) -> output tangents;
# vjp(*primals, *cotangents) -> argument cotangents.  jvp and vjp are linear in their tails.
remote_call_p = Primitive("gradserve_call")
remote_jvp_p = Primitive("gradserve_jvp")
remote_vjp_p = Primitive("gradserve_vjp")
_KINDS = {"call": remote_call_p, "jvp": remote_jvp_p, "vjp": remote_vjp_p}


def _shaped(avals: Avals) -> list[Any]:
    return [jax.core.ShapedArray(shape, dtype) for shape, dtype in avals]


def _avals_of(xs: Sequence[Any]) -> Avals:
    return tuple((tuple(x.shape), np.dtype(x.dtype)) for x in xs)


def _with_batch(avals: Avals, size: int | None) -> Avals:
    return avals if size is None else tuple(((size, *s), d) for s, d in avals)


def _result_avals(kind: str, params: dict[str, Any]) -> Avals:
    avals = params["in_avals"] if kind == "vjp" else params["out_avals"]
    return avals if kind == "call" else _with_batch(avals, params["batch"])


def _inexact(dtype: Any) -> bool:
    return np.dtype(dtype).kind in "fc"


# ---------------------------------------------------------------------------- host side


def _host(kind: str, params: dict[str, Any]) -> Callable[..., list[np.ndarray]]:
    """The blocking request a primitive makes: flat numpy in, flat numpy out."""
    fn, in_tree, out_tree = params["fn"], params["in_tree"], params["out_tree"]
    n, batch = in_tree.num_leaves, params["batch"]
    result_avals = _result_avals(kind, params)

    def call(*flat: Any) -> list[np.ndarray]:
        flat = [np.asarray(x) for x in flat]
        args = tuple(jax.tree.unflatten(in_tree, flat[:n]))
        if kind == "call":
            out = fn(*args)
        elif kind == "jvp":
            tangents = jax.tree.unflatten(in_tree, flat[n:])
            out = Pushforward(fn, args, None if batch is None else 0)(*tangents)
        else:
            cotangent = jax.tree.unflatten(out_tree, flat[n:])
            out = Pullback(fn, args, None if batch is None else 0)(cotangent)
        leaves = jax.tree.leaves(out)
        return [np.asarray(x, d) for x, (_, d) in zip(leaves, result_avals, strict=True)]

    return call


# ---------------------------------------------------------------------------- rules


def _register(kind: str) -> None:
    p = _KINDS[kind]
    p.multiple_results = True

    def impl(*flat: Any, **params: Any) -> list:
        return [jnp.asarray(x) for x in _host(kind, params)(*flat)]

    def abstract(*flat: Any, **params: Any) -> list:
        return _shaped(_result_avals(kind, params))

    def lowered(*flat: Any, **params: Any) -> list:
        shapes = [jax.ShapeDtypeStruct(s, d) for s, d in _result_avals(kind, params)]
        return jax.pure_callback(_host(kind, params), shapes, *flat)

    p.def_impl(impl)
    p.def_abstract_eval(abstract)
    mlir.register_lowering(p, mlir.lower_fun(lowered, multiple_results=True))
    batching.primitive_batchers[p] = _batcher(kind)


def _tangent(primal: Any, t: Any) -> Any:
    # Integer primals have float0 tangents, which cannot cross the wire: send float32 zeros.
    if not _inexact(primal.dtype):
        return jnp.zeros(primal.shape, jnp.float32)
    return ad.instantiate_zeros(t)


def _call_jvp(primals: Sequence[Any], tangents: Sequence[Any], **params: Any) -> tuple:
    out = remote_call_p.bind(*primals, **params)
    dots = [_tangent(p, t) for p, t in zip(primals, tangents, strict=True)]
    return out, remote_jvp_p.bind(*primals, *dots, **params)


def _linear_jvp(p: Primitive, name: str) -> Callable:
    def rule(primals: Sequence[Any], tangents: Sequence[Any], **params: Any) -> tuple:
        n = params["in_tree"].num_leaves
        if all(type(t) is ad.Zero for t in tangents[:n]):  # only the vector moves: still linear
            dots = [ad.instantiate_zeros(t) for t in tangents[n:]]
            return p.bind(*primals, **params), p.bind(*primals[:n], *dots, **params)
        raise NotImplementedError(
            f"second-order local differentiation of remote {params['fn']!r} is not supported: "
            f"its {name} is computed on the server and has no local derivative. Ask the server "
            "for second order instead: client.hessian(m), client.hvp(m, primals, tangents) or "
            "client.grad(client.grad(m)), one request each."
        )

    return rule


def _transpose(other: Primitive) -> Callable:
    def rule(cts: Sequence[Any], *flat: Any, **params: Any) -> list:
        n = params["in_tree"].num_leaves
        outs = other.bind(*flat[:n], *[ad.instantiate_zeros(c) for c in cts], **params)
        return [None] * n + [
            o if ad.is_undefined_primal(x) and _inexact(x.aval.dtype) else None
            for o, x in zip(outs, flat[n:], strict=True)
        ]

    return rule


def _batcher(kind: str) -> Callable:
    """One request per vmap: a batched jvp/vjp when only the linear inputs are batched, else the
    remote function under a remote `vmap` with every argument batched."""
    p = _KINDS[kind]

    def rule(args: Sequence[Any], dims: Sequence[Any], **params: Any) -> tuple:
        n = params["in_tree"].num_leaves
        size = next(x.shape[d] for x, d in zip(args, dims, strict=True) if d is not None)
        args = [
            jnp.broadcast_to(x, (size, *x.shape)) if d is None else jnp.moveaxis(x, d, 0)
            for x, d in zip(args, dims, strict=True)
        ]
        if params["batch"] is not None:
            raise NotImplementedError(f"vmap of vmap through remote {params['fn']!r}")
        if kind != "call" and all(d is None for d in dims[:n]):
            primals = [jnp.take(x, 0, axis=0) for x in args[:n]]  # undo the broadcast above
            outs = p.bind(*primals, *args[n:], **{**params, "batch": size})
        else:
            fn = remote_vmap(params["fn"], in_axes=0)
            batched = {
                "fn": fn,
                "in_avals": _with_batch(params["in_avals"], size),
                "out_avals": _with_batch(params["out_avals"], size),
            }
            outs = p.bind(*args, **{**params, **batched})
        return outs, [0] * len(outs)

    return rule


for _kind in _KINDS:
    _register(_kind)
ad.primitive_jvps[remote_call_p] = _call_jvp
ad.primitive_jvps[remote_jvp_p] = _linear_jvp(remote_jvp_p, "jvp")
ad.primitive_jvps[remote_vjp_p] = _linear_jvp(remote_vjp_p, "vjp")
ad.primitive_transposes[remote_jvp_p] = _transpose(remote_vjp_p)
ad.primitive_transposes[remote_vjp_p] = _transpose(remote_jvp_p)


# ---------------------------------------------------------------------------- as_jax


def _declared(spec: Any) -> Any:
    """An example output built from a fully declared spec, or None where anything is open."""
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
    return out_tree, _avals_of([np.asarray(x) for x in leaves])


def as_jax(fun: RemoteFunction) -> Callable[..., Any]:
    """A remote function as a local JAX function: traceable by jit, grad, jvp, vjp and vmap.

    Args:
      fun: a remote function of a blocking `Client` (``client.model(name)``, or a transform).

    Returns:
      A function of the same arguments. Under ``jax.grad`` it costs the remote value and one
      remote ``vjp``; under ``jax.vmap`` one (batched) request; under ``jax.jit`` it runs as a
      host callback. Differentiating it twice locally raises ``NotImplementedError``.

    >>> f = as_jax(client.model("tanh_sq_sum"))
    >>> jax.jit(jax.grad(lambda x: 2 * f(x) + jnp.sum(x)))(x)
    """
    if not isinstance(fun, RemoteFunction):
        raise TypeError(f"as_jax takes a remote function (client.model(name)), got {fun!r}")
    if not isinstance(fun._client, Client):
        raise TypeError("as_jax needs a remote function of a blocking Client, not AsyncClient")
    signatures: dict[tuple, tuple[Any, Avals]] = {}

    def wrapped(*args: Any) -> Any:
        flat, in_tree = jax.tree.flatten(args)
        flat = [jnp.asarray(x) for x in flat]
        in_avals = _avals_of(flat)
        key = (in_tree, in_avals)
        if key not in signatures:
            signatures[key] = _signature(fun, in_tree, in_avals)
        out_tree, out_avals = signatures[key]
        params = {"fn": fun, "in_tree": in_tree, "out_tree": out_tree, "in_avals": in_avals}
        outs = remote_call_p.bind(*flat, **params, out_avals=out_avals, batch=None)
        return jax.tree.unflatten(out_tree, outs)

    wrapped.__name__ = f"as_jax_{fun.model}"
    wrapped.__doc__ = f"{fun!r} as a local JAX function."
    return wrapped

"""`as_jax`'s derivative sessions: the transpose of its JVP at a point, without a forward pass.

Eager JAX (no ``jax.jit``) differentiates in two separate steps. ``jax.vjp`` and ``jax.grad``
first run the primitive's JVP rule at concrete primals with tangents that are only traced (a
linearization), and later transpose the traced tangent. Statelessly each step is one request,
and the second (the chain plus ``vjp``) recomputes the forward pass on the server. Here the
first step opens a session instead (``linearize`` answers the value), kept on this side under
(function, chain, argnums, the primals' bytes); the transpose sees the same primals, finds it,
and sends only the cotangent (a batched one under ``jax.vmap``, as ``jax.jacrev`` makes).
``jax.linearize``'s pushforward, the same linearization applied forward, goes there too.

A session is a cache, so results never depend on it: on any error or miss (deleted, expired,
evicted, a restarted server) the stateless request runs instead. At most `CAPACITY` sessions
are kept, least recently used out first; dropping one deletes it on the server with the next
``linearize`` (`client._sessions`'s deferred deletion of collected sessions). Under
``jax.jit`` nothing here runs: the compiled program sends only the requests its result needs.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Any

import jax
import numpy as np
from jax.interpreters import partial_eval as pe

from client._core import Transform
from client._remote import RemoteFunction
from client._sessions import Session, _flush
from client.errors import APIError

CAPACITY = 4  # live sessions kept by this process (each holds residuals on the server)

_lock = threading.Lock()
_store: OrderedDict[tuple, Session] = OrderedDict()


def linearizing(primals: Any, tangents: Any) -> bool:
    """Whether a JVP rule runs eagerly inside a linearization (``jax.vjp``, ``jax.grad``):
    concrete primals, and tangents that are traced, to be transposed (or applied) later."""
    # Partial evaluation's tracers: not jax.jvp's concrete tangents, nor jacfwd's batched ones.
    return not any(isinstance(p, jax.core.Tracer) for p in primals) and any(
        isinstance(t, pe.JaxprTracer) for t in tangents
    )


def _key(fn: RemoteFunction, chain: tuple, argnums: tuple, primals: tuple) -> tuple:
    """The primals by content: the transpose gets equal arrays, not necessarily the same ones."""
    leaves, tree = jax.tree.flatten(primals)
    digest = hashlib.blake2b(digest_size=16)
    for x in leaves:
        a = np.asarray(x)
        digest.update(f"{a.dtype.name}{a.shape}".encode())  # names tell bfloat16 from float16
        digest.update(a.tobytes())  # any dtype (a memoryview refuses bfloat16)
    return (fn, chain, argnums, tree, digest.digest())


def open_session(fn: RemoteFunction, chain: tuple, primals: tuple, argnums: tuple) -> Any:
    """Linearize ``fn`` under `chain` at `primals` in `argnums`: its raw value, or None when
    no session could be opened (the caller then evaluates statelessly)."""
    full = RemoteFunction(fn._client, fn.model, (*fn.chain, *chain))
    core = fn._client._core

    def flow() -> Any:
        yield from _flush(core)  # dropped sessions are deleted now, before opening one
        info = yield from core.info(fn.model)
        session = Session(full, core.prepare_args(info, full.chain, primals), argnums)
        raw = yield from session.open()
        return session, raw

    try:
        session, raw = fn._client._run(flow())
    except APIError:  # a chain the server does not linearize, no sessions, too large: stateless
        return None
    key = _key(fn, chain, argnums, primals)
    with _lock:
        _store[key] = session
        while len(_store) > CAPACITY:
            _store.popitem(last=False)  # its finalizer queues the DELETE
    return raw


def serve(fn: RemoteFunction, chain: tuple, args: tuple) -> list | None:
    """The output leaves of a product through a session, when `chain` is a kept session's chain
    plus a value-less ``vjp`` (the transpose) or ``jvp`` (``jax.linearize``'s pushforward),
    maybe under a ``vmap`` of the (co)tangents alone, at the same primals; None when none
    applies or it missed, and the stateless request must run."""
    if not _store:
        return None
    step, axis = _product(chain)
    if step is None:
        return None
    base = chain[: -2 if axis is not None else -1]
    argnums = tuple(step.opts["argnums"])
    n = len(args) - (len(argnums) if step.op == "jvp" else 1)  # the primals come first
    key = _key(fn, base, argnums, tuple(args[:n]))
    with _lock:
        session = _store.get(key)
        if session is not None:
            _store.move_to_end(key)
    if session is None:
        return None
    extra = jax.tree.map(np.asarray, tuple(args[n:]))
    if axis is not None:
        extra = jax.tree.map(lambda x: np.moveaxis(x, axis, 0), extra)
    if step.op == "jvp":
        tangents: list[Any] = [None] * n  # one per primal; only those in argnums are read
        for k, t in zip(argnums, extra, strict=True):
            tangents[k] = t
        flow = session.apply("jvp", tangents, axis is not None)
    else:
        flow = session.apply("vjp", extra[0], axis is not None)
    try:
        result = fn._client._run(flow)
    except APIError:
        result = Session.MISS
    if result is Session.MISS:
        with _lock:
            _store.pop(key, None)
        return None
    if step.op == "jvp":
        return jax.tree.leaves(result)
    return jax.tree.leaves(tuple(result[i] for i in argnums))


def _product(chain: tuple) -> tuple[Transform | None, int | None]:
    """(the trailing value-less ``vjp`` or ``jvp``, the (co)tangents' batch axis when a ``vmap``
    of them alone follows it, else None); (None, None) for any other chain."""
    last, axis = (chain[-1] if chain else None), None
    if last is not None and last.op == "vmap" and len(chain) > 1:
        vmap, last = last, chain[-2]
        in_axes = vmap.opts["in_axes"]
        m = len(last.opts.get("argnums", ())) if last.op == "jvp" else 1
        mapped = set(in_axes[-m:]) if isinstance(in_axes, tuple) and m else set()
        if (
            vmap.opts.get("out_axes", 0) != 0
            or len(mapped) != 1
            or any(a is not None for a in in_axes[:-m])
        ):
            return None, None
        axis = mapped.pop()
        if not isinstance(axis, int):
            return None, None
    if last is None or last.op not in ("jvp", "vjp") or last.opts.get("value", True):
        return None, None
    return last, axis

"""Derivative sessions on the client: `vjp` and `linearize` keep the linearization on the server.

`vjp(f, *primals)` and `linearize(f, *primals)` open a session (`POST .../linearize`), and
their pullback or pushforward sends only (co)tangents to it, so the server skips the forward
pass. A session is a cache: the primals stay here too, and when the server answers
`session_not_found` (expired, evicted, restarted, another replica) the product is recomputed
statelessly from them, once, with no error for the user; the next call opens a new session.

Like everything in the client, these are flows (`client._core`), run by `Client` and
`AsyncClient` alike.
"""

from __future__ import annotations

import inspect
import secrets
import weakref
from typing import Any

import numpy as np

from client import _trees, wire
from client._core import Core, Flow, HTTPRequest
from client._remote import Pullback, Pushforward, RemoteFunction, _Bound, _moveaxis_tree
from client.errors import APIError, GradserveError

# Requests with the same value of this header go to the same replica under `gradserve serve
# --ray` (Ray Serve's consistent-hash routing): a session's linearize and its products send one.
AFFINITY_HEADER = "X-Session-ID"
# Codes after which the function works statelessly: the server keeps no session for it.
_NO_SESSION = ("session_too_large", "op_not_found")
_MISS = object()  # a product the session could not serve: recompute statelessly

# Per client: ids of sessions whose functions were garbage collected, deleted (best effort)
# when that client next opens or closes one (so a product stays one request). A finalizer must not send anything itself: it
# may run inside a request of the same thread, holding the connection pool's lock.
_collected: weakref.WeakKeyDictionary[Core, list[tuple[str, str]]] = weakref.WeakKeyDictionary()


def _garbage(core: Core) -> list[tuple[str, str]]:
    return _collected.setdefault(core, [])


def _forget(garbage: list[tuple[str, str]], box: list[str | None], affinity: str) -> None:
    if box[0] is not None:
        garbage.append((box[0], affinity))


def _flush(core: Core) -> Flow:
    """Delete the sessions of collected functions; failures are ignored (they expire anyway)."""
    garbage = _collected.get(core)
    while garbage:
        session_id, affinity = garbage.pop()
        headers = {**core.headers, AFFINITY_HEADER: affinity}
        try:
            yield HTTPRequest("DELETE", f"/v1/sessions/{session_id}", headers, None, core.timeout)
        except GradserveError:
            return


def _post(
    core: Core,
    path: str,
    arrays: dict[str, Any],
    fields: dict[str, Any],
    affinity: str,
    answer_guess: int,
) -> Flow:
    """POST a session request, JSON or npz as `core.post` would choose; the decoded document."""
    size = _trees.nbytes(arrays)
    encoding = answer = core.encoding
    if encoding == "auto":
        encoding = "npz" if size >= core.npz_threshold else "json"
        answer = "npz" if max(size, answer_guess) >= core.npz_threshold else "json"
    if encoding == "npz":
        content, media = wire.dump_npz({**wire.npz_ready(arrays), **fields}), wire.NPZ
    else:
        binary = encoding == "base64"
        body = {
            **wire.encode_tree(arrays, binary),
            **fields,
            **({"binary": True} if binary else {}),
        }
        content, media = wire.dumps(body), wire.JSON
    accept = wire.NPZ if answer == "npz" else wire.JSON
    headers = {**core.headers, "Content-Type": media, "Accept": accept, AFFINITY_HEADER: affinity}
    response = yield from core.exchange(HTTPRequest("POST", path, headers, content))
    kind = response.headers.get("content-type", wire.JSON).split(";")[0].strip()
    return wire.load_npz(response.content) if kind == wire.NPZ else wire.loads(response.content)


class Session:
    """The server session behind one bound function (and its `vmap`s): opened lazily again
    after a miss, closed by the context manager, deleted when the functions are collected.

    ``apply`` is the way in for other integrations (`client.jax.as_jax`, say): a flow giving
    the product's raw result, or `MISS` when the caller must recompute statelessly.
    """

    MISS = _MISS

    def __init__(self, fn: RemoteFunction, primals: tuple) -> None:
        self.fn, self.primals = fn, primals
        self.core: Core = fn._client._core
        inexact = [
            all(x.dtype.kind in "fc" for x in _trees.leaves(p)) for p in primals
        ]  # JAX gives integer arguments float0 tangents: they are not linearized
        self.argnums = tuple(i for i, ok in enumerate(inexact) if ok)
        self.active = bool(self.argnums)  # False: stateless from now on
        self._id: list[str | None] = [None]  # a box the finalizer reads when it runs
        self.affinity = secrets.token_urlsafe(12)  # one replica for all of its requests
        weakref.finalize(self, _forget, _garbage(self.core), self._id, self.affinity)

    @property
    def id(self) -> str | None:
        return self._id[0]

    def open(self) -> Flow:
        """Linearize at the primals; the session's value (raw, as decoded)."""
        fields: dict[str, Any] = {}
        if len(self.argnums) != len(self.primals):
            fields["argnums"] = list(self.argnums)
        if self.fn.chain:
            fields["transforms"] = [t.to_json() for t in self.fn.chain]
        doc = yield from _post(
            self.core,
            f"/v1/models/{self.fn.model}/linearize",
            {"args": list(self.primals)},
            fields,
            self.affinity,
            _trees.nbytes(self.primals),
        )
        self._id[0] = str(doc["session"]["id"])
        return wire.decode_tree(doc["value"])

    def apply(self, kind: str, extra: Any, batched: bool) -> Flow:
        """The session's `jvp` (extra: a tangent per primal) or `vjp` (extra: a cotangent),
        restored to JAX's structure; `MISS` when the session is gone."""
        core = self.core
        if not self.active:
            return _MISS
        if self.id is None:  # the last one was gone: open a new one
            try:
                yield from self.open()
            except APIError as e:
                if e.code not in _NO_SESSION:
                    raise
                self.active = False
                return _MISS
        if kind == "jvp":
            if len(extra) != len(self.primals):
                raise TypeError(
                    f"the pushforward takes one tangent per primal ({len(self.primals)}), "
                    f"got {len(extra)}"
                )
            specs = _trees.dtype_specs(self.primals)
            arrays = {"tangents": [_trees.prepare(extra[k], specs[k]) for k in self.argnums]}
        else:
            arrays = {"cotangent": _trees.prepare(extra)}
        leading = [x.shape[0] for x in _trees.leaves(arrays) if batched and x.ndim]
        batch = tuple(leading[:1])  # (B,) when batched
        # The answer's size, to choose its encoding: tangents like their inputs, cotangents
        # like the linearized primals.
        guess = (
            _trees.nbytes(arrays)
            if kind == "jvp"
            else int(np.prod(batch)) * _trees.nbytes([self.primals[k] for k in self.argnums])
        )
        try:
            path, fields = f"/v1/sessions/{self.id}/{kind}", {"batched": True} if batched else {}
            doc = yield from _post(core, path, arrays, fields, self.affinity, guess)
        except APIError as e:
            if e.code != "session_not_found":
                raise
            self._id[0] = None
            return _MISS
        info = yield from core.info(self.fn.model)
        template = core.template(info, self.fn.chain, kind, self.primals)[1]
        if kind == "jvp":
            return _trees.restore(wire.decode_tree(doc["tangent"]), template)
        given = iter(wire.decode_tree(doc["cotangents"]))
        full = [
            next(given) if k in self.argnums else _float0_stand_in(p, batch)
            for k, p in enumerate(self.primals)
        ]
        return _trees.restore(full, template)

    def close(self) -> Flow:
        """Delete the session now; later calls recompute statelessly."""
        session_id, self._id[0], self.active = self.id, None, False
        yield from _flush(self.core)
        if session_id is not None:
            try:
                headers = {**self.core.headers, AFFINITY_HEADER: self.affinity}
                path = f"/v1/sessions/{session_id}"
                yield from self.core.exchange(HTTPRequest("DELETE", path, headers))
            except APIError as e:
                if e.code != "session_not_found":
                    raise


def _float0_stand_in(primal: Any, batch: tuple[int, ...]) -> Any:
    """What the stateless vjp gives an integer argument: bool zeros (JAX's float0)."""
    return _trees.tree_map(lambda x: np.zeros(batch + x.shape, bool), primal)


def _nothing() -> Flow:
    return
    yield


class _SessionBound(_Bound):
    def __init__(
        self,
        fn: RemoteFunction,
        primals: tuple,
        in_axes: int | None = None,
        out_axes: int = 0,
        session: Session | None = None,
    ) -> None:
        super().__init__(fn, primals, in_axes, out_axes)
        self.session = session

    def batched(self, in_axes: Any, out_axes: Any) -> _Bound:
        mapped = super().batched(in_axes, out_axes)
        mapped.session = self.session  # type: ignore[attr-defined]
        return mapped

    def _flow(self, extra: Any) -> Flow:
        if self.session is not None:
            batched = self.in_axes is not None
            moved = _moveaxis_tree(extra, self.in_axes, 0) if batched else extra
            result = yield from self.session.apply(self.apply, moved, batched)
            if result is not _MISS:
                return _moveaxis_tree(result, 0, self.out_axes) if batched else result
        return (yield from super()._flow(extra))

    def close(self) -> Any:
        """Delete the server session now (with an `AsyncClient`: an awaitable)."""
        flow = self.session.close() if self.session is not None else _nothing()
        return self.fn._client._run(flow)


class SessionPullback(_SessionBound, Pullback):
    """``pullback(cotangent)``: one request carrying only the cotangent, to the session."""

    _name = "pullback"


class SessionPushforward(_SessionBound, Pushforward):
    """``f_jvp(*tangents)``: one request carrying only the tangents, to the session."""

    _name = "pushforward"


class Linearized(tuple):
    """``(value, function)``, as JAX returns it, that also closes the session as a context
    manager: ``with linearize(f, x) as (y, f_jvp):`` (``async with`` for an `AsyncClient`)."""

    def __enter__(self) -> Linearized:
        return self

    def __exit__(self, *exc: object) -> None:
        result = self[1].close()
        if inspect.isawaitable(result):
            result.close()  # type: ignore[attr-defined]
            raise TypeError("with an AsyncClient, use `async with await linearize(...)`")

    async def __aenter__(self) -> Linearized:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self[1].close()


def bind(fn: RemoteFunction, primals: tuple, kind: str) -> Any:
    """``vjp``/``linearize`` of a remote function: the value and a session-backed function."""
    cls = SessionPullback if kind == "vjp" else SessionPushforward

    def flow() -> Flow:
        core = fn._client._core
        yield from _flush(core)
        info = yield from core.info(fn.model)
        prepared = core.prepare_args(info, fn.chain, primals)
        session = Session(fn, prepared)
        if session.active:
            try:
                raw = yield from session.open()
            except APIError as e:
                if e.code not in _NO_SESSION:
                    raise
            else:
                value = _trees.restore(raw, core.template(info, fn.chain, "eval", prepared))
                return Linearized((value, cls(fn, prepared, session=session)))
        value = yield from core.compute(fn.model, fn.chain, "eval", prepared)
        return Linearized((value, cls(fn, prepared)))

    return fn._client._run(flow())

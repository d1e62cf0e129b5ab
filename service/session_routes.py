"""The sessions door (PROTOCOL.md v1.1, "Sessions"): linearize once, then products by id.

Thin like `service.routes`: it translates bodies into engine calls and answers back. A
`linearize` body is the `eval` body of the same chain plus `argnums` and `ttl_s`, so it goes
through the shared `prepare` (decoding, specs, depth); products are checked against the
session's own linearization and queued on the device that holds its residuals, through the
same queues, batching, deadlines, limits and metrics as every other op.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from client import wire
from client._trees import leaves, tree_map
from client.errors import InvalidInput
from client.specs import canonical_dtype, check_args
from service import auth, codec, limits
from service.calls import Call, check_batch, prepare
from service.engine import Outcome
from service.engine.linearization import (
    LinearizeCall,
    LinearizeProgram,
    ProductProgram,
    check_argnums,
)
from service.schemas import Argnums, Problem, Pytree, TransformSpec
from service.sessions import ANONYMOUS
from service.settings import Settings
from service.state import State

router = APIRouter(tags=["sessions"])


# ---------------------------------------------------------------------------- bodies


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LinearizeRequest(_Body):
    """Evaluate once and keep the linearization: `jax.linearize` of the chain-transformed model
    in the arguments `argnums` (default: all), held as a session."""

    args: list[Pytree] = Field(description="positional inputs, each a pytree")
    transforms: list[TransformSpec] = Field(
        default_factory=list, description="applied to the model first, innermost first"
    )
    argnums: Argnums | None = Field(None, description="arguments to linearize in (default all)")
    ttl_s: float | None = Field(None, gt=0, description="seconds unused before it expires")
    binary: bool = False


class SessionJvpRequest(_Body):
    """The linearization applied to tangents: no forward pass."""

    tangents: list[Pytree] = Field(description="one per linearized argument, in argnums order")
    batched: bool = False
    binary: bool = False


class SessionVjpRequest(_Body):
    """The transpose of the linearization applied to a cotangent: no forward pass."""

    cotangent: Pytree = Field(description="same tree as the output")
    batched: bool = False
    binary: bool = False


class SessionInfo(BaseModel):
    id: str
    model: str
    expires_in_s: float
    bytes: int


class LinearizeResponse(BaseModel):
    value: Pytree
    session: SessionInfo


class SessionJvpResponse(BaseModel):
    tangent: Pytree


class SessionVjpResponse(BaseModel):
    cotangents: list[Pytree] = Field(description="one per linearized argument")


def _validate(schema: type[_Body], doc: Any) -> Any:
    if not isinstance(doc, Mapping):
        raise InvalidInput("the request body must be a JSON object", code="invalid_request")
    try:
        return schema.model_validate(doc)
    except ValidationError as e:
        errors = [{"loc": list(err["loc"]), "msg": err["msg"]} for err in e.errors()]
        where = ".".join(str(p) for p in errors[0]["loc"]) or "body"
        raise InvalidInput(
            f"{where}: {errors[0]['msg']}", code="invalid_request", errors=errors
        ) from None


# ---------------------------------------------------------------------------- translation


def owner_of(request: Request) -> str:
    """Who a session belongs to: the key's digest, or one anonymous owner without keys.

    `service.auth` has checked the key before any route runs (and set the scopes) whenever
    keys are configured.
    """
    if "scopes" not in request.scope.get("state", {}):
        return ANONYMOUS
    key = request.headers.get("authorization", "").partition(" ")[2].strip()
    return auth.digest(key).hex()


def linearize_call(
    model: Any, doc: Any, settings: Settings, owner: str, ttl_for: Callable[[Any], float]
) -> Call:
    """A linearize body -> the engine call that opens the session (`ttl_for`: the store's cap)."""
    request = _validate(LinearizeRequest, doc)
    as_eval = {"args": request.args, "transforms": doc.get("transforms", [])}
    call = prepare(model, "eval", {**as_eval, "binary": request.binary}, settings)
    nums = check_argnums(model.name, request.argnums, call.args)
    return LinearizeCall(
        model,
        "linearize",
        LinearizeProgram(call.program, nums),
        call.args,
        None,
        call.binary,
        owner=owner,
        ttl_s=ttl_for(request.ttl_s),
    )


def product_call(session: Any, kind: str, doc: Any, settings: Settings) -> Call:
    """A product body -> the engine call running it on the session's residuals."""
    lin, model = session.linearization, session.model.name
    request = _validate(SessionJvpRequest if kind == "jvp" else SessionVjpRequest, doc)
    batched = request.batched
    default = np.float64 if settings.x64 else np.float32

    def decode(value: Any, spec: Any, loc: tuple) -> Any:
        return tree_map(
            lambda x: x.astype(canonical_dtype(x.dtype, settings.x64), copy=False),
            wire.decode_tree(value, spec, default_dtype=default, loc=loc),
        )

    if kind == "jvp":
        specs, field = lin.tangent_specs(batched), "tangents"
        given = [
            decode(v, specs[i] if i < len(specs) else None, (field, i))
            for i, v in enumerate(request.tangents)
        ]
        check_args(model, specs, given, what="tangent")
    else:
        spec, field = lin.cotangent_spec(batched), "cotangent"
        given = [decode(request.cotangent, spec, (field,))]
        check_args(model, [spec], given, what="cotangent")
    # Structure checked: the programs take the flat leaves, so a list sent for a tuple (JSON
    # has no tuples) shares the executable of the tuple.
    flat = tuple(jax.tree.leaves(given))
    check_batch(model, list(flat), field, batched)
    program = ProductProgram(lin, kind, batched)
    call = Call(session.model, program.apply, program, session.residuals, flat, request.binary)
    limits.check_batch(call, settings)  # the same B limit as a stateless batched product
    return call


# ---------------------------------------------------------------------------- serving


def _state(request: Request) -> State:
    state = request.app.state.gradserve
    state.raise_unless_ready()
    return state


async def _serve(
    request: Request,
    state: State,
    model: str,
    make_call: Callable[[Any], Call],
    device: Any = None,
) -> tuple[Call, Outcome, str, dict[str, float]]:
    """Read and decode the body, queue the call, await it: what `routes.compute` does."""
    received = time.perf_counter()
    settings = state.settings
    with state.engine.arriving(model):  # workers may wait for it to join their batch
        media = codec.request_media(request)
        answer_media = codec.response_media(request, media)
        body = await codec.read_body(request, settings)
        call = await codec.decoded(body, media, settings, make_call)
        request.app.state.shape_budget.admit(call)
        decoded = time.perf_counter()
        result = state.engine.submit(call, device=device)
    outcome = await result
    state.metrics.phases["decode"].observe(decoded - received)
    state.metrics.bytes_in.inc(len(body))
    return call, outcome, answer_media, {"decode": decoded - received}


async def _respond(
    state: State,
    outcome: Outcome,
    timings: dict[str, float],
    arrays: dict[str, Any],
    plain: dict[str, Any],
    media: str,
    binary: bool,
) -> Response:
    def encode() -> codec.Body:
        if media == wire.NPZ:
            return wire.dump_npz_parts({**wire.npz_ready(arrays), **plain})
        return [wire.dumps({**wire.encode_tree(arrays, binary), **plain})]

    started = time.perf_counter()
    inline = codec.encodes_inline(sum(x.nbytes for x in leaves(arrays)), media)
    content = encode() if inline else await run_in_threadpool(encode)
    encode_s = time.perf_counter() - started
    state.metrics.phases["encode"].observe(encode_s)
    timings = {**timings, **outcome.timings, "encode": encode_s}
    return codec.answer(content, media, timings, outcome, state)


_ERRORS = {s: {"model": Problem} for s in (400, 404, 406, 413, 415, 422, 429, 503, 504)}


def _body_doc(schema: type[BaseModel]) -> dict[str, Any]:
    """The request body for /docs: JSON (its schema) or npz. Its `$defs` (TransformSpec) are
    components the app publishes for the op routes already."""
    json_schema = schema.model_json_schema(ref_template="#/components/schemas/{model}")
    json_schema.pop("$defs", None)
    binary = {"schema": {"type": "string", "format": "binary"}}
    return {
        "requestBody": {
            "required": True,
            "content": {wire.JSON: {"schema": json_schema}, wire.NPZ: binary},
        }
    }


def _ok(schema: type[BaseModel]) -> dict[int | str, Any]:
    content = {wire.JSON: {}, wire.NPZ: {"schema": {"type": "string", "format": "binary"}}}
    return {200: {"model": schema, "content": content, "description": "JSON or npz"}, **_ERRORS}


@router.post(
    "/v1/models/{name}/linearize",
    response_class=Response,
    responses=_ok(LinearizeResponse),
    openapi_extra=_body_doc(LinearizeRequest),
    summary="open a session: evaluate once, keep the linearization",
)
async def linearize(name: str, request: Request) -> Response:
    """`{"value", "session": {"id", "expires_in_s", "bytes"}}`; the session's products skip
    the forward pass. 413 `session_too_large` (judged before computing) when its residuals
    pass the server's session memory."""
    state = _state(request)
    model = state.registry.get(name)
    request.scope["gradserve.labels"] = (name, "linearize")
    owner, store = owner_of(request), state.engine.sessions

    def make(doc: Any) -> Call:
        return linearize_call(model, doc, state.settings, owner, store.ttl_for)

    call, outcome, media, timings = await _serve(request, state, name, make)
    value, session = outcome.value
    info = session.describe(store.clock())
    return await _respond(
        state, outcome, timings, {"value": value}, {"session": info}, media, call.binary
    )


async def _product(session_id: str, kind: str, request: Request) -> Response:
    state = _state(request)
    request.scope["gradserve.labels"] = ("-", f"session_{kind}")
    session = state.engine.sessions.get(session_id, owner_of(request))  # renews its TTL
    name = session.model.name
    request.scope["gradserve.labels"] = (name, f"session_{kind}")

    def make(doc: Any) -> Call:
        return product_call(session, kind, doc, state.settings)

    call, outcome, media, timings = await _serve(request, state, name, make, session.device)
    field = {"tangent": outcome.value} if kind == "jvp" else {"cotangents": list(outcome.value)}
    return await _respond(state, outcome, timings, field, {}, media, call.binary)


@router.post(
    "/v1/sessions/{session_id}/jvp",
    response_class=Response,
    responses=_ok(SessionJvpResponse),
    openapi_extra=_body_doc(SessionJvpRequest),
    summary="a session's Jacobian-vector product (Hessian-vector after linearize of grad)",
)
async def session_jvp(session_id: str, request: Request) -> Response:
    """`{"tangent"}`: the linearization applied to `tangents`; renews the session's TTL."""
    return await _product(session_id, "jvp", request)


@router.post(
    "/v1/sessions/{session_id}/vjp",
    response_class=Response,
    responses=_ok(SessionVjpResponse),
    openapi_extra=_body_doc(SessionVjpRequest),
    summary="a session's vector-Jacobian product (the transpose, no forward pass)",
)
async def session_vjp(session_id: str, request: Request) -> Response:
    """`{"cotangents"}`: one per linearized argument; renews the session's TTL."""
    return await _product(session_id, "vjp", request)


@router.get(
    "/v1/sessions/{session_id}",
    response_model=SessionInfo,
    responses={404: {"model": Problem}},
    summary="a session's model, size and time left",
)
async def get_session(session_id: str, request: Request) -> dict[str, Any]:
    """`{"id", "model", "expires_in_s", "bytes"}`; does not renew the TTL."""
    request.scope["gradserve.labels"] = ("-", "session")
    store = _state(request).engine.sessions
    session = store.get(session_id, owner_of(request), renew=False)
    request.scope["gradserve.labels"] = (session.model.name, "session")
    return session.describe(store.clock())


@router.delete(
    "/v1/sessions/{session_id}",
    status_code=204,
    response_class=Response,
    responses={404: {"model": Problem}},
    summary="close a session and free its memory now",
)
async def delete_session(session_id: str, request: Request) -> Response:
    """204; the residuals are freed at once (or as the last product running on them ends)."""
    request.scope["gradserve.labels"] = ("-", "session")
    name = _state(request).engine.sessions.delete(session_id, owner_of(request))
    request.scope["gradserve.labels"] = (name, "session")
    return Response(status_code=204)

"""HTTP routes. Thin: decode the body, hand a `Call` to the engine, encode the answer."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from client import wire
from client._trees import leaves
from client.errors import ModelNotFound
from service import codec
from service.calls import prepare
from service.schemas import REQUESTS, RESPONSES, ModelInfo, ModelList, Problem
from service.state import State
from service.transforms import OPS, package

router = APIRouter()


def state_of(request: Request) -> State:
    return request.app.state.gradserve


@router.get("/healthz", tags=["health"])
async def healthz() -> dict[str, str]:
    """200 while the process serves."""
    return {"status": "ok"}


@router.get("/readyz", tags=["health"], responses={503: {"model": Problem}})
async def readyz(request: Request) -> dict[str, str]:
    """200 once every model is loaded and warmed; 503 before, and while draining."""
    state_of(request).raise_unless_ready()
    return {"status": "ready"}


@router.get("/metrics", tags=["health"], response_class=Response)
async def metrics(request: Request) -> Response:
    """Prometheus text format."""
    m = state_of(request).metrics
    return Response(m.render(), media_type=m.content_type)


@router.get("/v1/models", response_model=ModelList, tags=["models"])
async def list_models(request: Request) -> dict[str, Any]:
    """Every served model: name, version, description, device."""
    state = state_of(request)
    return {"models": [state.describe(m, full=False) for m in state.registry]}


@router.get(
    "/v1/models/{name}",
    response_model=ModelInfo,
    tags=["models"],
    responses={404: {"model": Problem}},
)
async def get_model(name: str, request: Request) -> dict[str, Any]:
    """One model, with its input specs (`null` in a shape: any size), output spec and ops."""
    state = state_of(request)
    return state.describe(state.registry.get(name), full=True)


async def compute(request: Request, name: str, op: str) -> Response:
    received = time.perf_counter()
    state = state_of(request)
    state.raise_unless_ready()
    model = state.registry.get(name)
    request.scope["gradserve.labels"] = (name, op)
    settings = state.settings
    # While this request is read and decoded, a worker holding others of its model may wait
    # for it to join their batch.
    with state.engine.arriving(name):
        media = codec.request_media(request)
        answer_media = codec.response_media(request, media)
        body = await codec.read_body(request, settings)
        call = await codec.decoded(
            body, media, settings, lambda doc: prepare(model, op, doc, settings)
        )
        request.app.state.shape_budget.admit(call)  # 429 before a compile storm reaches a device
        decoded = time.perf_counter()
        result = state.engine.submit(call)
    outcome = await result
    request.scope["gradserve.batch"] = outcome.batch_size  # the pages' live figures
    fields = package(call.op, call.program, outcome.value)
    encode_start = time.perf_counter()
    result_bytes = _result_bytes(outcome.value)
    inline = codec.encodes_inline(result_bytes, answer_media)
    offload = bool(settings.json_offload_bytes) and result_bytes >= settings.json_offload_bytes
    encode = codec.encode_body
    content = (
        encode(fields, answer_media, call.binary)
        if inline
        else await run_in_threadpool(encode, fields, answer_media, call.binary, offload)
    )
    decode_s, encode_s = decoded - received, time.perf_counter() - encode_start
    metrics = state.metrics
    metrics.phases["decode"].observe(decode_s)
    metrics.phases["encode"].observe(encode_s)
    metrics.bytes_in.inc(len(body))
    timings = {"decode": decode_s, **outcome.timings, "encode": encode_s}
    return codec.answer(content, answer_media, timings, outcome, state)


def _result_bytes(tree: Any) -> int:
    return sum(x.nbytes for x in leaves(tree))


_BODY_CONTENT = {wire.NPZ: {"schema": {"type": "string", "format": "binary"}}}


def _add_op_route(op: str) -> None:
    request_model = REQUESTS[op]

    async def endpoint(name: str, request: Request) -> Response:
        return await compute(request, name, op)

    endpoint.__name__ = f"op_{op}"
    router.add_api_route(
        f"/v1/models/{{name}}/{op}",
        endpoint,
        methods=["POST"],
        tags=["ops"],
        summary=f"{op} of a model",
        description=(request_model.__doc__ or "")
        + "\n\nBody: JSON, or npz with a `__json__` member (PROTOCOL.md).",
        response_class=Response,
        responses={
            200: {
                "model": RESPONSES[op],
                "content": {wire.JSON: {}, **_BODY_CONTENT},
                "description": "The result; JSON or npz following Accept",
            },
            **{
                status: {"model": Problem}
                for status in (400, 404, 406, 413, 415, 422, 429, 503, 504)
            },
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    wire.JSON: {
                        "schema": {"$ref": f"#/components/schemas/{request_model.__name__}"}
                    },
                    **_BODY_CONTENT,
                },
            }
        },
    )


for _op in OPS:
    _add_op_route(_op)


@router.post("/v1/models/{name}/{op}", include_in_schema=False)
async def unknown_op(name: str, op: str, request: Request) -> Response:
    state_of(request).registry.get(name)
    raise ModelNotFound(f"no op {op!r}; ops are {', '.join(OPS)}", code="op_not_found")

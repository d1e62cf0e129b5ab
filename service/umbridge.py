"""UM-Bridge 1.0 at the root paths: the UQ community's clients and samplers reach the registry.

A thin translator. Each UM-Bridge call becomes a native request document (`eval`, `vjp` or
`jvp`, with the model's `config`) that goes through the same `prepare -> engine -> package` path
as `/v1`, so limits, batching, deadlines, errors and metrics apply alike; the answer is then
cut back into UM-Bridge's float64 vectors (`service/umbridge_layout.py` holds the mapping).

Protocol details that matter to its clients:
- a body is read as JSON whatever its Content-Type (UM-Bridge clients often send none);
- errors are `{"error": {"type", "message"}}` (service/errors.py): ModelNotFound,
  UnsupportedFeature and InvalidInput with 400, checked in an order that never indexes out of
  range; gradserve's own refusals (413, 429, 503, 504) keep their status;
- non-finite numbers travel as `NaN`, `Infinity`, `-Infinity` (what Python's `json` writes and
  reads), both ways;
- shared memory (`/TestShMem`, `*ShMem`) is refused without touching `/dev/shm`, so clients
  fall back to HTTP.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from client import wire
from client.errors import InvalidInput, ModelNotFound
from service import codec, limits
from service.calls import Call, prepare
from service.errors import UMBRIDGE_OPS
from service.registry import Model
from service.settings import Settings
from service.state import State
from service.transforms import package
from service.umbridge_layout import Catalog, Layout, as_document

PROTOCOL_VERSION = 1.0

router = APIRouter(include_in_schema=False)  # UM-Bridge documents its own protocol

# JSON bodies above codec.INLINE_JSON_BYTES are parsed and encoded on a worker thread.


def install(app: FastAPI, settings: Settings) -> None:
    """Serve UM-Bridge on `app` (the layouts are built on first use, off the event loop)."""
    app.state.umbridge = Catalog(settings.x64)
    app.include_router(router)


def _state(request: Request) -> State:
    return request.app.state.gradserve


def _catalog(request: Request) -> Catalog:
    return request.app.state.umbridge


def _unsupported(message: str) -> InvalidInput:
    return InvalidInput(message, code="unsupported_feature", status=400)


# ---------------------------------------------------------------------------- reading


async def _document(request: Request, settings: Settings) -> tuple[dict[str, Any], int]:
    """The body as a JSON object, whatever its Content-Type, and its size; limits as on /v1."""
    body = await codec.read_body(request, settings)
    _state(request).metrics.bytes_in.inc(len(body))

    def parse() -> Any:
        limits.scan_json(
            body, max_depth=settings.max_json_depth, max_elements=settings.max_json_elements
        )
        try:
            return wire.loads(body)
        except InvalidInput:
            pass
        try:  # Python's json (so UM-Bridge's Python client) writes NaN and Infinity bare
            return json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise InvalidInput(f"malformed JSON: {e}", code="invalid_json", status=400) from None

    doc = parse() if len(body) < codec.INLINE_JSON_BYTES else await run_in_threadpool(parse)
    if not isinstance(doc, dict):
        raise InvalidInput("the request body must be a JSON object", code="invalid_request")
    return doc, len(body)


def _model(state: State, doc: dict[str, Any]) -> Model:
    name = doc.get("name")
    if not isinstance(name, str):
        raise InvalidInput(
            f"the request needs 'name', a model name (a string); got {_show(name)}",
            code="invalid_request",
        )
    try:
        return state.registry.get(name)
    except ModelNotFound:
        raise ModelNotFound(
            f"no model named {_show(name)}; GET /Info lists the models served over UM-Bridge",
            code="model_not_found",
        ) from None


async def _layout(request: Request, model: Model, config: Any) -> Layout:
    """The model's layout at the request's `config` (checked first)."""
    resolved = model.spec.resolve_config(config)
    catalog = _catalog(request)
    found = catalog.cached(model, resolved)
    if found is None:
        found = await run_in_threadpool(catalog.layout, model, resolved)
    if isinstance(found, str):
        raise ModelNotFound(
            f"'{model.name}' is served on /v1 but not over UM-Bridge, which needs input and "
            f"output sizes known in advance: {found}",
            code="model_not_found",
        )
    return found


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:40] + "..."


def _index(doc: dict[str, Any], key: str, count: int, what: str, model: str) -> int:
    value = doc.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidInput(
            f"'{key}' must be the index of one of the model's {what}s, got {_show(value)}"
        )
    if not 0 <= value < count:
        raise InvalidInput(
            f"{key} {value} is out of range: '{model}' has {count} {what}(s), so {key} must be "
            f"from 0 to {count - 1}"
        )
    return value


def _vector(value: Any, what: str) -> np.ndarray:
    """A list of numbers -> float64; anything else is an `InvalidInput` naming `what`."""
    if isinstance(value, list):
        try:
            array = np.asarray(value) if value else np.zeros(0)
        except (ValueError, TypeError):  # ragged nesting
            array = np.zeros((0, 0))
        if array.ndim == 1 and array.dtype.kind in "if":
            return array.astype(np.float64)
    raise InvalidInput(f"{what} must be a list of numbers, got {_show(value)}")


def _sized(value: Any, size: int, what: str, model: str) -> np.ndarray:
    vector = _vector(value, what)
    if vector.size != size:
        raise InvalidInput(f"{what} of '{model}' must have length {size}, got {vector.size}")
    return vector


def _inputs(doc: dict[str, Any], layout: Layout, model: str) -> list[np.ndarray]:
    given = doc.get("input")
    if not isinstance(given, list):
        raise InvalidInput(f"'input' must be a list of input vectors, got {_show(given)}")
    if len(given) != len(layout.inputs):
        raise InvalidInput(f"'{model}' takes {len(layout.inputs)} input(s), got {len(given)}")
    return [
        _sized(values, size, f"input {i}", model)
        for i, (values, size) in enumerate(zip(given, layout.input_sizes, strict=True))
    ]


# ---------------------------------------------------------------------------- answering


def _answer(fields: dict[str, Any]) -> bytes:
    """JSON, with non-finite numbers as NaN/Infinity tokens (orjson would write null)."""
    if _finite(fields):
        return wire.dumps(fields)
    return json.dumps(_plain(fields), separators=(",", ":")).encode()


def _finite(value: Any) -> bool:
    if isinstance(value, np.ndarray):
        return bool(np.isfinite(value).all())
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    return True


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _json(fields: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    return Response(_answer(fields), media_type="application/json", headers=headers)


# ---------------------------------------------------------------------------- metadata


@router.get("/Info")
async def info(request: Request) -> Response:
    """The protocol version and the models UM-Bridge can reach."""
    models = list(_state(request).registry)
    names = await run_in_threadpool(_catalog(request).listed, models)
    return _json({"protocolVersion": PROTOCOL_VERSION, "models": names})


@router.post("/ModelInfo")
async def model_info(request: Request) -> Response:
    state = _state(request)
    doc, _ = await _document(request, state.settings)
    model = _model(state, doc)
    layout = await _layout(request, model, doc.get("config"))
    return _json({"support": layout.support()})


@router.post("/InputSizes")
async def input_sizes(request: Request) -> Response:
    state = _state(request)
    doc, _ = await _document(request, state.settings)
    layout = await _layout(request, _model(state, doc), doc.get("config"))
    return _json({"inputSizes": layout.input_sizes})


@router.post("/OutputSizes")
async def output_sizes(request: Request) -> Response:
    state = _state(request)
    doc, _ = await _document(request, state.settings)
    layout = await _layout(request, _model(state, doc), doc.get("config"))
    return _json({"outputSizes": layout.output_sizes})


# ---------------------------------------------------------------------------- computing

# Each UM-Bridge op: (native op, request document builder, answer extractor). Builders run the
# op's own checks in UM-Bridge's order: inputs, then each index before anything it indexes.
Builder = Callable[[dict[str, Any], Layout, list[Any], str], tuple[dict[str, Any], Any]]


def _evaluate(doc: dict, layout: Layout, args: list, name: str) -> tuple[dict, Any]:
    return {"args": args}, None


def _gradient(doc: dict, layout: Layout, args: list, name: str) -> tuple[dict, Any]:
    out_wrt = _index(doc, "outWrt", len(layout.outputs), "output", name)
    in_wrt = _index(doc, "inWrt", len(layout.inputs), "input", name)
    sens = _sized(doc.get("sens"), layout.output_sizes[out_wrt], "sens", name)
    return {"args": args, "cotangent": layout.cotangent(out_wrt, sens)}, in_wrt


def _apply_jacobian(doc: dict, layout: Layout, args: list, name: str) -> tuple[dict, Any]:
    out_wrt = _index(doc, "outWrt", len(layout.outputs), "output", name)
    in_wrt = _index(doc, "inWrt", len(layout.inputs), "input", name)
    vec = _sized(doc.get("vec"), layout.input_sizes[in_wrt], "vec", name)
    return {"args": args, "tangents": layout.tangents(in_wrt, vec)}, out_wrt


def _apply_hessian(doc: dict, layout: Layout, args: list, name: str) -> tuple[dict, Any]:
    # The jvp of a pullback: the cotangent of input inWrt1 for `sens` on output outWrt,
    # differentiated along `vec` on input inWrt2 (sum_k sens_k d2 f_k / dx1 dx2 . vec).
    out_wrt = _index(doc, "outWrt", len(layout.outputs), "output", name)
    in_wrt1 = _index(doc, "inWrt1", len(layout.inputs), "input", name)
    in_wrt2 = _index(doc, "inWrt2", len(layout.inputs), "input", name)
    sens = _sized(doc.get("sens"), layout.output_sizes[out_wrt], "sens", name)
    vec = _sized(doc.get("vec"), layout.input_sizes[in_wrt2], "vec", name)
    tangent = as_document(layout.inputs[in_wrt2].unflatten(vec, "vec"))
    transforms = [
        {"op": "vjp", "argnums": in_wrt1, "value": False},
        {"op": "jvp", "argnums": in_wrt2, "value": False},
    ]
    native = {"args": [*args, layout.cotangent(out_wrt, sens), tangent], "transforms": transforms}
    return native, in_wrt1


def _output_of(op: str, fields: dict[str, Any], layout: Layout, pick: Any) -> Any:
    if op == "Evaluate":
        return [
            layout.outputs[i].flatten(v) for i, v in enumerate(layout.split_output(fields["value"]))
        ]
    if op == "Gradient":
        return layout.inputs[pick].flatten(fields["cotangents"][pick])
    if op == "ApplyHessian":
        return layout.inputs[pick].flatten(fields["value"])
    return layout.outputs[pick].flatten(layout.split_output(fields["tangent"])[pick])


_OPS: dict[str, tuple[str, Builder]] = {
    "Evaluate": ("eval", _evaluate),
    "Gradient": ("vjp", _gradient),
    "ApplyJacobian": ("jvp", _apply_jacobian),
    "ApplyHessian": ("call", _apply_hessian),
}


async def _compute(request: Request, op: str) -> Response:
    received = time.perf_counter()
    state = _state(request)
    state.raise_unless_ready()
    settings = state.settings
    doc, size = await _document(request, settings)
    model = _model(state, doc)
    request.scope["gradserve.labels"] = (model.name, op)
    config = doc.get("config")
    layout = await _layout(request, model, config)
    if not layout.support()[op]:
        raise _unsupported(
            f"{op} is not supported by '{model.name}': derivatives need real floating-point "
            "inputs and outputs (complex and integer ones are served for Evaluate only)"
        )
    native_op, build = _OPS[op]

    def translate() -> tuple[Call, Any]:
        args = layout.arguments(_inputs(doc, layout, model.name))
        native, pick = build(doc, layout, args, model.name)
        if config is not None:
            native["config"] = config
        return prepare(model, native_op, native, settings), pick

    # As on /v1: while this request is decoded, a worker holding others of its model may wait
    # for it to join their batch.
    with state.engine.arriving(model.name):
        call, pick = (
            translate() if size < codec.INLINE_JSON_BYTES else await run_in_threadpool(translate)
        )
        request.app.state.shape_budget.admit(call)
        decoded = time.perf_counter()
        result = state.engine.submit(call)
    outcome = await result
    encode_start = time.perf_counter()

    def encode() -> bytes:
        fields = package(call.op, call.program, outcome.value)
        return _answer({"output": _output_of(op, fields, layout, pick)})

    big = 24 * sum(layout.output_sizes) >= codec.INLINE_JSON_BYTES  # ~24 bytes a float64 in JSON
    content = await run_in_threadpool(encode) if big else encode()
    metrics = state.metrics
    decode_s, encode_s = decoded - received, time.perf_counter() - encode_start
    metrics.phases["decode"].observe(decode_s)
    metrics.phases["encode"].observe(encode_s)
    timings = {"decode": decode_s, **outcome.timings, "encode": encode_s}
    return codec.answer([content], "application/json", timings, outcome, state)


def _add_op_route(op: str) -> None:
    async def endpoint(request: Request) -> Response:
        return await _compute(request, op)

    async def shared_memory(request: Request) -> Response:
        raise _unsupported(
            f"{op}ShMem: this server does not use shared memory; send the request over HTTP "
            f"to /{op}"
        )

    endpoint.__name__, shared_memory.__name__ = f"umbridge_{op}", f"umbridge_{op}_shmem"
    if op in _OPS:
        router.add_api_route(f"/{op}", endpoint, methods=["POST"])
    router.add_api_route(f"/{op}ShMem", shared_memory, methods=["POST"])


for _op in UMBRIDGE_OPS:
    _add_op_route(_op)


@router.post("/TestShMem")
async def test_shared_memory(request: Request) -> Response:
    """UM-Bridge clients probe shared memory here; refusing makes them use HTTP."""
    raise _unsupported("this server does not use shared memory; use HTTP")

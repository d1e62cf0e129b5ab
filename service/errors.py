"""problem+json (RFC 9457) for every error the server answers with, and UM-Bridge's own
`{"error": {"type", "message"}}` on UM-Bridge's paths.

Errors are the shared `client.errors` classes, so a `code` means the same on both sides; the
path a request came through picks the format, so each front door raises the same errors.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Collection
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from client.errors import APIError, ServerError, error_class
from client.wire import PROBLEM_JSON, dumps
from service.schemas import Problem

log = logging.getLogger("gradserve")

_CODE_BY_STATUS = {404: "not_found", 405: "method_not_allowed"}

# Details may quote model code or JAX, which name source files: no server path goes out.
_PATH = re.compile(r"(?<![\w.:/])/(?!v1/)(?:[\w.@+-]+/)+[\w.@+-]*")


def public(text: str) -> str:
    """`text` with absolute file paths masked."""
    return _PATH.sub("<path>", text)


def _title(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def problem_response(error: APIError, request_id: str | None) -> Response:
    body: dict[str, Any] = {
        "type": "about:blank",
        "title": _title(error.status),
        "status": error.status,
        "detail": public(error.detail),
        "code": error.code,
        "request_id": request_id,
    }
    if error.errors:
        body["errors"] = [
            {**e, "msg": public(e["msg"])} if isinstance(e.get("msg"), str) else e
            for e in error.errors
        ]
    headers = {k: v for k, v in error.headers.items() if k.lower() != "content-type"}
    return Response(dumps(body), error.status, headers=headers, media_type=PROBLEM_JSON)


# UM-Bridge 1.0's paths (service/umbridge.py); errors on them use its format.
UMBRIDGE_OPS = ("Evaluate", "Gradient", "ApplyJacobian", "ApplyHessian")
UMBRIDGE_PATHS = frozenset(
    {"/Info", "/ModelInfo", "/InputSizes", "/OutputSizes", "/TestShMem"}
    | {f"/{op}" for op in UMBRIDGE_OPS}
    | {f"/{op}ShMem" for op in UMBRIDGE_OPS}
)
# UM-Bridge's error types are ModelNotFound, UnsupportedFeature and InvalidInput (all 400);
# gradserve's other refusals keep their status and get a type of the same style.
_UMBRIDGE_TYPE_BY_CODE = {
    "model_not_found": "ModelNotFound",
    "unsupported_feature": "UnsupportedFeature",
    "model_error": "ModelError",
    "invalid_transform": "ModelError",
}
_UMBRIDGE_TYPE_BY_STATUS = {
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    406: "NotAcceptable",
    413: "PayloadTooLarge",
    415: "UnsupportedMediaType",
    429: "ServerBusy",
    503: "ServerBusy",
    504: "DeadlineExceeded",
}


def umbridge_response(error: APIError, request_id: str | None) -> Response:
    """`error` in UM-Bridge's format: exactly `type` and `message` (its conformity schemas
    forbid other keys). Input errors (gradserve's 400 and 422) are `InvalidInput` with 400."""
    kind = _UMBRIDGE_TYPE_BY_CODE.get(error.code)
    status = error.status
    if kind is not None or status in (400, 422):
        kind, status = kind or "InvalidInput", 400
    else:
        fallback = "InvalidInput" if status < 500 else "InternalError"
        kind = _UMBRIDGE_TYPE_BY_STATUS.get(status, fallback)
    message = public(error.detail)
    if status >= 500 and kind == "InternalError":
        message = f"internal error; quote request id {request_id} when reporting it"
    headers = {k: v for k, v in error.headers.items() if k.lower() != "content-type"}
    body = {"error": {"type": kind, "message": message}}
    return Response(dumps(body), status, headers=headers, media_type="application/json")


def render(error: APIError, request_id: str | None, path: str) -> Response:
    """The error response in the format of the door `path` belongs to."""
    if path in UMBRIDGE_PATHS:
        return umbridge_response(error, request_id)
    return problem_response(error, request_id)


def internal_error(request_id: str | None) -> Response:
    """A bug: the client gets the request id to report and nothing of the server's internals."""
    return problem_response(
        ServerError(f"internal error; quote request id {request_id} when reporting it"),
        request_id,
    )


def request_id_of(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


def install(app: FastAPI) -> None:
    """Route every raised error through `problem_response`."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> Response:
        return render(exc, request_id_of(request), request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        cls = error_class(exc.status_code)
        code = _CODE_BY_STATUS.get(exc.status_code, cls.code_default)
        error = cls(str(exc.detail), code=code, status=exc.status_code, headers=exc.headers)
        return render(error, request_id_of(request), request.url.path)


def document(schema: dict[str, Any], open_paths: Collection[str]) -> None:
    """Make an OpenAPI schema say what the server does: every error status is answered as
    application/problem+json, and 401/403 can come from any path that needs a key."""
    problem = {"$ref": "#/components/schemas/Problem"}
    schemas = schema.setdefault("components", {}).setdefault("schemas", {})
    schemas.setdefault("Problem", Problem.model_json_schema())
    for path, operations in schema.get("paths", {}).items():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            if path not in open_paths:
                responses.setdefault("401", {"description": "No API key, or a wrong one"})
                responses.setdefault("403", {"description": "The key lacks the scope"})
            for status, response in responses.items():
                if status.isdigit() and int(status) >= 400:
                    response["content"] = {PROBLEM_JSON: {"schema": problem}}
    for unused in ("HTTPValidationError", "ValidationError"):  # FastAPI's, never sent
        schemas.pop(unused, None)

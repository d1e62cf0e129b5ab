"""The exception tree shared by the client and the server.

The server raises these and turns them into problem+json; the client turns problem+json back
into the same classes. One vocabulary, so a `code` means the same thing on both sides::

    GradserveError
    ├── TransportError            the request never got an HTTP answer
    │   ├── ConnectError
    │   └── Timeout
    └── APIError                  the server answered with an error status
        ├── InvalidInput          400 / 422: the request is wrong for this model
        ├── ModelNotFound         404
        ├── NotAcceptable         406 / 415
        ├── PayloadTooLarge       413
        ├── Unauthorized          401 / 403
        ├── ServerBusy            429 / 503 (`retry_after` in seconds)
        ├── DeadlineExceeded      504
        └── ServerError           500 and other 5xx
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar


class GradserveError(Exception):
    """Base of every error this package raises."""


class TransportError(GradserveError):
    """No HTTP answer came back: the connection failed or the time ran out."""


class ConnectError(TransportError):
    """The server could not be reached (after the configured retries)."""


class Timeout(TransportError):
    """The request did not complete within the client's timeout."""


class APIError(GradserveError):
    """The server answered with an error: `status`, a stable `code` and its `detail`."""

    status_default: ClassVar[int] = 500
    code_default: ClassVar[str] = "error"
    title: ClassVar[str] = "Error"

    def __init__(
        self,
        detail: str,
        *,
        code: str | None = None,
        status: int | None = None,
        request_id: str | None = None,
        loc: Sequence[Any] | None = None,
        errors: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.code = code or self.code_default
        self.status = status or self.status_default
        self.request_id = request_id
        if errors is None and loc is not None:
            errors = [{"loc": list(loc), "msg": detail}]
        self.errors = errors
        self.headers = headers or {}

    def __str__(self) -> str:
        return self.detail

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status={self.status}, code={self.code!r}, detail={self.detail!r})"


class InvalidInput(APIError):
    """Malformed (400) or well-formed but wrong for this model (422)."""

    status_default, code_default, title = 422, "invalid_input", "Invalid input"


class ModelNotFound(APIError):
    status_default, code_default, title = 404, "model_not_found", "Not found"


class NotAcceptable(APIError):
    status_default, code_default, title = 406, "not_acceptable", "Not acceptable"


class PayloadTooLarge(APIError):
    status_default, code_default, title = 413, "payload_too_large", "Payload too large"


class Unauthorized(APIError):
    status_default, code_default, title = 401, "unauthorized", "Unauthorized"


class ServerBusy(APIError):
    """The server cannot take the request now; `retry_after` says when to try again."""

    status_default, code_default, title = 429, "queue_full", "Too many requests"

    @property
    def retry_after(self) -> float | None:
        value = self.headers.get("retry-after") or self.headers.get("Retry-After")
        try:
            return float(value) if value is not None else None
        except ValueError:
            return None


class DeadlineExceeded(APIError):
    status_default, code_default, title = 504, "deadline_exceeded", "Gateway timeout"


class ServerError(APIError):
    status_default, code_default, title = 500, "internal_error", "Internal server error"


_BY_STATUS: dict[int, type[APIError]] = {
    400: InvalidInput,
    401: Unauthorized,
    403: Unauthorized,
    404: ModelNotFound,
    406: NotAcceptable,
    413: PayloadTooLarge,
    415: NotAcceptable,
    422: InvalidInput,
    429: ServerBusy,
    503: ServerBusy,
    504: DeadlineExceeded,
}


def error_class(status: int) -> type[APIError]:
    """The exception class for an HTTP error status."""
    if status in _BY_STATUS:
        return _BY_STATUS[status]
    return ServerError if status >= 500 else InvalidInput if status >= 400 else APIError

"""HTTP bodies <-> documents: content negotiation, size-limited reading, JSON and npz.

The formats themselves live in `client.wire`; this module only chooses and applies them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import Request, Response
from starlette.concurrency import run_in_threadpool
from starlette.types import Receive, Scope, Send

from client import _zip, wire
from client.errors import InvalidInput, NotAcceptable, PayloadTooLarge
from service import limits
from service.json_offload import JSONOffload, offloadable
from service.settings import Settings

if TYPE_CHECKING:
    from service.engine import Outcome
    from service.state import State

T = TypeVar("T")

MEDIA_TYPES = (wire.JSON, wire.NPZ)
# Below these sizes coding a body costs less than the thread hop that would keep it off the
# event loop: JSON is parsed and printed at ~100-300 MB/s, while a stored npz body is decoded
# as views (work per member, not per byte) and an npz answer costs one CRC pass (~20 GB/s).
INLINE_JSON_BYTES = 64 * 1024
INLINE_NPZ_BYTES = 16 * 2**20
INLINE_NPZ_MEMBERS = 64
# Two helper processes: two large JSON bodies at once still never wait on each other's parse.
_offload = JSONOffload(processes=2)


def _media(value: str) -> str:
    return value.split(";", 1)[0].strip().lower()


def request_media(request: Request) -> str:
    """The body's encoding; 415 unless JSON or npz (a missing Content-Type means JSON)."""
    media = _media(request.headers.get("content-type", wire.JSON))
    if media not in MEDIA_TYPES:
        raise NotAcceptable(
            f"Content-Type {media!r} is not supported; send {wire.JSON} or {wire.NPZ}",
            code="unsupported_media_type",
            status=415,
        )
    return media


def response_media(request: Request, request_media: str) -> str:
    """The answer's encoding from `Accept` (highest q first); none given: the request's own."""
    accept = request.headers.get("accept", "").strip()
    if not accept:
        return request_media
    ranked = []
    for position, part in enumerate(accept.split(",")):
        media, *params = (p.strip() for p in part.split(";"))
        q = 1.0
        for param in params:
            if param.startswith("q="):
                try:
                    q = float(param[2:])
                except ValueError:
                    q = 0.0
        ranked.append((-q, position, media.lower()))
    for neg_q, _, media in sorted(ranked):
        if neg_q == 0:
            break
        if media in MEDIA_TYPES:
            return media
        if media in ("*/*", "application/*"):
            return request_media
    raise NotAcceptable(
        f"cannot answer in {accept!r}; acceptable: {wire.JSON}, {wire.NPZ}", code="not_acceptable"
    )


async def read_body(request: Request, settings: Settings) -> bytes | memoryview:
    """The whole body, refused (413) as soon as it is known to pass the limit.

    An npz body that arrived in one piece (a large one, received whole by the server:
    service/whole_body.py) comes back as that piece, a read-only view: the arrays decoded
    from it are views too. Other bodies are joined into bytes, which JSON parsing wants.
    """
    limit = settings.max_body_bytes
    media = _media(request.headers.get("content-type", wire.JSON))
    if media == wire.JSON:
        limit = min(limit, settings.max_json_bytes)
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise InvalidInput("Content-Length is not a number", status=400) from None
        if size > limit:
            raise _too_large(size, limit, settings)
    chunks, received = [], 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise _too_large(received, limit, settings)
        if chunk:  # Starlette ends every stream with b""
            chunks.append(chunk)
    if len(chunks) == 1 and media == wire.NPZ:
        return chunks[0]
    return b"".join(chunks)


def _too_large(size: int, limit: int, settings: Settings) -> PayloadTooLarge:
    # Over the JSON limit only (npz would be taken): say so; over every limit: the plain 413.
    if limit == settings.max_json_bytes and size <= settings.max_body_bytes:
        return PayloadTooLarge(
            f"JSON body of {size} bytes is over the {limit}-byte JSON limit; send arrays this "
            f"large as npz (Content-Type: {wire.NPZ}, up to {settings.max_body_bytes} bytes): "
            "above about 1 MB npz is several times faster and 2-3x smaller",
            code="json_too_large",
        )
    return PayloadTooLarge(
        f"body of {size} bytes is over the {limit}-byte limit", code="payload_too_large"
    )


async def decoded(
    body: bytes | memoryview, media: str, settings: Settings, then: Callable[[Any], T]
) -> T:
    """`then(document)` for the decoded body: on the event loop where decoding is quick (small
    JSON; a small npz of few stored members, read as views), else on a worker thread."""
    if media == wire.NPZ:
        archive = _inline_npz(body)
        if archive is not None:
            return then(decode_body(archive, media, settings))
    elif len(body) < INLINE_JSON_BYTES:
        return then(decode_body(body, media, settings))
    return await run_in_threadpool(lambda: then(decode_body(body, media, settings)))


def _inline_npz(body: bytes | memoryview) -> _zip.Reader | None:
    """The zip directory of a body that may be decoded on the event loop, opened once for
    the decode too; None for one that may not: large, with many members (the directory
    alone would take long to parse), or with deflated ones (inflating is work per byte)."""
    members = _zip.declared_members(body)
    if len(body) >= INLINE_NPZ_BYTES or members is None or members > INLINE_NPZ_MEMBERS:
        return None
    archive = wire.open_npz(body)  # a malformed body: its 400, from here as from a thread
    return archive if wire.npz_is_stored(archive) else None


def encodes_inline(array_bytes: int, media: str) -> bool:
    """Whether encoding an answer holding `array_bytes` of arrays is quick enough for the
    event loop itself."""
    return array_bytes < (INLINE_NPZ_BYTES if media == wire.NPZ else INLINE_JSON_BYTES)


def decode_body(body: bytes | memoryview | _zip.Reader, media: str, settings: Settings) -> Any:
    def check_json(text: bytes) -> None:
        limits.scan_json(
            text, max_depth=settings.max_json_depth, max_elements=settings.max_json_elements
        )

    if media == wire.NPZ:
        return wire.load_npz(
            body,
            max_members=settings.max_npz_members,
            max_bytes=settings.max_body_bytes * 4,
            check_json=check_json,
        )
    if settings.json_offload_bytes and len(body) >= settings.json_offload_bytes:
        return _offload.decode(
            body, max_depth=settings.max_json_depth, max_elements=settings.max_json_elements
        )
    check_json(body)
    return wire.loads(body)


Body = Sequence[bytes | memoryview]  # an answer's bytes, as the buffers that make it up


def encode_body(fields: dict[str, Any], media: str, binary: bool, offload: bool = False) -> Body:
    """The answer's buffers; npz array data as views of the arrays (never joined); `offload`:
    print large JSON in the helper process (same bytes)."""
    if media == wire.NPZ:
        return wire.dump_npz_parts(wire.npz_ready(fields))
    if offload and offloadable(fields):
        return [_offload.encode(fields, binary)]
    return [wire.dumps(wire.encode_tree(fields, binary))]


def answer(
    body: Body, media: str, timings: Mapping[str, float], outcome: Outcome, state: State
) -> Response:
    """The 200 every door sends: its body, Server-Timing (PROTOCOL.md) with each phase, and
    its size counted in `gradserve_bytes_total{direction="out"}`."""
    server_timing = ", ".join(f"{k};dur={v * 1e3:.3f}" for k, v in timings.items())
    server_timing += f', batch;desc="{outcome.batch_size}", device;desc="{outcome.device}"'
    if state.settings.server == "granian" and len(body) > 1:
        # granian writes each message as it comes, without TCP_NODELAY: the small zip
        # directory after a large array would wait for the client's delayed ACK (~40 ms).
        body = [b"".join(body)]
    response = BuffersResponse(body, media_type=media, headers={"Server-Timing": server_timing})
    state.metrics.bytes_out.inc(response.nbytes)
    return response


class BuffersResponse(Response):
    """A response written buffer by buffer: a large npz answer goes to the socket from the
    arrays' own memory (uvloop keeps a reference to a large buffer it cannot send at once)
    instead of first being joined into one more copy of itself."""

    def __init__(self, body: Body, **kwargs: Any) -> None:
        super().__init__(None, **kwargs)
        self.buffers = body
        self.nbytes = sum(len(b) for b in body)
        self.raw_headers = [h for h in self.raw_headers if h[0] != b"content-length"]
        self.raw_headers.append((b"content-length", str(self.nbytes).encode()))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = {"type": "http.response.start", "status": self.status_code}
        await send({**start, "headers": self.raw_headers})
        buffers = [b for b in self.buffers if len(b)] or [b""]
        for i, buffer in enumerate(buffers):
            more = i < len(buffers) - 1
            await send({"type": "http.response.body", "body": buffer, "more_body": more})

"""HTTP bodies <-> documents: content negotiation, size-limited reading, JSON and npz.

The formats themselves live in `client.wire`; this module only chooses and applies them.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request

from client import wire
from client.errors import InvalidInput, NotAcceptable, PayloadTooLarge
from service import limits
from service.json_offload import JSONOffload, offloadable
from service.settings import Settings

MEDIA_TYPES = (wire.JSON, wire.NPZ)
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


async def read_body(request: Request, settings: Settings) -> bytes:
    """The whole body, refused (413) as soon as it is known to pass the limit."""
    limit = settings.max_body_bytes
    if _media(request.headers.get("content-type", wire.JSON)) == wire.JSON:
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
        chunks.append(chunk)
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


def decode_body(body: bytes, media: str, settings: Settings) -> Any:
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


def encode_body(fields: dict[str, Any], media: str, binary: bool, offload: bool = False) -> bytes:
    """The answer's bytes; `offload`: print large JSON in the helper process (same bytes)."""
    if media == wire.NPZ:
        return wire.dump_npz(wire.npz_ready(fields))
    if offload and offloadable(fields):
        return _offload.encode(fields, binary)
    return wire.dumps(wire.encode_tree(fields, binary))

"""HTTP bodies <-> documents: content negotiation, size-limited reading, JSON and npz.

The formats themselves live in `client.wire`; this module only chooses and applies them.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request

from client import wire
from client.errors import InvalidInput, NotAcceptable, PayloadTooLarge
from service import limits
from service.settings import Settings

MEDIA_TYPES = (wire.JSON, wire.NPZ)


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
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise InvalidInput("Content-Length is not a number", status=400) from None
        if size > limit:
            raise _too_large(size, limit)
    chunks, received = [], 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise _too_large(received, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: int, limit: int) -> PayloadTooLarge:
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
    check_json(body)
    return wire.loads(body)


def encode_body(fields: dict[str, Any], media: str, binary: bool) -> bytes:
    if media == wire.NPZ:
        return wire.dump_npz(wire.npz_ready(fields))
    return wire.dumps(wire.encode_tree(fields, binary))

"""Which bodies `codec.decoded` decodes on the event loop: small stored npz with few members
and small JSON; the rest on a thread. Either way the document is the same."""

from __future__ import annotations

import asyncio
import io
import threading

import numpy as np
import pytest

from client import _zip, wire
from client.errors import InvalidInput
from service import codec
from service.settings import Settings

X = np.arange(12, dtype=np.float32).reshape(3, 4)


def compressed(doc: bytes, **arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, __json__=np.frombuffer(doc, np.uint8), **arrays)
    return buf.getvalue()


def decode_where(body: bytes, media: str) -> tuple[object, bool]:
    """The decoded document, and whether it was decoded on the event loop's thread."""
    loop_thread: list[int] = []

    def then(doc: object) -> tuple[object, bool]:
        return doc, threading.get_ident() == loop_thread[0]

    async def run() -> tuple[object, bool]:
        loop_thread.append(threading.get_ident())
        return await codec.decoded(body, media, Settings(), then)

    return asyncio.run(run())


def test_the_end_record_says_how_many_members() -> None:
    body = wire.dump_npz({"args": [X, X, X]})
    assert _zip.declared_members(body) == len(wire.open_npz(body).members) == 4
    assert _zip.declared_members(b"not a zip at all, but long enough to hold a record") is None


def test_a_small_stored_npz_is_decoded_on_the_loop() -> None:
    doc, on_loop = decode_where(wire.dump_npz({"args": [X]}), wire.NPZ)
    assert on_loop
    np.testing.assert_array_equal(doc["args"][0], X)


@pytest.mark.parametrize(
    "body",
    [
        compressed(b'{"args": [{"$npz": "x"}]}', x=X),  # deflated: inflating is work per byte
        wire.dump_npz({"args": [X] * (codec.INLINE_NPZ_MEMBERS + 1)}),  # a long directory
        wire.dump_npz({"args": [np.zeros(codec.INLINE_NPZ_BYTES // 4, np.float32)]}),  # large
    ],
    ids=["deflated", "many members", "large"],
)
def test_other_npz_bodies_are_decoded_on_a_thread_to_the_same_document(body: bytes) -> None:
    doc, on_loop = decode_where(body, wire.NPZ)
    assert not on_loop
    np.testing.assert_array_equal(doc["args"][0], wire.load_npz(body)["args"][0])


def test_json_by_size() -> None:
    small = wire.dumps(wire.encode_tree({"args": [X]}))
    assert decode_where(small, wire.JSON) == (wire.loads(small), True)
    large = wire.dumps(wire.encode_tree({"args": [np.zeros(20_000, np.float32)]}))
    assert len(large) >= codec.INLINE_JSON_BYTES
    assert decode_where(large, wire.JSON)[1] is False


def test_a_body_that_is_no_zip_is_refused_from_the_thread() -> None:
    with pytest.raises(InvalidInput, match="malformed npz"):
        decode_where(b"PK\x03\x04 but nothing of a zip after it", wire.NPZ)

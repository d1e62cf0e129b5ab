"""A large request body received whole, straight into one buffer the size it declared.

uvicorn hands a body to the app the way it arrives: asyncio reads the socket 256 KiB at a
time into a fresh `bytes`, the parser copies each piece into the cycle's bytearray, reading
pauses past 64 KiB until the app asks for more, `receive()` copies the piece out again, and
the app joins the pieces: for a 4 MB npz, four copies of every byte and some sixteen trips
through the event loop, each of which leaves the sender's socket full and idle.

For a body that declares a Content-Length of at least `large_body_bytes` (and at most the
largest body the server takes, so a declared size never buys memory a refusal would not),
the connection becomes an `asyncio.BufferedProtocol` for the length of that body: the
transport `recv_into`s an uninitialized numpy buffer of exactly that size, without pausing,
and the app gets one read-only view of it. Everything else (heads, small bodies, chunked
bodies) goes through uvicorn's parser as before, fed from a reused scratch buffer.

The parser is not fed the bytes it did not see, so once the body is in a fresh parser takes
the connection's next request (keep-alive and pipelining work as before).
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

import httptools
import numpy as np

_SCRATCH_BYTES = 256 * 1024  # asyncio's own read size for a plain Protocol


class BufferedFront(asyncio.BufferedProtocol):
    """What the transport talks to: reads go through `get_buffer`/`buffer_updated` to the
    HTTP protocol behind it, everything else straight through. (uvloop ignores the buffer
    methods of any `asyncio.Protocol` subclass, and uvicorn's protocol is one.)"""

    protocol_class: ClassVar[type[WholeBodyReceiver]]

    def __init__(self, **kwargs: Any) -> None:
        self.http: Any = self.protocol_class(**kwargs)

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        self.http.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.http.connection_lost(exc)

    def pause_writing(self) -> None:
        self.http.pause_writing()

    def resume_writing(self) -> None:
        self.http.resume_writing()

    def eof_received(self) -> bool | None:
        return self.http.eof_received()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.http.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self.http.buffer_updated(nbytes)


class WholeBodyReceiver:
    """Mixin for uvicorn's `HttpToolsProtocol` (placed before it in the bases), which a
    `BufferedFront` feeds."""

    large_body_bytes: ClassVar[int]
    max_body_bytes: ClassVar[int]

    # These belong to uvicorn's protocol; named here for the type checker.
    parser: Any
    cycle: Any
    transport: Any

    def _whole_body_reset(self) -> None:
        self._scratch = memoryview(bytearray(_SCRATCH_BYTES))
        self._whole: np.ndarray | None = None  # the body being received, once announced
        self._whole_size = 0
        self._whole_filled = 0

    # -- what BufferedFront hands on -----------------------------------------------------

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._whole_size:
            return memoryview(self._buffer())[self._whole_filled :]
        return self._scratch

    def buffer_updated(self, nbytes: int) -> None:
        if self._whole_size:
            self._whole_filled += nbytes
            self.whole_body_progress(nbytes)
            if self._whole_filled == self._whole_size:
                self._whole_body_done()
            return
        data = self._scratch[:nbytes]
        # The head is counted with bytes methods; body pieces go to the parser as views.
        self.data_received(bytes(data) if self.in_head() else data)  # type: ignore[attr-defined]

    # -- hooks for the protocol ----------------------------------------------------------

    def in_head(self) -> bool:
        return True

    def whole_body_progress(self, nbytes: int) -> None:
        """Called as the body's bytes arrive: the slow-client guard counts them."""

    def whole_body_begin(self, headers: list[tuple[bytes, bytes]]) -> None:
        """After the head: receive the body whole if it is declared large enough."""
        size = _declared_size(headers)
        if size is None or not self.large_body_bytes <= size <= self.max_body_bytes:
            return
        self._whole_size = size
        cycle = self.cycle
        cycle.whole_body = None
        own_receive = cycle.receive

        async def receive() -> dict[str, Any]:
            # uvicorn's receive() would copy the body to bytes; this one hands over a view.
            if cycle.waiting_for_100_continue and not cycle.transport.is_closing():
                cycle.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                cycle.waiting_for_100_continue = False
            if cycle.more_body and not cycle.disconnected and not cycle.response_complete:
                await cycle.message_event.wait()
            cycle.message_event.clear()
            body, cycle.whole_body = cycle.whole_body, None
            if body is None or cycle.disconnected or cycle.response_complete:
                return await own_receive()  # after the body: uvicorn's wait for a disconnect
            return {"type": "http.request", "body": body, "more_body": False}

        # The app task was created but has not run: it will find this receive.
        cycle.receive = receive

    def whole_body_piece(self, body: bytes) -> bool:
        """Body bytes the parser saw (those that came in with the head): copied into the
        buffer. False where this body is not being received whole."""
        if not self._whole_size:
            return False
        end = self._whole_filled + len(body)
        self._buffer()[self._whole_filled : end] = np.frombuffer(body, np.uint8)
        self._whole_filled = end
        self.whole_body_progress(len(body))
        return True

    def _buffer(self) -> np.ndarray:
        if self._whole is None:  # allocated when bytes come: a body refused first never is
            self._whole = np.empty(self._whole_size, np.uint8)
        return self._whole

    def whole_body_parsed(self) -> None:
        """The parser saw the whole body (it all came with the head): hand it over."""
        if self._whole_size and self._whole_filled == self._whole_size:
            self._deliver()

    def whole_body_dropped(self) -> None:
        self._whole, self._whole_size, self._whole_filled = None, 0, 0

    def _whole_body_done(self) -> None:
        self._deliver()
        # The parser still waits for the body it never saw: the next request gets a new one.
        self.parser = httptools.HttpRequestParser(self)
        self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
        self.on_message_complete()  # type: ignore[attr-defined]

    def _deliver(self) -> None:
        whole = self._whole
        self.whole_body_dropped()
        if not self.cycle.response_complete and whole is not None:
            self.cycle.whole_body = memoryview(whole).toreadonly()


def _declared_size(headers: list[tuple[bytes, bytes]]) -> int | None:
    size = None
    for name, value in headers:
        if name == b"transfer-encoding":
            return None
        if name == b"content-length":
            try:
                size = int(value)
            except ValueError:
                return None
    return size

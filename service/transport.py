"""Limits beneath the API, where a request is still bytes on a socket: uvicorn's HTTP protocol.

The routes refuse bad bodies, but headers are read before any route runs, and before the key
is checked, so these guards sit in the connection itself (a subclass of uvicorn's httptools
protocol, passed as `uvicorn.Config(http=...)`):

- **Header size and count**: the bytes of a request's head are counted as they arrive,
  before the parser sees them; past `max_header_bytes` (or `max_headers` headers) the server
  answers 431 and closes, so a client never makes it hold more than one socket read beyond
  the limit. A request line past `max_request_line` gets 414.
- **Slow clients**: the head must arrive within `header_timeout_s` of its first byte (or of
  the connection); the body must keep coming at `body_min_rate` bytes/s over each
  `body_window_s` window (windows where the server itself stopped reading, because the app is
  busy, do not count). Either closes the connection, with a log line and
  `gradserve_connections_closed{reason}`. Idle keep-alive connections close after
  `keep_alive_s`, as before.
- **Connection cap**: past `max_connections` open connections (default: three quarters of the
  file limit, which `gradserve serve` raises to its hard limit), new connections are answered
  503 with `Retry-After` and closed, except `/healthz` asked from loopback, so a local probe
  still sees a live process.

Under `--server granian` these guards are granian's own (see SECURITY.md): its HTTP/1 parser
bounds a request head by its buffer size and its `header_read_timeout`.
"""

from __future__ import annotations

import logging
import resource
from dataclasses import dataclass
from typing import Any, ClassVar

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from service.auth import is_loopback
from service.metrics import Metrics
from service.settings import Settings
from service.whole_body import BufferedFront, WholeBodyReceiver

log = logging.getLogger("gradserve")

_END_OF_HEAD = b"\r\n\r\n"


@dataclass(frozen=True)
class TransportLimits:
    max_header_bytes: int
    max_headers: int
    max_request_line: int
    header_timeout_s: float
    body_min_rate: float
    body_window_s: float
    max_connections: int
    metrics: Metrics | None = None

    @classmethod
    def from_settings(cls, settings: Settings, metrics: Metrics | None) -> TransportLimits:
        return cls(
            settings.max_header_bytes,
            settings.max_headers,
            settings.max_request_line,
            settings.header_timeout_s,
            settings.body_min_rate,
            settings.body_window_s,
            settings.max_connections or default_max_connections(),
            metrics,
        )


def raise_file_limit() -> int:
    """Raise this process's open-file limit to its hard limit; the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError):  # e.g. above fs.nr_open: keep what we have
            pass
    return soft


def default_max_connections() -> int:
    """Three quarters of the file limit: the rest for model files, the compile cache, the
    logs, and the sockets that answer 503 past the cap."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(16, soft * 3 // 4)


class _Refuse(Exception):
    def __init__(self, status: int, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.reason, self.detail = status, reason, detail


async def _over_capacity(scope: Any, receive: Any, send: Any) -> None:
    """The app a connection past the cap gets: 503, Retry-After, and the connection closed."""
    body = (
        b'{"type":"about:blank","status":503,"code":"too_many_connections",'
        b'"detail":"the server has too many open connections; retry shortly"}'
    )
    await send(
        {
            "type": "http.response.start",
            "status": 503,
            "headers": [
                (b"content-type", b"application/problem+json"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", b"1"),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class GuardedHttpToolsProtocol(WholeBodyReceiver, HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits above, receiving large bodies whole
    (`service.whole_body`). One instance per connection."""

    limits: ClassVar[TransportLimits]

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._whole_body_reset()
        self._in_head = True  # bytes now arriving belong to a request's head
        self._head_bytes = 0
        self._tail = b""  # the last bytes of the head so far: "\r\n\r\n" may straddle reads
        self._header_count = 0
        self._header_bytes = 0
        self._line_done = False
        self._header_timer: Any = None
        self._body_timer: Any = None
        self._body_bytes = 0
        self._over_cap = len(self.connections) > self.limits.max_connections
        self._gauge()
        self._start_header_timer()  # a client that connects and says nothing is slow too

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timers()
        self.whole_body_dropped()
        super().connection_lost(exc)
        self._gauge()

    # -- counting the head before the parser sees it -----------------------------------

    def data_received(self, data: bytes) -> None:
        try:
            if self._in_head:
                self._count_head(data)
            self._unset_keepalive_if_required()
            self.parser.feed_data(data)
        except _Refuse as refusal:
            self._refuse(refusal)
        except httptools.HttpParserCallbackError as e:
            if isinstance(e.__context__, _Refuse):
                self._refuse(e.__context__)
            else:
                self._bad_request()
        except httptools.HttpParserError:
            self._bad_request()
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()

    def _count_head(self, data: bytes) -> None:
        if self._header_timer is None:
            self._start_header_timer()
        seen = self._tail + data
        end = seen.find(_END_OF_HEAD)
        used = len(data) if end < 0 else max(0, end + len(_END_OF_HEAD) - len(self._tail))
        self._head_bytes += used
        self._tail = seen[-3:]
        if not self._line_done:
            if b"\n" in data[:used]:
                self._line_done = True  # its length is judged by `on_url`
            elif self._head_bytes > self.limits.max_request_line:
                raise self._too_long_line()
        if self._head_bytes > self.limits.max_header_bytes + self.limits.max_request_line:
            raise self._too_large(f"the request head passed {self._head_bytes} bytes")

    def _too_large(self, what: str) -> _Refuse:
        return _Refuse(
            431,
            "headers_too_large",
            f"{what}; the limit is {self.limits.max_header_bytes} bytes in "
            f"{self.limits.max_headers} headers",
        )

    def _too_long_line(self) -> _Refuse:
        return _Refuse(
            414,
            "request_line_too_long",
            f"the request line passed {self.limits.max_request_line} bytes",
        )

    # -- parser callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._header_count = 0
        self._header_bytes = 0

    def on_url(self, url: bytes) -> None:
        if len(self.url) + len(url) > self.limits.max_request_line:
            raise self._too_long_line()
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        self._header_bytes += len(name) + len(value) + 4  # ": " and CRLF
        if self._header_count > self.limits.max_headers:
            raise self._too_large(f"the request has more than {self.limits.max_headers} headers")
        if self._header_bytes > self.limits.max_header_bytes:
            raise self._too_large(f"the headers passed {self.limits.max_header_bytes} bytes")
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head, self._head_bytes, self._tail, self._line_done = False, 0, b"", False
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        app = self.app
        if self._over_cap and not self._exempt():
            self._count("over_capacity")
            self.app = _over_capacity  # uvicorn runs the app it holds now for this request
        try:
            super().on_headers_complete()
        finally:
            self.app = app
        if self._expects_body():
            self._body_bytes = 0
            self._body_timer = self.loop.call_later(self.limits.body_window_s, self._check_body)
            if self.cycle is not None and not self.cycle.response_complete:
                self.whole_body_begin(self.headers)

    def on_body(self, body: bytes) -> None:
        if not self.whole_body_piece(body):
            self._body_bytes += len(body)
            super().on_body(body)

    def in_head(self) -> bool:
        return self._in_head

    def whole_body_progress(self, nbytes: int) -> None:
        self._body_bytes += nbytes

    def on_message_complete(self) -> None:
        self.whole_body_parsed()
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        self._in_head = True  # what comes next on this connection is the next request's head
        super().on_message_complete()

    # -- decisions -----------------------------------------------------------------------

    def _exempt(self) -> bool:
        """`/healthz` from loopback is answered past the cap: the local probe must see us."""
        path = httptools.parse_url(self.url).path if self.url else b""
        return path == b"/healthz" and self.client is not None and is_loopback(self.client[0])

    def _expects_body(self) -> bool:
        for name, value in self.headers:
            if name == b"transfer-encoding" or (
                name == b"content-length" and value.strip() != b"0"
            ):
                return True
        return False

    def _check_body(self) -> None:
        """Every window: a body arriving slower than the minimum rate closes the connection."""
        self._body_timer = None
        if self.transport.is_closing():
            return
        window, rate = self.limits.body_window_s, self.limits.body_min_rate
        if self._body_bytes < rate * window and not self.flow.read_paused:
            self._close_slow(
                "body_too_slow",
                f"its body arrived at {self._body_bytes / window:.0f} bytes/s over {window:g} s "
                f"(minimum {rate:g})",
            )
            return
        self._body_bytes = 0  # a paused read (a busy app) is the server's delay, not the client's
        self._body_timer = self.loop.call_later(window, self._check_body)

    def _start_header_timer(self) -> None:
        self._header_timer = self.loop.call_later(self.limits.header_timeout_s, self._header_late)

    def _header_late(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or not self._in_head:
            return
        if self.cycle is None or self.cycle.response_complete:  # no answer of ours in flight
            self.transport.write(self._response(408, "the request headers took too long"))
        self._close_slow(
            "header_timeout",
            f"its request headers did not arrive within {self.limits.header_timeout_s:g} s",
        )

    def _close_slow(self, reason: str, why: str) -> None:
        log.warning("closed the connection of %s: %s", self._peer(), why)
        self._count(reason)
        self.transport.close()

    def _refuse(self, refusal: _Refuse) -> None:
        log.warning(
            "refused a request from %s: %s (%d)", self._peer(), refusal.detail, refusal.status
        )
        self._count(refusal.reason)
        if self.cycle is None or self.cycle.response_complete:  # no answer of ours in flight
            self.transport.write(self._response(refusal.status, refusal.detail))
        self.transport.close()

    def _bad_request(self) -> None:
        msg = "Invalid HTTP request received."
        self.logger.warning(msg)
        self.send_400_response(msg)

    def _response(self, status: int, detail: str) -> bytes:
        body = (
            f'{{"type":"about:blank","status":{status},"code":"{_CODES[status]}",'
            f'"detail":"{detail}"}}'
        ).encode()
        return b"".join(
            [
                STATUS_LINE[status],
                b"content-type: application/problem+json\r\n",
                b"content-length: %d\r\n" % len(body),
                b"connection: close\r\n\r\n",
                body,
            ]
        )

    def _stop_timers(self) -> None:
        for timer in (self._header_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._header_timer = self._body_timer = None

    def _peer(self) -> str:
        return f"{self.client[0]}:{self.client[1]}" if self.client else "a client"

    def _count(self, reason: str) -> None:
        if self.limits.metrics is not None:
            self.limits.metrics.connections_closed.labels(reason).inc()

    def _gauge(self) -> None:
        if self.limits.metrics is not None:
            self.limits.metrics.open_connections.set(len(self.connections))


_CODES = {
    408: "header_timeout",
    414: "request_line_too_long",
    431: "headers_too_large",
}


def protocol_class(
    limits: TransportLimits, large_body_bytes: int, max_body_bytes: int
) -> type[BufferedFront]:
    """A protocol class bound to `limits` and the whole-body sizes, for
    `uvicorn.Config(http=...)`."""
    bound = {
        "limits": limits,
        "large_body_bytes": large_body_bytes,
        "max_body_bytes": max_body_bytes,
    }
    protocol = type("GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,), bound)
    return type("BufferedFront", (BufferedFront,), {"protocol_class": protocol})


def uvicorn_options(settings: Settings, metrics: Metrics | None) -> dict[str, Any]:
    """What `uvicorn.Config` needs for these guards."""
    limits = TransportLimits.from_settings(settings, metrics)
    return {"http": protocol_class(limits, settings.large_body_bytes, settings.max_body_bytes)}


def granian_http1_settings(settings: Settings) -> Any:
    """granian's HTTP/1 settings carrying what of these limits granian can enforce itself.

    Its parser answers 431 when a request head outgrows its read buffer (and past 100
    headers), and closes a head that has not arrived `header_read_timeout` after its first
    byte. It has no hook for the rest (silent connections, request lines under 64 KiB, body
    progress, a connection cap): SECURITY.md leaves those to a reverse proxy under granian.
    """
    from granian.http import HTTP1Settings

    return HTTP1Settings(
        keep_alive=True,
        header_read_timeout=max(1, round(settings.header_timeout_s * 1000)),
        max_buffer_size=max(8192, settings.max_header_bytes + settings.max_request_line),
    )

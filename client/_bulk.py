"""The bulk path: npz request and answer bodies over the standard library's `http.client`.

httpx (h11 and httpcore underneath) reads an answer in 64 KB pieces, parses each through h11's
buffer and joins them at the end; an 8 MB npz request is first joined into one bytes. On an
8 MB-in/8 MB-out exchange that costs more than the bytes' time on the socket (docs/profile.md,
row k). Here the request goes out as the buffers `wire.dump_npz_parts` made (the arrays' own
memory, never joined) and the answer is read with `readinto` straight into one buffer of its
Content-Length, which the zero-copy npz reader then takes views of.

Only `client._client` uses this module; it keeps the same retry and error mapping by raising
the client's own `ConnectError` and `Timeout`.
"""

from __future__ import annotations

import http.client
import select
import socket
import ssl
import threading
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence

import numpy as np

from client.errors import ConnectError, Timeout
from client.wire import NPZ

# Parts below this size are joined before sending (one syscall, one TCP segment for the HTTP
# head and the small npz headers); larger ones are written from the arrays' own memory.
_COALESCE = 64 * 1024
# Idle connections kept per pool; more than this many concurrent exchanges open extra ones.
_MAX_IDLE = 8
_USER_AGENT = "gradserve-client (http.client)"


def usable(base_url: str) -> bool:
    """Whether the bulk path can reach `base_url` as httpx would: plain or TLS HTTP, and no
    proxy from the environment (httpx honours HTTP(S)_PROXY; `http.client` would not)."""
    parts = urllib.parse.urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False
    proxies = urllib.request.getproxies()
    proxied = proxies.get(parts.scheme) or proxies.get("all")
    return not proxied or bool(urllib.request.proxy_bypass(parts.hostname))


class Pool:
    """Keep-alive `http.client` connections to one server, safe to use from several threads
    (`AsyncClient` runs its bulk exchanges on worker threads)."""

    def __init__(self, base_url: str, ssl_context: ssl.SSLContext | None = None) -> None:
        parts = urllib.parse.urlsplit(base_url)
        self.base_url = base_url
        self._https = parts.scheme == "https"
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or (443 if self._https else 80)
        self._prefix = parts.path.rstrip("/")
        self._ssl = ssl_context
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._closed = False
        self.exchanges = 0  # bulk exchanges made: lets tests see which path ran

    def _connect(self, timeout: float) -> http.client.HTTPConnection:
        if self._https:
            context = self._ssl or ssl.create_default_context()
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                self._host, self._port, timeout=timeout, context=context
            )
        else:
            conn = http.client.HTTPConnection(self._host, self._port, timeout=timeout)
        try:
            conn.connect()
        except TimeoutError as e:
            raise ConnectError(f"cannot reach {self.base_url}: connect timed out ({e})") from None
        except OSError as e:
            raise ConnectError(f"cannot reach {self.base_url}: {e}") from None
        # Nagle would hold the last partial segment of a body until the peer ACKs.
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def _take(self) -> http.client.HTTPConnection | None:
        with self._lock:
            while self._idle:
                conn = self._idle.pop()
                # An idle connection with something to read has been closed by the server
                # (EOF) or is out of step: not reusable (httpcore checks the same).
                if conn.sock is not None and not select.select([conn.sock], [], [], 0)[0]:
                    return conn
                conn.close()
        return None

    def _give(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if not self._closed and conn.sock is not None and len(self._idle) < _MAX_IDLE:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def request(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str],
        body: Sequence[bytes | memoryview] | bytes | None,
        timeout: float | None,
    ) -> tuple[int, dict[str, str], bytes | bytearray | memoryview]:
        """One exchange: (status, lower-cased headers, body). A reused connection that fails
        before its answer starts is retried once on a fresh one (the server may have closed
        it while idle); every other failure raises `ConnectError` or `Timeout`."""
        parts = [body] if isinstance(body, (bytes, bytearray, memoryview)) else list(body or ())
        with self._lock:
            if self._closed:  # as httpx does for a closed client
                raise RuntimeError("cannot send a request: the client has been closed")
            self.exchanges += 1
        conn = self._take()
        if conn is not None:
            conn.timeout = timeout
            conn.sock.settimeout(timeout)
            try:
                return self._exchange(conn, method, path, headers, parts)
            except _Stale:
                pass  # the retry below, on a new connection
        conn = self._connect(timeout)
        try:
            return self._exchange(conn, method, path, headers, parts)
        except _Stale as e:
            raise ConnectError(
                f"connection to {self.base_url} dropped before an answer: {e.__cause__}"
            ) from None

    def _exchange(
        self,
        conn: http.client.HTTPConnection,
        method: str,
        path: str,
        headers: Mapping[str, str],
        parts: list[bytes | memoryview],
    ) -> tuple[int, dict[str, str], bytes | bytearray | memoryview]:
        answered, write_failed = False, False
        try:
            try:
                _send(conn, method, self._prefix + path, headers, parts)
            except (ConnectionError, ssl.SSLError):
                # The server may have answered early and stopped reading (a 413 for a body
                # over its limit): read that answer, as httpcore does after a write error.
                write_failed = True
            response = conn.getresponse()
            answered = True
            content = _read_body(response)
        except TimeoutError as e:
            conn.close()
            raise Timeout(f"no answer from {self.base_url} within the timeout: {e}") from None
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            if not answered:
                raise _Stale() from e
            raise ConnectError(
                f"connection to {self.base_url} dropped mid-answer: {type(e).__name__} {e}"
            ) from None
        except BaseException:
            conn.close()
            raise
        if response.will_close or write_failed:
            conn.close()
        else:
            self._give(conn)
        return response.status, _headers(response), content


class _Stale(Exception):
    """The connection failed before the answer's status line: safe to retry."""


def _send(
    conn: http.client.HTTPConnection,
    method: str,
    path: str,
    headers: Mapping[str, str],
    parts: list[bytes | memoryview],
) -> None:
    conn.putrequest(method, path, skip_accept_encoding=True)
    names = {k.lower() for k in headers}
    for name, value in headers.items():
        conn.putheader(name, value)
    if "user-agent" not in names:
        conn.putheader("User-Agent", _USER_AGENT)
    if "accept" not in names:
        conn.putheader("Accept", "*/*")
    if method in ("POST", "PUT", "PATCH") or parts:
        conn.putheader("Content-Length", str(sum(memoryview(p).nbytes for p in parts)))
    # Small parts ride with the head in one write; large ones go from their own memory.
    pending: list[bytes | memoryview] = []
    first = True
    for part in parts:
        if memoryview(part).nbytes < _COALESCE:
            pending.append(part)
            continue
        _flush(conn, pending, first)
        first = False
        conn.sock.sendall(part)
    _flush(conn, pending, first)


def _flush(conn: http.client.HTTPConnection, pending: list, first: bool) -> None:
    data = b"".join(pending)
    pending.clear()
    if first:
        conn.endheaders(data or None)
    elif data:
        conn.sock.sendall(data)


def _read_body(response: http.client.HTTPResponse) -> bytes | bytearray | memoryview:
    """The whole answer; with a Content-Length, read into one buffer of that size."""
    if response.length is None:  # chunked or close-delimited: http.client's own loop
        return response.read()
    npz = response.status == 200 and response.getheader("content-type", "").startswith(NPZ)
    # An npz answer (only ever read by the npz reader) goes into memory numpy leaves
    # uninitialized: bytearray(n) would first zero all of it, ~0.4 ms per 8 MB here.
    buf = memoryview(np.empty(response.length, np.uint8)) if npz else bytearray(response.length)
    view, got = memoryview(buf), 0
    while got < len(buf):
        n = response.readinto(view[got:])
        if not n:
            raise http.client.IncompleteRead(bytes(0), len(buf) - got)
        got += n
    return buf


def _headers(response: http.client.HTTPResponse) -> dict[str, str]:
    # Repeated names are joined with ", " as httpx's `Headers.items()` does.
    out: dict[str, str] = {}
    for name, value in response.getheaders():
        key = name.lower()
        out[key] = f"{out[key]}, {value}" if key in out else value
    return out

"""The client's bulk path (client/_bulk.py): large npz exchanges over `http.client`.

Against a real server: results equal local JAX, sync and async, and which path carried a
request is asserted from the pool's exchange count and httpx's own event hook. Faults a real
server does not produce on demand (an answer cut off mid-body, a kept-alive connection closed
just as a request is written on it) come from a raw TCP peer in a thread.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from client import AsyncClient, Client, errors, grad, vjp
from helpers import LiveServer
from service.models import cookbook

X = np.random.default_rng(1).standard_normal(1_000_000).astype(np.float32)  # 4 MB
U = np.random.default_rng(2).standard_normal(1_000_000).astype(np.float32)


@pytest.fixture(scope="module")
def server(start_server: Any) -> LiveServer:
    # Idle connections close after 1 s, so a test can watch a pooled one go stale.
    return start_server(
        "--models", "tests/hardening/faulty_models.py", env={"GRADSERVE_KEEP_ALIVE_S": "1"}
    )


def _hooked(c: Client | AsyncClient) -> list[Any]:
    """The requests httpx sends for `c` (its own httpx client, hooked after the fact)."""
    sent: list[Any] = []
    if isinstance(c, AsyncClient):

        async def hook(request: Any) -> None:
            sent.append(request)

        c._http.event_hooks = {"request": [hook]}
    else:
        c._http.event_hooks = {"request": [sent.append]}
    return sent


def _close(want: Any, got: Any) -> None:
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_allclose(g, np.asarray(w), rtol=1e-6, atol=1e-6)


def test_large_vjp_and_grad_go_bulk_and_equal_jax(server: LiveServer) -> None:
    want_value, pullback = jax.vjp(cookbook.square3, X)
    big = X.reshape(1000, 1000)
    with Client(server.url) as c:
        sent = _hooked(c)
        value, remote_pullback = vjp(c.model("square3"), X)
        cotangent = remote_pullback(U)
        g = grad(c.model("tanh_sq_sum"))(big)
        assert c._pool is not None and c._pool.exchanges == 3
        # The posts went bulk (linearize, the session's vjp, grad); the specs' GETs on httpx.
        assert [r.method for r in sent] == ["GET", "GET"]
    _close(want_value, value)
    _close(pullback(U), cotangent)
    _close(jax.grad(cookbook.tanh_sq_sum)(big), g)
    assert not cotangent[0].flags.writeable  # views of the answer, as on the httpx path


async def test_async_large_vjp_goes_bulk_and_equals_jax(server: LiveServer) -> None:
    want_value, pullback = jax.vjp(cookbook.square3, X)
    async with AsyncClient(server.url) as c:
        await c.model_info("square3")
        sent = _hooked(c)
        value, remote_pullback = await vjp(c.model("square3"), X)
        # Several at once: each on its own worker thread and pooled connection.
        results = await asyncio.gather(*(remote_pullback(U * k) for k in range(1, 4)))
        assert c._pool is not None and c._pool.exchanges == 4 and not sent
    _close(want_value, value)
    for k, got in zip(range(1, 4), results, strict=True):
        _close(pullback(U * k), got)


def test_small_requests_stay_on_httpx(server: LiveServer) -> None:
    x = jnp.linspace(-1.0, 1.0, 100, dtype=jnp.float32)
    with Client(server.url) as c:
        f = c.model("tanh_sq_sum")
        sent = _hooked(c)
        _close(jax.grad(cookbook.tanh_sq_sum)(x), grad(f)(np.asarray(x)))
        assert len(sent) == 1 and c._pool is not None and c._pool.exchanges == 0


def test_bulk_off_and_callers_http_client_carry_everything(server: LiveServer) -> None:
    import httpx

    want = jax.vjp(cookbook.square3, X)[1](U)
    sent: list[Any] = []
    with httpx.Client(event_hooks={"request": [sent.append]}) as http:
        for c in (Client(server.url, bulk=False), Client(server.url, http_client=http)):
            with c:
                assert c._pool is None
                _close(want, vjp(c.model("square3"), X)[1](U))
    # The caller's client saw its GET of the spec and the two posts (eval, vjp).
    assert [r.method for r in sent] == ["GET", "POST", "POST"]


def test_proxy_from_environment_turns_bulk_off(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    with Client("http://127.0.0.1:8000") as c:
        assert c._pool is None
    with Client("https://127.0.0.1:8000") as c:  # the variable is for http only
        assert c._pool is not None


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_timeout_on_bulk_path_raises_timeout(server: LiveServer, kind: str) -> None:
    x = np.zeros(300_000, np.float32)  # 1.2 MB: bulk
    x[0] = 3.0  # `sleepy` sleeps max(x) seconds
    if kind == "sync":
        with Client(server.url, timeout=0.5) as c, pytest.raises(errors.Timeout):
            c.model("sleepy")(x)
        assert c._pool is not None and c._pool.exchanges == 1
        return

    async def call() -> None:
        async with AsyncClient(server.url, timeout=0.5) as c:
            await c.model_info("sleepy")
            with pytest.raises(errors.Timeout):
                await c.model("sleepy")(x)
            assert c._pool is not None and c._pool.exchanges == 1

    asyncio.run(call())


def test_idle_connection_closed_by_server_is_replaced(server: LiveServer) -> None:
    want = jax.vjp(cookbook.square3, X)[1](U)
    with Client(server.url, retries=0) as c:
        _, pullback = vjp(c.model("square3"), X)
        _close(want, pullback(U))
        # The server closes the pooled connection after its 1 s keep-alive.
        threading.Event().wait(1.6)
        _close(want, pullback(U))
        assert c._pool is not None and c._pool.exchanges == 3


def test_stopped_server_is_a_connect_error(start_server: Any) -> None:
    server = start_server()
    with Client(server.url, retries=1, backoff=0.01) as c:
        _, pullback = vjp(c.model("square3"), X)
        server.stop()
        with pytest.raises(errors.ConnectError, match="cannot reach"):
            pullback(U)


# ------------------------------------------------------------------ a raw TCP peer


class Peer:
    """A TCP server that reads each HTTP request whole and answers per `script`: a list of
    actions per connection, "ok" (a complete npz answer, kept alive), "cut" (half the
    answer, then close) or "drop" (close without answering)."""

    def __init__(
        self, script: list[list[str]], answer: bytes, tls: ssl.SSLContext | None = None
    ) -> None:
        self.script, self.answer, self.connections, self.tls = script, answer, 0, tls
        self.sock = socket.create_server(("127.0.0.1", 0))
        scheme = "https" if tls else "http"
        self.url = f"{scheme}://127.0.0.1:{self.sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        for actions in self.script:
            conn, _ = self.sock.accept()
            self.connections += 1
            if self.tls is not None:
                try:
                    conn = self.tls.wrap_socket(conn, server_side=True)
                except ssl.SSLError:  # a client that refused the certificate
                    conn.close()
                    continue
            with conn:
                for action in actions:
                    if action == "early":  # a 413 before the body, which it never reads
                        _early_413(conn)
                        break
                    _read_request(conn)
                    if action == "drop":
                        break
                    head = (
                        "HTTP/1.1 200 OK\r\ncontent-type: application/x-npz\r\n"
                        f"content-length: {len(self.answer)}\r\n\r\n"
                    ).encode()
                    body = self.answer if action == "ok" else self.answer[: len(self.answer) // 2]
                    conn.sendall(head + body)
                    if action == "cut":
                        break

    def close(self) -> None:
        self.sock.close()


def _early_413(conn: socket.socket) -> None:
    while b"\r\n\r\n" not in conn.recv(65536, socket.MSG_PEEK):
        pass
    problem = b'{"status": 413, "code": "payload_too_large", "detail": "over the limit"}'
    conn.sendall(
        b"HTTP/1.1 413 Payload Too Large\r\ncontent-type: application/problem+json\r\n"
        b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(problem), problem)
    )


def _read_request(conn: socket.socket) -> None:
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length")
    )
    while len(body) < length:
        body += conn.recv(1 << 20)


@pytest.fixture
def answer() -> bytes:
    from client import wire

    return wire.dump_npz(wire.npz_ready({"value": X, "cotangents": [U]}))


def _send(c: Client) -> dict[str, Any]:
    from client._core import decode

    flow = c._core.send("/v1/models/m/vjp", {"args": [X], "cotangent": X}, {}, X.nbytes)
    return decode(c._run(flow))


def _peer(
    script: list[list[str]], answer: bytes, tls: ssl.SSLContext | None = None
) -> Iterator[Peer]:
    peer = Peer(script, answer, tls)
    yield peer
    peer.close()


def test_answer_cut_mid_body_is_a_connect_error_and_retried(answer: bytes) -> None:
    for peer in _peer([["cut"], ["cut"]], answer):
        c = Client(peer.url, retries=1, backoff=0.01)
        with c, pytest.raises(errors.ConnectError, match="mid-answer"):
            _send(c)
        assert peer.connections == 2  # retried once, like a connection error on httpx


def test_kept_alive_connection_dropped_on_reuse_is_retried(answer: bytes) -> None:
    # Connection 1 answers, then closes when the next request arrives on it (the race a
    # pooled connection loses to a server's idle timeout); connection 2 answers.
    for peer in _peer([["ok", "drop"], ["ok"]], answer):
        with Client(peer.url, retries=0) as c:
            for _ in range(2):
                np.testing.assert_array_equal(_send(c)["cotangents"][0], U)
        assert peer.connections == 2 and c._pool is not None and c._pool.exchanges == 2


def test_https_goes_bulk_with_httpx_trust(
    answer: bytes, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command for a self-signed certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    args = ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"]
    args += ["-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)]
    subprocess.run(["openssl", *args], check=True, capture_output=True)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    # The bulk path trusts what httpx trusts: here the certificate SSL_CERT_FILE names.
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    for peer in _peer([["ok", "ok"]], answer, tls):
        with Client(peer.url, retries=0) as c:
            for _ in range(2):
                np.testing.assert_array_equal(_send(c)["cotangents"][0], U)
            assert c._pool is not None and c._pool.exchanges == 2
        assert peer.connections == 1  # kept alive over TLS too
    monkeypatch.delenv("SSL_CERT_FILE")
    for peer in _peer([["ok"]], answer, tls):
        c = Client(peer.url, retries=0)
        with c, pytest.raises(errors.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            _send(c)


def test_an_answer_before_the_body_is_read_is_the_servers_error(answer: bytes) -> None:
    # The peer answers 413 and closes with the body unread: the write fails, the answer
    # stands (as over httpx), and nothing is retried.
    for peer in _peer([["early"]], answer):
        c = Client(peer.url, retries=2, timeout=10)
        with c, pytest.raises(errors.PayloadTooLarge, match="over the limit"):
            _send(c)
        assert peer.connections == 1


def test_server_errors_map_as_over_httpx(server: LiveServer) -> None:
    x = np.ones(300_000, np.float32)  # 1.2 MB: bulk
    raised = []
    for bulk in (True, False):
        with Client(server.url, bulk=bulk, retries=0) as c:
            with pytest.raises(errors.APIError) as info:
                c.model("boom")(x)
            assert c._pool is None or c._pool.exchanges == 1
        raised.append((type(info.value), info.value.status, info.value.code, str(info.value)))
    assert raised[0] == raised[1]

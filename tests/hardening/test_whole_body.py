"""Large bodies received whole (service/whole_body.py), against a real `gradserve serve` on
uvicorn: answers as local JAX's, keep-alive and pipelining after such a body, a body that
came with its head, `Expect: 100-continue`, a client gone mid-body, and the slow-body guard.

The threshold is lowered to 16 KiB so that small arrays take the whole-body path.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import jax
import numpy as np
import pytest
from test_cancel import metric, wait_until
from test_transport import answer, connect, status_of

from bench.harness import ServerProcess
from client import Client, vjp, wire
from helpers import assert_tree_equal
from service.models import cookbook as cb

THRESHOLD = 16 * 1024
ENV = {
    "GRADSERVE_LARGE_BODY_BYTES": str(THRESHOLD),
    "GRADSERVE_MAX_BODY_BYTES": str(8 * 2**20),
    "GRADSERVE_BODY_WINDOW_S": "1",
    "GRADSERVE_BODY_MIN_RATE": "2048",
    "GRADSERVE_WARMUP": "false",
    "GRADSERVE_COMPILE_CACHE_DIR": "",
}
X = np.linspace(-1, 1, 50_000, dtype=np.float32)  # 200 KB: whole, and over one socket read
SMALL = np.linspace(-1, 1, 6_000, dtype=np.float32)  # 24 KB: whole, all in the head's read


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with ServerProcess(env=ENV) as srv:
        yield srv


def vjp_request(x: np.ndarray, *, close: bool = False, expect: bool = False) -> tuple[bytes, bytes]:
    """The head and body of `vjp(square3, x)` with a cotangent of ones, in npz."""
    body = wire.dump_npz({"args": [x], "cotangent": np.ones_like(x)})
    head = (
        b"POST /v1/models/square3/vjp HTTP/1.1\r\nhost: t\r\n"
        b"content-type: application/x-npz\r\naccept: application/x-npz\r\n"
        + (b"connection: close\r\n" if close else b"")
        + (b"expect: 100-continue\r\n" if expect else b"")
        + b"content-length: %d\r\n\r\n" % len(body)
    )
    return head, body


def expected(x: np.ndarray) -> np.ndarray:
    _, pullback = jax.vjp(cb.square3, x)
    return np.asarray(pullback(np.ones_like(x))[0])


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    """One response (status, body) from a keep-alive connection, by its Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    length = next(
        int(v)
        for k, _, v in (ln.partition(b":") for ln in lines[1:])
        if k.lower() == b"content-length"
    )
    while len(rest) < length:
        chunk = sock.recv(length - len(rest))
        assert chunk
        rest += chunk
    return int(lines[0].split()[1]), rest


def cotangent_of(body: bytes) -> np.ndarray:
    return np.asarray(wire.load_npz(body)["cotangents"][0])


def test_large_bodies_over_one_connection_match_local_jax(server: ServerProcess) -> None:
    with Client(server.url, encoding="npz") as c:
        f = c.model("square3")
        for x in (X, SMALL, X[:100], X * 2):  # whole, whole, parsed, whole: one connection
            y, pullback = vjp(f, x)
            assert_tree_equal(pullback(np.ones_like(x))[0], expected(x))
            assert_tree_equal(y, np.asarray(cb.square3(x)))


def test_pipelined_requests_after_a_whole_body(server: ServerProcess) -> None:
    first, second = vjp_request(X), vjp_request(SMALL)
    with connect(server.port) as sock:
        sock.sendall(b"".join([*first, *second]))  # the next head right behind the body
        for x in (X, SMALL):
            status, body = read_response(sock)
            assert status == 200, body
            np.testing.assert_array_equal(cotangent_of(body), expected(x))


def test_expect_100_continue(server: ServerProcess) -> None:
    head, body = vjp_request(X, close=True, expect=True)
    with connect(server.port) as sock:
        sock.sendall(head)
        interim = sock.recv(64)
        assert interim.startswith(b"HTTP/1.1 100 Continue"), interim
        sock.sendall(body)
        reply = answer(sock)
    assert status_of(reply) == 200, reply[:300]
    np.testing.assert_array_equal(cotangent_of(reply.partition(b"\r\n\r\n")[2]), expected(X))


def test_client_gone_mid_body_harms_nobody(server: ServerProcess) -> None:
    head, body = vjp_request(X)
    for _ in range(3):
        with connect(server.port) as sock:
            sock.sendall(head + body[: len(body) // 2])
    test_large_bodies_over_one_connection_match_local_jax(server)


def test_a_body_over_the_limit_is_refused_before_it_is_read(server: ServerProcess) -> None:
    head = (
        b"POST /v1/models/square3/vjp HTTP/1.1\r\nhost: t\r\ncontent-type: application/x-npz\r\n"
        b"content-length: %d\r\n\r\n" % (64 * 2**20)
    )
    with connect(server.port) as sock:
        sock.sendall(head)
        status, body = read_response(sock)
    assert status == 413, body


def test_a_slow_whole_body_is_closed(server: ServerProcess) -> None:
    before = metric(server.url, "gradserve_connections_closed_total", reason="body_too_slow")
    head, body = vjp_request(X)
    with connect(server.port) as sock:
        sock.sendall(head + body[:1000])  # then nothing, well under 2048 bytes/s
        started = time.monotonic()
        assert answer(sock) == b""
        assert time.monotonic() - started < 30
    wait_until(
        lambda: (
            metric(server.url, "gradserve_connections_closed_total", reason="body_too_slow")
            > before
        ),
        "a body_too_slow close counted",
    )

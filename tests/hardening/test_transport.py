"""Limits beneath the API (service/transport.py), against a real `gradserve serve`: header
size, count and request line, slow heads and bodies, and the connection cap."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from test_cancel import metric, wait_until

from bench.harness import ServerProcess

LIMITS = {
    "GRADSERVE_HEADER_TIMEOUT_S": "1.5",
    "GRADSERVE_BODY_WINDOW_S": "1",
    "GRADSERVE_BODY_MIN_RATE": "2048",
    "GRADSERVE_WARMUP": "false",
    "GRADSERVE_COMPILE_CACHE_DIR": "",
}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(60)  # only so that a broken server cannot hang the test
    return sock


def answer(sock: socket.socket) -> bytes:
    """What the server sends until it closes (b"" when it closed without a word)."""
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    return b"".join(chunks)


def send_and_read(port: int, data: bytes) -> bytes:
    sock = connect(port)
    # The server may refuse before the client finishes sending: fine, it read no more.
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        sock.sendall(data)
    with sock:
        return answer(sock)


def status_of(reply: bytes) -> int | None:
    return int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/1.1 ") else None


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with ServerProcess(env=LIMITS) as srv:
        yield srv


def served_normally(srv: ServerProcess) -> None:
    reply = httpx.post(f"{srv.url}/v1/models/tanh/grad", json={"args": [0.5]}, timeout=60)
    assert reply.status_code == 200, reply.text


# -------------------------------------------------------------------- header limits


def test_oversized_headers_431_and_memory_flat(server: ServerProcess) -> None:
    served_normally(server)
    before = rss_mb(server.proc.pid)
    header = b"X-Big: " + b"a" * 8192 + b"\r\n"
    request = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + header * 1000 + b"\r\n"  # 8 MB
    replies: list[bytes] = []

    def attack() -> None:
        replies.append(send_and_read(server.port, request))

    threads = [threading.Thread(target=attack) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(replies) == 20
    for reply in replies:  # 431, or closed when the client was still sending
        assert reply == b"" or status_of(reply) == 431, reply[:200]
    assert any(status_of(r) == 431 for r in replies)
    grown = rss_mb(server.proc.pid) - before
    assert grown < 50, f"RSS grew {grown:.0f} MB"
    assert metric(server.url, "gradserve_connections_closed_total", reason="headers_too_large")
    served_normally(server)


def test_too_many_headers_431(server: ServerProcess) -> None:
    request = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + b"X-A: 1\r\n" * 150 + b"\r\n"
    reply = send_and_read(server.port, request)
    assert status_of(reply) == 431, reply[:200]
    assert b"headers_too_large" in reply


def test_long_request_line_414(server: ServerProcess) -> None:
    reply = send_and_read(server.port, b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status_of(reply) == 414, reply[:200]
    # Sent in pieces, with no end of line yet: refused as soon as it passes the limit.
    sock = connect(server.port)
    with sock:
        sock.sendall(b"GET /" + b"b" * 5000)
        sock.sendall(b"b" * 5000)
        assert status_of(answer(sock)) == 414


def test_headers_under_the_limit_and_a_body_in_the_same_read_pass(server: ServerProcess) -> None:
    headers = {f"x-pad-{i}": "p" * 100 for i in range(60)}  # ~7 KB of headers
    big_body = {"args": [[0.25] * 100_000]}  # ~600 KB, most of it in the first reads
    reply = httpx.post(
        f"{server.url}/v1/models/tanh/eval", json=big_body, headers=headers, timeout=60
    )
    assert reply.status_code == 200, reply.text
    # Keep-alive: the next request's head on the same connection is counted afresh.
    with httpx.Client(timeout=60) as http:
        for _ in range(3):
            assert http.get(f"{server.url}/v1/models", headers=headers).status_code == 200


# -------------------------------------------------------------------- slow clients


def test_trickled_headers_are_cut_off_while_others_are_served(server: ServerProcess) -> None:
    sock = connect(server.port)
    sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")
    closed = threading.Event()

    def trickle() -> None:
        try:
            while not closed.is_set():
                sock.sendall(b"X")  # one byte of a header at a time
                time.sleep(0.1)
        except OSError:
            closed.set()

    trickler = threading.Thread(target=trickle)
    trickler.start()
    served = 0
    while not closed.is_set():  # everyone else is answered while the trickler holds on
        served_normally(server)
        served += 1
        closed.wait(0.05)
    trickler.join(60)
    reply = answer(sock)
    sock.close()
    assert reply == b"" or status_of(reply) == 408, reply[:200]
    assert served > 0
    assert metric(server.url, "gradserve_connections_closed_total", reason="header_timeout") >= 1


def test_silent_connection_is_closed(server: ServerProcess) -> None:
    sock = connect(server.port)
    with sock:
        assert status_of(answer(sock)) == 408  # nothing sent: closed after the head timeout


def test_trickled_body_is_cut_off_while_others_are_served(server: ServerProcess) -> None:
    before = metric(server.url, "gradserve_connections_closed_total", reason="body_too_slow")
    sock = connect(server.port)
    sock.sendall(
        b"POST /v1/models/tanh/eval HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Content-Length: 100000\r\n\r\n{"args": [['
    )
    closed = threading.Event()

    def trickle() -> None:
        try:
            while not closed.is_set():
                sock.sendall(b"0.5, ")  # 50 bytes/s, far below the 2048 bytes/s asked
                time.sleep(0.1)
        except OSError:
            closed.set()

    trickler = threading.Thread(target=trickle)
    trickler.start()
    while not closed.is_set():
        served_normally(server)
        closed.wait(0.05)
    trickler.join(60)
    sock.close()
    wait_until(
        lambda: (
            metric(server.url, "gradserve_connections_closed_total", reason="body_too_slow")
            == before + 1
        ),
        "the slow body is counted",
    )
    # Its request saw the disconnect while reading the body: cancelled, not a 5xx.
    assert metric(server.url, "gradserve_cancelled_requests_total", stage="reading") >= 1
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert 'status="5' not in text, [line for line in text.splitlines() if 'status="5' in line]


# -------------------------------------------------------------------- connection cap


def test_connection_cap_503_and_healthz_from_loopback() -> None:
    with ServerProcess(env={**LIMITS, "GRADSERVE_MAX_CONNECTIONS": "4"}) as srv:
        # wait_ready's connections are closed; hold the cap's worth open with keep-alive.
        held = []
        for _ in range(4):
            sock = connect(srv.port)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert status_of(sock.recv(65536)) == 200
            held.append(sock)
        over = send_and_read(srv.port, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status_of(over) == 503, over[:300]
        assert b"retry-after: 1" in over.lower() and b"too_many_connections" in over
        health = send_and_read(
            srv.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        assert status_of(health) == 200, health[:300]
        for sock in held:
            sock.close()
        wait_until(
            lambda: metric(srv.url, "gradserve_open_connections") <= 1,
            "the held connections close",
        )
        assert httpx.get(f"{srv.url}/v1/models", timeout=30).status_code == 200
        assert metric(srv.url, "gradserve_connections_closed_total", reason="over_capacity") >= 1

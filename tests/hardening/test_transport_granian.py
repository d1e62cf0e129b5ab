"""Under granian (`--server granian`), the connection limits granian enforces itself with
`transport.granian_http1_settings`: oversized heads get 431 or a close with memory flat, and a
trickled head is cut off. The app-level guards (quotas, cancellation) are the same app."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from test_transport import rss_mb, send_and_read, status_of

from bench.harness import ROOT, free_port

pytest.importorskip("granian")


@pytest.fixture(scope="module")
def granian_server() -> Iterator[tuple[str, int, subprocess.Popen]]:
    """The real `gradserve serve --server granian`, with a short head timeout."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", "serve", "--server", "granian", "--port", str(port)],
        cwd=ROOT,
        env={**os.environ, "GRADSERVE_HEADER_TIMEOUT_S": "1.5", "GRADSERVE_WARMUP": "false"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail("granian server did not start")
    yield url, port, proc
    proc.terminate()
    proc.wait(30)


def test_granian_oversized_headers_431_memory_flat(granian_server) -> None:
    url, port, proc = granian_server
    assert httpx.get(f"{url}/v1/models", timeout=30).status_code == 200
    before = rss_mb(proc.pid)
    header = b"X-Big: " + b"a" * 8192 + b"\r\n"
    request = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + header * 1000 + b"\r\n"
    replies: list[bytes] = []
    threads = [
        threading.Thread(target=lambda: replies.append(send_and_read(port, request)))
        for _ in range(20)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(replies) == 20
    assert all(r == b"" or status_of(r) == 431 for r in replies), [r[:80] for r in replies]
    assert rss_mb(proc.pid) - before < 50
    assert httpx.get(f"{url}/v1/models", timeout=30).status_code == 200


def test_granian_trickled_head_is_cut_off(granian_server) -> None:
    url, port, _ = granian_server
    reply = send_and_read(port, b"GET /v1/models HTTP/1.1\r\nHost")  # and then nothing
    assert reply == b"" or status_of(reply) == 408, reply[:200]
    assert httpx.get(f"{url}/healthz", timeout=30).status_code == 200

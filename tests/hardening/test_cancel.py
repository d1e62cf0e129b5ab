"""Cancelled work, on a real `gradserve serve`: a client that leaves while its request is
queued leaves no computation behind (a counting model shows it never ran)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import jax.numpy as jnp
import numpy as np
import pytest

from bench.harness import ServerProcess
from helpers import decode

MODELS = str(Path(__file__).with_name("counting_models.py"))


def metric(url: str, name: str, headers: dict[str, str] | None = None, **labels: str) -> float:
    """One sample of the server's /metrics (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    response = httpx.get(f"{url}/metrics", headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    text = response.text
    for line in text.splitlines():
        head, _, value = line.rpartition(" ")
        if head == (f"{name}{{{want}}}" if want else name):
            return float(value)
    return 0.0


def wait_until(predicate, what: str, timeout: float = 60) -> None:
    """Poll; the timeout only stops a broken server from hanging the test."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.02)


def raw_post(port: int, path: str, doc: object) -> socket.socket:
    """A whole request sent on a socket that the caller closes without reading the answer."""
    body = json.dumps(doc).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    return sock


@pytest.fixture
def server(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[ServerProcess, Path, Path]]:
    runs, gate = tmp_path / "runs", tmp_path / "gate"
    runs.touch()
    env = {
        "GRADSERVE_TEST_RUNS": str(runs),
        "GRADSERVE_TEST_GATE": str(gate),
        "GRADSERVE_WORKERS_PER_DEVICE": "1",  # one worker: the gate holds it, the rest queue
        "GRADSERVE_MAX_BATCH_SIZE": str(getattr(request, "param", 1)),
        "GRADSERVE_CPU_DEVICES": "1",
        "GRADSERVE_WARMUP": "false",
        "GRADSERVE_COMPILE_CACHE_DIR": "",
    }
    with ServerProcess("--models", MODELS, "--no-builtin-models", env=env) as srv:
        yield srv, runs, gate
        gate.touch()  # release a worker a failed test left waiting


def test_disconnected_while_queued_never_runs(server) -> None:
    srv, runs, gate = server
    url = srv.url
    # Compile `counted` first, so the request under test is queued, not compiling.
    warm = httpx.post(f"{url}/v1/models/counted/eval", json={"args": [[1.0]]}, timeout=60)
    assert warm.status_code == 200, warm.text

    held: dict[str, httpx.Response] = {}
    holder = threading.Thread(
        target=lambda: held.setdefault(
            "r", httpx.post(f"{url}/v1/models/gate/eval", json={"args": [[3.0]]}, timeout=120)
        )
    )
    holder.start()
    wait_until(lambda: "gate 3 started" in runs.read_text(), "the gate request runs")

    before = metric(url, "gradserve_cancelled_requests_total", stage="queued")
    sock = raw_post(srv.port, "/v1/models/counted/eval", {"args": [[777.0]]})
    wait_until(
        lambda: metric(url, "gradserve_queue_depth", device="cpu:0") == 1, "the request queues"
    )
    sock.close()  # the client leaves while its request waits behind the gate
    wait_until(
        lambda: metric(url, "gradserve_cancelled_requests_total", stage="queued") == before + 1,
        "the server notices the disconnect",
    )

    gate.touch()
    holder.join(120)
    assert held["r"].status_code == 200, held["r"].text
    np.testing.assert_array_equal(decode(held["r"])["value"], np.float32([3.0]))
    # One worker, first in first out: had the cancelled request stayed queued, it would run
    # before this one.
    after = httpx.post(f"{url}/v1/models/counted/eval", json={"args": [[5.0]]}, timeout=60)
    assert after.status_code == 200, after.text
    np.testing.assert_array_equal(decode(after)["value"], 2 * jnp.float32([5.0]))
    lines = runs.read_text().splitlines()
    assert "counted 5" in lines
    assert "counted 777" not in lines, lines
    assert metric(url, "gradserve_queue_depth", device="cpu:0") == 0
    assert metric(url, "gradserve_requests_total", model="counted", op="eval", status="499") == 1


def test_disconnected_while_running_is_discarded(server) -> None:
    srv, runs, gate = server
    url = srv.url
    before = metric(url, "gradserve_cancelled_requests_total", stage="running")
    sock = raw_post(srv.port, "/v1/models/gate/eval", {"args": [[4.0]]})
    wait_until(lambda: "gate 4 started" in runs.read_text(), "the gate request runs")
    sock.close()
    wait_until(
        lambda: metric(url, "gradserve_cancelled_requests_total", stage="running") == before + 1,
        "the server notices the disconnect",
    )
    gate.touch()  # the computation finishes; its result has nobody to go to
    after = httpx.post(f"{url}/v1/models/counted/eval", json={"args": [[6.0]]}, timeout=60)
    assert after.status_code == 200, after.text
    np.testing.assert_array_equal(decode(after)["value"], 2 * jnp.float32([6.0]))


@pytest.mark.parametrize("server", [8], indirect=True)
def test_a_batch_leaves_the_departed_out(server) -> None:
    """With batching on, the request queued beside the one whose client left runs alone."""
    srv, runs, gate = server
    url = srv.url
    warm = httpx.post(f"{url}/v1/models/counted/eval", json={"args": [[1.0]]}, timeout=60)
    assert warm.status_code == 200, warm.text
    held: dict[str, httpx.Response] = {}

    def post(name: str, model: str, x: float) -> None:
        doc = {"args": [[x]]}
        held[name] = httpx.post(f"{url}/v1/models/{model}/eval", json=doc, timeout=120)

    holder = threading.Thread(target=post, args=("gate", "gate", 3.0))
    holder.start()
    wait_until(lambda: "gate 3 started" in runs.read_text(), "the gate request runs")
    before = metric(url, "gradserve_cancelled_requests_total", stage="queued")
    sock = raw_post(srv.port, "/v1/models/counted/eval", {"args": [[777.0]]})
    wait_until(lambda: metric(url, "gradserve_queue_depth", device="cpu:0") == 1, "it queues")
    stays = threading.Thread(target=post, args=("stays", "counted", 5.0))
    stays.start()
    wait_until(lambda: metric(url, "gradserve_queue_depth", device="cpu:0") == 2, "both queue")
    sock.close()
    wait_until(
        lambda: metric(url, "gradserve_cancelled_requests_total", stage="queued") == before + 1,
        "the server notices the disconnect",
    )
    gate.touch()
    holder.join(120)
    stays.join(120)
    assert held["stays"].status_code == 200, held["stays"].text
    np.testing.assert_array_equal(decode(held["stays"])["value"], 2 * jnp.float32([5.0]))
    lines = runs.read_text().splitlines()
    assert "counted 5" in lines
    assert "counted 777" not in lines, lines

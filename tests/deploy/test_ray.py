"""`gradserve serve --ray`: two replicas behind Ray Serve's HTTP proxy on 127.0.0.1.

The real CLI in a subprocess starts a local Ray (2 CPUs, loopback only), deploys, and on SIGTERM
removes the app and stops Ray. Answers must equal local JAX, and both replicas must serve. The
server runs with an API key, so the settings are seen to reach the replicas.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import jax
import numpy as np
import pytest
from deploy_files import ROOT

from client import wire
from service.models import cookbook as cb
from service.ray_serve import REPLICA_HEADER

pytest.importorskip("ray.serve", reason="needs the `ray` extra")

STARTUP_S = 150
KEY = "ray-test-key"
AUTH = {"authorization": f"Bearer {KEY}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    cmd = [sys.executable, "-m", "service", "serve", "--ray", "--replicas", "2", "--num-cpus", "2"]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADSERVE_")}
    env |= {"GRADSERVE_API_KEYS": KEY, "RAY_USAGE_STATS_ENABLED": "0"}
    # A file, not a pipe: Ray forwards every replica's log to the driver, and a full pipe that
    # nobody reads would block it. Its own session, so a stuck run is killed with its Ray.
    log_path = tmp_path_factory.mktemp("ray") / "gradserve.log"
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(proc, url, log_path)
        yield url
    finally:
        _stop(proc)
    assert proc.returncode == 0, log_path.read_text()[-3000:]


def _wait_ready(proc: subprocess.Popen, url: str, log_path: Path) -> None:
    """Until `serve.run` has returned (every replica warm) and the proxy answers /readyz."""
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gradserve --ray exited: {log_path.read_text()[-3000:]}")
        if "gradserve on Ray Serve at" in log_path.read_text():
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
        time.sleep(0.5)
    raise TimeoutError(f"gradserve --ray did not become ready: {log_path.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM: the CLI deletes the app and shuts its Ray down, then exits 0."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _grad(url: str, W: np.ndarray, b: np.ndarray) -> tuple[str, list[np.ndarray]]:
    body = wire.dumps({"args": wire.encode_tree([W, b]), "argnums": [0, 1]})
    response = httpx.post(
        f"{url}/v1/models/logistic_loss/grad",
        content=body,
        headers={"content-type": wire.JSON, **AUTH},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    return response.headers[REPLICA_HEADER], wire.decode_tree(wire.loads(response.content)["grad"])


def test_two_replicas_answer_like_local_jax(ray_server: str) -> None:
    rng = np.random.default_rng(0)
    inputs = [(rng.normal(size=3).astype(np.float32), np.float32(rng.normal())) for _ in range(24)]
    # Concurrent requests, so the proxy has reason to use both replicas.
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda wb: _grad(ray_server, *wb), inputs))

    want_fn = jax.jit(jax.grad(cb.logistic_loss, argnums=(0, 1)))
    for (W, b), (_, got) in zip(inputs, results, strict=True):
        want = want_fn(W, b)
        for g, w in zip(got, want, strict=True):
            assert g.dtype == w.dtype and g.shape == w.shape
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    replicas = {replica for replica, _ in results}
    assert len(replicas) == 2, replicas


def test_every_response_names_its_replica_and_keeps_one_request_id(ray_server: str) -> None:
    for path, status in [
        ("/healthz", 200),
        ("/readyz", 200),
        ("/v1/models", 200),
        ("/metrics", 200),
    ]:
        response = httpx.get(
            ray_server + path, headers={**AUTH, "x-request-id": "req-1"}, timeout=10
        )
        assert response.status_code == status, (path, response.text)
        assert response.headers[REPLICA_HEADER].startswith("gradserve#"), path
        assert response.headers.get_list("x-request-id") == ["req-1"], path


def test_replicas_enforce_the_keys(ray_server: str) -> None:
    response = httpx.get(f"{ray_server}/v1/models", timeout=10)
    assert response.status_code == 401, response.text
    assert response.json()["code"] == "missing_key"
    assert REPLICA_HEADER in response.headers


def test_a_sessions_products_reach_its_replica(ray_server: str) -> None:
    """The client's X-Session-ID keeps a session's requests on one replica (Ray's consistent-hash
    routing): with two replicas, chance alone would send half of them elsewhere (a 404 there)."""
    from client import Client, vjp

    sent: list[httpx.Response] = []
    http = httpx.Client(event_hooks={"response": [sent.append]}, timeout=60)
    rng = np.random.default_rng(2)
    with Client(ray_server, api_key=KEY, http_client=http) as c:
        for _ in range(4):  # sessions with different keys, so both replicas hold some
            W, b = rng.normal(size=3).astype(np.float32), np.float32(rng.normal())
            first = len(sent)
            _, pullback = vjp(c.model("logistic_predict"), W, b)
            _, local = jax.vjp(cb.logistic_predict, W, b)
            for _ in range(8):
                u = rng.normal(size=4).astype(np.float32)
                for g, w in zip(pullback(u), local(u), strict=True):
                    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
            answers = [r for r in sent[first:] if r.request.method == "POST"]
            assert len(answers) == 9 and answers[0].request.url.path.endswith("/linearize")
            assert all(r.status_code == 200 for r in answers), [r.status_code for r in answers]
            assert len({r.headers[REPLICA_HEADER] for r in answers}) == 1
    http.close()
    # Collected sessions were deleted on the replicas that held them (204, not 404).
    deletes = [r.status_code for r in sent if r.request.method == "DELETE"]
    assert len(deletes) >= 2 and set(deletes) == {204}, deletes

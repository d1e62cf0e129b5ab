"""The real thing: `gradserve serve` (uvicorn) on 127.0.0.1, spoken to over real HTTP."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import jax
import numpy as np

from client import wire
from helpers import assert_tree_equal, decode, request_body
from service.models import cookbook as cb


def test_json_grad_and_npz_hessian_over_http(live_server):
    W, b = np.array([0.1, 0.2, 0.3], np.float32), np.float32(-0.4)
    with httpx.Client(base_url=live_server.url) as http:
        r = http.post(
            "/v1/models/logistic_loss/grad",
            json={"args": [W.tolist(), float(b)], "argnums": [0, 1]},
        )
        assert r.status_code == 200, r.text
        assert_tree_equal(decode(r)["grad"], list(jax.grad(cb.logistic_loss, (0, 1))(W, b)))
        body, media = request_body("npz", {"args": [W, b]})
        r = http.post(
            "/v1/models/logistic_loss/hessian", content=body, headers={"content-type": media}
        )
        assert r.headers["content-type"] == wire.NPZ
        assert_tree_equal(decode(r)["hessian"], jax.hessian(cb.logistic_loss)(W, b))
        assert "compute;dur=" in r.headers["server-timing"]


def test_concurrent_requests_all_answered_correctly(live_server):
    xs = np.linspace(-3, 3, 32, dtype=np.float32)

    def one(x: np.float32) -> np.ndarray:
        r = httpx.post(
            f"{live_server.url}/v1/models/tanh/call",
            json={"args": [float(x)], "transforms": [{"op": "grad"}] * 2},
        )
        assert r.status_code == 200, r.text
        return decode(r)["value"]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, xs))
    assert_tree_equal(np.stack(results), jax.vmap(jax.grad(jax.grad(jax.numpy.tanh)))(xs))


def test_errors_and_health_over_http(live_server):
    with httpx.Client(base_url=live_server.url) as http:
        r = http.post(
            "/v1/models/logistic_loss/grad",
            json={"args": [[1, 2, 3, 4], 0.5]},
            headers={"x-request-id": "req-1"},
        )
        assert r.status_code == 422 and r.headers["content-type"] == wire.PROBLEM_JSON
        assert (
            r.json()["detail"] == "argument 0 of 'logistic_loss' expects float32[3], got float32[4]"
        )
        assert r.json()["request_id"] == r.headers["x-request-id"] == "req-1"
        assert http.get("/healthz").json() == {"status": "ok"}
        assert http.get("/readyz").status_code == 200
        assert "gradserve_requests_total" in http.get("/metrics").text

"""Sessions on a server with two CPU devices: a session's products run on the device that holds
its residuals, whichever device the least-loaded routing would have picked."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import jax
import jax.numpy as jnp
import numpy as np

from client import wire
from helpers import LiveServer, assert_tree_equal

ENGINE_MODELS = str(Path(__file__).with_name("engine_models.py"))  # `spread`: on every device


def device(response: httpx.Response) -> str:
    match = re.search(r'device;desc="([^"]*)"', response.headers["server-timing"])
    assert match, response.headers["server-timing"]
    return match.group(1)


def test_products_run_where_the_residuals_are() -> None:
    server = LiveServer("--models", ENGINE_MODELS, env={"GRADSERVE_CPU_DEVICES": "2"})
    npz = {"content-type": wire.NPZ}
    grad = jax.grad(lambda v: jnp.sum(jnp.sin(v) ** 2))
    try:
        server.wait_ready()

        def session(i: int) -> tuple[str, set[str]]:
            x = np.linspace(-1, 1, 50_000, dtype=np.float32) * (1 + i / 10)
            with httpx.Client(base_url=server.url, timeout=60) as http:
                body = wire.dump_npz({"args": [x], "transforms": [{"op": "grad"}]})
                r = http.post("/v1/models/spread/linearize", content=body, headers=npz)
                assert r.status_code == 200, r.text
                sid, where = wire.load_npz(r.content)["session"]["id"], device(r)
                products = set()
                for _ in range(4):
                    v = np.cos(x * (i + 1)).astype(np.float32)
                    body = wire.dump_npz({"tangents": [v]})
                    r = http.post(f"/v1/sessions/{sid}/jvp", content=body, headers=npz)
                    assert r.status_code == 200, r.text
                    got = wire.load_npz(r.content)["tangent"]
                    assert_tree_equal(got, jax.jvp(grad, (x,), (v,))[1], rtol=1e-4, atol=1e-5)
                    products.add(device(r))
                return where, products

        with ThreadPoolExecutor(8) as pool:  # concurrent, so both devices take sessions
            results = list(pool.map(session, range(24)))
    finally:
        server.stop()
    assert {where for where, _ in results} == {"cpu:0", "cpu:1"}
    assert all(products == {where} for where, products in results), results

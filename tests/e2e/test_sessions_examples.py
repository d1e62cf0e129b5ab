"""The session examples against a live server and local JAX: trust-ncg's hessp from one session
per iterate, and a Lanczos estimate of mlp_loss's top Hessian eigenvalues in x."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import httpx
import jax
import numpy as np

from client import Client
from service.registry import Registry

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _load(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


trust_ncg, lanczos = _load("scipy_trust_ncg"), _load("lanczos_hessian")


def test_trust_ncg_hessp_linearizes_once_per_iterate(live_server: Any) -> None:
    sent: list[httpx.Request] = []
    http = httpx.Client(event_hooks={"request": [sent.append]})
    with Client(live_server.url, http_client=http) as c:
        with_sessions = trust_ncg.minimise(c, np.zeros(4))
        requests = list(sent)
        stateless = trust_ncg.minimise(c, np.zeros(4), sessions=False)
    http.close()
    assert with_sessions.success and stateless.success
    np.testing.assert_allclose(with_sessions.x, stateless.x, rtol=1e-4, atol=1e-5)
    paths = [r.url.path for r in requests]
    opened = paths.count("/v1/models/logistic_loss/linearize")
    products = [p for p in paths if p.startswith("/v1/sessions/") and p.endswith("/jvp")]
    assert opened >= 2 and len(products) > opened  # several products per linearization
    assert "/v1/models/logistic_loss/hvp" not in paths
    deletes = [r for r in requests if r.method == "DELETE"]
    assert len(deletes) == opened  # each session closed when its iterate is left


def test_lanczos_top_hessian_eigenvalues_of_mlp_loss(live_server: Any) -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 784)).astype(np.float32)
    y = np.array([4, 1], np.int32)
    with Client(live_server.url) as c:
        top = lanczos.top_hessian_eigenvalues(c, x, y, k=3)
    model = Registry()
    model.load("service.models.cookbook")
    mlp_loss = model.get("mlp_loss")
    H = jax.hessian(lambda a: mlp_loss.bound()(mlp_loss.params, a, y))(x)
    want = np.linalg.eigvalsh(np.asarray(H, np.float64).reshape(x.size, x.size))[::-1][:3]
    np.testing.assert_allclose(top, want, rtol=1e-3)

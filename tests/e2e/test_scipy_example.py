"""examples/scipy_trust_ncg.py reaches the optimum that trust-ncg finds with local JAX."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import jax
import numpy as np
from scipy.optimize import minimize

from client import Client
from service.models import cookbook as cb

_path = Path(__file__).resolve().parents[2] / "examples" / "scipy_trust_ncg.py"
_spec = importlib.util.spec_from_file_location("scipy_trust_ncg", _path)
example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(example)


def _local_optimum(x0: np.ndarray) -> Any:
    f = lambda x: cb.logistic_loss(x[:3], x[3])  # noqa: E731
    value_and_grad = jax.jit(jax.value_and_grad(f))

    def fun(x: np.ndarray) -> tuple[float, np.ndarray]:
        v, g = value_and_grad(x.astype(np.float32))
        return float(v), np.asarray(g, np.float64)

    def hessp(x: np.ndarray, p: np.ndarray) -> np.ndarray:
        hvp = jax.jvp(jax.grad(f), (x.astype(np.float32),), (p.astype(np.float32),))[1]
        return np.asarray(hvp, np.float64)

    return minimize(fun, x0, jac=True, hessp=hessp, method="trust-ncg", options={"gtol": 1e-5})


def test_remote_trust_ncg_reaches_the_local_optimum(client_server: Any) -> None:
    x0 = np.zeros(4)
    with Client(client_server.url) as c:
        remote = example.minimise(c, x0)
    here = _local_optimum(x0)
    assert remote.success and here.success
    np.testing.assert_allclose(remote.x, here.x, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(remote.fun, here.fun, rtol=1e-5, atol=1e-6)

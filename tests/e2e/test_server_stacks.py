"""Every HTTP server `gradserve serve --server` offers answers the same numbers as local JAX.

A real `gradserve serve` per stack, spoken to through the client: a tiny JSON grad, a small
grad in base64 leaves, a 1M-float32 VJP in npz (the large-body path where the stacks differ
most: received whole and answered buffer by buffer on uvicorn) and a large JSON grad.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from bench.harness import ServerProcess
from client import Client, grad, vjp
from service.models import cookbook as cb

STACKS = ("uvicorn", "granian")


@pytest.fixture(scope="module")
def answers() -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal(1_000_000).astype(np.float32)
    u = rng.standard_normal(1_000_000).astype(np.float32)
    X = rng.standard_normal((300, 300)).astype(np.float32)
    out = {}
    for stack in STACKS:
        pytest.importorskip(stack)
        with ServerProcess("--server", stack) as server:
            with Client(server.url, encoding="json") as c:
                tiny = grad(c.model("tanh"))(np.float32(0.5))
                big_json = grad(c.model("tanh_sq_sum"))(X)
            with Client(server.url) as c:  # "auto": a small array goes as a base64 leaf
                small = grad(c.model("tanh_sq_sum"))(X[:30, :30])
            with Client(server.url, encoding="npz") as c:
                value, pullback = vjp(c.model("square3"), x)
                (cotangent,) = pullback(u)
        out[stack] = {
            "tiny": tiny,
            "json": big_json,
            "base64": small,
            "value": value,
            "cotangent": cotangent,
        }
    out["inputs"] = {"x": x, "u": u, "X": X}
    return out


@pytest.mark.parametrize("stack", STACKS)
def test_every_stack_equals_local_jax(answers, stack):
    got, inputs = answers[stack], answers["inputs"]
    x, u, X = inputs["x"], inputs["u"], inputs["X"]
    np.testing.assert_allclose(got["tiny"], jax.grad(cb.tanh)(np.float32(0.5)), rtol=1e-6)
    np.testing.assert_allclose(got["json"], jax.grad(cb.tanh_sq_sum)(X), rtol=1e-5, atol=1e-6)
    small = jax.grad(cb.tanh_sq_sum)(X[:30, :30])
    np.testing.assert_allclose(got["base64"], small, rtol=1e-5, atol=1e-6)
    assert got["base64"].dtype == np.float32
    value, pullback = jax.vjp(cb.square3, x)
    np.testing.assert_allclose(got["value"], value, rtol=1e-6)
    np.testing.assert_allclose(got["cotangent"], pullback(u)[0], rtol=1e-6)
    assert got["cotangent"].dtype == np.float32 and got["cotangent"].shape == x.shape


def test_the_stacks_agree_bit_for_bit(answers):
    """Same app, same XLA programs: the server underneath must not change a single bit."""
    for key in ("tiny", "json", "base64", "value", "cotangent"):
        np.testing.assert_array_equal(answers["uvicorn"][key], answers["granian"][key])

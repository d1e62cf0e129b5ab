"""`client.jax.as_jax`: a remote model inside local JAX programs equals the all-local program."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from client import Client
from client.jax import as_jax
from service.models import cookbook as cb

RNG = np.random.default_rng(1)
X = RNG.standard_normal((3, 4)).astype(np.float32)
W = RNG.standard_normal(3).astype(np.float32)
b = np.float32(0.3)


@pytest.fixture(scope="module")
def c(client_server: Any) -> Iterator[Client]:
    requests: list[httpx.Request] = []
    with Client(
        client_server.url, http_client=httpx.Client(event_hooks={"request": [requests.append]})
    ) as client:
        client.requests = requests  # type: ignore[attr-defined]
        yield client


def close(got: Any, want: Any, tol: float = 1e-5) -> None:
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol)


def test_jit_grad_inside_a_local_computation(c: Client) -> None:
    f = as_jax(c.model("tanh_sq_sum"))
    got = jax.jit(jax.grad(lambda x: 2 * f(x) + jnp.sum(x)))(X)
    close(got, jax.jit(jax.grad(lambda x: 2 * cb.tanh_sq_sum(x) + jnp.sum(x)))(X))
    close(jax.jit(f)(X), cb.tanh_sq_sum(X))


def test_jvp_vjp_and_jacobians(c: Client) -> None:
    f = as_jax(c.model("logistic_predict"))
    v = RNG.standard_normal(3).astype(np.float32)
    close(
        jax.jvp(f, (W, b), (v, np.float32(1))),
        jax.jvp(cb.logistic_predict, (W, b), (v, np.float32(1))),
    )
    y, pullback = jax.vjp(f, W, b)
    y_l, pullback_l = jax.vjp(cb.logistic_predict, W, b)
    u = RNG.standard_normal(4).astype(np.float32)
    close((y, pullback(u)), (y_l, pullback_l(u)))
    for transform in (jax.jacfwd, jax.jacrev):
        close(transform(f, (0, 1))(W, b), transform(cb.logistic_predict, (0, 1))(W, b))
    close(jax.jit(jax.jacrev(f))(W, b), jax.jacrev(cb.logistic_predict)(W, b))


def test_pytree_arguments(c: Client) -> None:
    f = as_jax(c.model("logistic_loss_dict"))
    params = {"W": W, "b": b}
    close(jax.grad(f)(params), jax.grad(cb.logistic_loss_dict)(params))


def test_vmap_is_one_request(c: Client) -> None:
    f = as_jax(c.model("tanh_sq_sum"))
    xs = RNG.standard_normal((8, 3, 4)).astype(np.float32)
    f(X)  # the signature probe (tanh_sq_sum declares no input shape) happens once, here
    before = len(c.requests)
    close(jax.vmap(f)(xs), jax.vmap(cb.tanh_sq_sum)(xs))
    assert len(c.requests) - before == 1
    pred = as_jax(c.model("logistic_predict"))
    _, pullback = jax.vjp(pred, W, b)
    _, pullback_l = jax.vjp(cb.logistic_predict, W, b)
    U = RNG.standard_normal((16, 4)).astype(np.float32)
    before = len(c.requests)
    close(jax.vmap(pullback)(U), jax.vmap(pullback_l)(U))
    assert len(c.requests) - before == 1
    loss = as_jax(c.model("logistic_loss"))
    Ws = RNG.standard_normal((5, 3)).astype(np.float32)
    close(
        jax.vmap(jax.grad(loss), in_axes=(0, None))(Ws, b),
        jax.vmap(jax.grad(cb.logistic_loss), in_axes=(0, None))(Ws, b),
    )


def test_second_order_points_to_the_server(c: Client) -> None:
    f = as_jax(c.model("tanh"))
    with pytest.raises(NotImplementedError, match=r"client\.hessian"):
        jax.grad(jax.grad(lambda x: jnp.sum(f(x))))(1.0)


def test_only_remote_functions_of_a_blocking_client() -> None:
    with pytest.raises(TypeError, match="remote function"):
        as_jax(jnp.tanh)


def test_no_request_at_trace_time_when_the_spec_is_declared(c: Client) -> None:
    pred = as_jax(c.model("logistic_predict"))  # output declared float32[4]
    before = len(c.requests)
    jaxpr = jax.make_jaxpr(jax.grad(lambda W, b: jnp.sum(pred(W, b))))(W, b)
    assert len(c.requests) == before
    assert "gradserve_call" in str(jaxpr) and "gradserve_vjp" in str(jaxpr)

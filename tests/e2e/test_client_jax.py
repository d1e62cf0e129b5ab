"""`client.jax.as_jax`: a remote model inside local JAX programs equals the all-local program,
under any composition of transforms and to any order, with the requests counted."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from client import Client
from client.jax import as_jax
from helpers import assert_tree_close, recorded_client
from service.models import cookbook as cb

RNG = np.random.default_rng(1)
X = RNG.standard_normal((3, 4)).astype(np.float32)
W = RNG.standard_normal(3).astype(np.float32)
b = np.float32(0.3)


@pytest.fixture(scope="module")
def c(client_server: Any) -> Iterator[Client]:
    with recorded_client(client_server.url) as client:
        yield client


close = assert_tree_close


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


def test_only_remote_functions_of_a_blocking_client() -> None:
    with pytest.raises(TypeError, match="remote function"):
        as_jax(jnp.tanh)


def test_no_request_at_trace_time_when_the_spec_is_declared(c: Client) -> None:
    pred = as_jax(c.model("logistic_predict"))  # output declared float32[4]
    before = len(c.requests)
    jaxpr = jax.make_jaxpr(jax.grad(lambda W, b: jnp.sum(pred(W, b))))(W, b)
    assert len(c.requests) == before
    assert "gradserve_remote" in str(jaxpr) and "op='vjp'" in str(jaxpr)


# ---------------------------------------------------------------------------- any order


def counted(c: Client, thunk: Any) -> tuple[Any, list[str]]:
    """The result and the requests it sent (op of each), after the signature probes; DELETEs of
    sessions dropped earlier, which ride along with a later one's opening, are not counted."""
    before = len(c.requests)
    out = thunk()
    return out, [r.url.path.rsplit("/", 1)[1] for r in c.requests[before:] if r.method == "POST"]


def test_hessian_is_one_request_under_jit(c: Client) -> None:
    f = as_jax(c.model("logistic_predict"))  # vector output: the (4, 3, 3) Hessian, as JAX's
    got, sent = counted(c, lambda: jax.jit(jax.hessian(f))(W, b))
    close(got, jax.hessian(cb.logistic_predict)(W, b))
    assert sent == ["call"]  # [vjp, vmap, jvp, vmap]: jacrev's basis, then jacfwd's
    # Without jit JAX evaluates every intermediate eagerly: f, its jvp, the gradient, and the
    # Hessian, each one request.
    got, sent = counted(c, lambda: jax.hessian(f, (0, 1))(W, b))
    close(got, jax.hessian(cb.logistic_predict, (0, 1))(W, b))
    assert sent == ["eval", "call", "call", "call"]
    loss = as_jax(c.model("logistic_loss_dict"))
    params = {"W": W, "b": b}
    got, sent = counted(c, lambda: jax.jit(jax.hessian(loss))(params))
    close(got, jax.hessian(cb.logistic_loss_dict)(params))
    assert sent == ["call"]


def test_grad_costs_the_pullback_alone_under_jit(c: Client) -> None:
    f = as_jax(c.model("logistic_loss"))
    got, sent = counted(c, lambda: jax.jit(jax.grad(f, (0, 1)))(W, b))
    close(got, jax.grad(cb.logistic_loss, (0, 1))(W, b))
    assert sent == ["call"]  # [vjp]: XLA drops the unused value's callback
    got, sent = counted(c, lambda: jax.grad(f)(W, b))
    close(got, jax.grad(cb.logistic_loss)(W, b))
    # Eager JAX computes the value too: a session's (linearize), then the pullback through it,
    # which skips the forward pass (tests/e2e/test_client_jax_sessions.py).
    assert sent == ["linearize", "vjp"]


def test_jacfwd_of_grad_and_grad_of_grad(c: Client) -> None:
    f = as_jax(c.model("logistic_loss"))
    got, sent = counted(c, lambda: jax.jit(jax.jacfwd(jax.grad(f)))(W, b))
    close(got, jax.jacfwd(jax.grad(cb.logistic_loss))(W, b))
    assert sent == ["call"]  # [vjp, jvp, vmap]
    got, sent = counted(c, lambda: jax.jacfwd(jax.grad(f))(W, b))
    close(got, jax.jacfwd(jax.grad(cb.logistic_loss))(W, b))
    assert sent == ["eval", "call", "call", "call"]
    g = as_jax(c.model("piecewise"))  # a scalar model
    x = np.float32(1.3)
    got, sent = counted(c, lambda: jax.grad(jax.grad(g))(x))
    close(got, jax.grad(jax.grad(cb.piecewise))(x))
    assert sent == ["linearize", "linearize", "vjp"]  # g's value, grad(g)'s, its pullback
    got, sent = counted(c, lambda: jax.jit(jax.grad(jax.grad(jax.grad(g))))(x))
    close(got, jax.grad(jax.grad(jax.grad(cb.piecewise)))(x))
    assert sent == ["call"]  # [vjp, vjp, vjp]


def test_nested_vmap_and_vmap_of_grad(c: Client) -> None:
    f = as_jax(c.model("tanh_sq_sum"))
    xss = RNG.standard_normal((2, 5, 3, 4)).astype(np.float32)
    f(X)  # the signature probe (the output shape is declared, the input's is not)
    got, sent = counted(c, lambda: jax.vmap(jax.vmap(f))(xss))
    close(got, jax.vmap(jax.vmap(cb.tanh_sq_sum))(xss))
    assert sent == ["call"]  # [vmap, vmap]
    got, sent = counted(c, lambda: jax.jit(jax.vmap(jax.grad(f)))(xss[0]))
    close(got, jax.vmap(jax.grad(cb.tanh_sq_sum))(xss[0]))
    assert sent == ["call"]  # [vjp, vmap]
    got, sent = counted(c, lambda: jax.vmap(jax.grad(f))(xss[0]))
    close(got, jax.vmap(jax.grad(cb.tanh_sq_sum))(xss[0]))
    assert sent == ["call", "call"]  # eagerly, the values too
    t = as_jax(c.model("tanh"))
    ys = RNG.standard_normal((3, 4, 2)).astype(np.float32)
    t(ys[:, 0, 0])  # probe the per-example signature
    got, sent = counted(c, lambda: jax.vmap(jax.vmap(t, in_axes=1), in_axes=2)(ys))
    close(got, jax.vmap(jax.vmap(jnp.tanh, in_axes=1), in_axes=2)(ys))
    assert sent == ["call"]


def test_a_local_loss_mixing_remote_and_local_code(c: Client) -> None:
    pred = as_jax(c.model("logistic_predict"))
    target = np.array([0.1, 0.9, 0.4, 0.7], np.float32)

    def loss(W, b, model):
        p = model(W, b)
        return jnp.mean((p - target) ** 2) + 0.1 * jnp.sum(jnp.sin(W)) * b

    remote = lambda W, b: loss(W, b, pred)  # noqa: E731
    local = lambda W, b: loss(W, b, cb.logistic_predict)  # noqa: E731
    got, sent = counted(c, lambda: jax.jit(jax.hessian(remote, (0, 1)))(W, b))
    close(got, jax.hessian(local, (0, 1))(W, b))
    # pred's value, its Jacobian pushed along jacfwd's basis ([jvp, vmap]) and the pullback of
    # (p - target) differentiated along it ([vjp, vmap, jvp, vmap]): all three enter the
    # Hessian; the gradient itself (the [vjp, vmap] value) does not, and is not sent.
    assert sent == ["eval", "call", "call"]
    got, sent = counted(c, lambda: jax.jit(jax.value_and_grad(remote))(W, b))
    close(got, jax.value_and_grad(local)(W, b))
    assert sent == ["eval", "call"]
    v = RNG.standard_normal(3).astype(np.float32)
    hvp = lambda f: jax.jvp(jax.grad(f), (W, b), (v, np.float32(0.5)))[1]  # noqa: E731
    close(jax.jit(lambda: hvp(remote))(), hvp(local))


def test_integer_arguments_and_higher_order_in_float_ones(c: Client) -> None:
    f = as_jax(c.model("mlp_loss"))
    params = cb.mlp_init(jax.random.PRNGKey(0))
    x = (RNG.standard_normal((2, 784)) * 0.1).astype(np.float32)
    y = np.array([3, 8], np.int32)
    v = RNG.standard_normal((2, 784)).astype(np.float32)
    local = lambda x: cb.mlp_loss(params, x, y)  # noqa: E731
    got, sent = counted(c, lambda: jax.jit(lambda x: jax.grad(f)(x, y))(x))
    close(got, jax.grad(local)(x), tol=1e-4)
    assert sent == ["call"]
    hvp = lambda g: jax.jvp(jax.grad(g), (x,), (v,))[1]  # noqa: E731
    got, sent = counted(c, jax.jit(lambda: hvp(lambda x: f(x, y))))
    close(got, hvp(local), tol=1e-4)
    assert sent == ["call"]  # [vjp, jvp]


def test_abstract_evaluation_of_any_order_sends_nothing(c: Client) -> None:
    pred = as_jax(c.model("logistic_predict"))
    before = len(c.requests)
    jaxpr = jax.make_jaxpr(jax.hessian(jax.jacrev(pred)))(W, b)
    assert len(c.requests) == before
    assert str(jaxpr).count("gradserve_remote") >= 1

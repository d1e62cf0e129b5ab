"""`as_jax` without jit: the transpose of its JVP at a point goes to a session (no forward pass),
equals local JAX, carries no primals, and falls back statelessly when the session is gone."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import jax
import numpy as np
import pytest

from client import Client, wire
from client import _jax_sessions as kept
from client.jax import as_jax
from helpers import assert_tree_close, recorded_client
from service.models import cookbook as cb

RNG = np.random.default_rng(11)
W = RNG.standard_normal(3).astype(np.float32)
b = np.float32(0.3)


@pytest.fixture(scope="module")
def c(client_server: Any) -> Iterator[Client]:
    with recorded_client(client_server.url) as client:
        yield client


close = assert_tree_close


def sent(c: Client, thunk: Any) -> tuple[Any, list[httpx.Request]]:
    """The result and the POSTs it sent (DELETEs of dropped sessions ride along; not counted)."""
    before = len(c.requests)
    out = thunk()
    return out, [r for r in c.requests[before:] if r.method == "POST"]


def body(request: httpx.Request) -> dict[str, Any]:
    """The request's fields, less `binary` (how its arrays are written, not what it asks)."""
    media = request.headers["content-type"]
    doc = wire.load_npz(request.content) if media == wire.NPZ else wire.loads(request.content)
    doc.pop("binary", None)
    return doc


def is_session(request: httpx.Request, product: str) -> bool:
    path = request.url.path
    return path.startswith("/v1/sessions/") and path.endswith(f"/{product}")


def test_grad_pulls_back_through_a_session_with_no_primals(c: Client) -> None:
    f = as_jax(c.model("mlp_loss"))
    x = (RNG.standard_normal((64, 784)) * 0.1).astype(np.float32)  # 200 KB of primal
    y = RNG.integers(0, 10, 64).astype(np.int32)
    params = cb.mlp_init(jax.random.PRNGKey(0))
    got, posts = sent(c, lambda: jax.value_and_grad(f)(x, y))
    close(got, jax.value_and_grad(lambda x: cb.mlp_loss(params, x, y))(x), tol=1e-4)
    opened, pulled = posts
    assert opened.url.path == "/v1/models/mlp_loss/linearize" and len(opened.content) > x.nbytes
    assert is_session(pulled, "vjp") and set(body(pulled)) == {"cotangent"}
    assert len(pulled.content) < 1024  # a scalar cotangent, not x
    # In the integer argument too: JAX's float0 zeros, as without a session.
    (gx, gy), posts = sent(c, lambda: jax.grad(f, (0, 1), allow_int=True)(x, y))
    assert gy.dtype == jax.dtypes.float0 and gy.shape == y.shape
    close(gx, jax.grad(lambda x: cb.mlp_loss(params, x, y))(x), tol=1e-4)
    assert [r.url.path.rsplit("/")[-1] for r in posts] == ["linearize", "vjp"]


def test_vjp_pullback_single_and_batched(c: Client) -> None:
    f = as_jax(c.model("logistic_predict"))
    (y, pullback), posts = sent(c, lambda: jax.vjp(f, W, b))
    y_l, pullback_l = jax.vjp(cb.logistic_predict, W, b)
    close(y, y_l)
    assert [r.url.path for r in posts] == ["/v1/models/logistic_predict/linearize"]
    u = RNG.standard_normal(4).astype(np.float32)
    U = RNG.standard_normal((16, 4)).astype(np.float32)
    got, posts = sent(c, lambda: (pullback(u), pullback(2 * u), jax.vmap(pullback)(U)))
    close(got, (pullback_l(u), pullback_l(2 * u), jax.vmap(pullback_l)(U)))
    assert all(is_session(r, "vjp") for r in posts) and len(posts) == 3
    assert set(body(posts[2])) == {"cotangent", "batched"}
    # jacrev: the value, then its basis pulled back in one batched session request.
    got, posts = sent(c, lambda: jax.jacrev(f, (0, 1))(W, b))
    close(got, jax.jacrev(cb.logistic_predict, (0, 1))(W, b))
    assert posts[0].url.path.endswith("/linearize") and is_session(posts[1], "vjp")
    assert len(posts) == 2


def test_pytree_arguments_and_grad_of_grad(c: Client) -> None:
    loss = as_jax(c.model("logistic_loss_dict"))
    params = {"W": W, "b": b}
    got, posts = sent(c, lambda: jax.grad(loss)(params))
    close(got, jax.grad(cb.logistic_loss_dict)(params))
    assert is_session(posts[-1], "vjp") and len(posts) == 2
    g = as_jax(c.model("piecewise"))
    x = np.float32(1.3)
    got, posts = sent(c, lambda: jax.grad(jax.grad(g))(x))
    close(got, jax.grad(jax.grad(cb.piecewise))(x))
    # g's value (unused), grad(g) at (x, 1.0), and its pullback through that session.
    assert [r.url.path.rsplit("/")[-1] for r in posts] == ["linearize", "linearize", "vjp"]


def test_a_deleted_session_falls_back_to_the_stateless_request(c: Client) -> None:
    f = as_jax(c.model("logistic_predict"))
    _, pullback = jax.vjp(f, W, b)
    _, pullback_l = jax.vjp(cb.logistic_predict, W, b)
    u = RNG.standard_normal(4).astype(np.float32)
    _, (first,) = sent(c, lambda: pullback(u))
    assert is_session(first, "vjp")
    session = first.url.path.split("/")[3]
    assert httpx.delete(f"{c._core.base_url}/v1/sessions/{session}").status_code == 204
    got, posts = sent(c, lambda: pullback(u))
    close(got, pullback_l(u))
    assert is_session(posts[0], "vjp") and posts[1].url.path == "/v1/models/logistic_predict/call"
    assert "args" in body(posts[1])  # the stateless pullback carries the primals
    got, posts = sent(c, lambda: pullback(3 * u))  # the session is forgotten: stateless
    close(got, pullback_l(3 * u))
    assert [r.url.path for r in posts] == ["/v1/models/logistic_predict/call"]


def test_at_most_capacity_sessions_and_dropped_ones_are_deleted(c: Client) -> None:
    f = as_jax(c.model("logistic_loss"))
    points = [RNG.standard_normal(3).astype(np.float32) for _ in range(kept.CAPACITY + 2)]
    ids = []
    for p in points:
        got, posts = sent(c, lambda p=p: jax.grad(f)(p, b))
        close(got, jax.grad(cb.logistic_loss)(p, b))
        ids.append(posts[-1].url.path.split("/")[3])
    assert len(kept._store) <= kept.CAPACITY
    jax.grad(f)(points[0], b)  # a new session: the dropped ones are deleted before it opens
    alive = [httpx.get(f"{c._core.base_url}/v1/sessions/{s}").status_code for s in ids]
    assert alive[:2] == [404, 404] and alive[-kept.CAPACITY + 1 :] == [200] * (kept.CAPACITY - 1)


def test_jit_opens_no_session(c: Client) -> None:
    f = as_jax(c.model("logistic_loss"))
    got, posts = sent(c, lambda: jax.jit(jax.grad(f))(W, b))
    close(got, jax.grad(cb.logistic_loss)(W, b))
    assert [r.url.path.rsplit("/")[-1] for r in posts] == ["call"]


def test_linearize_pushes_forward_through_the_session(c: Client) -> None:
    f = as_jax(c.model("logistic_predict"))
    (y, f_jvp), posts = sent(c, lambda: jax.linearize(f, W, b))
    y_l, f_jvp_l = jax.linearize(cb.logistic_predict, W, b)
    close(y, y_l)
    assert [r.url.path for r in posts] == ["/v1/models/logistic_predict/linearize"]
    v = RNG.standard_normal(3).astype(np.float32)
    V = RNG.standard_normal((8, 3)).astype(np.float32)
    s = np.linspace(-1, 1, 8).astype(np.float32)
    got, posts = sent(c, lambda: (f_jvp(v, np.float32(0.5)), jax.vmap(f_jvp)(V, s)))
    close(got, (f_jvp_l(v, np.float32(0.5)), jax.vmap(f_jvp_l)(V, s)))
    assert [is_session(r, "jvp") for r in posts] == [True, True]
    assert set(body(posts[0])) == {"tangents"} and set(body(posts[1])) == {"tangents", "batched"}
    # A tangent shared by the batch is not the session's batched form: stateless, same numbers.
    got, posts = sent(c, lambda: jax.vmap(f_jvp, in_axes=(0, None))(V, np.float32(1)))
    close(got, jax.vmap(f_jvp_l, in_axes=(0, None))(V, np.float32(1)))
    assert [r.url.path.rsplit("/")[-1] for r in posts] == ["call"]


def test_the_key_tells_shapes_and_dtypes_apart(c: Client) -> None:
    fn = c.model("tanh")
    one = np.ones(2, np.float16)
    keys = {
        kept._key(fn, (), (0,), (x,))
        for x in (np.float32(1), np.ones(1, np.float32), one, one.view(jax.numpy.bfloat16))
    }
    assert len(keys) == 4

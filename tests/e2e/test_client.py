"""The client against a real server: every op equals local JAX, sync and async alike.

Each test runs twice, through `Client` and through `AsyncClient` (the `h` harness awaits what
needs awaiting), and counts the HTTP requests it makes with an httpx event hook.
"""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from client import (
    AsyncClient,
    Client,
    errors,
    grad,
    hessian,
    hvp,
    jacfwd,
    jacobian,
    jacrev,
    jvp,
    linearize,
    value_and_grad,
    vjp,
    vmap,
)
from helpers import free_port
from service.models import cookbook as cb

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location(
    "client_test_examples", ROOT / "examples" / "models.py"
)
examples = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(examples)

RNG = np.random.default_rng(0)
W = RNG.standard_normal(3).astype(np.float32)
b = np.float32(RNG.standard_normal())
X = RNG.standard_normal((5, 6)).astype(np.float32)
V = RNG.standard_normal((5, 6)).astype(np.float32)
A = np.array([[5.0, 2.0 + 3j, 5j], [2.0 - 3j, 7.0, 1.0 + 7j], [-5j, 1.0 - 7j, 12.0]], np.complex64)


class Harness:
    """One client plus the means to resolve its results and count its requests."""

    def __init__(self, kind: str, url: str) -> None:
        self.kind, self.url, self.requests = kind, url, []
        if kind == "sync":
            http = httpx.Client(event_hooks={"request": [self.requests.append]})
            self.c: Any = Client(url, http_client=http)
            self.loop = None
        else:
            self.loop = asyncio.new_event_loop()

            async def hook(request: httpx.Request) -> None:
                self.requests.append(request)

            http = httpx.AsyncClient(event_hooks={"request": [hook]})
            self.c = AsyncClient(url, http_client=http)
        self.http = http

    def __call__(self, value: Any) -> Any:
        return self.loop.run_until_complete(value) if inspect.isawaitable(value) else value

    def model(self, name: str) -> Any:
        m = self.c.model(name)
        if self.loop is not None:
            self(self.c.model_info(name))  # the sync client fetches the spec in model()
        return m

    def counted(self, thunk: Any) -> tuple[Any, int]:
        before = len(self.requests)
        value = self(thunk())
        return value, len(self.requests) - before

    def close(self) -> None:
        if self.loop is None:
            self.http.close()
        else:
            self.loop.run_until_complete(self.http.aclose())
            self.loop.close()


@pytest.fixture(scope="module", params=["sync", "async"])
def h(request: pytest.FixtureRequest, client_server: Any) -> Iterator[Harness]:
    harness = Harness(request.param, client_server.url)
    yield harness
    harness.close()


def assert_tree_close(got: Any, want: Any, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Same structure (tuples stay tuples), numpy leaves of the same shape and dtype, values
    close to local JAX."""
    got_leaves, got_def = jax.tree.flatten(got)
    want_leaves, want_def = jax.tree.flatten(want)
    assert got_def == want_def, f"{got_def} != {want_def}"
    for g, w in zip(got_leaves, want_leaves, strict=True):
        assert isinstance(g, np.ndarray), type(g)
        assert g.shape == w.shape and g.dtype == w.dtype, (g.shape, g.dtype, w.shape, w.dtype)
        np.testing.assert_allclose(g, np.asarray(w), rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------- values


def test_eval_and_nested_grads_are_0d_arrays(h: Harness) -> None:
    tanh = h.model("tanh")
    assert_tree_close(h(tanh(2.0)), jnp.tanh(2.0))
    f, local = tanh, jnp.tanh
    for _ in range(3):
        f, local = grad(f), jax.grad(local)
        assert_tree_close(h(f(2.0)), local(2.0))


def test_grad_argnums_int_and_tuple(h: Harness) -> None:
    loss = h.model("logistic_loss")
    for argnums in (0, 1, (0, 1), (1, 0), [0, 1]):
        want = jax.grad(
            cb.logistic_loss, argnums=tuple(argnums) if isinstance(argnums, list) else argnums
        )(W, b)
        assert_tree_close(h(grad(loss, argnums=argnums)(W, b)), want)
    assert_tree_close(
        h(value_and_grad(loss, (0, 1))(W, b)), jax.value_and_grad(cb.logistic_loss, (0, 1))(W, b)
    )


def test_pytree_arguments(h: Harness) -> None:
    params = {"W": W, "b": b}
    f = h.model("logistic_loss_dict")
    assert_tree_close(h(grad(f)(params)), jax.grad(cb.logistic_loss_dict)(params))
    assert_tree_close(h(hessian(f)(params)), jax.hessian(cb.logistic_loss_dict)(params))
    # Python scalars and lists take the declared dtypes, as in JAX.
    assert_tree_close(
        h(grad(f)({"W": W.tolist(), "b": float(b)})), jax.grad(cb.logistic_loss_dict)(params)
    )


def test_jacobians_and_hessians(h: Harness) -> None:
    f, loss = h.model("logistic_predict"), h.model("logistic_loss")
    for remote, local in ((jacfwd, jax.jacfwd), (jacrev, jax.jacrev)):
        for argnums in (0, 1, (0, 1)):
            assert_tree_close(
                h(remote(f, argnums)(W, b)), local(cb.logistic_predict, argnums)(W, b)
            )
    for mode in ("fwd", "rev", "auto"):
        assert_tree_close(
            h(jacobian(f, (0, 1), mode=mode)(W, b)), jax.jacrev(cb.logistic_predict, (0, 1))(W, b)
        )
    assert_tree_close(h(jacfwd(jacrev(f))(W, b)), jax.jacfwd(jax.jacrev(cb.logistic_predict))(W, b))
    assert_tree_close(
        h(jacfwd(jacrev(f, (0, 1)), (0, 1))(W, b)),
        jax.jacfwd(jax.jacrev(cb.logistic_predict, (0, 1)), (0, 1))(W, b),
    )
    assert_tree_close(h(hessian(loss, (0, 1))(W, b)), jax.hessian(cb.logistic_loss, (0, 1))(W, b))
    # jax.hessian of any output: a vector output, tuple argnums nesting as tuples of tuples
    assert_tree_close(h(hessian(f)(W, b)), jax.hessian(cb.logistic_predict)(W, b))
    assert_tree_close(h(hessian(f, (0, 1))(W, b)), jax.hessian(cb.logistic_predict, (0, 1))(W, b))
    assert_tree_close(
        h(vmap(hessian(f), (0, None))(np.stack([W, 2 * W]), b)),
        jax.vmap(jax.hessian(cb.logistic_predict), (0, None))(np.stack([W, 2 * W]), b),
    )


def test_jvp_vjp_linearize(h: Harness) -> None:
    f = h.model("logistic_predict")
    v = RNG.standard_normal(3).astype(np.float32)
    assert_tree_close(
        h(jvp(f, (W, b), (v, 0.0))), jax.jvp(cb.logistic_predict, (W, b), (v, jnp.float32(0)))
    )
    y, pullback = h(vjp(f, W, b))
    y_local, pullback_local = jax.vjp(cb.logistic_predict, W, b)
    assert_tree_close(y, y_local)
    u = RNG.standard_normal(4).astype(np.float32)
    assert_tree_close(h(pullback(u)), pullback_local(u))
    U = RNG.standard_normal((8, 4)).astype(np.float32)
    assert_tree_close(h(vmap(pullback)(U)), jax.vmap(pullback_local)(U))
    assert_tree_close(h(vmap(pullback, in_axes=1)(U.T)), jax.vmap(pullback_local, in_axes=1)(U.T))
    y, f_jvp = h(linearize(f, W, b))
    _, f_jvp_local = jax.linearize(cb.logistic_predict, W, b)
    S = RNG.standard_normal((8, 3)).astype(np.float32)
    assert_tree_close(h(f_jvp(v, np.float32(0))), f_jvp_local(v, jnp.float32(0)))
    assert_tree_close(
        h(vmap(f_jvp, in_axes=0)(S, np.zeros(8, np.float32))),
        jax.vmap(f_jvp_local)(S, jnp.zeros(8)),
    )


def test_hvp_modes(h: Harness) -> None:
    f = h.model("tanh_sq_sum")
    want = jax.jvp(jax.grad(cb.tanh_sq_sum), (X,), (V,))[1]
    for mode in ("fwd_rev", "rev_fwd", "rev_rev"):
        assert_tree_close(h(hvp(f, (X,), (V,), mode=mode)), want, rtol=1e-4, atol=1e-5)
    loss = h.model("logistic_loss")
    v = (W[::-1].copy(), np.float32(0.5))
    assert_tree_close(
        h(hvp(loss, (W, b), v, argnums=(0, 1))),
        jax.jvp(jax.grad(cb.logistic_loss, (0, 1)), (W, b), v)[1],
    )
    # In x only: mlp_loss's labels are int32, and their tangent is ignored.
    x = RNG.standard_normal((3, 784)).astype(np.float32)
    y = np.array([1, 7, 3], np.int32)
    vx = RNG.standard_normal((3, 784)).astype(np.float32)
    params = cb.mlp_init(jax.random.PRNGKey(0))
    want = jax.jvp(jax.grad(lambda x: cb.mlp_loss(params, x, y)), (x,), (vx,))[1]
    mlp_loss = h.model("mlp_loss")  # fetches the spec
    before = len(h.requests)
    for mode in ("fwd_rev", "rev_fwd", "rev_rev"):
        got = h(hvp(mlp_loss, (x, y), (vx, 0), mode=mode))
        assert_tree_close(got, want, rtol=2e-4, atol=1e-6)
    assert len(h.requests) - before == 3


def test_chain_products_keep_jax_structure(h: Harness) -> None:
    """jvp/vjp steps inside a client chain (what client.jax builds): one request, JAX's tuples."""
    from client._core import Transform

    f = h.model("logistic_predict")
    v, u = RNG.standard_normal(3).astype(np.float32), RNG.standard_normal(4).astype(np.float32)
    y, pullback = jax.vjp(cb.logistic_predict, W, b)
    vjp_chain = f.then(Transform.of("vjp", argnums=(0, 1)))
    got, n = h.counted(lambda: vjp_chain(W, b, u))
    assert n == 1 and isinstance(got, tuple) and isinstance(got[1], tuple)
    assert_tree_close(got, (y, pullback(u)))
    jvp_chain = f.then(Transform.of("jvp", argnums=0, value=False))
    assert_tree_close(
        h(jvp_chain(W, b, v)), jax.jvp(lambda W: cb.logistic_predict(W, b), (W,), (v,))[1]
    )
    # ApplyHessian's chain: the jvp (in W) of the pullback of u
    hess = f.then(Transform.of("vjp", argnums=0, value=False)).then(
        Transform.of("jvp", argnums=0, value=False)
    )
    H = jax.hessian(cb.logistic_predict)(W, b)
    assert_tree_close(h(hess(W, b, u, v)), jnp.einsum("i,ijk,k->j", u, H, v), rtol=1e-5, atol=1e-6)
    with pytest.raises(errors.InvalidInput, match=r"jvp of 'logistic_predict'") as e:
        h(f.then(Transform.of("jvp"))(W, b, v))
    assert e.value.code == "invalid_transform"


def test_vmap(h: Harness) -> None:
    xs = np.linspace(-2, 2, 7, dtype=np.float32)
    tanh = h.model("tanh")
    assert_tree_close(h(vmap(grad(tanh))(xs)), jax.vmap(jax.grad(jnp.tanh))(xs))
    Ws = RNG.standard_normal((4, 3)).astype(np.float32)
    loss = h.model("logistic_loss")
    want = jax.vmap(jax.grad(cb.logistic_loss), in_axes=(0, None))(Ws, b)
    assert_tree_close(h(vmap(grad(loss), in_axes=(0, None))(Ws, b)), want)


def test_complex_and_holomorphic(h: Harness) -> None:
    z = np.complex64(3 + 4j)
    assert_tree_close(h(grad(h.model("abs2"))(3.0 + 4j)), jax.grad(cb.abs2)(z))
    assert_tree_close(
        h(grad(h.model("sin"), holomorphic=True)(3.0 + 4j)), jax.grad(jnp.sin, holomorphic=True)(z)
    )
    assert_tree_close(
        h(grad(h.model("conj"), holomorphic=True)(3.0 + 4j)),
        jax.grad(jnp.conjugate, holomorphic=True)(z),
    )
    assert_tree_close(
        h(grad(h.model("cholesky_loss"), holomorphic=True)(A)),
        jax.grad(cb.cholesky_loss, holomorphic=True)(A),
        rtol=1e-4,
        atol=1e-4,
    )
    z_dot = np.complex64(0.3 + 0.7j)
    assert_tree_close(h(jvp(h.model("sin"), (z,), (z_dot,))), jax.jvp(jnp.sin, (z,), (z_dot,)))


def test_has_aux(h: Harness) -> None:
    ridge = h.model("ridge")
    w = RNG.standard_normal(4).astype(np.float32)
    Xr, yr = (
        RNG.standard_normal((6, 4)).astype(np.float32),
        RNG.standard_normal(6).astype(np.float32),
    )
    for remote, local in (
        (grad, jax.grad),
        (value_and_grad, jax.value_and_grad),
        (jacrev, jax.jacrev),
        (jacfwd, jax.jacfwd),
    ):
        assert_tree_close(
            h(remote(ridge, has_aux=True)(w, Xr, yr)),
            local(examples.ridge, has_aux=True)(w, Xr, yr),
            rtol=1e-4,
            atol=1e-5,
        )
    assert_tree_close(h(ridge(w, Xr, yr)), examples.ridge(w, Xr, yr), rtol=1e-5, atol=1e-5)


def test_npz_and_json_give_the_same_numbers(h: Harness) -> None:
    f = h.model("tanh_sq_sum")
    Xb = RNG.standard_normal((64, 200)).astype(np.float32)  # 51 kB: over the npz threshold
    before = len(h.requests)
    assert_tree_close(h(grad(f)(Xb)), jax.grad(cb.tanh_sq_sum)(Xb))
    assert h.requests[before].headers["content-type"] == "application/x-npz"
    assert h.requests[before].headers["accept"] == "application/x-npz"
    small_before = len(h.requests)
    h(grad(f)(X))
    assert h.requests[small_before].headers["content-type"] == "application/json"


# ---------------------------------------------------------------------------- one request each


def test_chains_cost_one_request(h: Harness) -> None:
    tanh, f = h.model("tanh"), h.model("logistic_predict")
    _, n = h.counted(lambda: grad(grad(grad(tanh)))(2.0))
    assert n == 1
    _, n = h.counted(lambda: jacfwd(jacrev(f))(W, b))
    assert n == 1
    _, n = h.counted(lambda: vmap(grad(tanh))(np.linspace(0, 1, 16, dtype=np.float32)))
    assert n == 1
    _, pullback = h(vjp(f, W, b))
    U = RNG.standard_normal((128, 4)).astype(np.float32)
    (W_bar, b_bar), n = h.counted(lambda: vmap(pullback)(U))
    assert n == 1 and W_bar.shape == (128, 3) and b_bar.shape == (128,)
    # The pullback's session: only the cotangents travel (tests/e2e/test_sessions_client.py).
    path = h.requests[-1].url.path
    assert path.startswith("/v1/sessions/") and path.endswith("/vjp")


def test_32_concurrent_awaits(client_server: Any) -> None:
    async def main() -> list:
        async with AsyncClient(client_server.url) as c:
            f = grad(grad(c.model("tanh")))
            xs = np.linspace(-3, 3, 32, dtype=np.float32)
            results = await asyncio.gather(*(f(x) for x in xs))
            return xs, results

    xs, results = asyncio.run(main())
    assert_tree_close(np.stack(results), jax.vmap(jax.grad(jax.grad(jnp.tanh)))(xs))


# ---------------------------------------------------------------------------- errors


def test_errors_carry_the_server_detail(h: Harness) -> None:
    with pytest.raises(errors.ModelNotFound, match="no model named 'nope'") as e:
        h(h.c.model_info("nope"))
    assert e.value.status == 404 and e.value.code == "model_not_found"
    with pytest.raises(errors.InvalidInput, match="needs a scalar output") as e:
        h(grad(h.model("logistic_predict"))(W, b))
    assert e.value.status == 422 and e.value.code == "non_scalar_output" and e.value.request_id
    with pytest.raises(errors.PayloadTooLarge, match="over the limit") as e:
        h(hessian(h.model("mlp_loss"))(np.zeros((16, 784), np.float32), np.zeros(16, np.int32)))
    assert e.value.status == 413


def test_local_shape_check_matches_the_server_and_sends_nothing(h: Harness) -> None:
    loss = h.model("logistic_loss")
    bad = np.ones(4, np.float32)
    before = len(h.requests)
    with pytest.raises(errors.InvalidInput) as local:
        h(grad(loss)(bad, b))
    assert len(h.requests) == before
    r = httpx.post(f"{h.url}/v1/models/logistic_loss/grad", json={"args": [bad.tolist(), float(b)]})
    assert (
        str(local.value)
        == r.json()["detail"]
        == "argument 0 of 'logistic_loss' expects float32[3], got float32[4]"
    )


class _Rewrite(httpx.BaseTransport):
    def __init__(self, **headers: str) -> None:
        self.inner, self.headers = httpx.HTTPTransport(), headers

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        request.headers.update(self.headers)
        return self.inner.handle_request(request)


def test_406_and_415_map_to_not_acceptable(client_server: Any) -> None:
    for headers, status in (({"accept": "text/html"}, 406), ({"content-type": "text/plain"}, 415)):
        with Client(
            client_server.url, http_client=httpx.Client(transport=_Rewrite(**headers))
        ) as c:
            tanh = c.model("tanh")
            with pytest.raises(errors.NotAcceptable) as e:
                tanh(1.0)
            assert e.value.status == status and e.value.detail


@pytest.mark.filterwarnings(
    "ignore:Using .httpx. with .starlette.testclient", "ignore:You should not use the 'timeout'"
)
def test_unauthorized_in_process() -> None:
    from starlette.testclient import TestClient

    from service import Settings, create_app

    with TestClient(create_app(Settings(api_keys="k-0123456789abcdef"))) as app:
        with pytest.raises(errors.Unauthorized) as e:
            Client("http://testserver", http_client=app).model("tanh")
        assert e.value.status == 401 and e.value.detail
        c = Client("http://testserver", http_client=app, api_key="k-0123456789abcdef")
        assert_tree_close(grad(c.model("tanh"))(1.0), jax.grad(jnp.tanh)(1.0))


def test_stopped_server_gives_connect_error_after_retries() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    attempts = []
    http = httpx.Client(event_hooks={"request": [attempts.append]})
    c = Client(url, http_client=http, retries=3, backoff=0.05, timeout=5.0)
    t0 = time.monotonic()
    with pytest.raises(errors.ConnectError, match="cannot reach"):
        c.model("tanh")
    assert len(attempts) == 4 and time.monotonic() - t0 < 5.0

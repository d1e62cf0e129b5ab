"""The client's sessions against real servers: `vjp` and `linearize` send only (co)tangents,
survive a restart, close, and are deleted when collected; sync and async alike."""

from __future__ import annotations

import asyncio
import gc
import inspect
from collections.abc import Iterator
from typing import Any

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bench.harness
from client import AsyncClient, Client, grad, linearize, vjp, vmap, wire
from service.registry import Registry

RNG = np.random.default_rng(5)
_REGISTRY = Registry()
_REGISTRY.load("service.models.cookbook")


def cookbook(name: str) -> Any:
    model = _REGISTRY.get(name)
    return lambda *args: model.bound()(model.params, *args)


class Recorder:
    """A client whose requests are kept (method, path, decoded body) as they are sent."""

    def __init__(self, kind: str, url: str) -> None:
        self.requests: list[httpx.Request] = []
        self.loop = asyncio.new_event_loop() if kind == "async" else None
        if self.loop is None:
            self.http: Any = httpx.Client(event_hooks={"request": [self.requests.append]})
            self.c: Any = Client(url, http_client=self.http)
        else:

            async def hook(request: httpx.Request) -> None:
                self.requests.append(request)

            self.http = httpx.AsyncClient(event_hooks={"request": [hook]})
            self.c = AsyncClient(url, http_client=self.http)

    def __call__(self, value: Any) -> Any:
        return self.loop.run_until_complete(value) if inspect.isawaitable(value) else value

    def model(self, name: str) -> Any:
        if self.loop is not None:
            self(self.c.model_info(name))
        return self.c.model(name)

    def since(self, n: int) -> list[httpx.Request]:
        return self.requests[n:]

    def session_exists(self, sid: str) -> bool:
        return httpx.get(f"{self.url}/v1/sessions/{sid}").status_code == 200

    @property
    def url(self) -> str:
        return self.c._core.base_url

    def close(self) -> None:
        if self.loop is None:
            self.http.close()
        else:
            self.loop.run_until_complete(self.http.aclose())
            self.loop.close()


@pytest.fixture(params=["sync", "async"])
def rec(request: pytest.FixtureRequest, live_server: Any) -> Iterator[Recorder]:
    r = Recorder(request.param, live_server.url)
    yield r
    r.close()


def body(request: httpx.Request) -> dict[str, Any]:
    """The request's fields, less `binary` (how its arrays are written, not what it asks)."""
    media = request.headers["content-type"]
    doc = wire.load_npz(request.content) if media == wire.NPZ else wire.loads(request.content)
    doc.pop("binary", None)
    return doc


def close(got: Any, want: Any, rtol: float = 1e-5, atol: float = 1e-5) -> None:
    got_leaves, got_def = jax.tree.flatten(got)
    want_leaves, want_def = jax.tree.flatten(want)
    assert got_def == want_def, (got_def, want_def)
    for g, w in zip(got_leaves, want_leaves, strict=True):
        assert isinstance(g, np.ndarray) and g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_allclose(g, np.asarray(w), rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------- what travels


def test_pullback_requests_carry_no_primals(rec: Recorder) -> None:
    x = RNG.standard_normal((64, 784)).astype(np.float32)  # 200 KB of primal
    y, pullback = rec(vjp(rec.model("mlp"), x))
    y_local, pull_local = jax.vjp(cookbook("mlp"), x)
    close(y, y_local, rtol=1e-4)
    opened = rec.requests[-1]
    assert opened.url.path == "/v1/models/mlp/linearize" and len(opened.content) > x.nbytes

    u = RNG.standard_normal((64, 10)).astype(np.float32)
    n = len(rec.requests)
    close(rec(pullback(u)), pull_local(u), rtol=1e-4)
    U = RNG.standard_normal((8, 64, 10)).astype(np.float32)
    close(rec(vmap(pullback)(U)), jax.vmap(pull_local)(U), rtol=1e-4)
    sent = rec.since(n)
    assert [r.url.path.split("/")[-1] for r in sent] == ["vjp", "vjp"]  # one request each
    for r, cotangent in zip(sent, (u, U), strict=True):
        assert r.url.path.startswith("/v1/sessions/")
        assert set(body(r)) <= {"cotangent", "batched"}
        # JSON spends about 11 bytes a float32: the size of the cotangent alone, far below x's.
        assert len(r.content) < 4 * cotangent.nbytes + 1024 < x.nbytes


def test_pushforward_requests_carry_only_tangents(rec: Recorder) -> None:
    W, b = RNG.standard_normal(3).astype(np.float32), np.float32(0.4)
    _, f_jvp = rec(linearize(rec.model("logistic_predict"), W, b))
    S = RNG.standard_normal((16, 3)).astype(np.float32)
    n = len(rec.requests)
    got = rec(vmap(f_jvp)(S, np.zeros(16, np.float32)))
    local = jax.vmap(lambda s: jax.jvp(cookbook("logistic_predict"), (W, b), (s, 0.0))[1])(S)
    close(got, local)
    (sent,) = rec.since(n)
    assert sent.url.path.endswith("/jvp") and set(body(sent)) == {"tangents", "batched"}


def test_hvp_at_a_point_is_linearize_of_grad(rec: Recorder) -> None:
    X = RNG.standard_normal((5, 6)).astype(np.float32)
    f = rec.model("tanh_sq_sum")
    hvp_at = rec(linearize(grad(f), X))[1]
    g = jax.grad(cookbook("tanh_sq_sum"))
    for _ in range(3):
        V = RNG.standard_normal((5, 6)).astype(np.float32)
        close(rec(hvp_at(V)), jax.jvp(g, (X,), (V,))[1])
    # mlp_loss has an integer argument: only x is linearized, y's tangent is never sent.
    x, y = RNG.standard_normal((2, 784)).astype(np.float32), np.array([1, 9], np.int32)
    hvp_x = rec(linearize(grad(rec.model("mlp_loss")), x, y))[1]
    assert body(rec.requests[-1])["argnums"] == [0]
    v = RNG.standard_normal((2, 784)).astype(np.float32)
    gx = jax.grad(cookbook("mlp_loss"))
    close(rec(hvp_x(v, np.zeros(2, np.int32))), jax.jvp(lambda a: gx(a, y), (x,), (v,))[1], 1e-4)


def test_integer_arguments_get_the_stateless_stand_ins(rec: Recorder) -> None:
    x, y = RNG.standard_normal((2, 784)).astype(np.float32), np.array([1, 9], np.int32)
    _, pullback = rec(vjp(rec.model("mlp_loss"), x, y))
    x_bar, y_bar = rec(pullback(np.float32(1.0)))
    _, pull_local = jax.vjp(lambda a: cookbook("mlp_loss")(a, y), x)
    close(x_bar, pull_local(np.float32(1.0))[0], rtol=1e-4)
    assert y_bar.dtype == bool and y_bar.shape == y.shape and not y_bar.any()  # as stateless vjp


# ---------------------------------------------------------------------------- lifetime


def test_context_manager_closes_the_session(rec: Recorder) -> None:
    W, b = RNG.standard_normal(3).astype(np.float32), np.float32(0.1)
    f = rec.model("logistic_predict")
    if rec.loop is None:
        with linearize(f, W, b) as (_, f_jvp):
            sid = f_jvp.session.id
            assert rec.session_exists(sid)
            f_jvp(np.ones(3, np.float32), 0.0)
    else:

        async def use() -> tuple:
            async with await linearize(f, W, b) as (_, f_jvp):
                assert rec.session_exists(f_jvp.session.id)
                await f_jvp(np.ones(3, np.float32), 0.0)
                return f_jvp.session.id, f_jvp

        sid, f_jvp = rec(use())
    assert not rec.session_exists(sid)
    assert rec.requests[-1].method == "DELETE"
    # Still usable afterwards, statelessly: the primals are kept.
    got = rec(f_jvp(np.ones(3, np.float32), 0.0))
    close(got, jax.jvp(cookbook("logistic_predict"), (W, b), (np.ones(3, np.float32), 0.0))[1])


def test_a_collected_pushforward_is_deleted(rec: Recorder) -> None:
    f = rec.model("tanh")
    _, f_jvp = rec(linearize(f, np.ones(4, np.float32)))
    sid = f_jvp.session.id
    del f_jvp
    gc.collect()
    assert rec.session_exists(sid)  # nothing is sent from a finalizer...
    rec(linearize(f, np.zeros(4, np.float32)))  # ...but with the client's next session
    assert not rec.session_exists(sid)


def test_a_lost_session_is_recomputed_once_and_reopened(rec: Recorder) -> None:
    W, b = RNG.standard_normal(3).astype(np.float32), np.float32(-0.3)
    _, pullback = rec(vjp(rec.model("logistic_predict"), W, b))
    _, pull_local = jax.vjp(cookbook("logistic_predict"), W, b)
    sid = pullback.session.id
    assert httpx.delete(f"{rec.url}/v1/sessions/{sid}").status_code == 204  # as if evicted
    n = len(rec.requests)
    u = RNG.standard_normal(4).astype(np.float32)
    close(rec(pullback(u)), pull_local(u))
    assert [r.url.path for r in rec.since(n)] == [
        f"/v1/sessions/{sid}/vjp",  # 404 session_not_found
        "/v1/models/logistic_predict/vjp",  # recomputed statelessly, no error
    ]
    n = len(rec.requests)
    close(rec(pullback(u)), pull_local(u))
    paths = [r.url.path for r in rec.since(n)]
    assert paths[0] == "/v1/models/logistic_predict/linearize" and len(paths) == 2
    assert paths[1] == f"/v1/sessions/{pullback.session.id}/vjp" != f"/v1/sessions/{sid}/vjp"


def test_pullback_survives_a_server_restart(
    start_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = start_server()
    W, b = RNG.standard_normal(3).astype(np.float32), np.float32(0.7)
    _, pull_local = jax.vjp(cookbook("logistic_predict"), W, b)
    u1, u2, u3 = (RNG.standard_normal(4).astype(np.float32) for _ in range(3))
    with Client(server.url, timeout=120) as c:
        _, pullback = vjp(c.model("logistic_predict"), W, b)
        close(pullback(u1), pull_local(u1))
        server.stop()
        monkeypatch.setattr(bench.harness, "free_port", lambda: server.port)
        start_server()  # a new process on the same port: every session is gone
        close(pullback(u2), pull_local(u2))  # the fallback: right numbers, no error
        close(pullback(u3), pull_local(u3))  # on a new session
        assert httpx.get(f"{server.url}/v1/sessions/{pullback.session.id}").status_code == 200


def test_async_vjp_and_vmap_of_its_pullback(live_server: Any) -> None:
    W, b = RNG.standard_normal(3).astype(np.float32), np.float32(0.2)
    U = RNG.standard_normal((32, 4)).astype(np.float32)

    async def main() -> tuple:
        async with AsyncClient(live_server.url) as c:
            y, pullback = await vjp(c.model("logistic_predict"), W, b)
            one = await pullback(U[0])
            many = await vmap(pullback)(U)
            await pullback.close()
            return y, one, many

    y, one, many = asyncio.run(main())
    y_local, pull_local = jax.vjp(cookbook("logistic_predict"), W, b)
    close(y, y_local)
    close(one, pull_local(U[0]))
    close(many, jax.vmap(pull_local)(U))


def test_too_large_for_sessions_falls_back_to_stateless(start_server: Any) -> None:
    server = start_server(env={"GRADSERVE_SESSION_MEMORY": "1000"})
    X = RNG.standard_normal((40, 40)).astype(np.float32)  # residuals over 1000 bytes
    with Client(server.url) as c:
        value, f_jvp = linearize(c.model("tanh"), X)
        assert f_jvp.session is None
        V = RNG.standard_normal((40, 40)).astype(np.float32)
        close(value, np.tanh(X), rtol=1e-6)
        close(f_jvp(V), jax.jvp(jnp.tanh, (X,), (V,))[1])

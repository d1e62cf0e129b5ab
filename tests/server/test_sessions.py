"""Sessions in-process (ASGI): products against local JAX, owners, TTL, memory, compiles."""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from client import wire
from helpers import assert_tree_equal, request_body
from service.registry import Registry

RNG = np.random.default_rng(11)
B = 3  # batch of batched products

_REGISTRY = Registry()
_REGISTRY.load("service.models.cookbook")


def _draw(shape: tuple, dtype: Any) -> np.ndarray:
    dtype = np.dtype(dtype)
    if dtype.kind == "c":
        return (RNG.standard_normal(shape) + 1j * RNG.standard_normal(shape)).astype(dtype)
    return RNG.standard_normal(shape).astype(dtype)


def _spd(n: int) -> np.ndarray:
    a = _draw((n, n), np.complex64)
    return (a @ a.conj().T + n * np.eye(n)).astype(np.complex64)


# Each built-in model at a point: (args, argnums linearized; None: all).
POINTS: dict[str, tuple[list, Any]] = {
    "tanh": ([_draw((5,), np.float32)], None),
    "logistic_loss": ([_draw((3,), np.float32), np.float32(0.3)], None),
    "logistic_predict": ([_draw((3,), np.float32), np.float32(-0.2)], None),
    "logistic_loss_dict": ([{"W": _draw((3,), np.float32), "b": np.float32(0.1)}], None),
    "tanh_sq_sum": ([_draw((4, 3), np.float32)], None),
    "square3": ([_draw((2, 2), np.float32)], None),
    "sin": ([_draw((3,), np.complex64)], None),
    "conj": ([_draw((3,), np.complex64)], None),
    "abs2": ([_draw((3,), np.complex64)], None),
    "cholesky_loss": ([_spd(3)], None),
    "mlp": ([_draw((2, 784), np.float32)], None),
    "mlp_loss": ([_draw((2, 784), np.float32), np.array([3, 7], np.int32)], 0),
    "piecewise": ([np.float32(1.5)], None),
    "complex_linear": ([_draw((4,), np.float32), np.complex64(0.3 - 0.4j)], None),
}
SCALAR = ["logistic_loss", "logistic_loss_dict", "tanh_sq_sum", "mlp_loss", "piecewise"]


def local(name: str, args: list, argnums: Any, chain: Any = None) -> tuple[Any, tuple]:
    """The model as local JAX sees it, as a function of the linearized arguments only."""
    model = _REGISTRY.get(name)
    nums = tuple(range(len(args))) if argnums is None else (argnums,)

    def f(*linearized: Any) -> Any:
        full = list(args)
        for k, x in zip(nums, linearized, strict=True):
            full[k] = x
        return model.bound()(model.params, *full)

    return (chain(f) if chain else f), tuple(args[k] for k in nums)


def like(tree: Any, batch: tuple = ()) -> Any:
    return jax.tree.map(lambda x: _draw(batch + np.shape(x), np.asarray(x).dtype), tree)


# ---------------------------------------------------------------------------- plumbing


def decode_doc(response: Any) -> dict[str, Any]:
    media = response.headers["content-type"].split(";")[0]
    if media == wire.NPZ:
        return wire.load_npz(response.content)
    return wire.loads(response.content)


def send(client: Any, path: str, encoding: str = "json", headers: Any = None, **fields: Any) -> Any:
    body, media = request_body(encoding, fields)
    return client.post(path, content=body, headers={"content-type": media, **(headers or {})})


def ok(response: Any) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    return decode_doc(response)


def open_session(client: Any, name: str, encoding: str = "json", **fields: Any) -> tuple:
    doc = ok(send(client, f"/v1/models/{name}/linearize", encoding, **fields))
    return wire.decode_tree(doc["value"]), doc["session"]


def product(client: Any, sid: str, kind: str, encoding: str = "json", **fields: Any) -> Any:
    doc = ok(send(client, f"/v1/sessions/{sid}/{kind}", encoding, **fields))
    return wire.decode_tree(doc["tangent" if kind == "jvp" else "cotangents"])


def compiles(client: Any, headers: Any = None) -> float:
    text = client.get("/metrics", headers=headers or {}).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("gradserve_compiles_total{")
    )


def metric(client: Any, prefix: str) -> float:
    lines = client.get("/metrics").text.splitlines()
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in lines if ln.startswith(prefix))


# ---------------------------------------------------------------------------- numbers


@pytest.mark.parametrize("encoding", ["json", "npz"])
@pytest.mark.parametrize("name", sorted(POINTS))
def test_products_equal_local_jax(app_client: Any, name: str, encoding: str) -> None:
    args, argnums = POINTS[name]
    f, primals = local(name, args, argnums)
    extra = {} if argnums is None else {"argnums": argnums}
    value, session = open_session(app_client, name, encoding, args=args, **extra)
    y, f_vjp = jax.vjp(f, *primals)
    assert_tree_equal(value, y, rtol=1e-5, atol=1e-6)
    assert session["bytes"] >= 0 and 0 < session["expires_in_s"] <= 300
    sid = session["id"]

    tangents = like(primals)
    got = product(app_client, sid, "jvp", encoding, tangents=list(tangents))
    assert_tree_equal(got, jax.jvp(f, primals, tangents)[1], rtol=1e-5, atol=1e-5)

    cotangent = like(y)
    got = product(app_client, sid, "vjp", encoding, cotangent=cotangent)
    assert_tree_equal(got, list(f_vjp(cotangent)), rtol=1e-5, atol=1e-5)

    batch = like(primals, (B,))
    got = product(app_client, sid, "jvp", encoding, tangents=list(batch), batched=True)
    want = jax.vmap(lambda *t: jax.jvp(f, primals, t)[1])(*batch)
    assert_tree_equal(got, want, rtol=1e-5, atol=1e-5)

    batch = like(y, (B,))
    got = product(app_client, sid, "vjp", encoding, cotangent=batch, batched=True)
    assert_tree_equal(got, list(jax.vmap(f_vjp)(batch)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("encoding", ["json", "npz"])
@pytest.mark.parametrize("name", SCALAR)
def test_linearize_of_grad_is_hvp(app_client: Any, name: str, encoding: str) -> None:
    args, argnums = POINTS[name]
    nums = list(range(len(args))) if argnums is None else argnums
    extra = {} if argnums is None else {"argnums": argnums}
    chain = [{"op": "grad", "argnums": nums}]
    value, session = open_session(app_client, name, encoding, args=args, transforms=chain, **extra)
    g, primals = local(name, args, argnums, lambda f: jax.grad(f, argnums=0 if argnums else nums))
    assert_tree_equal(value, g(*primals), rtol=1e-5, atol=1e-6)

    tangents = like(primals)
    got = product(app_client, session["id"], "jvp", encoding, tangents=list(tangents))
    assert_tree_equal(got, jax.jvp(g, primals, tangents)[1], rtol=1e-4, atol=1e-5)
    if argnums is None:  # the stateless hvp op agrees too
        stateless = ok(
            send(app_client, f"/v1/models/{name}/hvp", encoding, args=args, tangents=list(tangents))
        )
        assert_tree_equal(got, wire.decode_tree(stateless["hvp"]), rtol=1e-4, atol=1e-5)

    batch = like(primals, (B,))
    got = product(app_client, session["id"], "jvp", encoding, tangents=list(batch), batched=True)
    want = jax.vmap(lambda *t: jax.jvp(g, primals, t)[1])(*batch)
    assert_tree_equal(got, want, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------- compiles


def test_a_second_session_at_a_seen_shape_compiles_nothing(app_client: Any) -> None:
    def session_and_products() -> None:
        args = [_draw((7,), np.float32)]
        chain = [{"op": "grad"}]
        _, s = open_session(app_client, "tanh_sq_sum", args=args, transforms=chain)
        product(app_client, s["id"], "jvp", tangents=like(args))
        product(app_client, s["id"], "vjp", cotangent=like(args[0]))
        product(app_client, s["id"], "jvp", tangents=like(args, (4,)), batched=True)

    session_and_products()
    before = compiles(app_client)
    session_and_products()
    session_and_products()
    assert compiles(app_client) == before


# ---------------------------------------------------------------------------- owners


def test_another_key_gets_404_and_learns_nothing(app_factory: Any) -> None:
    one, two = {"Authorization": "Bearer key-one"}, {"Authorization": "Bearer key-two"}
    with app_factory(api_keys="key-one,key-two") as client:
        args = [_draw((3,), np.float32), np.float32(0.5)]
        _, s = open_session(client, "logistic_predict", args=args, headers=one)
        sid = s["id"]
        answers = [
            client.get(f"/v1/sessions/{sid}", headers=two),
            send(client, f"/v1/sessions/{sid}/jvp", tangents=like(args), headers=two),
            send(client, f"/v1/sessions/{sid}/vjp", cotangent=like(np.zeros(4)), headers=two),
            client.delete(f"/v1/sessions/{sid}", headers=two),
        ]
        unknown = client.get(f"/v1/sessions/{sid[::-1]}x", headers=one)
        for r in [*answers, unknown]:
            assert r.status_code == 404 and r.json()["code"] == "session_not_found", r.text
            assert r.json()["detail"] == unknown.json()["detail"]
        assert client.get(f"/v1/sessions/{sid}").status_code == 401  # no key at all
        assert client.get(f"/v1/sessions/{sid}", headers=one).json()["id"] == sid
        product(client, sid, "jvp", tangents=like(args), headers=one)
        assert client.delete(f"/v1/sessions/{sid}", headers=one).status_code == 204
        assert client.get(f"/v1/sessions/{sid}", headers=one).status_code == 404


# ---------------------------------------------------------------------------- lifetime


def test_a_one_second_ttl_expires(app_client: Any) -> None:
    _, s = open_session(app_client, "tanh", args=[_draw((3,), np.float32)], ttl_s=1)
    info = app_client.get(f"/v1/sessions/{s['id']}")
    assert info.status_code == 200 and 0 < info.json()["expires_in_s"] <= 1
    deadline = time.monotonic() + 30
    while app_client.get(f"/v1/sessions/{s['id']}").status_code == 200:
        assert time.monotonic() < deadline, "the session outlived its TTL by 30 s"
        time.sleep(0.1)
    r = send(app_client, f"/v1/sessions/{s['id']}/jvp", tangents=[np.ones(3, np.float32)])
    assert r.status_code == 404 and r.json()["code"] == "session_not_found"


def test_ttl_is_capped_by_the_server(app_client: Any) -> None:
    _, s = open_session(app_client, "tanh", args=[np.float32(1)], ttl_s=1e6)
    assert s["expires_in_s"] <= 300


def test_memory_budget_evicts_the_oldest_and_never_fails(app_factory: Any) -> None:
    x = _draw((125_000,), np.float32)  # tanh keeps about 1 MB of residuals for it
    with app_factory(session_memory=3_500_000) as client:
        sessions, statuses = [], []
        for _ in range(6):
            r = send(client, "/v1/models/tanh/linearize", "npz", args=[x])
            statuses.append(r.status_code)
            sessions.append(decode_doc(r)["session"])
        assert all(s["bytes"] == sessions[0]["bytes"] > 900_000 for s in sessions)
        fit = 3_500_000 // sessions[0]["bytes"]
        for i, s in enumerate(sessions):
            r = send(client, f"/v1/sessions/{s['id']}/jvp", "npz", tangents=[x])
            statuses.append(r.status_code)
            assert (r.status_code == 200) == (i >= len(sessions) - fit), (i, r.text)
            if r.status_code != 200:
                assert r.json()["code"] == "session_not_found"
        assert all(s < 500 for s in statuses)
        assert metric(client, "gradserve_session_evictions_total") == len(sessions) - fit
        assert metric(client, "gradserve_session_bytes{") <= 3_500_000
        # One larger than the whole budget: 413 before compiling or running anything.
        before = compiles(client)
        for _ in range(2):  # the refusal is remembered, like any other
            r = send(client, "/v1/models/tanh/linearize", "npz", args=[np.tile(x, 4)])
            assert r.status_code == 413 and r.json()["code"] == "session_too_large", r.text
        assert compiles(client) == before
        assert metric(client, "gradserve_sessions{") == fit


def test_delete_frees_the_memory_at_once(app_client: Any) -> None:
    before = metric(app_client, "gradserve_session_bytes{")
    _, s = open_session(app_client, "tanh", args=[_draw((1000,), np.float32)])
    assert metric(app_client, "gradserve_session_bytes{") == before + s["bytes"]
    assert app_client.delete(f"/v1/sessions/{s['id']}").status_code == 204
    assert metric(app_client, "gradserve_session_bytes{") == before
    assert app_client.delete(f"/v1/sessions/{s['id']}").status_code == 404


# ---------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"args": [[1.0, 2.0, 3.0], 0.5], "argnums": 2}, "argnums_out_of_range"),
        ({"args": [[1.0, 2.0, 3.0], 0.5], "argnums": [0, 0]}, "argnums_out_of_range"),
        ({"args": [[1.0, 2.0], 0.5]}, "shape_mismatch"),
        ({"args": [[1.0, 2.0, 3.0], 0.5], "ttl_s": -1}, "invalid_request"),
        ({"args": [[1.0, 2.0, 3.0], 0.5], "cotangent": 1.0}, "invalid_request"),
    ],
)
def test_linearize_refusals(app_client: Any, fields: dict, code: str) -> None:
    r = app_client.post("/v1/models/logistic_predict/linearize", json=fields)
    assert r.status_code == 422 and r.json()["code"] == code, r.text


def test_linearize_refuses_integer_arguments_with_the_fix(app_client: Any) -> None:
    x, y = np.zeros((1, 784), np.float32), np.zeros(1, np.int32)
    r = send(app_client, "/v1/models/mlp_loss/linearize", args=[x, y])
    assert r.status_code == 422 and r.json()["code"] == "integer_input"
    assert "argument 1" in r.json()["detail"] and "argnums" in r.json()["detail"]


@pytest.mark.parametrize(
    ("kind", "fields", "code"),
    [
        ("jvp", {"tangents": [[1.0, 2.0]]}, "arity_mismatch"),
        ("jvp", {"tangents": [[1.0, 2.0], 0.0]}, "shape_mismatch"),
        ("jvp", {"tangents": [[[1.0, 2.0, 3.0]], [0.0, 1.0]], "batched": True}, "batch_mismatch"),
        ("vjp", {"cotangent": [1.0, 2.0]}, "shape_mismatch"),
        ("vjp", {"cotangent": {"a": [1.0, 2.0, 3.0, 4.0]}}, "tree_mismatch"),
        ("vjp", {"cotangent": [1.0, 2.0, 3.0, 4.0], "tangents": []}, "invalid_request"),
    ],
)
def test_product_refusals(app_client: Any, kind: str, fields: dict, code: str) -> None:
    _, s = open_session(app_client, "logistic_predict", args=[np.ones(3, np.float32), 0.5])
    r = app_client.post(f"/v1/sessions/{s['id']}/{kind}", json=fields)
    assert r.status_code == 422 and r.json()["code"] == code, r.text


def test_batched_products_over_the_batch_limit_are_413_naming_the_field(app_client: Any) -> None:
    """The stateless path's B limit (limits.check_batch) guards session products too."""
    limit = app_client.app.state.gradserve.settings.max_batch_tangents
    _, s = open_session(app_client, "logistic_predict", args=[np.ones(3, np.float32), 0.5])
    too_many = {
        "jvp": {"tangents": [np.zeros((limit + 1, 3)).tolist(), [0.0] * (limit + 1)]},
        "vjp": {"cotangent": np.zeros((limit + 1, 4)).tolist()},
    }
    for kind, fields in too_many.items():
        r = app_client.post(f"/v1/sessions/{s['id']}/{kind}", json={**fields, "batched": True})
        assert r.status_code == 413 and r.json()["code"] == "batch_too_large", r.text
        field = "cotangent" if kind == "vjp" else "tangents"
        assert r.json()["errors"][0]["loc"] == [field]


def test_unknown_model_and_malformed_bodies(app_client: Any) -> None:
    r = app_client.post("/v1/models/nope/linearize", json={"args": [1.0]})
    assert r.status_code == 404 and r.json()["code"] == "model_not_found"
    r = app_client.post("/v1/models/tanh/linearize", content=b"{", headers=JSON)
    assert r.status_code == 400 and r.json()["code"] == "invalid_json"
    _, s = open_session(app_client, "tanh", args=[np.float32(1)])
    r = app_client.post(f"/v1/sessions/{s['id']}/jvp", content=b"[1]", headers=JSON)
    assert r.status_code == 422 and r.json()["code"] == "invalid_request"


JSON = {"content-type": "application/json"}


def test_products_of_one_session_share_a_batch(app_client: Any) -> None:
    """Concurrent products of one session run as one stacked program, with the right numbers."""
    import asyncio

    import httpx

    args = [_draw((6,), np.float32)]
    _, s = open_session(app_client, "tanh_sq_sum", args=args, transforms=[{"op": "grad"}])
    vs = [_draw((6,), np.float32) for _ in range(16)]

    async def main() -> list:
        transport = httpx.ASGITransport(app=app_client.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            bodies = [wire.dumps({"tangents": wire.encode_tree([v])}) for v in vs]
            path = f"/v1/sessions/{s['id']}/jvp"
            return await asyncio.gather(*(http.post(path, content=b, headers=JSON) for b in bodies))

    answers = asyncio.run(main())
    g = jax.grad(lambda x: jnp.sum(jnp.tanh(x) ** 2))
    for r, v in zip(answers, vs, strict=True):
        got = wire.decode_tree(ok(r)["tangent"])
        assert_tree_equal(got, jax.jvp(g, (args[0],), (v,))[1], rtol=1e-5, atol=1e-6)

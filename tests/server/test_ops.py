"""Every op and option against local JAX, in-process (ASGI)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import assert_tree_equal, post
from service.models import cookbook as cb

RNG = np.random.default_rng(0)
W = RNG.standard_normal(3).astype(np.float32)
B = np.float32(0.3)


def _compiles(app_client) -> float:
    text = app_client.get("/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("gradserve_compiles_total{")
    )


def test_named_op_and_one_element_call_share_compiled_program(app_client):
    x = np.float32(0.7)
    named = post(app_client, "square3", "grad", args=[x])
    before = _compiles(app_client)
    called = post(app_client, "square3", "call", args=[x], transforms=[{"op": "grad"}])
    assert _compiles(app_client) == before
    assert_tree_equal(called["value"], named["grad"], exact=True)


def test_jacobian_mode_fwd_is_jacfwd(app_client):
    named = post(app_client, "logistic_predict", "jacfwd", args=[W, B])
    before = _compiles(app_client)
    moded = post(app_client, "logistic_predict", "jacobian", args=[W, B], mode="fwd")
    assert _compiles(app_client) == before
    assert_tree_equal(moded["jacobian"], named["jacobian"], exact=True)


@pytest.mark.parametrize("mode", ["auto", "fwd", "rev"])
def test_jacobian_modes_agree_with_jax(app_client, mode):
    out = post(app_client, "logistic_predict", "jacobian", args=[W, B], argnums=[0, 1], mode=mode)
    assert_tree_equal(out["jacobian"], list(jax.jacrev(cb.logistic_predict, (0, 1))(W, B)))


def test_value_and_grad_of_dict_argument(app_client):
    params = {"W": W, "b": B}
    out = post(app_client, "logistic_loss_dict", "value_and_grad", args=[params])
    value, grad = jax.value_and_grad(cb.logistic_loss_dict)(params)
    assert_tree_equal(out["value"], value)
    assert_tree_equal(out["grad"], grad)


def test_has_aux_grad_value_and_grad_and_jacobian(app_client):
    from examples.models import ridge

    w = RNG.standard_normal(4).astype(np.float32)
    X = RNG.standard_normal((6, 4)).astype(np.float32)
    y = RNG.standard_normal(6).astype(np.float32)
    out = post(app_client, "ridge", "grad", args=[w, X, y], has_aux=True)
    grad, aux = jax.grad(ridge, has_aux=True)(w, X, y)
    assert_tree_equal(out["grad"], grad)
    assert_tree_equal(out["aux"], aux)
    out = post(app_client, "ridge", "value_and_grad", args=[w, X, y], has_aux=True, argnums=[0, 2])
    (value, aux), grads = jax.value_and_grad(ridge, argnums=(0, 2), has_aux=True)(w, X, y)
    assert_tree_equal(out["value"], value)
    assert_tree_equal(out["aux"], aux)
    assert_tree_equal(out["grad"], list(grads))
    out = post(app_client, "ridge", "jacrev", args=[w, X, y], has_aux=True)
    assert_tree_equal(out["jacobian"], jax.jacrev(ridge, has_aux=True)(w, X, y)[0])


def test_server_held_parameters_seeded_init_and_npz(app_client):
    from examples.models import _init_regressor, regressor, scaled_tanh

    x = RNG.standard_normal((5, 8)).astype(np.float32)
    params = _init_regressor(jax.random.PRNGKey(42))
    out = post(app_client, "regressor", "jacrev", args=[x])
    assert_tree_equal(out["jacobian"], jax.jacrev(regressor, argnums=1)(params, x))
    v = RNG.standard_normal(7).astype(np.float32)
    with np.load("examples/scaled_tanh_params.npz") as f:
        npz_params = dict(f)
    out = post(app_client, "scaled_tanh", "eval", args=[v])
    assert_tree_equal(out["value"], scaled_tanh(npz_params, v))


def test_mlp_loss_grad_and_hvp_with_server_params(app_client):
    params = cb.mlp_init(jax.random.PRNGKey(0))
    x = RNG.standard_normal((3, 784)).astype(np.float32)
    y = np.array([1, 5, 9], np.int32)
    out = post(app_client, "mlp_loss", "value_and_grad", "npz", args=[x, y])
    value, grad = jax.value_and_grad(cb.mlp_loss, argnums=1)(params, x, y)
    assert_tree_equal(out["value"], value)
    assert_tree_equal(out["grad"], grad, atol=1e-6)
    # Integer labels: jvp gives them float0 tangents; the client may send zeros of any dtype.
    t = RNG.standard_normal((3, 784)).astype(np.float32)
    out = post(
        app_client, "mlp_loss", "jvp", "npz", args=[x, y], tangents=[t, np.zeros(3, np.int32)]
    )
    want = jax.jvp(lambda x: cb.mlp_loss(params, x, y), (x,), (t,))[1]
    assert_tree_equal(out["tangent"], want, rtol=1e-4, atol=1e-6)


def test_vmap_of_grad_in_one_call(app_client):
    xs = np.linspace(-2, 2, 9, dtype=np.float32)
    out = post(app_client, "tanh", "call", args=[xs], transforms=[{"op": "grad"}, {"op": "vmap"}])
    assert_tree_equal(out["value"], jax.jit(jax.vmap(jax.grad(jnp.tanh)))(xs), exact=True)


def test_vmap_in_axes(app_client):
    Ws = RNG.standard_normal((5, 3)).astype(np.float32)
    out = post(
        app_client,
        "logistic_loss",
        "call",
        args=[Ws, B],
        transforms=[{"op": "grad"}, {"op": "vmap", "in_axes": [0, None]}],
    )
    assert_tree_equal(out["value"], jax.vmap(jax.grad(cb.logistic_loss), in_axes=(0, None))(Ws, B))


def test_transforms_before_jvp(app_client):
    # Extension: a transform chain applied before jvp gives forward-over-reverse in one request.
    X = RNG.standard_normal((4, 5)).astype(np.float32)
    V = RNG.standard_normal((4, 5)).astype(np.float32)
    out = post(
        app_client, "tanh_sq_sum", "jvp", args=[X], tangents=[V], transforms=[{"op": "grad"}]
    )
    want = jax.jvp(jax.grad(cb.tanh_sq_sum), (X,), (V,))
    assert_tree_equal(out["value"], want[0])
    assert_tree_equal(out["tangent"], want[1])


@pytest.mark.parametrize("mode", ["fwd_rev", "rev_fwd", "rev_rev"])
def test_batched_hvp(app_client, mode):
    X = RNG.standard_normal((6, 7)).astype(np.float32)
    Vs = RNG.standard_normal((4, 6, 7)).astype(np.float32)
    out = post(app_client, "tanh_sq_sum", "hvp", args=[X], tangents=[Vs], mode=mode, batched=True)
    H = jax.hessian(cb.tanh_sq_sum)(X)
    want = jnp.stack([jnp.tensordot(H, v, 2) for v in Vs])
    np.testing.assert_allclose(out["hvp"][0], want, rtol=1e-4, atol=1e-5)


def test_zero_d_and_empty_inputs_keep_their_shape(app_client):
    out = post(app_client, "tanh", "eval", args=[np.float32(0.5)])
    assert out["value"].shape == ()
    out = post(app_client, "tanh", "eval", args=[np.zeros((0, 3), np.float32)])
    assert out["value"].shape == (0, 3)


def test_nan_and_inf_pass_through(app_client):
    x = np.array([np.nan, np.inf, -np.inf, 1.0], np.float32)
    for enc in ("json", "npz"):
        out = post(app_client, "square3", "eval", enc, args=[x])
        assert_tree_equal(out["value"], cb.square3(x), exact=True)


def test_binary_response_leaves(app_client):
    x = RNG.standard_normal(5).astype(np.float32)
    r = app_client.post("/v1/models/tanh/eval", json={"args": [x.tolist()], "binary": True})
    leaf = r.json()["value"]
    assert set(leaf) == {"dtype", "shape", "base64"}
    from client.wire import decode_array

    assert_tree_equal(decode_array(leaf), jnp.tanh(x.astype(np.float32)))


def test_plain_numbers_take_the_declared_dtype_and_float64_narrows(app_client):
    r = app_client.post("/v1/models/mlp_loss/grad", json={"args": [[[0.0] * 784], [3]]})
    assert r.status_code == 200, r.text
    out = post(app_client, "logistic_loss", "grad", args=[W.astype(np.float64), np.float64(B)])
    assert out["grad"].dtype == np.float32


def test_response_encoding_follows_accept(app_client):
    body = {"args": [1.0]}
    r = app_client.post("/v1/models/tanh/eval", json=body, headers={"accept": "application/x-npz"})
    assert r.headers["content-type"] == "application/x-npz"
    r = app_client.post(
        "/v1/models/tanh/eval",
        json=body,
        headers={"accept": "application/x-npz;q=0.5, application/json"},
    )
    assert r.headers["content-type"] == "application/json"
    r = app_client.post("/v1/models/tanh/eval", json=body, headers={"accept": "*/*"})
    assert r.headers["content-type"] == "application/json"


def test_headers_request_id_and_server_timing(app_client):
    r = app_client.post(
        "/v1/models/tanh/eval", json={"args": [1.0]}, headers={"x-request-id": "abc-123"}
    )
    assert r.headers["x-request-id"] == "abc-123"
    phases = {part.split(";")[0].strip() for part in r.headers["server-timing"].split(",")}
    assert {"queue", "compile", "compute"} <= phases
    r = app_client.post("/v1/models/tanh/eval", json={"args": [1.0]})
    assert len(r.headers["x-request-id"]) == 32


def test_discovery_and_health(app_client):
    assert app_client.get("/healthz").json() == {"status": "ok"}
    assert app_client.get("/readyz").status_code == 200
    names = {m["name"] for m in app_client.get("/v1/models").json()["models"]}
    assert {"tanh", "logistic_loss", "mlp_loss", "cholesky_loss", "rosenbrock"} <= names
    info = app_client.get("/v1/models/logistic_loss_dict").json()
    assert info["inputs"] == [
        {"W": {"shape": [3], "dtype": "float32"}, "b": {"shape": [], "dtype": "float32"}}
    ]
    assert "hvp" in info["ops"]
    assert app_client.get("/v1/models/mlp").json()["inputs"] == [
        {"shape": [None, 784], "dtype": "float32"}
    ]
    metrics = app_client.get("/metrics").text
    assert "gradserve_requests_total" in metrics and "gradserve_request_seconds_bucket" in metrics


def test_openapi_documents_every_op(app_client):
    schema = app_client.get("/openapi.json").json()
    from service.transforms import OPS

    for op in OPS:
        route = schema["paths"][f"/v1/models/{{name}}/{op}"]["post"]
        body = route["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[
            1
        ]
        assert body in schema["components"]["schemas"]
        assert "application/x-npz" in route["requestBody"]["content"]
        assert route["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    assert app_client.get("/docs").status_code == 200


def test_vmap_keeps_declared_dtypes_of_plain_inputs(app_client):
    x = RNG.standard_normal((2, 1, 784)).astype(np.float32)
    body = {"args": [x.tolist(), [[1], [2]]], "transforms": [{"op": "grad"}, {"op": "vmap"}]}
    r = app_client.post("/v1/models/mlp_loss/call", json=body)
    assert r.status_code == 200, r.text
    params = cb.mlp_init(jax.random.PRNGKey(0))
    want = jax.vmap(jax.grad(cb.mlp_loss, argnums=1), in_axes=(None, 0, 0))(
        params, x, np.array([[1], [2]], np.int32)
    )
    from helpers import decode

    assert_tree_equal(decode(r)["value"], want, atol=1e-6)

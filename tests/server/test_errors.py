"""Each error of PROTOCOL.md's table, provoked for real: status, problem+json, a detail that
names model, argument, expected and received; never a 500; the server fine afterwards."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from client import wire
from helpers import assert_tree_equal, post, request_body
from service.models import cookbook as cb

W = np.array([0.1, -0.2, 0.3], np.float32)
B = np.float32(0.5)


def assert_problem(response, status: int, code: str, *words: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == wire.PROBLEM_JSON
    body = response.json()
    assert {"type", "title", "status", "detail", "code", "request_id"} <= body.keys()
    assert body["status"] == status and body["code"] == code, body
    assert body["request_id"] == response.headers["x-request-id"]
    assert "compute;dur=" in response.headers["server-timing"]
    for word in words:
        assert word in body["detail"], (word, body["detail"])
    return body


def still_serving(client) -> None:
    out = post(client, "logistic_loss", "grad", args=[W, B])
    assert_tree_equal(out["grad"], jax.grad(cb.logistic_loss)(W, B))


def send(client, model: str, op: str, body: bytes, media: str = wire.JSON, **headers: str):
    return client.post(
        f"/v1/models/{model}/{op}", content=body, headers={"content-type": media, **headers}
    )


def explicit(**fields) -> bytes:
    return wire.dumps(fields)


BAD_REQUESTS = [
    # (model, op, body, media, status, code, words in detail)
    ("tanh", "eval", b'{"args": [1.0', wire.JSON, 400, "invalid_json", ["malformed JSON"]),
    ("tanh", "eval", b"PK\x03\x04 not a zip", wire.NPZ, 400, "invalid_npz", ["npz"]),
    (
        "tanh",
        "eval",
        explicit(args=[{"dtype": "float32", "shape": [2], "base64": "%%%"}]),
        wire.JSON,
        400,
        "invalid_base64",
        ["base64"],
    ),
    (
        "tanh",
        "eval",
        explicit(args=[{"dtype": "float32", "shape": [2], "base64": "AAAA"}]),
        wire.JSON,
        400,
        "data_length_mismatch",
        ["3 bytes", "needs 8"],
    ),
    (
        "tanh",
        "eval",
        explicit(args=[{"dtype": "float32", "shape": [2, 2], "data": [1, 2, 3]}]),
        wire.JSON,
        400,
        "data_length_mismatch",
        ["3 element", "[2, 2]"],
    ),
    (
        "tanh",
        "eval",
        explicit(args=[{"dtype": "float99", "shape": [1], "data": [1]}]),
        wire.JSON,
        400,
        "invalid_dtype",
        ["float99"],
    ),
    ("tanh", "eval", explicit(args=[[1, "x"]]), wire.JSON, 400, "invalid_body", ["'x'"]),
    ("nope", "grad", explicit(args=[1]), wire.JSON, 404, "model_not_found", ["'nope'"]),
    ("tanh", "integrate", explicit(args=[1]), wire.JSON, 404, "op_not_found", ["'integrate'"]),
    (
        "tanh",
        "eval",
        b"x=1",
        "application/x-www-form-urlencoded",
        415,
        "unsupported_media_type",
        ["x-www-form-urlencoded"],
    ),
    (
        "logistic_loss",
        "grad",
        explicit(args=[[1, 2, 3, 4], 0.5]),
        wire.JSON,
        422,
        "shape_mismatch",
        ["argument 0 of 'logistic_loss' expects float32[3], got float32[4]"],
    ),
    (
        "logistic_loss",
        "grad",
        explicit(args=[{"dtype": "int32", "shape": [3], "data": [1, 2, 3]}, 0.5]),
        wire.JSON,
        422,
        "dtype_mismatch",
        ["argument 0", "float32[3]", "int32[3]"],
    ),
    (
        "logistic_loss",
        "grad",
        explicit(args=[[1, 2, 3]]),
        wire.JSON,
        422,
        "arity_mismatch",
        ["'logistic_loss'", "2", "got 1"],
    ),
    (
        "logistic_loss_dict",
        "grad",
        explicit(args=[{"W": [1, 2, 3]}]),
        wire.JSON,
        422,
        "tree_mismatch",
        ["argument 0", "keys ['W', 'b']", "keys ['W']"],
    ),
    (
        "logistic_loss",
        "grad",
        explicit(args=[[1, 2, 3], 0.5], argnums=2),
        wire.JSON,
        422,
        "argnums_out_of_range",
        ["'logistic_loss'", "argnums 2"],
    ),
    (
        "mlp_loss",
        "grad",
        explicit(args=[[[0.0] * 784], [1]], argnums=1),
        wire.JSON,
        422,
        "integer_input",
        ["'mlp_loss'", "argument 1", "int32[1]"],
    ),
    (
        "logistic_predict",
        "grad",
        explicit(args=[[1, 2, 3], 0.5]),
        wire.JSON,
        422,
        "non_scalar_output",
        ["grad of 'logistic_predict' needs a scalar output", "float32[4]", "jacrev"],
    ),
    (  # hessian takes any output (jax.hessian); only the grad family needs a scalar
        "logistic_predict",
        "value_and_grad",
        explicit(args=[[1, 2, 3], 0.5]),
        wire.JSON,
        422,
        "non_scalar_output",
        ["value_and_grad of 'logistic_predict'", "float32[4]"],
    ),
    (  # without argnums, hvp differentiates every argument: y is int32
        "mlp_loss",
        "hvp",
        explicit(args=[[[0.0] * 784], [1]], tangents=[[[0.0] * 784], [0]]),
        wire.JSON,
        422,
        "integer_input",
        ["hvp of 'mlp_loss'", "argument 1", "int32[1]", "argnums"],
    ),
    (
        "tanh",
        "call",
        explicit(args=[1.0, 1.0, 1.0], transforms=[{"op": "jvp"}]),
        wire.JSON,
        422,
        "invalid_transform",
        ["jvp of 'tanh'", "n primals followed by n tangents", "3 arguments"],
    ),
    (
        "logistic_predict",
        "call",
        explicit(args=[[1, 2, 3], 0.5, [1, 2, 3]], transforms=[{"op": "grad"}, {"op": "vjp"}]),
        wire.JSON,
        422,
        "non_scalar_output",
        ["grad of 'logistic_predict'", "float32[4]"],
    ),
    (
        "logistic_predict",
        "call",
        explicit(args=[[1, 2, 3], 0.5, [1, 2, 3]], transforms=[{"op": "vjp"}]),
        wire.JSON,
        422,
        "shape_mismatch",
        ["vjp of 'logistic_predict'", "cotangent", "float32[4]", "float32[3]"],
    ),
    (
        "logistic_predict",
        "call",
        explicit(args=[[1, 2, 3], 0.5, [1, 2, 3, 4]], transforms=[{"op": "vjp", "argnums": 2}]),
        wire.JSON,
        422,
        "argnums_out_of_range",
        ["vjp of 'logistic_predict'", "argnums 2", "2 primal(s)"],
    ),
    (
        "tanh",
        "call",
        explicit(args=[1.0], transforms=[{"op": "jvp", "in_axes": 0}]),
        wire.JSON,
        422,
        "invalid_request",
        ["jvp", "in_axes"],
    ),
    (
        "tanh",
        "call",
        explicit(args=[[1.0, 2.0]], transforms=[{"op": "grad"}, {"op": "grad"}]),
        wire.JSON,
        422,
        "non_scalar_output",
        ["grad of 'tanh'", "float32[2]"],
    ),
    (
        "sin",
        "grad",
        explicit(args=[1.0], holomorphic=True),
        wire.JSON,
        422,
        "holomorphic_real_input",
        ["'sin'", "argument 0", "float32[]"],
    ),
    (
        "logistic_predict",
        "vjp",
        explicit(args=[[1, 2, 3], 0.5], cotangent=[1, 2, 3]),
        wire.JSON,
        422,
        "shape_mismatch",
        ["cotangent", "float32[4]", "float32[3]"],
    ),
    (
        "logistic_predict",
        "jvp",
        explicit(args=[[1, 2, 3], 0.5], tangents=[[1, 2], 0.0]),
        wire.JSON,
        422,
        "shape_mismatch",
        ["tangent 0", "float32[3]", "float32[2]"],
    ),
    (
        "logistic_predict",
        "vjp",
        explicit(args=[[1, 2, 3], 0.5], cotangent=[[1, 2, 3, 4], [1, 2, 3, 4]], batched=True),
        wire.JSON,
        200,
        "",
        [],
    ),
    (
        "tanh",
        "eval",
        explicit(args=[1.0], argnums=0),
        wire.JSON,
        422,
        "invalid_request",
        ["argnums"],
    ),
    (
        "tanh",
        "call",
        explicit(args=[1.0], transforms=[{"op": "grad"}] * 9),
        wire.JSON,
        422,
        "transform_depth",
        ["9"],
    ),
    (
        "tanh",
        "call",
        explicit(args=[1.0], transforms=[{"op": "vmap", "argnums": 0}]),
        wire.JSON,
        422,
        "invalid_request",
        ["vmap", "argnums"],
    ),
    (
        "mlp",
        "jacrev",
        explicit(args=[[[0.0] * 784] * 400]),
        wire.JSON,
        413,
        "output_too_large",
        ["jvp, vjp or hvp"],
    ),
]


@pytest.mark.parametrize(("model", "op", "body", "media", "status", "code", "words"), BAD_REQUESTS)
def test_bad_request(app_client, model, op, body, media, status, code, words):
    response = send(app_client, model, op, body, media)
    if status == 200:
        assert response.status_code == 200, response.text
    else:
        body = assert_problem(response, status, code, *words)
        assert "Traceback" not in body["detail"] and "/work" not in body["detail"]
    still_serving(app_client)


def test_unsupported_accept_is_406(app_client):
    response = send(app_client, "tanh", "eval", explicit(args=[1.0]), accept="text/csv")
    assert_problem(response, 406, "not_acceptable", "text/csv")
    still_serving(app_client)


def test_npz_reference_to_a_missing_member(app_client):
    body, media = request_body("npz", {"args": [np.float32(1)]})
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(body)) as src, zipfile.ZipFile(buf, "w") as dst:
        for name in src.namelist():
            if name != "a0.npy":
                dst.writestr(name, src.read(name))
    response = send(app_client, "tanh", "eval", buf.getvalue(), media)
    assert_problem(response, 400, "invalid_npz", "'a0'")
    still_serving(app_client)


def test_npz_with_pickled_objects_is_refused(app_client):
    import io

    payload = io.BytesIO()
    np.savez(
        payload,
        __json__=np.frombuffer(b'{"args": [{"$npz": "x"}]}', np.uint8),
        x=np.array([{"a": 1}], dtype=object),
    )
    response = send(app_client, "tanh", "eval", payload.getvalue(), wire.NPZ)
    assert_problem(response, 400, "invalid_npz", "objects")
    still_serving(app_client)


def test_body_over_the_limit_is_413_before_reading():
    from starlette.testclient import TestClient

    from service import Settings, create_app

    with TestClient(create_app(Settings(max_body_bytes=1000))) as client:
        response = send(client, "tanh", "eval", explicit(args=[[0.0] * 1000]))
        assert_problem(response, 413, "payload_too_large", "1000-byte limit")
        still_serving(client)


def test_unknown_route_is_problem_json(app_client):
    response = app_client.get("/v2/nothing")
    assert_problem(response, 404, "not_found")

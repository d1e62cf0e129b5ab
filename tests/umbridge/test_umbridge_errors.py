"""Every UM-Bridge error provoked for real, in UM-Bridge's format: ModelNotFound,
UnsupportedFeature, InvalidInput (checked in an order that never indexes out of range),
the model's own exceptions, and gradserve's limits; bodies without a Content-Type; NaN and
Infinity; shared memory refused."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import requests
import umbridge
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient
from umbridge_util import MODELS_FILE

from service import Settings, create_app

# UM-Bridge's conformity suite allows exactly these keys in an error answer.
ERROR_KEYS = {"error"}
ERROR_FIELDS = {"type", "message"}


def assert_umbridge_error(response: Any, status: int, kind: str, *words: str) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == ERROR_KEYS and set(body["error"]) == ERROR_FIELDS, body
    assert body["error"]["type"] == kind, body
    message = body["error"]["message"]
    for word in words:
        assert word in message, message
    return message


@pytest.fixture(scope="module")
def post(umbridge_server):
    """POST a document as UM-Bridge's clients do: `json.dumps`, and no Content-Type."""

    def send(path: str, doc: Any) -> requests.Response:
        body = doc if isinstance(doc, (str, bytes)) else json.dumps(doc)
        return requests.post(f"{umbridge_server.url}{path}", data=body, timeout=60)

    return send


DONUT = {"name": "donut", "input": [[1.0, 2.0]]}
TWO = {"name": "two_outputs", "input": [[1.0, 2.0], [0.1, 0.2, 0.3, 0.4]]}


def test_a_body_without_content_type_is_json(post):
    response = post("/Evaluate", DONUT)
    assert response.request.headers.get("content-type") is None
    assert response.status_code == 200 and set(response.json()) == {"output"}


def test_model_not_found(post):
    for path in ("/Evaluate", "/Gradient", "/ModelInfo", "/InputSizes", "/OutputSizes"):
        assert_umbridge_error(post(path, {"name": "nope"}), 400, "ModelNotFound", "'nope'")
    # Served on /v1, but its input has no fixed size: not a UM-Bridge model.
    assert_umbridge_error(
        post("/Evaluate", {"name": "tanh", "input": [[1.0]]}), 400, "ModelNotFound", "fixed"
    )


def test_unsupported_feature(post):
    for op in ("Gradient", "ApplyJacobian", "ApplyHessian"):
        # Checked before any other field, as UM-Bridge's conformity suite expects.
        assert_umbridge_error(post(f"/{op}", {"name": "cholesky_loss"}), 400, "UnsupportedFeature")


def test_shared_memory_is_refused_and_clients_fall_back_to_http(post, umbridge_server, capsys):
    for path in ("/TestShMem", "/EvaluateShMem", "/GradientShMem", "/ApplyJacobianShMem"):
        assert_umbridge_error(post(path, {"name": "donut"}), 400, "UnsupportedFeature", "HTTP")
    assert_umbridge_error(post("/ApplyHessianShMem", {}), 400, "UnsupportedFeature")
    model = umbridge.HTTPModel(umbridge_server.url, "donut", use_shmem=True)
    assert not model.supports_shmem()
    assert "Using HTTP instead" in capsys.readouterr().out
    assert model([[2.0, 2.0]])[0][0] == pytest.approx(-1.581180343024592, rel=1e-12)


@pytest.mark.parametrize(
    ("path", "doc", "words"),
    [
        ("/Evaluate", {"name": "donut", "input": [[1.0, 2.0], [3.0]]}, ["takes 1 input", "got 2"]),
        ("/Evaluate", {"name": "donut", "input": [[1.0, 2.0, 3.0]]}, ["input 0", "length 2"]),
        ("/Evaluate", {"name": "donut", "input": [[1.0]]}, ["input 0", "got 1"]),
        ("/Evaluate", {"name": "donut"}, ["'input'"]),
        ("/Evaluate", {"name": "donut", "input": [1.0]}, ["input 0", "list of numbers"]),
        ("/Evaluate", {"name": "donut", "input": [["a", "b"]]}, ["input 0", "list of numbers"]),
        ("/Evaluate", {"name": "donut", "input": [[[1.0], [2.0]]]}, ["list of numbers"]),
        ("/Evaluate", {"name": "donut", "input": [[1.0, [2.0, 3.0]]]}, ["list of numbers"]),
        ("/Evaluate", {"name": "donut", "input": [[1.0, None]]}, ["list of numbers"]),
        ("/Evaluate", {"name": "donut", "input": [[1.0, 10**400]]}, ["list of numbers"]),
        ("/Evaluate", {"name": 3}, ["'name'"]),
        ("/Evaluate", [1, 2], ["JSON object"]),
        ("/Evaluate", "{not json", ["malformed JSON"]),
        ("/Evaluate", "", ["malformed JSON"]),
        ("/Evaluate", {**DONUT, "config": {"x": 1}}, ["no config option 'x'"]),
        ("/Evaluate", {"name": "banana", "input": [[0, 0]], "config": {"a": "big"}}, ["'a'"]),
        ("/Evaluate", {"name": "banana", "input": [[0, 0]], "config": [1]}, ["config"]),
        ("/InputSizes", {"name": "banana", "config": {"scale": True}}, ["'scale'"]),
        ("/Evaluate", {"name": "scaled_counts", "input": [[1.5, 2, 3], [1]]}, ["whole numbers"]),
        ("/Gradient", {**DONUT, "outWrt": 1, "inWrt": 0, "sens": [1.0]}, ["outWrt 1", "0 to 0"]),
        ("/Gradient", {**DONUT, "outWrt": 0, "inWrt": 5, "sens": [1.0]}, ["inWrt 5"]),
        ("/Gradient", {**DONUT, "outWrt": -1, "inWrt": 0, "sens": [1.0]}, ["outWrt -1"]),
        ("/Gradient", {**DONUT, "outWrt": 0, "inWrt": 0, "sens": [1.0, 2.0]}, ["sens", "1"]),
        ("/Gradient", {**DONUT, "outWrt": True, "inWrt": 0, "sens": [1.0]}, ["'outWrt'"]),
        ("/Gradient", {**DONUT, "outWrt": 0.0, "inWrt": 0, "sens": [1.0]}, ["'outWrt'"]),
        ("/Gradient", {**DONUT, "outWrt": 0, "sens": [1.0]}, ["'inWrt'"]),
        ("/Gradient", {**DONUT, "outWrt": 0, "inWrt": 0}, ["sens"]),
        ("/ApplyJacobian", {**DONUT, "outWrt": 0, "inWrt": 0, "vec": [1.0]}, ["vec", "2"]),
        ("/ApplyJacobian", {**TWO, "outWrt": 0, "inWrt": 2, "vec": [1.0]}, ["inWrt 2"]),
        # Indices are checked before the vectors they size: no index out of range.
        ("/Gradient", {**TWO, "outWrt": 9, "inWrt": 0, "sens": []}, ["outWrt 9"]),
        ("/ApplyJacobian", {**TWO, "outWrt": 0, "inWrt": 9, "vec": []}, ["inWrt 9"]),
        ("/Gradient", {**TWO, "outWrt": 10**30, "inWrt": 0, "sens": []}, ["outWrt"]),
        ("/ApplyHessian", {**TWO, "outWrt": 2, "inWrt1": 0, "inWrt2": 0}, ["outWrt 2"]),
        ("/ApplyHessian", {**TWO, "outWrt": 0, "inWrt1": 3, "inWrt2": 0}, ["inWrt1 3"]),
        ("/ApplyHessian", {**TWO, "outWrt": 0, "inWrt1": 0, "inWrt2": -2}, ["inWrt2 -2"]),
        (
            "/ApplyHessian",
            {**TWO, "outWrt": 1, "inWrt1": 0, "inWrt2": 1, "sens": [1.0], "vec": [0.0] * 4},
            ["sens", "4"],
        ),
        (
            "/ApplyHessian",
            {**TWO, "outWrt": 0, "inWrt1": 0, "inWrt2": 1, "sens": [1.0, 1.0], "vec": [0.0] * 2},
            ["vec", "4"],
        ),
    ],
)
def test_invalid_input(post, path, doc, words):
    assert_umbridge_error(post(path, doc), 400, "InvalidInput", *words)


def test_the_models_own_exceptions_are_model_errors(post, umbridge_server):
    # Raised by the model at run time (a host callback), then while tracing (at a config).
    assert_umbridge_error(
        post("/Evaluate", {"name": "fails", "input": [[-1.0, 0.0]]}),
        400,
        "ModelError",
        "must not be negative",
    )
    for path in ("/Evaluate", "/OutputSizes"):
        doc = {"name": "fails", "input": [[1.0, 0.0]], "config": {"explode": True}}
        assert_umbridge_error(post(path, doc), 400, "ModelError", "explode was set")
    ok = umbridge.HTTPModel(umbridge_server.url, "fails")([[1.0, 0.5]])
    assert ok == [[2.0, 1.0]]
    with pytest.raises(Exception, match="ModelError"):  # how umbridge's client reports it
        umbridge.HTTPModel(umbridge_server.url, "fails")([[-1.0, 0.5]])


def test_wrong_method_is_an_umbridge_error(umbridge_server):
    response = requests.get(f"{umbridge_server.url}/Evaluate", timeout=10)
    assert_umbridge_error(response, 405, "MethodNotAllowed")


def test_non_finite_numbers_travel_as_nan_and_infinity(umbridge_server):
    """Decision: NaN/Infinity/-Infinity are JSON tokens both ways, as Python's json writes and
    reads them. umbridge's Python client receives them as floats; it cannot send them (requests
    refuses non-finite JSON), but a client that does is understood."""
    import jax.numpy as jnp

    logs = umbridge.HTTPModel(umbridge_server.url, "logs")
    got = logs([[-1.0, 0.0]])[0]
    np.testing.assert_equal(got, np.asarray(jnp.log(jnp.array([-1.0, 0.0], jnp.float32))))
    assert np.isnan(got[0]) and got[1] == -np.inf
    # The sampler's own case: a log density of -inf outside the support, and its gradient.
    np.testing.assert_equal(logs.gradient(0, 0, [[0.0, 2.0]], [1.0, 1.0]), [np.inf, 0.5])
    raw = requests.post(
        f"{umbridge_server.url}/Evaluate",
        data='{"name": "piecewise", "input": [[-Infinity]]}',
        timeout=10,
    )
    assert raw.text == '{"output":[[-Infinity]]}'
    raw = requests.post(
        f"{umbridge_server.url}/Evaluate",
        data='{"name": "logs", "input": [[NaN, Infinity]]}',
        timeout=10,
    )
    assert raw.text == '{"output":[[NaN,Infinity]]}'


# ---------------------------------------------------------------------------- in-process


def _app(**settings: Any) -> Iterator[TestClient]:
    every = Settings(models=["service.models.benchmarks", MODELS_FILE], warmup=False, **settings)
    with TestClient(create_app(every), raise_server_exceptions=False) as client:
        yield client


@pytest.fixture(scope="module")
def limited() -> Iterator[TestClient]:
    """A small body limit (float32: no --x64 in this process)."""
    yield from _app(max_body_bytes=4096)


def test_limits_reach_umbridge(limited):
    big = {"name": "donut", "input": [[0.5] * 2000]}
    assert_umbridge_error(
        limited.post("/Evaluate", content=json.dumps(big)), 413, "PayloadTooLarge", "4096"
    )


def test_deadlines_reach_umbridge():
    for deadlined in _app(request_timeout_s=1.0):
        slow = {"name": "sleepy2", "input": [[3.0, 0.0]]}
        assert_umbridge_error(
            deadlined.post("/Evaluate", content=json.dumps(slow)), 504, "DeadlineExceeded", "1 s"
        )


def test_float32_without_x64(limited):
    from umbridge_util import Local

    response = limited.post(
        "/Evaluate", content=json.dumps({"name": "banana", "input": [[0.3, 0.2]]})
    )
    got = response.json()["output"][0][0]
    want = float(Local("banana", x64=False).evaluate([[0.3, 0.2]])[0][0])
    assert got == want  # the float32 result, widened exactly


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
_fields = st.fixed_dictionaries(
    {},
    optional={
        "name": st.sampled_from(["donut", "two_outputs", "scaled_counts", "cholesky_loss", "x"])
        | _json,
        "input": st.lists(
            st.lists(
                st.floats(width=32) | st.integers(-3, 3) | st.lists(st.floats(), max_size=2),
                max_size=5,
            ),
            max_size=3,
        )
        | _json,
        "outWrt": st.integers(-2, 3) | _json,
        "inWrt": st.integers(-2, 3) | _json,
        "inWrt1": st.integers(-1, 2),
        "inWrt2": st.integers(-1, 2),
        "sens": st.lists(st.floats(), max_size=5) | _json,
        "vec": st.lists(st.floats(), max_size=5) | _json,
        "config": st.dictionaries(st.sampled_from(["power", "a", "z"]), _json, max_size=2) | _json,
    },
)


@given(
    path=st.sampled_from(
        [
            "/Evaluate",
            "/Gradient",
            "/ApplyJacobian",
            "/ApplyHessian",
            "/InputSizes",
            "/OutputSizes",
            "/ModelInfo",
        ]
    ),
    doc=_fields,
)
@settings(
    max_examples=int(os.environ.get("GRADSERVE_FUZZ_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_hostile_documents_get_a_clean_answer(limited, path, doc):
    response = limited.post(path, content=json.dumps(doc))
    assert response.status_code in (200, 400), response.text
    body = response.json()
    if response.status_code == 400:
        assert set(body) == ERROR_KEYS and set(body["error"]) == ERROR_FIELDS
    else:
        assert set(body) <= {"output", "inputSizes", "outputSizes", "support"}

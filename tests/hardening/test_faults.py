"""Faults inside model code: clean 422s with a request id and no internals; NaN and Inf kept."""

from __future__ import annotations

import faulty_models as faulty
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hardening_util import assert_problem, send, still_serving

from client import wire
from helpers import assert_tree_equal, post


def test_exception_while_tracing_is_a_clean_422(limited):
    response = send(limited, "boom", "grad", wire.dumps({"args": [[1.0, 2.0]]}))
    body = assert_problem(response, 422, "model_error", "'boom'", "refuses every input")
    assert "<path>" in body["detail"]  # the model's message named its file; the path is masked
    still_serving(limited)


def test_exception_in_a_host_callback_is_a_clean_error(limited):
    response = send(limited, "callback_boom", "eval", wire.dumps({"args": [[1.0]]}))
    body = assert_problem(response, 422, "model_error", "'callback_boom'")
    assert "Traceback" not in body["detail"]
    still_serving(limited)


def test_request_id_is_echoed_or_replaced(limited):
    response = send(limited, "boom", "eval", b'{"args": [[1.0]]}', **{"x-request-id": "abc-123"})
    assert assert_problem(response, 422, "model_error")["request_id"] == "abc-123"
    for hostile in ("x" * 300, "a b<script>", "id\\n\\rSet-Cookie: x"):  # replaced, not echoed
        response = send(limited, "boom", "eval", b'{"args": [[1.0]]}', **{"x-request-id": hostile})
        assert assert_problem(response, 422, "model_error")["request_id"] != hostile
    still_serving(limited)


X = np.array([-1.0, 0.0, 2.0, np.inf, -np.inf, np.nan], np.float32)


@pytest.mark.parametrize("encoding", ["json", "npz"])
def test_nan_and_inf_pass_through_faithfully(limited, encoding):
    out = post(limited, "nonfinite", "eval", encoding, args=[X])
    want = np.asarray(jax.jit(faulty.nonfinite)(jnp.asarray(X)))
    assert np.isnan(want).any() and np.isinf(want).any()
    np.testing.assert_array_equal(out["value"], want)  # NaN where NaN, same-signed infinities
    finite_or_inf = ~np.isnan(want)  # JSON's "NaN" has no sign; -0.0 and -Infinity keep theirs
    assert np.array_equal(np.signbit(out["value"])[finite_or_inf], np.signbit(want)[finite_or_inf])
    tangent = np.ones_like(X)
    out = post(limited, "nonfinite", "jvp", encoding, args=[X], tangents=[tangent])
    _, want_t = jax.jvp(faulty.nonfinite, (jnp.asarray(X),), (jnp.asarray(tangent),))
    assert_tree_equal(out["tangent"], want_t, exact=True)
    still_serving(limited)


def test_binary_nonfinite_roundtrip(limited):
    body = wire.dumps(wire.encode_tree({"args": [X]}, binary=True) | {"binary": True})
    response = send(limited, "nonfinite", "eval", body)
    assert response.status_code == 200, response.text
    got = wire.decode_tree(response.json()["value"])
    want = np.asarray(jax.jit(faulty.nonfinite)(jnp.asarray(X)))
    assert got.tobytes() == want.tobytes()  # bit for bit, NaN payloads included


@pytest.mark.parametrize("in_axes", [5, -7, 2**40])
def test_vmap_axis_out_of_range_is_422_not_500(limited, in_axes):
    """Found by hand after fuzzing: `in_axes` is free-form in the schema."""
    body = wire.dumps({"args": [[1.0, 2.0]], "transforms": [{"op": "vmap", "in_axes": in_axes}]})
    assert_problem(send(limited, "tanh", "call", body), 422, "invalid_transform", "in_axes")
    still_serving(limited)

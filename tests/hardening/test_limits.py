"""Every limit of issue 5, provoked: refused with its status before parsing, inflating or
computing, as problem+json, and the server answers a valid request correctly right after."""

from __future__ import annotations

import io
import time
import zipfile

import numpy as np
import pytest
from hardening_util import LIMITS, assert_problem, send, still_serving

from client import wire
from service.limits import ShapeBudget


def nested(depth: int, leaf: str = "1.0") -> bytes:
    return b"[" * depth + leaf.encode() + b"]" * depth


def test_body_over_the_limit_while_streaming_is_413(limited):
    """No Content-Length (chunked): counted while reading, refused once past the limit."""
    chunk = b" " * 65536
    read = []

    def body():
        yield b'{"args": [1.0]'
        for _ in range(64):  # 4 MiB of whitespace, far past the 256 KiB limit
            read.append(1)
            yield chunk
        yield b"}"

    response = limited.post(
        "/v1/models/tanh/eval", content=body(), headers={"content-type": wire.JSON}
    )
    assert_problem(response, 413, "payload_too_large", str(LIMITS["max_body_bytes"]))
    still_serving(limited)


def test_declared_content_length_over_the_limit_is_413(limited):
    response = limited.post(
        "/v1/models/tanh/eval",
        content=b'{"args": [1.0]}',
        headers={"content-type": wire.JSON, "content-length": str(10 * 2**30)},
    )
    assert_problem(response, 413, "payload_too_large", str(10 * 2**30))
    still_serving(limited)


def test_json_nested_too_deep_is_413(limited):
    body = b'{"args": [' + nested(40) + b"]}"
    assert_problem(send(limited, "tanh", "eval", body), 413, "json_too_deep", "42 levels", "16")
    still_serving(limited)


def test_json_deeper_than_the_parser_allows_is_413_not_a_parser_error(limited):
    body = b'{"args": [' + nested(5000) + b"]}"  # orjson itself stops at 1024
    assert_problem(send(limited, "tanh", "eval", body), 413, "json_too_deep")
    still_serving(limited)


def test_brackets_inside_strings_do_not_count_as_nesting(limited):
    key = "[" * 40 + '\\"{' * 10
    body = b'{"args": [{"' + key.encode() + b'": [1.0]}]}'
    response = send(limited, "tanh", "eval", body)
    assert response.status_code == 422, response.text  # a dict for an array: wrong, but not deep
    still_serving(limited)


def test_json_with_too_many_elements_is_413(limited):
    body = wire.dumps({"args": [[0.5] * 30_000]})
    assert len(body) < LIMITS["max_body_bytes"]
    assert_problem(send(limited, "tanh", "eval", body), 413, "too_many_elements", "20000", "base64")
    still_serving(limited)


def test_npz_json_member_is_scanned_too(limited):
    body = _npz({"__json__": np.frombuffer(b'{"args": [' + nested(40) + b"]}", np.uint8)})
    assert_problem(send(limited, "tanh", "eval", body, wire.NPZ), 413, "json_too_deep")
    still_serving(limited)


def test_npz_with_too_many_members_is_413(limited):
    members = {f"a{i}": np.zeros(1, np.float32) for i in range(LIMITS["max_npz_members"] + 1)}
    members["__json__"] = np.frombuffer(b'{"args": [{"$npz": "a0"}]}', np.uint8)
    assert_problem(send(limited, "tanh", "eval", _npz(members), wire.NPZ), 413, "too_many_members")
    still_serving(limited)


def test_npz_zip_bomb_is_refused_before_inflating(limited):
    """64 MiB of zeros deflate to ~64 KiB; the member's declared size is judged first."""
    inflated = 64 * 2**20
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("__json__.npy", _npy(np.frombuffer(b'{"args": [{"$npz": "x"}]}', np.uint8)))
        with zf.open("x.npy", "w") as f:
            f.write(_npy_header(np.dtype(np.float32), (inflated // 4,)))
            zero = bytes(2**20)
            for _ in range(64):
                f.write(zero)
    body = buf.getvalue()
    assert len(body) < LIMITS["max_body_bytes"]
    started = time.perf_counter()
    response = send(limited, "tanh", "eval", body, wire.NPZ)
    assert_problem(response, 413, "payload_too_large", "'x' inflates to 6710")
    assert time.perf_counter() - started < 2
    still_serving(limited)


def test_npz_with_pickled_objects_is_400(limited):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("__json__.npy", _npy(np.frombuffer(b'{"args": [{"$npz": "x"}]}', np.uint8)))
        with zf.open("x.npy", "w") as f:
            np.lib.format.write_array(f, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    assert_problem(
        send(limited, "tanh", "eval", buf.getvalue(), wire.NPZ), 400, "invalid_npz", "objects"
    )
    still_serving(limited)


def test_npz_reference_to_a_missing_member_is_400(limited):
    body = _npz({"__json__": np.frombuffer(b'{"args": [{"$npz": "ghost"}]}', np.uint8)})
    assert_problem(send(limited, "tanh", "eval", body, wire.NPZ), 400, "invalid_npz", "ghost")
    still_serving(limited)


def test_npz_member_shorter_than_its_header_is_400(limited):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("__json__.npy", _npy(np.frombuffer(b'{"args": [{"$npz": "x"}]}', np.uint8)))
        zf.writestr("x.npy", _npy_header(np.dtype(np.float32), (10**6,)) + b"\0" * 16)
    assert_problem(send(limited, "tanh", "eval", buf.getvalue(), wire.NPZ), 400, "invalid_npz")
    still_serving(limited)


@pytest.mark.parametrize(
    ("model", "op", "n"),
    [("tanh", "jacobian", 300), ("tanh_sq_sum", "hessian", 300), ("tanh", "jacfwd", 250)],
)
def test_result_over_the_output_limit_is_413_before_computing(limited, model, op, n):
    body = wire.dumps({"args": [[0.1] * n]})
    assert_problem(
        send(limited, model, op, body),
        413,
        "output_too_large",
        f"{n * n} elements",
        "jvp, vjp or hvp",
    )
    still_serving(limited)


def test_transform_chain_deeper_than_the_limit_is_422(limited):
    depth = LIMITS["max_transform_depth"] + 1
    body = wire.dumps({"args": [0.5], "transforms": [{"op": "grad"}] * depth})
    assert_problem(send(limited, "tanh", "call", body), 422, "transform_depth", str(depth))
    still_serving(limited)


@pytest.mark.parametrize(
    ("model", "op", "fields"),
    [
        ("tanh", "jvp", {"args": [[0.1, 0.2]], "tangents": [[[1.0, 0.0]] * 17]}),
        ("tanh", "vjp", {"args": [[0.1, 0.2]], "cotangent": [[1.0, 0.0]] * 17}),
        ("tanh_sq_sum", "hvp", {"args": [[0.1, 0.2]], "tangents": [[[1.0, 0.0]] * 17]}),
    ],
)
def test_batch_over_the_limit_is_413(limited, model, op, fields):
    body = wire.dumps({**fields, "batched": True})
    assert_problem(send(limited, model, op, body), 413, "batch_too_large", "17", "16")
    still_serving(limited)


def test_batch_at_the_limit_is_served(limited):
    tangents = np.eye(16, 2, dtype=np.float32)
    body = wire.dumps(
        wire.encode_tree({"args": [np.float32([0.1, 0.2])], "tangents": [tangents]})
        | {"batched": True}
    )
    response = send(limited, "tanh", "jvp", body)
    assert response.status_code == 200, response.text
    assert wire.decode_tree(response.json()["tangent"]).shape == (16, 2)


def test_new_shapes_past_the_per_minute_budget_are_429(limited):
    app = limited.app
    saved, app.state.shape_budget = app.state.shape_budget, ShapeBudget(2)
    try:
        for n in (3, 4):
            assert (
                send(limited, "square3", "eval", wire.dumps({"args": [[1.0] * n]})).status_code
                == 200
            )
        response = send(limited, "square3", "eval", wire.dumps({"args": [[1.0] * 5]}))
        assert_problem(response, 429, "too_many_shapes", "'square3'", "2")
        assert 1 <= int(response.headers["retry-after"]) <= 60
        # Shapes already compiled still pass, and so do other models.
        assert (
            send(limited, "square3", "eval", wire.dumps({"args": [[2.0] * 3]})).status_code == 200
        )
        still_serving(limited)
    finally:
        app.state.shape_budget = saved


def test_shape_budget_window_slides():
    budget = ShapeBudget(2)
    budget.admit_key("m", "a", now=0.0)
    budget.admit_key("m", "b", now=1.0)
    with pytest.raises(Exception, match="new input shapes") as refused:
        budget.admit_key("m", "c", now=30.0)
    assert refused.value.headers["Retry-After"] == "30"
    budget.admit_key("other", "c", now=30.0)  # per model
    budget.admit_key("m", "a", now=59.0)  # known: free
    budget.admit_key("m", "c", now=60.5)  # "a" has left the window


# ---------------------------------------------------------------------------- npz helpers


def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": dtype.str, "fortran_order": False, "shape": shape}
    )
    return np.lib.format.magic(1, 0) + buf.getvalue()


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _npz(members: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, arr in members.items():
            zf.writestr(name + ".npy", _npy(arr))
    return buf.getvalue()


def test_declared_10_gb_body_is_refused_at_once_over_a_real_socket(live_server):
    """Headers only: the server answers 413 without waiting for (or reading) a byte of body."""
    import socket

    head = (
        "POST /v1/models/tanh/eval HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/json\r\nContent-Length: {10 * 2**30}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", live_server.port), timeout=5) as sock:
        started = time.perf_counter()
        sock.sendall(head.encode())
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    assert time.perf_counter() - started < 2
    status_line, _, rest = answer.partition(b"\r\n")
    assert b" 413 " in status_line, answer[:300]
    assert b"application/problem+json" in rest and b'"payload_too_large"' in rest
    import httpx

    still_serving(httpx.Client(base_url=live_server.url, timeout=30))

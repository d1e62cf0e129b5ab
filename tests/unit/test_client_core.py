"""The client without a server: requests it builds, answers it decodes, errors and retries.

An `httpx.MockTransport` plays the server, so these run in milliseconds and need no JAX.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import httpx
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
    jacrev,
    jvp,
    value_and_grad,
    vjp,
    vmap,
    wire,
)
from client._core import NPZ_THRESHOLD

F32 = {"shape": None, "dtype": "float32"}
INFOS = {
    "tanh": {"inputs": [F32], "output": None},
    "loss": {"inputs": [{"shape": [3], "dtype": "float32"}, {"shape": [], "dtype": "float32"}],
             "output": {"shape": [], "dtype": "float32"}},
    "pred": {"inputs": [{"shape": [3], "dtype": "float32"}, {"shape": [], "dtype": "float32"}],
             "output": {"shape": [4], "dtype": "float32"}},
}  # fmt: skip


def leaf(x: Any, dtype: str = "float32") -> dict:
    return json.loads(wire.dumps(wire.encode_array(np.asarray(x, dtype))))


class FakeServer:
    """Answers model info, records every request, and replies to POSTs with `reply`."""

    def __init__(self, reply: Callable[[httpx.Request], httpx.Response] | None = None) -> None:
        self.requests: list[httpx.Request] = []
        self.reply = reply or (lambda r: httpx.Response(200, json={"value": leaf(0.0)}))

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        parts = request.url.path.split("/")
        if request.method == "GET" and len(parts) == 4:
            name = parts[3]
            if name not in INFOS:
                return problem(404, "model_not_found", f"no model named {name!r}")
            return httpx.Response(
                200, json={"name": name, "version": "1", "ops": [], **INFOS[name]}
            )
        return self.reply(request)

    @property
    def posts(self) -> list[httpx.Request]:
        return [r for r in self.requests if r.method == "POST"]

    def body(self, i: int = -1) -> dict:
        r = self.posts[i]
        if r.headers["content-type"] == wire.NPZ:
            return wire.load_npz(r.content)
        return json.loads(r.content)


def problem(status: int, code: str, detail: str, **headers: str) -> httpx.Response:
    body = {
        "type": "about:blank",
        "title": "x",
        "status": status,
        "detail": detail,
        "code": code,
        "request_id": "rid-1",
    }
    return httpx.Response(status, json=body, headers={"content-type": wire.PROBLEM_JSON, **headers})


def client(server: FakeServer, **options: Any) -> Client:
    return Client(
        "http://gs.test", http_client=httpx.Client(transport=httpx.MockTransport(server)), **options
    )


# ---------------------------------------------------------------------------- requests


def test_chains_become_one_request_with_transforms_innermost_first() -> None:
    server = FakeServer(
        lambda r: httpx.Response(200, json={"grad": leaf(0.25), "value": leaf(1.0)})
    )
    c = client(server, encoding="json")  # plain numbers, to compare the body as written
    tanh, pred = c.model("tanh"), c.model("pred")
    assert float(grad(grad(grad(tanh)))(2.0)) == 0.25
    assert server.posts[-1].url.path == "/v1/models/tanh/grad"
    assert server.body() == {
        "args": [leaf(2.0)],
        "transforms": [{"op": "grad", "argnums": 0, "has_aux": False, "holomorphic": False}] * 2,
        "argnums": 0,
        "has_aux": False,
        "holomorphic": False,
    }
    server.reply = lambda r: httpx.Response(200, json={"jacobian": leaf(np.zeros((4, 3, 3)))})
    assert jacfwd(jacrev(pred))(np.zeros(3), 0.0).shape == (4, 3, 3)
    assert server.posts[-1].url.path == "/v1/models/pred/jacfwd"
    assert [t["op"] for t in server.body()["transforms"]] == ["jacrev"]
    server.reply = lambda r: httpx.Response(200, json={"value": leaf(np.zeros(5))})
    vmap(grad(tanh))(np.zeros(5))
    assert server.posts[-1].url.path == "/v1/models/tanh/call"
    assert [t["op"] for t in server.body()["transforms"]] == ["grad", "vmap"]
    assert len(server.posts) == 3


def test_pullback_and_vmap_of_it() -> None:
    def reply(r: httpx.Request) -> httpx.Response:
        body = json.loads(r.content)
        if r.url.path.endswith("/linearize"):  # a server without sessions: stateless pullbacks
            return problem(404, "op_not_found", "no op 'linearize'")
        if r.url.path.endswith("/eval"):
            return httpx.Response(200, json={"value": leaf(np.zeros(4))})
        shape = tuple(body["cotangent"]["shape"][:1]) if body["batched"] else ()
        return httpx.Response(
            200,
            json={
                "value": leaf(np.zeros(4)),
                "cotangents": [leaf(np.ones((*shape, 3))), leaf(np.ones(shape))],
            },
        )

    server = FakeServer(reply)
    pred = client(server).model("pred")
    y, pullback = vjp(pred, np.zeros(3), 0.0)
    assert y.shape == (4,)
    W_bar, b_bar = pullback(np.ones(4))
    assert W_bar.shape == (3,) and b_bar.shape == () and server.body()["batched"] is False
    out = vmap(pullback)(np.ones((128, 4), np.float32))
    assert isinstance(out, tuple) and out[0].shape == (128, 3) and out[1].shape == (128,)
    assert server.body()["batched"] is True and server.posts[-1].url.path == "/v1/models/pred/vjp"
    with pytest.raises(TypeError, match="only vmap applies"):
        grad(pullback)


def test_python_scalars_take_the_declared_dtype_and_tangents_their_primals() -> None:
    server = FakeServer(
        lambda r: httpx.Response(
            200, json={"value": leaf(np.zeros(4)), "tangent": leaf(np.zeros(4))}
        )
    )
    pred = client(server, encoding="json").model("pred")
    jvp(pred, ([1, 2, 3], 0.5), (np.ones(3), 0))
    body = server.body()
    assert body["args"] == [leaf([1, 2, 3]), leaf(0.5)]
    assert body["tangents"] == [leaf(np.ones(3)), leaf(0.0)]  # float64 narrowed, int -> float32


def test_encoding_follows_size_and_can_be_forced() -> None:
    server = FakeServer(lambda r: httpx.Response(200, json={"value": leaf(0.0)}))
    c = client(server)
    tanh = c.model("tanh")
    tanh(np.zeros(4, np.float32))
    assert server.posts[-1].headers["content-type"] == wire.JSON
    assert server.posts[-1].headers["accept"] == wire.JSON
    # Small arrays go as base64 leaves: cheaper than JSON numbers to write and to read.
    assert server.body()["binary"] is True and "base64" in server.body()["args"][0]
    big = np.zeros(NPZ_THRESHOLD // 4 + 1, np.float32)
    tanh(big)
    assert server.posts[-1].headers["content-type"] == wire.NPZ
    assert server.posts[-1].headers["accept"] == wire.NPZ
    np.testing.assert_array_equal(server.body()["args"][0], big)
    forced = client(server, encoding="npz").model("tanh")
    forced(1.0)
    assert server.posts[-1].headers["content-type"] == wire.NPZ
    with pytest.raises(ValueError, match="encoding"):
        Client("http://gs.test", encoding="xml")


def test_npz_answers_decode() -> None:
    hess = np.arange(9, dtype=np.float32).reshape(3, 3)
    server = FakeServer(
        lambda r: httpx.Response(
            200, content=wire.dump_npz({"hessian": hess}), headers={"content-type": wire.NPZ}
        )
    )
    got = hessian(client(server).model("tanh"))(np.zeros(3))
    np.testing.assert_array_equal(got, hess)


def test_results_keep_jax_structure() -> None:
    g = [leaf([1, 2, 3]), leaf(4.0)]
    server = FakeServer(lambda r: httpx.Response(200, json={"grad": g, "value": leaf(5.0)}))
    loss = client(server).model("loss")
    out = grad(loss, (0, 1))(np.zeros(3), 0.0)
    assert isinstance(out, tuple) and out[1].shape == () and out[1].dtype == np.float32
    assert isinstance(grad(loss, [0, 1])(np.zeros(3), 0.0), tuple)
    value, grads = value_and_grad(loss, (0, 1))(np.zeros(3), 0.0)
    assert value.shape == () and isinstance(grads, tuple)
    # hvp sends argnums; the server answers that block alone, or a list for a tuple.
    server.reply = lambda r: httpx.Response(200, json={"hvp": leaf([1, 2, 3])})
    assert hvp(loss, (np.zeros(3), 0.0), (np.ones(3), 1.0)).shape == (3,)
    assert json.loads(server.posts[-1].content)["argnums"] == 0
    server.reply = lambda r: httpx.Response(200, json={"hvp": [leaf([1, 2, 3]), leaf(4.0)]})
    assert isinstance(hvp(loss, (np.zeros(3), 0.0), (np.ones(3), 1.0), argnums=(0, 1)), tuple)
    assert json.loads(server.posts[-1].content)["argnums"] == [0, 1]


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, errors.InvalidInput),
        (401, errors.Unauthorized),
        (403, errors.Unauthorized),
        (404, errors.ModelNotFound),
        (406, errors.NotAcceptable),
        (413, errors.PayloadTooLarge),
        (415, errors.NotAcceptable),
        (422, errors.InvalidInput),
        (429, errors.ServerBusy),
        (500, errors.ServerError),
        (503, errors.ServerBusy),
        (504, errors.DeadlineExceeded),
    ],
)
def test_each_status_raises_its_exception_with_the_detail(status: int, cls: type) -> None:
    server = FakeServer(lambda r: problem(status, "some_code", f"detail of {status}"))
    with pytest.raises(cls) as e:
        client(server, retries=0).model("tanh")(1.0)
    assert str(e.value) == f"detail of {status}" and e.value.status == status
    assert e.value.code == "some_code" and e.value.request_id == "rid-1"
    assert isinstance(e.value, errors.APIError) and isinstance(e.value, errors.GradserveError)


def test_non_problem_error_bodies_still_map() -> None:
    server = FakeServer(lambda r: httpx.Response(502, text="bad gateway"))
    with pytest.raises(errors.ServerError, match="bad gateway"):
        client(server).model("tanh")(1.0)


def test_unknown_model_and_local_shape_check() -> None:
    server = FakeServer()
    c = client(server)
    with pytest.raises(errors.ModelNotFound, match="no model named 'nope'"):
        c.model("nope")
    with pytest.raises(
        errors.InvalidInput, match=r"argument 0 of 'loss' expects float32\[3\], got float32\[4\]"
    ):
        grad(c.model("loss"))(np.zeros(4), 0.0)
    with pytest.raises(errors.InvalidInput, match="'loss' takes 2 positional argument"):
        c.model("loss")(np.zeros(3))
    assert server.posts == []


def test_plain_callables_are_refused_with_a_pointer_to_jax() -> None:
    for transform in (grad, jacfwd, hessian, vmap):
        with pytest.raises(TypeError, match=rf"use jax\.{transform.__name__}"):
            transform(np.tanh)
    with pytest.raises(TypeError, match=r"use jax\.vjp"):
        vjp(lambda x: x, 1.0)


# ---------------------------------------------------------------------------- retries


def test_retries_503_and_429_honouring_retry_after() -> None:
    answers = [
        problem(503, "not_ready", "warming"),
        problem(429, "queue_full", "busy", **{"retry-after": "0.2"}),
    ]

    def reply(r: httpx.Request) -> httpx.Response:
        return answers.pop(0) if answers else httpx.Response(200, json={"value": leaf(1.0)})

    server = FakeServer(reply)
    t0 = time.monotonic()
    assert float(client(server, backoff=0.01).model("tanh")(1.0)) == 1.0
    assert len(server.posts) == 3 and time.monotonic() - t0 >= 0.2


def test_no_retry_on_other_4xx_and_none_past_the_timeout() -> None:
    server = FakeServer(lambda r: problem(422, "shape_mismatch", "bad shape"))
    with pytest.raises(errors.InvalidInput):
        client(server).model("tanh")(1.0)
    assert len(server.posts) == 1
    server.reply = lambda r: problem(429, "queue_full", "busy", **{"retry-after": "30"})
    t0 = time.monotonic()
    with pytest.raises(errors.ServerBusy) as e:
        client(server, timeout=1.0).model("tanh")(1.0)
    assert e.value.retry_after == 30 and time.monotonic() - t0 < 1.0


def test_connect_errors_retry_then_raise() -> None:
    calls = []

    def refuse(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        raise httpx.ConnectError("connection refused", request=request)

    c = Client(
        "http://gs.test",
        http_client=httpx.Client(transport=httpx.MockTransport(refuse)),
        retries=2,
        backoff=0.01,
    )
    with pytest.raises(errors.ConnectError, match=r"cannot reach http://gs\.test"):
        c.models()
    assert len(calls) == 3


def test_a_connection_dropped_on_reuse_is_retried() -> None:
    # A pooled keep-alive connection the server closed while idle fails with ReadError.
    answers: list = [httpx.ReadError("connection reset"), httpx.Response(200, json={"models": []})]

    def flaky(request: httpx.Request) -> httpx.Response:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    c = Client(
        "http://gs.test",
        http_client=httpx.Client(transport=httpx.MockTransport(flaky)),
        retries=2,
        backoff=0.01,
    )
    assert c.models() == []
    assert answers == []


def test_read_timeouts_raise_timeout() -> None:
    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    c = Client("http://gs.test", http_client=httpx.Client(transport=httpx.MockTransport(slow)))
    with pytest.raises(errors.Timeout):
        c.models()


# ---------------------------------------------------------------------------- async twin


def test_async_client_shares_the_core() -> None:
    server = FakeServer(lambda r: httpx.Response(200, json={"grad": [leaf([1, 2, 3]), leaf(4.0)]}))

    async def main() -> Any:
        http = httpx.AsyncClient(transport=httpx.MockTransport(server))
        async with AsyncClient("http://gs.test", http_client=http) as c:
            loss = c.model("loss")
            out = await grad(loss, (0, 1))(np.zeros(3), 0.0)
            assert (await c.model_info("loss")).inputs[0].shape == (3,)
            assert loss.spec[1].shape == ()
            return out

    out = asyncio.run(main())
    assert isinstance(out, tuple) and out[0].shape == (3,)
    assert [r.method for r in server.requests] == ["GET", "POST"]

"""What every hardening test checks: a clean problem+json, then a correct answer right after."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np

from client import wire
from helpers import assert_tree_equal, post
from service.models import cookbook as cb

FAULTY_MODELS = str(Path(__file__).with_name("faulty_models.py"))
W = np.array([0.1, -0.2, 0.3], np.float32)
B = np.float32(0.5)
LIMITS = {
    "max_body_bytes": 256 * 1024,
    "max_npz_members": 8,
    "max_json_depth": 16,
    "max_json_elements": 20_000,
    "max_output_elements": 50_000,
    "max_batch_tangents": 16,
    "max_transform_depth": 4,
}
KEYS = {
    "compute": "ck-0123456789",
    "admin": "ak-0123456789",
    "both": "bk-0123456789",
    "metrics": "mk-0123456789",
}
FILE_KEY = "fk-from-the-hashed-file"
PROBLEM_KEYS = {"type", "title", "status", "detail", "code", "request_id"}


def assert_problem(response: Any, status: int, code: str, *words: str) -> dict[str, Any]:
    """An RFC 9457 body with our code and request id, and nothing of the server's insides."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == wire.PROBLEM_JSON
    body = response.json()
    assert body.keys() >= PROBLEM_KEYS, body
    assert body["status"] == status and body["code"] == code, body
    assert body["request_id"] and body["request_id"] == response.headers["x-request-id"]
    for word in words:
        assert word in body["detail"], (word, body["detail"])
    for leak in ("Traceback", 'File "', ".py", "/work/", "site-packages"):
        assert leak not in response.text, (leak, response.text)
    return body


def still_serving(client: Any, **headers: str) -> None:
    """A valid request right after, answered with what local JAX computes."""
    body, media = wire.dumps(wire.encode_tree({"args": [W, B]})), wire.JSON
    response = client.post(
        "/v1/models/logistic_loss/grad", content=body, headers={"content-type": media, **headers}
    )
    assert response.status_code == 200, response.text
    got = wire.decode_tree(response.json()["grad"])
    assert_tree_equal(got, jax.grad(cb.logistic_loss)(W, B))


def send(
    client: Any, model: str, op: str, body: bytes, media: str = wire.JSON, **headers: str
) -> Any:
    return client.post(
        f"/v1/models/{model}/{op}", content=body, headers={"content-type": media, **headers}
    )


__all__ = [
    "FAULTY_MODELS",
    "FILE_KEY",
    "KEYS",
    "LIMITS",
    "assert_problem",
    "post",
    "send",
    "still_serving",
]

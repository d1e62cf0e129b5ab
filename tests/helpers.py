"""Test helpers: a real server in a subprocess, and posting ops in JSON or npz.

Shared code lives here rather than in conftest.py: with a conftest.py in several test folders,
`from conftest import ...` names whichever was imported first.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import jax
import numpy as np

from bench.harness import ServerProcess, free_port  # noqa: F401 - free_port for tests
from client import wire

ROOT = Path(__file__).resolve().parents[1]
ENCODINGS = ("json", "npz")

# `gradserve serve` in a subprocess: the same helper the benchmarks and the soak use.
LiveServer = ServerProcess


def to_numpy(tree: Any) -> Any:
    return jax.tree.map(np.asarray, tree)


def request_body(encoding: str, fields: dict[str, Any]) -> tuple[bytes, str]:
    """Arrays in `fields` go out as explicit JSON leaves, or as npz members."""
    # Only these fields hold arrays; the rest (argnums, mode, transforms...) are plain JSON.
    arrays = {k: v for k, v in fields.items() if k in _ARRAY_FIELDS}
    options = {k: v for k, v in fields.items() if k not in _ARRAY_FIELDS}
    if encoding == "npz":
        return wire.dump_npz(wire.npz_ready(arrays) | options), wire.NPZ
    return wire.dumps(wire.encode_tree(arrays) | options), wire.JSON


_ARRAY_FIELDS = ("args", "tangents", "cotangent")


def post(client: Any, model: str, op: str, encoding: str = "json", **fields: Any) -> dict[str, Any]:
    """POST an op and return its decoded response fields; fails the test on an error status."""
    response = post_raw(client, model, op, encoding, **fields)
    assert response.status_code == 200, response.text
    return decode(response)


def post_raw(client: Any, model: str, op: str, encoding: str = "json", **fields: Any) -> Any:
    body, media = request_body(encoding, fields)
    return client.post(f"/v1/models/{model}/{op}", content=body, headers={"content-type": media})


def decode(response: Any) -> dict[str, Any]:
    media = response.headers["content-type"].split(";")[0]
    doc = wire.load_npz(response.content) if media == wire.NPZ else wire.loads(response.content)
    return {k: wire.decode_tree(v) for k, v in doc.items()}


def assert_tree_equal(
    got: Any, want: Any, exact: bool = False, rtol: float = 1e-5, atol: float = 1e-6
) -> None:
    """Same structure (lists for tuples), same dtypes and shapes, and equal or allclose values."""
    got_leaves, got_def = jax.tree.flatten(got)
    want_leaves, want_def = jax.tree.flatten(to_numpy(want))
    assert len(got_leaves) == len(want_leaves), (got_def, want_def)
    for g, w in zip(got_leaves, want_leaves, strict=True):
        g, w = np.asarray(g), np.asarray(w)
        assert g.dtype == w.dtype, (g.dtype, w.dtype)
        assert g.shape == w.shape, (g.shape, w.shape)
        if exact:
            np.testing.assert_array_equal(g, w)
        else:
            np.testing.assert_allclose(g, w, rtol=rtol, atol=atol)


def complex_draws(seed: int) -> tuple[np.ndarray, np.complex64, np.complex64]:
    """In[30]/In[31]'s draws: `complex_linear`'s coefficients, a point z and a tangent."""
    from jax import random

    key = random.PRNGKey(seed)
    key, subkey = random.split(key)
    coeffs = np.asarray(random.uniform(subkey, (4,)))
    key, subkey = random.split(key)
    x, y = np.asarray(random.uniform(subkey, (2,)))
    key, subkey = random.split(key)
    dc, dd = np.asarray(random.uniform(subkey, (2,)))
    return coeffs, np.complex64(x + y * 1j), np.complex64(dc + dd * 1j)


def seed_draws() -> dict[str, np.ndarray]:
    """The seed notebook's random draws, in its order, with the PRNG it ran with.

    The notebook predates `jax_threefry_partitionable=True`; its W and b (and so its printed
    numbers) come from the old setting, restored here for the draws only.
    """
    from jax import random

    before = jax.config.jax_threefry_partitionable
    jax.config.update("jax_threefry_partitionable", False)
    try:
        key = random.PRNGKey(0)
        key, W_key, b_key = random.split(key, 3)
        draws = {"W": random.normal(W_key, (3,)), "b": random.normal(b_key, ())}  # In[3]
        key, subkey = random.split(key)
        draws["vec"] = random.normal(subkey, (3,))  # In[7]
        key, subkey = random.split(key)
        draws["v"] = random.normal(subkey, (3,))  # In[14]
        key, subkey = random.split(key)
        draws["u"] = random.normal(subkey, (4,))  # In[15]
        key, k1, k2 = random.split(key, 3)
        draws["X"], draws["V"] = random.normal(k1, (30, 40)), random.normal(k2, (30, 40))  # In[19]
        draws["U"] = random.normal(random.PRNGKey(0), (128, 4))  # In[23]
        draws["S"] = random.normal(random.PRNGKey(0), (128, 3))  # In[24]
        return {k: np.asarray(x) for k, x in draws.items()}
    finally:
        jax.config.update("jax_threefry_partitionable", before)


def assert_tree_close(got: Any, want: Any, tol: float = 1e-5) -> None:
    """Same structure, shapes and dtypes; values allclose at `tol` (float32 tolerance)."""
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol)


@contextmanager
def recorded_client(url: str) -> Iterator[Any]:
    """A `client.Client` whose `.requests` lists every HTTP request it sent (an httpx hook)."""
    from client import Client

    requests: list[httpx.Request] = []
    hooks = {"request": [requests.append]}
    with Client(url, http_client=httpx.Client(event_hooks=hooks)) as client:
        client.requests = requests  # type: ignore[attr-defined]
        yield client

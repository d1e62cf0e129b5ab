"""Models for the UM-Bridge tests: several inputs and outputs, pytrees, config, an integer
input, and failures. Served with `--models tests/umbridge/umbridge_models.py`."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from service.registry import model


@model(
    "two_outputs",
    inputs=[((2,), "float32"), {"w": ((3,), "float32"), "s": ((), "float32")}],
    config={"power": 2},
    description="a tuple of a vector and a dict: two UM-Bridge outputs of sizes 2 and 4",
)
def two_outputs(x: jax.Array, p: dict[str, jax.Array], *, power: int) -> tuple:
    first = x**power * p["s"] + jnp.sum(jnp.tanh(p["w"])) * x[0]
    second = {"a": jnp.sum(jnp.sin(x)) * p["w"] ** 2, "b": p["s"] ** 2 * x[1]}
    return first, second


@model(
    "scaled_counts",
    inputs=[((3,), "int32"), ((), "float32")],
    description="integer counts times a scale: Evaluate only",
)
def scaled_counts(n: jax.Array, scale: jax.Array) -> jax.Array:
    return n * scale


def _refuse_negative(x: np.ndarray) -> np.ndarray:
    if x[0] < 0:
        raise ValueError("fails: x[0] must not be negative")
    return np.asarray(x)


@model(
    "fails",
    inputs=[((2,), "float32")],
    config={"explode": False},
    description="raises at run time for x[0] < 0, and while tracing with explode=true",
)
def fails(x: jax.Array, *, explode: bool) -> jax.Array:
    if explode:
        raise ValueError("fails: explode was set")
    return jax.pure_callback(_refuse_negative, jax.ShapeDtypeStruct(x.shape, x.dtype), x) * 2


def _sleep(x: np.ndarray) -> np.ndarray:
    time.sleep(min(float(x[0]), 10.0))
    return np.asarray(x)


@model("sleepy2", inputs=[((2,), "float32")], description="sleeps x[0] seconds on the host")
def sleepy2(x: jax.Array) -> jax.Array:
    return jax.pure_callback(_sleep, jax.ShapeDtypeStruct(x.shape, x.dtype), x)


@model("logs", inputs=[((2,), "float32")], description="jnp.log(x): NaN and -inf for x <= 0")
def logs(x: jax.Array) -> jax.Array:
    return jnp.log(x)


@model(
    "held_affine",
    inputs=[((3,), "float32")],
    params={
        "A": np.array([[0.5, -1.0, 0.25], [1.5, 0.2, -0.3]], np.float32),
        "c": np.array([0.1, -0.2], np.float32),
    },
    description="tanh(A x + c) with A and c held by the server",
)
def held_affine(params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    return jnp.tanh(params["A"] @ x + params["c"]) ** 2

"""Models that misbehave on purpose: the server must answer for them cleanly.

Served by the hardening tests with `--models tests/hardening/faulty_models.py`.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from service.registry import model

VEC = [((None,), "float32")]


@model("boom", inputs=VEC, description="raises while tracing")
def boom(x: jax.Array) -> jax.Array:
    raise ValueError(f"boom: this model refuses every input (defined in {__file__})")


def _fail(x: np.ndarray) -> np.ndarray:
    raise RuntimeError(f"callback failed in {__file__}")


@model("callback_boom", inputs=VEC, description="raises inside a host callback, at run time")
def callback_boom(x: jax.Array) -> jax.Array:
    return jax.pure_callback(_fail, jax.ShapeDtypeStruct(x.shape, x.dtype), x)


@model("nonfinite", inputs=VEC, description="log(x) and 1/x: NaN and Inf for x <= 0")
def nonfinite(x: jax.Array) -> jax.Array:
    return jnp.stack([jnp.log(x), 1 / x])


def _sleep(x: np.ndarray) -> np.ndarray:
    time.sleep(min(float(np.max(x, initial=0.0)), 30.0))
    return np.asarray(x)


@model("sleepy", inputs=VEC, description="sleeps max(x) seconds (at most 30) on the host, then x")
def sleepy(x: jax.Array) -> jax.Array:
    return jax.pure_callback(_sleep, jax.ShapeDtypeStruct(x.shape, x.dtype), x)


@model("trace_hang", inputs=VEC, description="blocks its worker for 3 s while tracing")
def trace_hang(x: jax.Array) -> jax.Array:
    time.sleep(3.0)
    return x

"""Models for the engine tests: a slow one (to fill queues and pass deadlines) and one
replicated over every CPU device."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from service import model

# How many times the slow model's body really ran: dropped work must not count.
RUNS = {"slow": 0}


def _sleep_then_copy(x: np.ndarray, seconds: np.ndarray) -> np.ndarray:
    RUNS["slow"] += 1
    time.sleep(float(seconds))
    return np.asarray(x)


@model(
    "slow",
    inputs=[((), "float32"), ((), "float32")],
    max_batch_size=1,
    description="sleeps `seconds`",
)
def slow(x: jax.Array, seconds: jax.Array) -> jax.Array:
    return jax.pure_callback(
        _sleep_then_copy,
        jax.ShapeDtypeStruct(x.shape, x.dtype),
        x,
        seconds,
        vmap_method="sequential",
    )


@model(
    "spread",
    inputs=[((None,), "float32")],
    replicas=0,
    description="sum(sin(x)**2) on every CPU device",
)
def spread(x: jax.Array) -> jax.Array:
    return jnp.sum(jnp.sin(x) ** 2)


@model(
    "wants_gpu", inputs=[((), "float32")], device="gpu", description="placed on CPU where no GPU"
)
def wants_gpu(x: jax.Array) -> jax.Array:
    return x * 2


# How many times `vector_out` was traced: a refused request must not trace it again.
TRACES = {"vector_out": 0}


@model("vector_out", inputs=[((None,), "float32")], description="2x; grad of it is refused")
def vector_out(x: jax.Array) -> jax.Array:
    TRACES["vector_out"] += 1
    return 2 * x


@model(
    "warm_batched",
    inputs=[((None,), "float32")],
    warmup_batch_size=8,
    description="sum(tanh(x)**2); warm-up compiles its batched programs up to 8 requests",
)
def warm_batched(x: jax.Array) -> jax.Array:
    return jnp.sum(jnp.tanh(x) ** 2)

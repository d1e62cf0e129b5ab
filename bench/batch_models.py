"""The batching benchmark's model: a compute-bound 784-4096-4096-10 tanh MLP.

Its weights (~20 M floats) make one sample's grad cost ~10 ms of matrix-vector work on a CPU,
which a batch of 32 turns into matrix-matrix work: the case where dynamic batching pays.

    gradserve serve --models bench.batch_models
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from service.models import cookbook
from service.registry import model

SIZES = (784, 4096, 4096, 10)


def init(key: jax.Array) -> Any:
    return cookbook.mlp_init(key, SIZES)


@model(
    "big_mlp_loss",
    inputs=[((None, 784), "float32"), ((None,), "int32")],
    output=((), "float32"),
    init=init,
    seed=0,
    warmup_batch_size=32,  # the bench's 32 clients: their first burst runs batched
    description="Mean softmax cross-entropy of a 784-4096-4096-10 tanh MLP on (x, labels y)",
)
def big_mlp_loss(params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
    logp = jax.nn.log_softmax(cookbook.mlp_apply(params, x))
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))

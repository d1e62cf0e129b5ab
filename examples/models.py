"""Serving your own models: `gradserve serve --models examples/models.py`.

A models file is plain Python that the operator names on the command line (never a client).
Each `@model` function is registered under its name; everything else in the file is ignored.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp

from service import model

HERE = Path(__file__).parent


@model(
    "rosenbrock",
    inputs=[((None,), "float32")],  # a vector of any length
    output=((), "float32"),
    description="The Rosenbrock function, sum of 100 (x[i+1] - x[i]^2)^2 + (1 - x[i])^2",
)
def rosenbrock(x: jax.Array) -> jax.Array:
    return jnp.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2)


@model(
    "ridge",
    inputs=[((None,), "float32"), ((None, None), "float32"), ((None,), "float32")],
    description="Ridge loss of weights w on (X, y), returning (loss, aux): use has_aux=True",
)
def ridge(w: jax.Array, X: jax.Array, y: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    residual = X @ w - y
    loss = jnp.mean(residual**2) + 0.1 * jnp.sum(w**2)
    return loss, {"residual_norm": jnp.linalg.norm(residual), "prediction": X @ w}


def _init_regressor(key: jax.Array) -> dict[str, jax.Array]:
    w_key, b_key = jax.random.split(key)
    return {"w": jax.random.normal(w_key, (8,)), "b": jax.random.normal(b_key, ())}


@model(
    "regressor",
    inputs=[((None, 8), "float32")],
    init=_init_regressor,
    seed=42,
    description="A linear model x @ w + b whose parameters the server holds (seeded init)",
)
def regressor(params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    return x @ params["w"] + params["b"]


@model(
    "scaled_tanh",
    inputs=[((None,), "float32")],
    params=HERE / "scaled_tanh_params.npz",
    description="scale * tanh(x) + shift, parameters read from an .npz file at start-up",
)
def scaled_tanh(params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    return params["scale"] * jnp.tanh(x) + params["shift"]

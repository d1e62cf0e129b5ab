"""Models for the pages' tests: a 2-variable scalar (the contour map) and markup in a description."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from service.registry import model


@model(
    "bowl2",
    inputs=[((2,), "float32")],
    output=((), "float32"),
    example=[[0.5, -0.25]],
    description="<b>bold</b> <script>alert('description')</script>: a tilted bowl",
)
def bowl2(x: jax.Array) -> jax.Array:
    return x[0] ** 2 + 3 * x[1] ** 2 + x[0] * x[1] + jnp.sin(3 * x[0])

"""A model whose forward pass dominates its products, for the sessions benchmark.

`reaction_diffusion`: a 1-D reaction-diffusion equation stepped explicitly `STEPS` times
(`lax.scan`), with an Arrhenius-type reaction rate, as stiff combustion and battery models have.
Each step evaluates several transcendental functions per grid point, which the forward pass
pays and the linearization only multiplies by, so applying a product at a kept linearization
costs a fraction of recomputing it: the case sessions are for.

    gradserve serve --models bench/session_models.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from service import model

GRID = 2048
STEPS = 200
DT, DIFFUSION, ACTIVATION = 1e-3, 0.2, 3.0


def _step(u: jax.Array, k: jax.Array) -> tuple[jax.Array, None]:
    laplacian = jnp.roll(u, 1) - 2 * u + jnp.roll(u, -1)
    rate = jnp.exp(-ACTIVATION / (1.0 + u * u)) * jnp.log1p(u * u) * jnp.tanh(k * u)
    return u + DT * (DIFFUSION * laplacian + rate - jnp.sin(u) * jnp.cos(u) ** 2), None


def _solve(u0: jax.Array, k: jax.Array) -> jax.Array:
    u, _ = jax.lax.scan(lambda u, _: _step(u, k), u0, None, length=STEPS)
    return u


@model(
    "reaction_diffusion",
    inputs=[((GRID,), "float32"), ((), "float32")],
    output=((GRID,), "float32"),
    description=f"u(T) of a 1-D reaction-diffusion equation, {STEPS} explicit steps from u0",
)
def reaction_diffusion(u0: jax.Array, k: jax.Array) -> jax.Array:
    return _solve(u0, k)


@model(
    "reaction_diffusion_loss",
    inputs=[((GRID,), "float32"), ((), "float32")],
    output=((), "float32"),
    description="0.5 * |u(T)|^2 of `reaction_diffusion`: a scalar for grad and hvp",
)
def reaction_diffusion_loss(u0: jax.Array, k: jax.Array) -> jax.Array:
    return 0.5 * jnp.sum(_solve(u0, k) ** 2)

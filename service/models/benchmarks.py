"""UM-Bridge's analytic benchmark posteriors in JAX: `banana`, `donut`, `funnel` and
`gaussian_mixture` (UM-Bridge/benchmarks, `benchmarks/analytic-*`), each a log density of a
point in R^2.

Written from the formulas in those benchmarks' READMEs and servers, with their documented
outputs (tests/umbridge); unlike the originals, every one also has Gradient, ApplyJacobian and
ApplyHessian, from JAX. Inputs take the server's float type: float64 under `--x64`.

    gradserve serve --x64 --models service.models.benchmarks
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp
from jax.scipy.stats import multivariate_normal

from service.registry import ConfigOption, model

# One input of two numbers in the server's float type (float32, or float64 under --x64).
POINT = [((2,), None)]
LOG_DENSITY = ((), None)

DONUT_RADIUS = 2.6
DONUT_SIGMA2 = 0.033
# Gaussian mixture: (mean, isotropic variance) of its three equally weighted components.
MIXTURE = (((-1.5, -1.5), 0.8), ((1.5, 1.5), 0.8), ((-2.0, 2.0), 0.5))


@model(
    "banana",
    inputs=POINT,
    output=LOG_DENSITY,
    config=[
        ConfigOption("a", float, 2.0, "transformation parameter"),
        ConfigOption("b", float, 0.2, "transformation parameter"),
        ConfigOption("scale", float, 1.0, "factor on the underlying normal's covariance"),
    ],
    description="UM-Bridge benchmark analytic-banana: log N(T(x); (0, 4), scale [[1, .5], "
    "[.5, 1]]) with T(x) = (x1 / a, a x2 + a b (x1^2 + a^2))",
)
def banana(x: jax.Array, *, a: float, b: float, scale: float) -> jax.Array:
    y = jnp.stack([x[0] / a, x[1] * a + a * b * (x[0] ** 2 + a**2)])
    mean = jnp.array([0.0, 4.0], x.dtype)
    cov = scale * jnp.array([[1.0, 0.5], [0.5, 1.0]], x.dtype)
    return multivariate_normal.logpdf(y, mean, cov)


@model(
    "donut",
    inputs=POINT,
    output=LOG_DENSITY,
    description="UM-Bridge benchmark analytic-donut: -(|x| - 2.6)^2 / 0.033",
)
def donut(x: jax.Array) -> jax.Array:
    # |x| is not differentiable at 0; the double `where` keeps NaN out of its derivatives
    # there and makes them 0, as the original's gradient is (a NaN input stays NaN).
    squared = jnp.sum(x**2)
    zero = squared == 0
    r = jnp.where(zero, 0.0, jnp.sqrt(jnp.where(zero, 1.0, squared)))
    return -((r - DONUT_RADIUS) ** 2) / DONUT_SIGMA2


def _normal_logpdf(x: jax.Array, mean: jax.Array | float, std: jax.Array | float) -> jax.Array:
    return -0.5 * jnp.log(2 * jnp.pi) - jnp.log(std) - 0.5 * ((x - mean) / std) ** 2


@model(
    "funnel",
    inputs=POINT,
    output=LOG_DENSITY,
    description="UM-Bridge benchmark analytic-funnel (Neal 2003): log N(x1; 0, 3^2) + "
    "log N(x2; 0, exp(x1 / 2)^2)",
)
def funnel(x: jax.Array) -> jax.Array:
    return _normal_logpdf(x[0], 0.0, 3.0) + _normal_logpdf(x[1], 0.0, jnp.exp(x[0] / 2))


@model(
    "gaussian_mixture",
    inputs=POINT,
    output=LOG_DENSITY,
    description="UM-Bridge benchmark analytic-gaussian-mixture: log of the sum of the "
    "densities N((-1.5, -1.5), 0.8 I), N((1.5, 1.5), 0.8 I) and N((-2, 2), 0.5 I)",
)
def gaussian_mixture(x: jax.Array) -> jax.Array:
    # log-sum-exp of the log densities: finite far out, where the original's sum of densities
    # underflows to 0 (it then returns the smallest positive float instead of a log density).
    logs = jnp.stack(
        [
            -0.5 * jnp.sum((x - jnp.array(mean, x.dtype)) ** 2) / var - jnp.log(2 * jnp.pi * var)
            for mean, var in MIXTURE
        ]
    )
    return logsumexp(logs)

"""The autodiff cookbook's functions (../shared/seed), served by default.

Names and inputs are part of the public contract: clients and tests rely on them.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from service.registry import model

F32_ANY = (None, "float32")

# numpy, not jnp: creating JAX arrays at import would start the backend before the server has
# configured it (x64, device count).
INPUTS = np.array(
    [[0.52, 1.12, 0.77], [0.88, -1.08, 0.15], [0.52, 0.06, -1.30], [0.74, -2.49, 1.39]],
    np.float32,
)
TARGETS = np.array([True, True, False, True])


def sigmoid(x: jax.Array) -> jax.Array:
    return 0.5 * (jnp.tanh(x / 2) + 1)


def predict(W: jax.Array, b: jax.Array, inputs: jax.Array) -> jax.Array:
    return sigmoid(jnp.dot(inputs, W) + b)


def _nll(preds: jax.Array) -> jax.Array:
    label_probs = preds * TARGETS + (1 - preds) * (1 - TARGETS)
    return -jnp.sum(jnp.log(label_probs))


@model(
    "tanh",
    inputs=[F32_ANY],
    example=[[-2.0, -1.0, -0.25, 0.5, 1.5]],
    description="jnp.tanh(x), elementwise (seed In[2])",
)
def tanh(x: jax.Array) -> jax.Array:
    return jnp.tanh(x)


@model(
    "logistic_loss",
    inputs=[((3,), "float32"), ((), "float32")],
    output=((), "float32"),
    example=[[0.5, -0.4, 0.8], 0.1],
    description="Negative log-likelihood of the seed's toy logistic regression (In[3])",
)
def logistic_loss(W: jax.Array, b: jax.Array) -> jax.Array:
    return _nll(predict(W, b, INPUTS))


@model(
    "logistic_predict",
    inputs=[((3,), "float32"), ((), "float32")],
    output=((4,), "float32"),
    example=[[0.5, -0.4, 0.8], 0.1],
    description="predict(W, b, inputs) over the seed's four examples (In[3])",
)
def logistic_predict(W: jax.Array, b: jax.Array) -> jax.Array:
    return predict(W, b, INPUTS)


@model(
    "logistic_loss_dict",
    inputs=[{"W": ((3,), "float32"), "b": ((), "float32")}],
    output=((), "float32"),
    example=[{"W": [0.5, -0.4, 0.8], "b": 0.1}],
    description="loss2(params) with params a dict {'W', 'b'} (In[5])",
)
def logistic_loss_dict(params: dict[str, jax.Array]) -> jax.Array:
    return _nll(predict(params["W"], params["b"], INPUTS))


@model(
    "tanh_sq_sum",
    inputs=[F32_ANY],
    output=((), "float32"),
    example=[[[0.5, -1.0, 0.25], [2.0, 0.0, -0.75]]],
    description="sum(tanh(X)**2) (In[19])",
)
def tanh_sq_sum(X: jax.Array) -> jax.Array:
    return jnp.sum(jnp.tanh(X) ** 2)


@model("square3", inputs=[F32_ANY], description="3 * x**2 (In[16])")
def square3(x: jax.Array) -> jax.Array:
    return 3 * x**2


@model("sin", inputs=[(None, None)], description="jnp.sin(z), real or complex (In[34])")
def sin(z: jax.Array) -> jax.Array:
    return jnp.sin(z)


@model("conj", inputs=[(None, "complex64")], description="jnp.conjugate(z) (In[35])")
def conj(z: jax.Array) -> jax.Array:
    return jnp.conjugate(z)


@model("abs2", inputs=[(None, "complex64")], description="real(z)**2 + imag(z)**2 (In[32])")
def abs2(z: jax.Array) -> jax.Array:
    x, y = jnp.real(z), jnp.imag(z)
    return x**2 + y**2


@model(
    "cholesky_loss",
    inputs=[((3, 3), "complex64")],
    output=((), "complex64"),
    description="sum((L - sin(L))**2) with L = cholesky(X) (In[36])",
)
def cholesky_loss(X: jax.Array) -> jax.Array:
    L = jnp.linalg.cholesky(X)
    return jnp.sum((L - jnp.sin(L)) ** 2)


MLP_SIZES = (784, 512, 512, 10)


def mlp_init(key: jax.Array, sizes: tuple[int, ...] = MLP_SIZES) -> list[dict[str, jax.Array]]:
    """Seeded LeCun-normal weights, zero biases: the parameters the server holds for `mlp`."""
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        {
            "W": jax.random.normal(k, (m, n), jnp.float32) / jnp.sqrt(m),
            "b": jnp.zeros((n,), jnp.float32),
        }
        for k, m, n in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]


def mlp_apply(params: list[dict[str, jax.Array]], x: jax.Array) -> jax.Array:
    for layer in params[:-1]:
        x = jnp.tanh(x @ layer["W"] + layer["b"])
    return x @ params[-1]["W"] + params[-1]["b"]


@model(
    "mlp",
    inputs=[((None, 784), "float32")],
    init=mlp_init,
    seed=0,
    description="Logits of a 784-512-512-10 tanh MLP; parameters held by the server",
)
def mlp(params: Any, x: jax.Array) -> jax.Array:
    return mlp_apply(params, x)


@model(
    "mlp_loss",
    inputs=[((None, 784), "float32"), ((None,), "int32")],
    output=((), "float32"),
    init=mlp_init,
    seed=0,
    description="Mean softmax cross-entropy of `mlp` on (x, labels y)",
)
def mlp_loss(params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
    logp = jax.nn.log_softmax(mlp_apply(params, x))
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))


@model(
    "piecewise",
    inputs=[((), "float32")],
    output=((), "float32"),
    example=[2.5],
    description="2x**3 below 3, pi*x from 3 on: the seed's try/except function (In[27]) "
    "written with jnp.where, since Python control flow on traced values cannot be jit-compiled",
)
def piecewise(x: jax.Array) -> jax.Array:
    return jnp.where(x < 3, 2 * x**3, jnp.pi * x)


@model(
    "complex_linear",
    inputs=[((4,), "float32"), ((), "complex64")],
    output=((), "complex64"),
    description="u(x, y) + i v(x, y) with u = a x + b y, v = c x + d y and coeffs = (a, b, c, d): "
    "the seed's complex jvp/vjp checks (In[30], In[31]) with their random coefficients as input",
)
def complex_linear(coeffs: jax.Array, z: jax.Array) -> jax.Array:
    a, b, c, d = coeffs
    x, y = jnp.real(z), jnp.imag(z)
    return (a * x + b * y) + (c * x + d * y) * 1j

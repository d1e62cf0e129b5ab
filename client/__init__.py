"""gradserve's Python client: remote JAX models used like JAX functions.

>>> from client import Client, grad
>>> c = Client("http://127.0.0.1:8000")
>>> grad(grad(grad(c.model("tanh"))))(2.0)  # one request
array(0.25265405, dtype=float32)

`client.jax.as_jax` (needs the `jax` extra) puts a remote model inside local JAX programs.
"""

from client import errors
from client._client import AsyncClient, Client
from client._core import ModelInfo
from client._remote import Pullback, Pushforward, RemoteFunction
from client.transforms import (
    grad,
    hessian,
    hvp,
    jacfwd,
    jacobian,
    jacrev,
    jvp,
    linearize,
    value_and_grad,
    vjp,
    vmap,
)

__all__ = [
    "AsyncClient",
    "Client",
    "ModelInfo",
    "Pullback",
    "Pushforward",
    "RemoteFunction",
    "errors",
    "grad",
    "hessian",
    "hvp",
    "jacfwd",
    "jacobian",
    "jacrev",
    "jvp",
    "linearize",
    "value_and_grad",
    "vjp",
    "vmap",
]

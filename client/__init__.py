"""gradserve's Python client: remote JAX models used like JAX functions.

>>> from client import Client, grad
>>> c = Client("http://127.0.0.1:8000")
>>> grad(grad(grad(c.model("tanh"))))(2.0)  # one request
array(0.25265405, dtype=float32)

Every exception class is importable from here (``from client import InvalidInput``), as httpx
exports its own; `client.errors` holds the tree. `client.jax.as_jax` (needs the `jax` extra)
puts a remote model inside local JAX programs.
"""

from client import errors
from client._client import AsyncClient, Client
from client._core import ModelInfo
from client._remote import Pullback, Pushforward, RemoteFunction
from client.errors import (
    APIError,
    ConnectError,
    DeadlineExceeded,
    GradserveError,
    InvalidInput,
    ModelNotFound,
    NotAcceptable,
    PayloadTooLarge,
    ServerBusy,
    ServerError,
    Timeout,
    TransportError,
    Unauthorized,
)
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
    "APIError",
    "AsyncClient",
    "Client",
    "ConnectError",
    "DeadlineExceeded",
    "GradserveError",
    "InvalidInput",
    "ModelInfo",
    "ModelNotFound",
    "NotAcceptable",
    "PayloadTooLarge",
    "Pullback",
    "Pushforward",
    "RemoteFunction",
    "ServerBusy",
    "ServerError",
    "Timeout",
    "TransportError",
    "Unauthorized",
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

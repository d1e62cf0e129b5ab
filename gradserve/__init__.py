"""The distribution's own name for the client: ``import gradserve as gs``.

A thin re-export of `client` (no logic of its own, and no JAX or FastAPI import), so a notebook
can read ``gs.grad(gs.grad(c.model("tanh")))`` beside ``jax.grad``:

>>> import gradserve as gs
>>> c = gs.Client("http://127.0.0.1:8000")
>>> gs.hessian(c.model("logistic_predict"))(W, b).shape
(4, 3, 3)
"""

from client import (
    APIError,
    AsyncClient,
    Client,
    ConnectError,
    DeadlineExceeded,
    GradserveError,
    InvalidInput,
    ModelInfo,
    ModelNotFound,
    NotAcceptable,
    PayloadTooLarge,
    Pullback,
    Pushforward,
    RemoteFunction,
    ServerBusy,
    ServerError,
    Timeout,
    TransportError,
    Unauthorized,
    errors,
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

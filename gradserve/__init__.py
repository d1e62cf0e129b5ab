"""The distribution's own name for the client: ``import gradserve as gs``.

A thin re-export of `client` (no logic of its own, and no JAX or FastAPI import), so a notebook
can read ``gs.grad(gs.grad(c.model("tanh")))`` beside ``jax.grad``:

>>> import gradserve as gs
>>> c = gs.Client("http://127.0.0.1:8000")
>>> gs.hessian(c.model("logistic_predict"))(W, b).shape
(4, 3, 3)
"""

# The same names as `client`, by construction: one list to keep (client/__init__.py).
from client import *  # noqa: F403
from client import __all__  # noqa: F401

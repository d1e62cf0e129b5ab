"""UM-Bridge's own Python client on a gradserve model: Evaluate, Gradient, ApplyJacobian and
ApplyHessian of the seed's `logistic_loss(W, b)`.

    gradserve serve --port 8000 &
    python examples/umbridge_client.py http://127.0.0.1:8000

UM-Bridge sees each positional argument as one input vector (W: 3 numbers, b: 1) and the
scalar loss as one output of size 1. With API keys, put one in the URL:
`http://user:KEY@host:8000`.
"""

from __future__ import annotations

import sys
from typing import Any

import umbridge

# The seed's W and b (In[3]).
W, B = [-0.36838785, -2.275689, 0.01144757], [0.8535516]


def run(url: str) -> dict[str, Any]:
    """Every UM-Bridge operation on `logistic_loss` at (W, b); the answers by name."""
    loss = umbridge.HTTPModel(url, "logistic_loss")
    inputs = [W, B]
    return {
        "input_sizes": loss.get_input_sizes(),  # [3, 1]
        "output_sizes": loss.get_output_sizes(),  # [1]
        "value": loss(inputs),  # [[loss]]
        # d loss / d W, weighted by the sensitivity of the one output: the gradient.
        "gradient_W": loss.gradient(0, 0, inputs, [1.0]),
        "gradient_b": loss.gradient(0, 1, inputs, [1.0]),
        # The directional derivative along W + t (1, 0, 0).
        "jacobian_action": loss.apply_jacobian(0, 0, inputs, [1.0, 0.0, 0.0]),
        # d2 loss / dW2 . e0: the first column of the Hessian in W, never formed whole.
        "hessian_action_WW": loss.apply_hessian(0, 0, 0, inputs, [1.0], [1.0, 0.0, 0.0]),
        # The cross term d2 loss / dW db . 1.
        "hessian_action_Wb": loss.apply_hessian(0, 0, 1, inputs, [1.0], [1.0]),
    }


if __name__ == "__main__":
    for name, answer in run(sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8000").items():
        print(f"{name:>18}: {answer}")

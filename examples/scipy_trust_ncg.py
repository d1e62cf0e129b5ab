"""SciPy's trust-ncg on a remote model: `jac` from remote value_and_grad, `hessp` from remote hvp.

    gradserve serve --port 8000 &
    python examples/scipy_trust_ncg.py http://127.0.0.1:8000

Minimises the seed's `logistic_loss(W, b)` over x = concat(W, b); every function value,
gradient and Hessian-vector product is one request, and no Hessian is ever formed.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
from scipy.optimize import OptimizeResult, minimize

from client import Client, hvp, value_and_grad


def minimise(c: Client, x0: np.ndarray, gtol: float = 1e-5) -> OptimizeResult:
    """trust-ncg from x0 = [W0, W1, W2, b], everything derivative computed remotely."""
    loss = c.model("logistic_loss")
    loss_and_grads = value_and_grad(loss, argnums=(0, 1))

    def split(x: np.ndarray) -> tuple[np.ndarray, np.float32]:
        return x[:3].astype(np.float32), np.float32(x[3])

    def fun(x: np.ndarray) -> tuple[float, np.ndarray]:
        value, (gW, gb) = loss_and_grads(*split(x))
        return float(value), np.append(gW, gb).astype(np.float64)

    def hessp(x: np.ndarray, p: np.ndarray) -> np.ndarray:
        hW, hb = hvp(loss, split(x), split(p), argnums=(0, 1))
        return np.append(hW, hb).astype(np.float64)

    return minimize(fun, x0, jac=True, hessp=hessp, method="trust-ncg", options={"gtol": gtol})


def main(argv: list[str]) -> Any:
    url = argv[1] if len(argv) > 1 else "http://127.0.0.1:8000"
    with Client(url) as c:
        result = minimise(c, np.zeros(4))
    print(f"{result.message} after {result.nit} iterations: loss {result.fun:.6f} at {result.x}")
    return result


if __name__ == "__main__":
    main(sys.argv)

"""SciPy's trust-ncg on a remote model: `jac` from remote value_and_grad, `hessp` from a session.

    gradserve serve --port 8000 &
    python examples/scipy_trust_ncg.py http://127.0.0.1:8000

Minimises the seed's `logistic_loss(W, b)` over x = concat(W, b); every function value and
gradient is one request, and no Hessian is ever formed. trust-ncg asks for several Hessian-vector
products at each iterate: the first one there linearizes `grad(loss)` on the server
(`linearize`), and every product at that iterate then sends only its direction, skipping the
forward and backward passes (`sessions=False`: one stateless `hvp` request each).
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
from scipy.optimize import OptimizeResult, minimize

from client import Client, grad, hvp, linearize, value_and_grad


def split(x: np.ndarray) -> tuple[np.ndarray, np.float32]:
    return x[:3].astype(np.float32), np.float32(x[3])


class SessionHessp:
    """``hessp(x, p)`` from one session per iterate: ``linearize(grad(loss), *split(x))``."""

    def __init__(self, loss: Any) -> None:
        self.grad = grad(loss, argnums=(0, 1))
        self.x: np.ndarray | None = None
        self.at: Any = None  # the linearization at self.x
        self.linearized = 0

    def __call__(self, x: np.ndarray, p: np.ndarray) -> np.ndarray:
        if self.x is None or not np.array_equal(x, self.x):
            self.close()
            self.x, self.at = x.copy(), linearize(self.grad, *split(x))
            self.linearized += 1
        hW, hb = self.at[1](*split(p))  # only p travels
        return np.append(hW, hb).astype(np.float64)

    def close(self) -> None:
        if self.at is not None:
            self.at[1].close()  # free the server's memory now, not at the session's TTL


def minimise(
    c: Client, x0: np.ndarray, gtol: float = 1e-5, sessions: bool = True
) -> OptimizeResult:
    """trust-ncg from x0 = [W0, W1, W2, b], every derivative computed remotely."""
    loss = c.model("logistic_loss")
    loss_and_grads = value_and_grad(loss, argnums=(0, 1))

    def fun(x: np.ndarray) -> tuple[float, np.ndarray]:
        value, (gW, gb) = loss_and_grads(*split(x))
        return float(value), np.append(gW, gb).astype(np.float64)

    def stateless_hessp(x: np.ndarray, p: np.ndarray) -> np.ndarray:
        hW, hb = hvp(loss, split(x), split(p), argnums=(0, 1))
        return np.append(hW, hb).astype(np.float64)

    hessp = SessionHessp(loss) if sessions else stateless_hessp
    try:
        return minimize(fun, x0, jac=True, hessp=hessp, method="trust-ncg", options={"gtol": gtol})
    finally:
        if sessions:
            hessp.close()


def main(argv: list[str]) -> Any:
    url = argv[1] if len(argv) > 1 else "http://127.0.0.1:8000"
    with Client(url) as c:
        result = minimise(c, np.zeros(4))
    print(f"{result.message} after {result.nit} iterations: loss {result.fun:.6f} at {result.x}")
    return result


if __name__ == "__main__":
    main(sys.argv)

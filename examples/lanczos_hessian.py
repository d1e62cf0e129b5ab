"""The top eigenvalues of a remote model's Hessian by Lanczos, through one derivative session.

    gradserve serve --port 8000 &
    python examples/lanczos_hessian.py http://127.0.0.1:8000

Estimates the largest eigenvalues of the Hessian of `mlp_loss` with respect to its inputs x at
one batch (x, y). The server linearizes `grad(mlp_loss)` once (`linearize`, in x only: the
labels y are integers); each Lanczos step is then one Hessian-vector product that sends only
its vector and skips the network's forward and backward passes. The Hessian itself (here
1568 x 1568) is never formed.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import numpy as np

from client import Client, grad, linearize


def lanczos(matvec: Callable[[np.ndarray], np.ndarray], n: int, steps: int, seed: int = 0):
    """Eigenvalues of the `steps` x `steps` tridiagonal Lanczos matrix of a symmetric operator
    (full reorthogonalisation: float32 products lose orthogonality fast without it)."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal(n)
    basis = [q / np.linalg.norm(q)]
    alphas, betas = [], []
    for j in range(steps):
        w = matvec(basis[j])
        alphas.append(basis[j] @ w)
        Q = np.array(basis)
        w -= Q.T @ (Q @ w)
        w -= Q.T @ (Q @ w)  # twice is enough (Kahan)
        beta = np.linalg.norm(w)
        if j == steps - 1 or beta < 1e-10:
            break
        betas.append(beta)
        basis.append(w / beta)
    T = (
        np.diag(alphas)
        + np.diag(betas[: len(alphas) - 1], 1)
        + np.diag(betas[: len(alphas) - 1], -1)
    )
    return np.linalg.eigvalsh(T)


def top_hessian_eigenvalues(
    c: Client, x: np.ndarray, y: np.ndarray, k: int = 3, steps: int = 60
) -> np.ndarray:
    """The `k` largest eigenvalues of the Hessian of `mlp_loss(., y)` at `x`, largest first."""
    loss = c.model("mlp_loss")
    with linearize(grad(loss), x, y) as (_, hvp_at):  # one forward pass, on the server

        def matvec(v: np.ndarray) -> np.ndarray:
            hv = hvp_at(v.reshape(x.shape).astype(np.float32), np.zeros_like(y))
            return hv.ravel().astype(np.float64)

        eigenvalues = lanczos(matvec, x.size, steps)
    return eigenvalues[::-1][:k]


def main(argv: list[str]) -> np.ndarray:
    url = argv[1] if len(argv) > 1 else "http://127.0.0.1:8000"
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 784)).astype(np.float32)
    y = np.array([3, 7], np.int32)
    with Client(url) as c:
        top = top_hessian_eigenvalues(c, x, y)
    print(f"top Hessian eigenvalues of mlp_loss in x: {top}")
    return top


if __name__ == "__main__":
    main(sys.argv)

"""The seed notebook (../shared/seed) replayed through the client against a live server.

Only the imports change: `from client import grad, ...` and the seed's functions become
`c.model(...)`. Every result matches the seed's printed numbers and local JAX.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from client import (
    Client,
    grad,
    hessian,
    hvp,
    jacfwd,
    jacrev,
    jvp,
    linearize,
    value_and_grad,
    vjp,
    vmap,
)
from client.jax import as_jax
from helpers import complex_draws, seed_draws
from service.models import cookbook as cb


@pytest.fixture(scope="module")
def c(client_server: Any) -> Iterator[Client]:
    with Client(client_server.url) as client:
        yield client


@pytest.fixture(scope="module")
def keys() -> dict[str, np.ndarray]:
    return seed_draws()


def printed(got: Any, value: Any) -> None:
    """Equal to the number the notebook printed (float32 print precision)."""
    got = np.asarray(got)
    np.testing.assert_allclose(got, np.asarray(value, got.dtype), rtol=2e-6, atol=2e-7)


def local(got: Any, want: Any, rtol: float = 1e-6, atol: float = 1e-7) -> None:
    """Equal to local JAX: same structure, shape, dtype, and values."""
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_allclose(g, np.asarray(w), rtol=rtol, atol=atol)


def test_in2_grad_of_grad_of_grad(c: Client) -> None:
    tanh = c.model("tanh")
    grad_tanh = grad(tanh)
    printed(grad_tanh(2.0), 0.070650816)
    printed(grad(grad(tanh))(2.0), -0.13621868)
    printed(grad(grad(grad(tanh)))(2.0), 0.25265405)
    local(grad(grad(grad(tanh)))(2.0), jax.grad(jax.grad(jax.grad(jnp.tanh)))(2.0))


def test_in4_to_in7_logistic_regression(c: Client, keys: dict) -> None:
    W, b, vec = keys["W"], keys["b"], keys["vec"]
    loss = c.model("logistic_loss")
    W_grad_printed, b_grad_printed = [-0.16965583, -0.8774644, -1.4901346], -0.29227245
    printed(grad(loss, argnums=0)(W, b), W_grad_printed)
    printed(grad(loss)(W, b), W_grad_printed)
    printed(grad(loss, 1)(W, b), b_grad_printed)
    W_grad, b_grad = grad(loss, (0, 1))(W, b)
    printed(W_grad, W_grad_printed)
    printed(b_grad, b_grad_printed)
    local(grad(loss, (0, 1))(W, b), jax.grad(cb.logistic_loss, (0, 1))(W, b))
    # In[5]: a dict of parameters
    got = grad(c.model("logistic_loss_dict"))({"W": W, "b": b})
    printed(got["W"], W_grad_printed)
    printed(got["b"], b_grad_printed)
    # In[6]
    loss_value, Wb_grad = value_and_grad(loss, (0, 1))(W, b)
    printed(loss_value, 3.0519385)
    printed(loss(W, b), 3.0519385)
    local((loss_value, Wb_grad), jax.value_and_grad(cb.logistic_loss, (0, 1))(W, b))
    # In[7]: finite differences, every evaluation remote
    eps = 1e-4
    b_grad_numerical = (loss(W, b + eps / 2.0) - loss(W, b - eps / 2.0)) / eps
    printed(b_grad_numerical, -0.29325485)
    unitvec = vec / np.sqrt(np.vdot(vec, vec))
    W_dirderiv = (loss(W + eps / 2.0 * unitvec, b) - loss(W - eps / 2.0 * unitvec, b)) / eps
    np.testing.assert_allclose(W_dirderiv, -0.2002716, rtol=1e-3)  # float32 cancellation
    printed(np.vdot(grad(loss)(W, b), unitvec), -0.19909117)


def test_in8_check_grads_through_as_jax(c: Client, keys: dict) -> None:
    from jax.test_util import check_grads

    # Second order is the server's job (see test_in12); first order checks locally through as_jax.
    check_grads(
        as_jax(c.model("logistic_loss")), (keys["W"], keys["b"]), order=1, atol=1e-2, rtol=1e-2
    )


JAC = [
    [0.05981758, 0.12883787, 0.08857603],
    [0.04015916, -0.04928625, 0.00684531],
    [0.12188288, 0.01406341, -0.3047072],
    [0.00140431, -0.00472531, 0.00263782],
]


def test_in10_to_in12_jacobians_and_hessian(c: Client, keys: dict) -> None:
    W, b = keys["W"], keys["b"]
    f = c.model("logistic_predict")  # the seed's `lambda W: predict(W, b, inputs)`, b an argument
    J = jacfwd(f)(W, b)
    assert J.shape == (4, 3)
    printed(J, JAC)
    printed(jacrev(f)(W, b), JAC)
    J_W, J_b = jacrev(f, (0, 1))(W, b)  # In[11]: the seed's dict {'W', 'b'}, here argnums
    printed(J_W, JAC)
    printed(J_b, [0.11503381, 0.04563541, 0.23439017, 0.00189771])
    # In[12]: `def hessian(f): return jacfwd(jacrev(f))`, `H = hessian(f)(W)`: both ways
    for H in (hessian(f)(W, b), jacfwd(jacrev(f))(W, b)):
        assert H.shape == (4, 3, 3)
        printed(H[0, 0], [0.02285465, 0.04922541, 0.03384247])
        printed(H[1, 2], [-0.00544639, 0.00668421, -0.00092836])
        printed(H[3, 1], [0.00348343, -0.01172127, 0.0065432])
        local(H, jax.hessian(cb.logistic_predict)(W, b))


def test_in14_to_in16_jvp_vjp(c: Client, keys: dict) -> None:
    W, b, v, u = keys["W"], keys["b"], keys["v"], keys["u"]
    f = c.model("logistic_predict")
    f_local = lambda W: cb.logistic_predict(W, b)  # noqa: E731
    local(jvp(f, (W, b), (v, 0.0)), jax.jvp(f_local, (W,), (v,)))
    y, vjp_fun = vjp(f, W, b)
    y_l, vjp_fun_l = jax.vjp(f_local, W)
    local(y, y_l)
    local(vjp_fun(u)[0], vjp_fun_l(u)[0])
    # In[16]: vgrad of 3 * x**2
    y, vjp_fn = vjp(c.model("square3"), jnp.ones((2, 2)))
    printed(vjp_fn(np.ones(y.shape, np.float32))[0], [[6.0, 6.0], [6.0, 6.0]])


def test_in19_to_in22_hvp(c: Client, keys: dict) -> None:
    X, V = keys["X"], keys["V"]
    f = c.model("tanh_sq_sum")
    ans1 = hvp(f, (X,), (V,))
    ans2 = np.tensordot(hessian(f)(X), V, 2)  # 30*40 squared: an npz answer
    assert np.allclose(ans1, ans2, 1e-4, 1e-4)
    want = jax.jvp(jax.grad(cb.tanh_sq_sum), (X,), (V,))[1]
    for mode in ("fwd_rev", "rev_fwd", "rev_rev"):
        local(hvp(f, (X,), (V,), mode=mode), want, rtol=1e-4, atol=1e-5)


def test_in23_to_in26_matrix_products(c: Client, keys: dict) -> None:
    W, b, U, S = keys["W"], keys["b"], keys["U"], keys["S"]
    f = c.model("logistic_predict")
    f_local = lambda W: cb.logistic_predict(W, b)  # noqa: E731
    y, vjp_fun = vjp(f, W, b)
    (vmap_vs, _) = vmap(vjp_fun)(U)  # In[23]: one request for 128 covectors
    loop_vs = np.vstack([vjp_fun(mi)[0] for mi in U[:8]])
    assert np.allclose(loop_vs, vmap_vs[:8])
    local(vmap_vs, jax.vmap(jax.vjp(f_local, W)[1])(U)[0])
    _, f_jvp = linearize(f, W, b)  # In[24]
    vmap_jvps = vmap(f_jvp)(S, np.zeros(len(S), np.float32))
    loop_jvps = np.vstack([jvp(f, (W, b), (s, 0.0))[1] for s in S[:8]])
    assert np.allclose(loop_jvps, vmap_jvps[:8])
    J_rev, _ = vmap(vjp_fun)(np.eye(len(y), dtype=np.float32))  # In[25]: our_jacrev
    assert np.allclose(jax.jacrev(f_local)(W), J_rev)
    Jt = vmap(f_jvp)(np.eye(len(W), dtype=np.float32), np.zeros(3, np.float32))
    assert np.allclose(jax.jacfwd(f_local)(W), np.transpose(Jt))  # In[26]: our_jacfwd


def test_in30_to_in36_complex(c: Client) -> None:
    z = 3.0 + 4j
    printed(grad(c.model("abs2"))(z), 6.0 - 8j)  # In[32], In[33]
    printed(grad(c.model("sin"), holomorphic=True)(z), -27.034946 - 3.8511534j)  # In[34]
    printed(grad(c.model("conj"), holomorphic=True)(z), 1.0 - 0j)  # In[35]
    z_dot = np.complex64(0.5 + 0.25j)
    local(jvp(c.model("sin"), (z,), (z_dot,)), jax.jvp(jnp.sin, (np.complex64(z),), (z_dot,)))
    A = jnp.array([[5.0, 2.0 + 3j, 5j], [2.0 - 3j, 7.0, 1.0 + 7j], [-5j, 1.0 - 7j, 12.0]])
    got = grad(c.model("cholesky_loss"), holomorphic=True)(A)  # In[36]
    want = [
        [-0.7534186 + 0j, -3.0509028 - 10.940545j, 5.9896846 + 3.542303j],
        [-3.0509028 + 10.940545j, -8.904491 + 0j, -5.1351523 - 6.559373j],
        [5.9896846 - 3.542303j, -5.1351523 + 6.559373j, 0.01320427 + 0j],
    ]
    np.testing.assert_allclose(got, np.asarray(want, np.complex64), rtol=1e-5, atol=1e-5)
    local(got, jax.grad(cb.cholesky_loss, holomorphic=True)(A), rtol=1e-5, atol=1e-5)


def test_in27_vjp_of_piecewise(c: Client) -> None:
    # The notebook's Python `if` becomes jnp.where in the served model: jit cannot branch on values.
    y, f_vjp = vjp(c.model("piecewise"), 4.0)
    local(y, cb.piecewise(np.float32(4.0)))
    (x_bar,) = f_vjp(1.0)
    printed(x_bar, 3.1415927)
    local((x_bar,), jax.vjp(cb.piecewise, np.float32(4.0))[1](np.float32(1.0)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_in30_in31_complex_jvp_and_vjp(c: Client, seed: int) -> None:
    coeffs, z, z_dot = complex_draws(seed)
    a, b, cc, d = coeffs
    dc, dd = z_dot.real, z_dot.imag
    fun = c.model("complex_linear")
    _, ans = jvp(fun, (coeffs, z), (np.zeros(4, np.float32), z_dot))
    expected = a * dc + b * dd + cc * dc * 1j + d * dd * 1j  # In[30]
    assert np.allclose(ans, expected)
    _, fun_vjp = vjp(fun, coeffs, z)
    _, ans = fun_vjp(z_dot)
    expected = a * dc + cc * (-dd) + b * dc * (-1j) + d * (-dd) * (-1j)  # In[31]
    assert np.allclose(ans, expected, atol=1e-5, rtol=1e-5)

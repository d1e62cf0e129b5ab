"""The seed notebook (../shared/seed), every cell, over HTTP in JSON and in npz.

Each result must match the seed's printed numbers (float32 tolerance) and local JAX.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import ENCODINGS, assert_tree_equal, complex_draws, post, seed_draws
from service.models import cookbook as cb


@pytest.fixture(params=ENCODINGS)
def enc(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def seed_keys() -> dict[str, np.ndarray]:
    return seed_draws()


def seed_close(got, printed) -> None:
    np.testing.assert_allclose(
        got, np.asarray(printed, dtype=np.asarray(got).dtype), rtol=1e-6, atol=2e-7
    )


def test_in2_grad_of_grad_of_grad_tanh(app_client, enc):
    printed = [0.070650816, -0.13621868, 0.25265405]
    for depth, want in enumerate(printed, start=1):
        out = post(
            app_client,
            "tanh",
            "call",
            enc,
            args=[np.float32(2.0)],
            transforms=[{"op": "grad"}] * depth,
        )
        f = jnp.tanh
        for _ in range(depth):
            f = jax.grad(f)
        assert_tree_equal(out["value"], f(2.0))
        seed_close(out["value"], want)


def test_in4_grad_argnums(app_client, enc, seed_keys):
    W, b = seed_keys["W"], seed_keys["b"]
    W_grad = [-0.16965583, -0.8774644, -1.4901346]
    for argnums in (0, None):
        fields = {} if argnums is None else {"argnums": argnums}
        out = post(app_client, "logistic_loss", "grad", enc, args=[W, b], **fields)
        assert_tree_equal(out["grad"], jax.grad(cb.logistic_loss)(W, b))
        seed_close(out["grad"], W_grad)
    out = post(app_client, "logistic_loss", "grad", enc, args=[W, b], argnums=1)
    seed_close(out["grad"], -0.29227245)
    out = post(app_client, "logistic_loss", "grad", enc, args=[W, b], argnums=[0, 1])
    assert_tree_equal(out["grad"], list(jax.grad(cb.logistic_loss, (0, 1))(W, b)))
    seed_close(out["grad"][0], W_grad)
    seed_close(out["grad"][1], -0.29227245)


def test_in5_grad_of_dict(app_client, enc, seed_keys):
    params = {"W": seed_keys["W"], "b": seed_keys["b"]}
    out = post(app_client, "logistic_loss_dict", "grad", enc, args=[params])
    assert_tree_equal(out["grad"], jax.grad(cb.logistic_loss_dict)(params))
    seed_close(out["grad"]["W"], [-0.16965583, -0.8774644, -1.4901346])
    seed_close(out["grad"]["b"], -0.29227245)


def test_in6_value_and_grad(app_client, enc, seed_keys):
    W, b = seed_keys["W"], seed_keys["b"]
    out = post(app_client, "logistic_loss", "value_and_grad", enc, args=[W, b], argnums=[0, 1])
    value, grads = jax.value_and_grad(cb.logistic_loss, (0, 1))(W, b)
    assert_tree_equal(out["value"], value)
    assert_tree_equal(out["grad"], list(grads))
    seed_close(out["value"], 3.0519385)
    eval_out = post(app_client, "logistic_loss", "eval", enc, args=[W, b])
    seed_close(eval_out["value"], 3.0519385)


def test_in7_finite_differences(app_client, enc, seed_keys):
    W, b, vec = seed_keys["W"], seed_keys["b"], seed_keys["vec"]
    eps = 1e-4

    def loss(W, b):
        return post(app_client, "logistic_loss", "eval", enc, args=[np.asarray(W), np.asarray(b)])[
            "value"
        ]

    def local_loss(W, b):  # the same program in local JAX: every evaluation bit-identical
        return jax.jit(cb.logistic_loss)(np.asarray(W), np.asarray(b))

    b_numerical = (loss(W, b + eps / 2.0) - loss(W, b - eps / 2.0)) / eps
    np.testing.assert_allclose(b_numerical, -0.29325485, rtol=1e-4)
    assert b_numerical == (local_loss(W, b + eps / 2.0) - local_loss(W, b - eps / 2.0)) / eps
    unitvec = vec / jnp.sqrt(jnp.vdot(vec, vec))
    W_numerical = (loss(W + eps / 2.0 * unitvec, b) - loss(W - eps / 2.0 * unitvec, b)) / eps
    np.testing.assert_allclose(W_numerical, -0.2002716, rtol=1e-4)
    W_local = local_loss(W + eps / 2.0 * unitvec, b) - local_loss(W - eps / 2.0 * unitvec, b)
    assert W_numerical == W_local / eps
    grad = post(app_client, "logistic_loss", "grad", enc, args=[W, b])["grad"]
    seed_close(jnp.vdot(grad, unitvec), -0.19909117)


def test_in8_second_order_matches_local(app_client, enc, seed_keys):
    # check_grads(loss, (W, b), order=2) checks second derivatives; the remote Hessian is them.
    W, b = seed_keys["W"], seed_keys["b"]
    out = post(app_client, "logistic_loss", "hessian", enc, args=[W, b], argnums=[0, 1])
    want = jax.hessian(cb.logistic_loss, (0, 1))(W, b)
    assert_tree_equal(out["hessian"], [list(row) for row in want])


def test_in10_jacfwd_jacrev(app_client, enc, seed_keys):
    W, b = seed_keys["W"], seed_keys["b"]
    printed = [
        [0.05981758, 0.12883787, 0.08857603],
        [0.04015916, -0.04928625, 0.00684531],
        [0.12188288, 0.01406341, -0.3047072],
        [0.00140431, -0.00472531, 0.00263782],
    ]
    for op, local in (("jacfwd", jax.jacfwd), ("jacrev", jax.jacrev)):
        out = post(app_client, "logistic_predict", op, enc, args=[W, b])
        # The same XLA computation as the server's: bit-identical.
        assert_tree_equal(out["jacobian"], jax.jit(local(cb.logistic_predict))(W, b), exact=True)
        seed_close(out["jacobian"], printed)


def test_in11_jacobian_of_dict(app_client, enc, seed_keys):
    W, b = seed_keys["W"], seed_keys["b"]
    out = post(app_client, "logistic_predict", "jacrev", enc, args=[W, b], argnums=[0, 1])
    J = jax.jacrev(lambda p: cb.predict(p["W"], p["b"], cb.INPUTS))({"W": W, "b": b})
    assert_tree_equal(out["jacobian"], [J["W"], J["b"]])
    seed_close(out["jacobian"][1], [0.11503381, 0.04563541, 0.23439017, 0.00189771])


def test_in12_hessian_as_jacfwd_of_jacrev(app_client, enc, seed_keys):
    W, b = seed_keys["W"], seed_keys["b"]
    out = post(
        app_client,
        "logistic_predict",
        "call",
        enc,
        args=[W, b],
        transforms=[{"op": "jacrev"}, {"op": "jacfwd"}],
    )
    H = jax.jit(jax.jacfwd(jax.jacrev(cb.logistic_predict)))(W, b)
    assert_tree_equal(out["value"], H, exact=True)
    assert out["value"].shape == (4, 3, 3)
    seed_close(out["value"][0, 0], [0.02285465, 0.04922541, 0.03384247])
    seed_close(out["value"][3, 2], [-0.00194457, 0.0065432, -0.00365263])


def test_in14_in15_jvp_and_vjp(app_client, enc, seed_keys):
    W, b, v, u = (seed_keys[k] for k in ("W", "b", "v", "u"))
    f = lambda W: cb.predict(W, b, cb.INPUTS)  # noqa: E731
    out = post(app_client, "logistic_predict", "jvp", enc, args=[W, b], tangents=[v, np.float32(0)])
    y, t = jax.jvp(f, (W,), (v,))
    assert_tree_equal(out["value"], y)
    assert_tree_equal(out["tangent"], t)
    out = post(app_client, "logistic_predict", "vjp", enc, args=[W, b], cotangent=u)
    y, pullback = jax.vjp(cb.logistic_predict, W, b)
    assert_tree_equal(out["value"], y, exact=True)
    assert_tree_equal(out["cotangents"], list(pullback(u)))


def test_in16_vgrad(app_client, enc):
    x = np.ones((2, 2), np.float32)
    ones = np.ones((2, 2), np.float32)
    out = post(app_client, "square3", "vjp", enc, args=[x], cotangent=ones)
    assert_tree_equal(out["cotangents"], list(jax.vjp(cb.square3, x)[1](ones)))
    seed_close(out["cotangents"][0], [[6.0, 6.0], [6.0, 6.0]])  # the notebook's print


@pytest.mark.parametrize("mode", ["fwd_rev", "rev_fwd", "rev_rev"])
def test_in19_to_22_hvp_modes(app_client, enc, seed_keys, mode):
    X, V = seed_keys["X"], seed_keys["V"]
    out = post(app_client, "tanh_sq_sum", "hvp", enc, args=[X], tangents=[V], mode=mode)
    H = post(app_client, "tanh_sq_sum", "hessian", "npz", args=[X])["hessian"]
    assert H.shape == (30, 40, 30, 40)
    np.testing.assert_allclose(out["hvp"][0], jnp.tensordot(H, V, 2), rtol=1e-4, atol=1e-4)
    local = jax.jvp(jax.grad(cb.tanh_sq_sum), (X,), (V,))[1]
    assert_tree_equal(out["hvp"][0], local, rtol=1e-4, atol=1e-5)


def test_in23_batched_vjp_equals_single_ones(app_client, enc, seed_keys):
    W, b, U = seed_keys["W"], seed_keys["b"], seed_keys["U"]
    out = post(app_client, "logistic_predict", "vjp", enc, args=[W, b], cotangent=U, batched=True)
    assert out["cotangents"][0].shape == (128, 3)
    singles = [
        post(app_client, "logistic_predict", "vjp", "json", args=[W, b], cotangent=u) for u in U
    ]
    np.testing.assert_allclose(
        out["cotangents"][0], np.stack([s["cotangents"][0] for s in singles]), rtol=1e-5, atol=1e-7
    )
    _, pullback = jax.vjp(lambda W: cb.predict(W, b, cb.INPUTS), W)
    assert_tree_equal(out["cotangents"][0], jax.vmap(pullback)(U)[0])


def test_in24_batched_jvp_equals_single_ones(app_client, enc, seed_keys):
    W, b, S = seed_keys["W"], seed_keys["b"], seed_keys["S"]
    zeros = np.zeros(128, np.float32)
    out = post(
        app_client, "logistic_predict", "jvp", enc, args=[W, b], tangents=[S, zeros], batched=True
    )
    assert out["tangent"].shape == (128, 4)
    singles = [
        post(
            app_client, "logistic_predict", "jvp", "json", args=[W, b], tangents=[s, np.float32(0)]
        )["tangent"]
        for s in S
    ]
    np.testing.assert_allclose(out["tangent"], np.stack(singles), rtol=1e-5, atol=1e-7)
    f = lambda W: cb.predict(W, b, cb.INPUTS)  # noqa: E731
    want = jax.vmap(lambda s: jax.jvp(f, (W,), (s,))[1])(S)
    assert_tree_equal(out["tangent"], want)


def test_in25_in26_jacobians_from_batched_products(app_client, enc, seed_keys):
    W, b = seed_keys["W"], seed_keys["b"]
    rows = post(
        app_client,
        "logistic_predict",
        "vjp",
        enc,
        args=[W, b],
        cotangent=np.eye(4, dtype=np.float32),
        batched=True,
    )
    cols = post(
        app_client,
        "logistic_predict",
        "jvp",
        enc,
        args=[W, b],
        tangents=[np.eye(3, dtype=np.float32), np.zeros(3, np.float32)],
        batched=True,
    )
    J = jax.jacrev(cb.logistic_predict)(W, b)
    np.testing.assert_allclose(rows["cotangents"][0], J, rtol=1e-6)
    np.testing.assert_allclose(cols["tangent"].T, J, rtol=1e-6)


def test_in27_vjp_of_piecewise(app_client, enc):
    out = post(
        app_client, "piecewise", "vjp", enc, args=[np.float32(4.0)], cotangent=np.float32(1.0)
    )
    seed_close(out["cotangents"][0], 3.1415927)
    assert_tree_equal(
        out["cotangents"], list(jax.vjp(cb.piecewise, np.float32(4.0))[1](np.float32(1.0)))
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_in30_in31_complex_jvp_vjp(app_client, enc, seed):
    coeffs, z, z_dot = complex_draws(seed)
    a, b, c, d = coeffs
    dc, dd = z_dot.real, z_dot.imag
    out = post(
        app_client,
        "complex_linear",
        "jvp",
        enc,
        args=[coeffs, z],
        tangents=[np.zeros(4, np.float32), z_dot],
    )
    expected = a * dc + b * dd + c * dc * 1j + d * dd * 1j
    np.testing.assert_allclose(out["tangent"], expected, rtol=1e-5)
    assert_tree_equal(
        out["tangent"], jax.jvp(cb.complex_linear, (coeffs, z), (np.zeros(4, np.float32), z_dot))[1]
    )
    out = post(app_client, "complex_linear", "vjp", enc, args=[coeffs, z], cotangent=z_dot)
    expected = a * dc + c * (-dd) + b * dc * (-1j) + d * (-dd) * (-1j)
    np.testing.assert_allclose(out["cotangents"][1], expected, rtol=1e-5, atol=1e-5)


def test_in32_to_35_complex_grads(app_client, enc):
    z = np.complex64(3 + 4j)
    out = post(app_client, "abs2", "grad", enc, args=[z])
    assert_tree_equal(out["grad"], jax.grad(cb.abs2)(z), exact=True)
    seed_close(out["grad"], 6 - 8j)
    out = post(app_client, "sin", "grad", enc, args=[z], holomorphic=True)
    assert_tree_equal(out["grad"], jax.grad(cb.sin, holomorphic=True)(z), exact=True)
    seed_close(out["grad"], -27.034946 - 3.8511534j)
    out = post(app_client, "conj", "grad", enc, args=[z], holomorphic=True)
    seed_close(out["grad"], 1 - 0j)


def test_in36_cholesky_loss(app_client, enc):
    A = np.array(
        [[5.0, 2.0 + 3j, 5j], [2.0 - 3j, 7.0, 1.0 + 7j], [-5j, 1.0 - 7j, 12.0]], np.complex64
    )
    out = post(app_client, "cholesky_loss", "grad", enc, args=[A], holomorphic=True)
    assert_tree_equal(
        out["grad"], jax.grad(cb.cholesky_loss, holomorphic=True)(A), rtol=1e-5, atol=1e-5
    )
    printed = np.array(
        [
            [-0.7534186 + 0j, -3.0509028 - 10.940545j, 5.9896846 + 3.542303j],
            [-3.0509028 + 10.940545j, -8.904491 + 0j, -5.1351523 - 6.559373j],
            [5.9896846 - 3.542303j, -5.1351523 + 6.559373j, 0.01320427 + 0j],
        ]
    )
    np.testing.assert_allclose(out["grad"], printed, rtol=1e-5, atol=1e-5)

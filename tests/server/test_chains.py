"""`hessian` of any output, `hvp` over argnums, and `jvp`/`vjp` inside chains, against local JAX
(in-process, ASGI)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import assert_tree_equal, post, post_raw
from service.models import cookbook as cb

RNG = np.random.default_rng(9)
W = RNG.standard_normal(3).astype(np.float32)
B = np.float32(0.3)
V = RNG.standard_normal(3).astype(np.float32)
U = RNG.standard_normal(4).astype(np.float32)
MLP_PARAMS = cb.mlp_init(jax.random.PRNGKey(0))


def lists(tree):
    """JAX's tuples as the lists JSON gives back."""
    if isinstance(tree, (tuple, list)):
        return [lists(x) for x in tree]
    if isinstance(tree, dict):
        return {k: lists(v) for k, v in tree.items()}
    return tree


# ---------------------------------------------------------------------------- hessian


def test_hessian_of_a_vector_output_is_jax_hessian(app_client):
    out = post(app_client, "logistic_predict", "hessian", args=[W, B])["hessian"]
    want = jax.hessian(cb.logistic_predict)(W, B)
    assert want.shape == (4, 3, 3)
    assert_tree_equal(out, want)


def test_hessian_of_a_dict_argument_is_a_dict_of_dicts(app_client):
    params = {"W": W, "b": B}
    out = post(app_client, "logistic_loss_dict", "hessian", args=[params])["hessian"]
    want = jax.hessian(cb.logistic_loss_dict)(params)
    assert set(out) == {"W", "b"} and set(out["W"]) == {"W", "b"}
    assert_tree_equal(out, want)


@pytest.mark.parametrize("model", ["logistic_predict", "logistic_loss"])
def test_hessian_with_tuple_argnums_nests_like_jax(app_client, model):
    f = getattr(cb, model)
    out = post(app_client, model, "hessian", args=[W, B], argnums=[0, 1])["hessian"]
    assert_tree_equal(out, lists(jax.hessian(f, (0, 1))(W, B)))
    out = post(app_client, model, "hessian", args=[W, B], argnums=[1])["hessian"]
    assert_tree_equal(out, lists(jax.hessian(f, (1,))(W, B)))


def test_hessian_named_op_equals_its_call_and_jacfwd_of_jacrev(app_client):
    named = post(app_client, "logistic_predict", "hessian", args=[W, B])["hessian"]
    called = post(
        app_client, "logistic_predict", "call", args=[W, B], transforms=[{"op": "hessian"}]
    )["value"]
    assert_tree_equal(called, named, exact=True)
    composed = post(
        app_client,
        "logistic_predict",
        "call",
        args=[W, B],
        transforms=[{"op": "jacrev"}, {"op": "jacfwd"}],
    )["value"]
    assert_tree_equal(composed, named)


def test_holomorphic_hessian(app_client):
    z = np.array([0.3 + 0.2j, -0.1 + 0.5j], np.complex64)
    out = post(app_client, "sin", "hessian", args=[z], holomorphic=True)["hessian"]
    assert_tree_equal(out, jax.hessian(jnp.sin, holomorphic=True)(z))


def test_hessian_inside_a_chain(app_client):
    xs = RNG.standard_normal((5, 3)).astype(np.float32)
    out = post(
        app_client,
        "logistic_predict",
        "call",
        args=[xs, B],
        transforms=[{"op": "hessian"}, {"op": "vmap", "in_axes": [0, None]}],
    )["value"]
    assert_tree_equal(out, jax.vmap(jax.hessian(cb.logistic_predict), (0, None))(xs, B))


# ---------------------------------------------------------------------------- hvp


def _mlp_inputs(batch: int = 3):
    x = RNG.standard_normal((batch, 784)).astype(np.float32)
    y = RNG.integers(0, 10, batch).astype(np.int32)
    v = RNG.standard_normal((batch, 784)).astype(np.float32)
    return x, y, v


def _mlp_hvp(x, y, v):
    return jax.jvp(jax.grad(lambda x: cb.mlp_loss(MLP_PARAMS, x, y)), (x,), (v,))[1]


@pytest.mark.parametrize("mode", ["fwd_rev", "rev_fwd", "rev_rev"])
def test_hvp_of_mlp_loss_in_x(app_client, mode):
    x, y, v = _mlp_inputs()
    want = _mlp_hvp(x, y, v)
    out = post(app_client, "mlp_loss", "hvp", args=[x, y], tangents=[v, 0], argnums=0, mode=mode)
    assert_tree_equal(out["hvp"], want, rtol=2e-4, atol=1e-6)
    listed = post(
        app_client, "mlp_loss", "hvp", args=[x, y], tangents=[v, 0], argnums=[0], mode=mode
    )
    assert_tree_equal(listed["hvp"], [want], rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("mode", ["fwd_rev", "rev_fwd", "rev_rev"])
def test_batched_hvp_of_mlp_loss_in_x(app_client, mode):
    x, y, _ = _mlp_inputs(2)
    vs = RNG.standard_normal((4, 2, 784)).astype(np.float32)
    out = post(
        app_client,
        "mlp_loss",
        "hvp",
        args=[x, y],
        tangents=[vs, 0],
        argnums=0,
        mode=mode,
        batched=True,
    )
    want = jax.vmap(lambda v: _mlp_hvp(x, y, v))(vs)
    assert_tree_equal(out["hvp"], want, rtol=2e-4, atol=1e-6)


def test_hvp_blocks_follow_argnums(app_client):
    H = jax.hessian(cb.logistic_loss, (0, 1))(W, B)
    tangents = [V, np.float32(0.7)]
    want = [
        H[0][0] @ V + H[0][1] * tangents[1],
        H[1][0] @ V + H[1][1] * tangents[1],
    ]
    every = post(app_client, "logistic_loss", "hvp", args=[W, B], tangents=tangents)["hvp"]
    assert_tree_equal(every, want, rtol=1e-5, atol=1e-6)
    swapped = post(
        app_client, "logistic_loss", "hvp", args=[W, B], tangents=tangents, argnums=[1, 0]
    )
    # With argnums, the Hessian is taken in those arguments only, the rest held fixed.
    f = lambda b, W: cb.logistic_loss(W, b)  # noqa: E731
    local = jax.jvp(jax.grad(f, (0, 1)), (B, W), (tangents[1], V))[1]
    assert_tree_equal(swapped["hvp"], list(local), rtol=1e-5, atol=1e-6)
    alone = post(app_client, "logistic_loss", "hvp", args=[W, B], tangents=[V, 0], argnums=0)
    assert_tree_equal(alone["hvp"], H[0][0] @ V, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- jvp / vjp chains


def chain(app_client, model, args, *transforms):
    return post(app_client, model, "call", args=list(args), transforms=list(transforms))["value"]


def test_jvp_and_vjp_layouts(app_client):
    got = chain(app_client, "logistic_predict", (W, B, V, np.float32(0.5)), {"op": "jvp"})
    assert_tree_equal(got, lists(jax.jvp(cb.logistic_predict, (W, B), (V, np.float32(0.5)))))
    y, pullback = jax.vjp(cb.logistic_predict, W, B)
    got = chain(app_client, "logistic_predict", (W, B, U), {"op": "vjp"})
    assert_tree_equal(got, [y, list(pullback(U))])
    got = chain(app_client, "logistic_predict", (W, B, U), {"op": "vjp", "argnums": 1})
    assert_tree_equal(got, [y, pullback(U)[1]])
    got = chain(app_client, "logistic_predict", (W, B, V), {"op": "jvp", "argnums": 0})
    assert_tree_equal(got, lists(jax.jvp(lambda W: cb.logistic_predict(W, B), (W,), (V,))))
    got = chain(
        app_client, "logistic_predict", (W, B, U), {"op": "vjp", "argnums": [0], "value": False}
    )
    assert_tree_equal(got, [pullback(U)[0]])


def test_jvp_of_grad_is_the_hvp(app_client):
    got = chain(app_client, "tanh_sq_sum", (W, V), {"op": "grad"}, {"op": "jvp", "value": False})
    assert_tree_equal(got, jax.jvp(jax.grad(cb.tanh_sq_sum), (W,), (V,))[1])
    hvp = post(app_client, "tanh_sq_sum", "hvp", args=[W], tangents=[V], argnums=0)["hvp"]
    assert_tree_equal(got, hvp, rtol=1e-6, atol=1e-7)


def test_jvp_of_vjp_is_the_hessian_action_of_um_bridge(app_client):
    """ApplyHessian: d/dx <u, f'(x) .> applied to v, i.e. jvp (in x) of the vjp chain."""
    got = chain(
        app_client,
        "logistic_predict",
        (W, B, U, V),
        {"op": "vjp", "argnums": 0, "value": False},
        {"op": "jvp", "argnums": 0, "value": False},
    )
    pull = lambda W: jax.vjp(lambda W: cb.logistic_predict(W, B), W)[1](U)[0]  # noqa: E731
    assert_tree_equal(got, jax.jvp(pull, (W,), (V,))[1])
    H = jax.hessian(cb.logistic_predict)(W, B)
    np.testing.assert_allclose(got, np.einsum("i,ijk,k->j", U, H, V), rtol=1e-5, atol=1e-6)


def test_derivatives_of_products(app_client):
    # jacfwd of a vjp: the Jacobian of the pullback in (W, b, u).
    f = lambda W, b, u: jax.vjp(cb.logistic_predict, W, b)[1](u)  # noqa: E731
    got = chain(
        app_client, "logistic_predict", (W, B, U), {"op": "vjp", "value": False}, {"op": "jacfwd"}
    )
    assert_tree_equal(got, lists(jax.jacfwd(lambda W, b, u: list(f(W, b, u)))(W, B, U)))
    # grad of a jvp of a scalar model: the jvp returns a scalar without its value.
    g = lambda W, b, v: jax.jvp(lambda W: cb.logistic_loss(W, b), (W,), (v,))[1]  # noqa: E731
    got = chain(
        app_client,
        "logistic_loss",
        (W, B, V),
        {"op": "jvp", "argnums": 0, "value": False},
        {"op": "grad", "argnums": [0, 2]},
    )
    assert_tree_equal(got, lists(jax.grad(g, (0, 2))(W, B, V)))
    # vmap of a jvp: the Jacobian's columns, one request.
    basis = np.eye(3, dtype=np.float32)
    got = chain(
        app_client,
        "logistic_predict",
        (W, B, basis),
        {"op": "jvp", "argnums": 0, "value": False},
        {"op": "vmap", "in_axes": [None, None, 0]},
    )
    assert_tree_equal(got, jax.jacfwd(cb.logistic_predict)(W, B).T)


def test_third_order_products(app_client):
    """jvp of jvp of grad: a third derivative in two directions, one request."""
    x = np.float32(0.4)
    got = chain(
        app_client,
        "tanh",
        (x, np.float32(1.0), np.float32(1.0)),
        {"op": "grad"},
        {"op": "jvp", "value": False},
        {"op": "jvp", "argnums": 0, "value": False},
    )
    first = lambda x, t: jax.jvp(jax.grad(jnp.tanh), (x,), (t,))[1]  # noqa: E731
    want = jax.jvp(lambda x: first(x, np.float32(1.0)), (x,), (np.float32(1.0),))[1]
    assert_tree_equal(got, want)
    assert_tree_equal(got, jax.grad(jax.grad(jax.grad(jnp.tanh)))(x), rtol=1e-6)
    # vjp of jvp of grad, the values kept at every level: the cotangent is a pair
    got = chain(
        app_client,
        "logistic_loss",
        (W, B, V, [np.ones(3, np.float32), U[:3]]),
        {"op": "grad"},
        {"op": "jvp", "argnums": 0},
        {"op": "vjp", "argnums": [0, 2]},
    )
    inner = lambda W, v: jax.jvp(  # noqa: E731
        lambda W: jax.grad(cb.logistic_loss)(W, B), (W,), (v,)
    )
    y, pullback = jax.vjp(inner, W, V)
    assert_tree_equal(got, [list(y), list(pullback((jnp.ones(3), U[:3])))], rtol=1e-5, atol=1e-6)


def test_products_inside_named_ops(app_client):
    """A chain jvp under the named jvp op: forward-over-forward, tangents for all 2n args."""
    x, t = np.float32(0.4), np.float32(1.0)
    out = post(
        app_client,
        "tanh",
        "jvp",
        args=[x, t],
        tangents=[np.float32(1.0), np.float32(0.0)],
        transforms=[{"op": "jvp"}],
    )
    want = jax.jvp(lambda x: jax.jvp(jnp.tanh, (x,), (t,)), (x,), (np.float32(1.0),))
    assert_tree_equal([out["value"], out["tangent"]], lists(want))


def test_depth_bound_counts_products(app_client):
    response = post_raw(
        app_client,
        "tanh",
        "call",
        args=[np.float32(0.1)] * 2,
        transforms=[{"op": "grad"}] * 8 + [{"op": "jvp"}],
    )
    assert response.status_code == 422 and response.json()["code"] == "transform_depth"

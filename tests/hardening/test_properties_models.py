"""Property tests of the built-in models: random inputs, every op, the same numbers as local JAX.

Shapes are fixed per model, so each (model, op) compiles once and the examples only vary the
values; the example counts stay small so the tier stays fast.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from starlette.testclient import TestClient

from helpers import assert_tree_equal, post
from service import Settings, create_app
from service.models import cookbook as cb

EXAMPLES = settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def floats(shape: tuple[int, ...], low: float = -2.0, high: float = 2.0) -> st.SearchStrategy:
    elements = st.floats(low, high, width=32, allow_nan=False, allow_infinity=False)
    return hnp.arrays(np.float32, shape, elements=elements)


# name -> (function, strategy of its positional args); the functions are the cookbook's own.
MODELS: dict[str, tuple[Callable[..., Any], st.SearchStrategy]] = {
    "tanh": (cb.tanh, st.tuples(floats((4,)))),
    "square3": (cb.square3, st.tuples(floats((3,)))),
    "sin": (cb.sin, st.tuples(floats((3,)))),
    "logistic_predict": (cb.logistic_predict, st.tuples(floats((3,)), floats(()))),
    "logistic_loss": (cb.logistic_loss, st.tuples(floats((3,)), floats(()))),
    "logistic_loss_dict": (
        cb.logistic_loss_dict,
        st.tuples(st.fixed_dictionaries({"W": floats((3,)), "b": floats(())})),
    ),
    "tanh_sq_sum": (cb.tanh_sq_sum, st.tuples(floats((2, 3)))),
    "piecewise": (cb.piecewise, st.tuples(floats((), -2.0, 5.0))),
    # The server holds the parameters: locally they come from the same init and seed.
    "mlp": (lambda x: cb.mlp_apply(PARAMS, x), st.tuples(floats((1, 784), -1.0, 1.0))),
    "mlp_loss": (
        lambda x, y: cb.mlp_loss(PARAMS, x, y),
        st.tuples(
            floats((2, 784), -1.0, 1.0), hnp.arrays(np.int32, (2,), elements=st.integers(0, 9))
        ),
    ),
}
PARAMS = cb.mlp_init(jax.random.PRNGKey(0))
SCALAR = ["logistic_loss", "logistic_loss_dict", "tanh_sq_sum", "piecewise"]
ANY = [name for name in MODELS if name != "mlp_loss"]  # its integer labels take no tangents
OPS = {
    "eval": [*ANY, "mlp_loss"],
    "grad": [*SCALAR, "mlp_loss"],
    "value_and_grad": [*SCALAR, "mlp_loss"],
    "jacfwd": ANY,
    "jacrev": ANY,
    "jacobian": ANY,
    "hessian": [*SCALAR, "tanh", "square3", "sin", "logistic_predict"],  # any output
    "jvp": ANY,
    "vjp": ANY,
    "hvp": SCALAR,
    "call": SCALAR,
}


def local(op: str, f: Callable[..., Any], args: tuple, extra: Any) -> dict[str, Any]:
    """The response fields, computed by local JAX."""
    if op == "eval":
        return {"value": jax.jit(f)(*args)}
    if op == "grad":
        return {"grad": jax.jit(jax.grad(f))(*args)}
    if op == "value_and_grad":
        value, grad = jax.jit(jax.value_and_grad(f))(*args)
        return {"value": value, "grad": grad}
    if op in ("jacfwd", "jacrev"):
        return {"jacobian": jax.jit(getattr(jax, op)(f))(*args)}
    if op == "jacobian":
        return {"jacobian": jax.jit(jax.jacobian(f))(*args)}
    if op == "hessian":
        return {"hessian": jax.jit(jax.hessian(f))(*args)}
    if op == "jvp":
        value, tangent = jax.jvp(f, args, extra)
        return {"value": value, "tangent": tangent}
    if op == "vjp":
        value, pullback = jax.vjp(f, *args)
        return {"value": value, "cotangents": list(pullback(extra))}
    if op == "hvp":
        every = tuple(range(len(args)))
        return {"hvp": list(jax.jvp(jax.grad(f, argnums=every), args, extra)[1])}
    # call: [jacrev, jacfwd] is the Hessian, built as a chain
    return {"value": jax.jit(jax.jacfwd(jax.jacrev(f)))(*args)}


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    """Its own app: these tests compile many (model, op) pairs, past the default shape budget."""
    with TestClient(create_app(Settings(max_shapes_per_minute=10_000))) as client:
        yield client


@st.composite
def cases(draw: st.DrawFn, op: str) -> tuple[str, tuple, Any, str]:
    name = draw(st.sampled_from(OPS[op]))
    f, arg_strategy = MODELS[name]
    args = draw(arg_strategy)
    extra = None
    if op in ("jvp", "hvp"):
        extra = tuple(jax.tree.map(np.asarray, draw(arg_strategy)))
    elif op == "vjp":
        out = jax.eval_shape(f, *args)
        extra = draw(floats(out.shape))
    return name, args, extra, draw(st.sampled_from(["json", "npz"]))


@pytest.mark.parametrize("op", list(OPS))
def test_every_op_matches_local_jax(client, op):
    @EXAMPLES
    @given(cases(op))
    def check(case: tuple[str, tuple, Any, str]) -> None:
        name, args, extra, encoding = case
        fields: dict[str, Any] = {"args": list(args)}
        if op in ("jvp", "hvp"):
            fields["tangents"] = list(extra)
        elif op == "vjp":
            fields["cotangent"] = extra
        elif op == "call":
            fields["transforms"] = [{"op": "jacrev"}, {"op": "jacfwd"}]
        got = post(client, name, op, encoding, **fields)
        want = local(op, MODELS[name][0], args, extra)
        assert set(want) <= set(got), (set(got), set(want))
        for key, value in want.items():
            assert_tree_equal(got[key], value, rtol=2e-5, atol=2e-6)

    check()

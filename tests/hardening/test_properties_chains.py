"""Property tests of `call` chains: random compositions of every transform, `jvp` and `vjp`
included, on the built-in models, against the same composition built with local JAX.

Every chain the server accepts gives local JAX's numbers; every chain it refuses gets a 422
whose detail names the refusing step at its depth (``grad of jvp of 'tanh' ...``), the step
where local JAX refuses too. Shapes are tiny so each example's compile is cheap.
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

from client import wire
from helpers import assert_tree_equal, post_raw
from service import Settings, create_app
from service.models import cookbook as cb

# name -> (function, shapes of its positional arguments (a dict for a dict argument))
MODELS: dict[str, tuple[Callable[..., Any], tuple]] = {
    "tanh": (cb.tanh, ((2,),)),
    "tanh_sq_sum": (cb.tanh_sq_sum, ((2, 2),)),
    "logistic_loss": (cb.logistic_loss, ((3,), ())),
    "logistic_predict": (cb.logistic_predict, ((3,), ())),
    "logistic_loss_dict": (cb.logistic_loss_dict, ({"W": (3,), "b": ()},)),
}
DERIVATIVES = ("grad", "value_and_grad", "jacfwd", "jacrev", "hessian")
BATCH = 2


def _is_shape(x: Any) -> bool:
    return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def _avals(shapes: Any) -> Any:
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, np.float32), shapes, is_leaf=_is_shape)


@st.composite
def transforms(draw: st.DrawFn, nargs: int) -> dict[str, Any]:
    """One transform for a function of `nargs` arguments (argnums sometimes out of range)."""
    op = draw(st.sampled_from([*DERIVATIVES, "vmap", "jvp", "jvp", "vjp", "vjp"]))
    t: dict[str, Any] = {"op": op}
    if op in DERIVATIVES:
        choices = [0, nargs - 1, nargs, list(range(nargs))]
        t["argnums"] = draw(st.sampled_from(choices))
    elif op in ("jvp", "vjp"):
        if draw(st.booleans()):
            subset = draw(st.lists(st.integers(0, nargs - 1), min_size=1, max_size=2, unique=True))
            t["argnums"] = subset[0] if len(subset) == 1 and draw(st.booleans()) else subset
        t["value"] = draw(st.booleans())
    return t


def _argnums(t: dict[str, Any], n: int) -> tuple[int, ...]:
    nums = t.get("argnums")
    if nums is None:
        return tuple(range(n))
    return (nums,) if isinstance(nums, int) else tuple(nums)


def local_transform(f: Callable, t: dict[str, Any]) -> Callable:
    """The reference: `t` with local JAX, following PROTOCOL.md's layout."""
    op = t["op"]
    if op in DERIVATIVES:
        argnums = t["argnums"]
        return getattr(jax, op)(f, argnums=tuple(argnums) if isinstance(argnums, list) else argnums)
    if op == "vmap":
        return jax.vmap(f)

    def product(*args: Any) -> Any:
        k = len(t["argnums"]) if isinstance(t.get("argnums"), list) else 1
        n = (
            len(args) - 1
            if op == "vjp"
            else len(args) // 2
            if "argnums" not in t
            else len(args) - k
        )
        nums = _argnums(t, n)

        def part(*chosen: Any) -> Any:
            full = list(args[:n])
            for i, x in zip(nums, chosen, strict=True):
                full[i] = x
            return f(*full)

        chosen = [args[i] for i in nums]
        if op == "jvp":
            out, prod = jax.jvp(part, chosen, list(args[n:]))
        else:
            out, pullback = jax.vjp(part, *chosen)
            prod = pullback(args[n])
            prod = prod[0] if isinstance(t.get("argnums"), int) else list(prod)
        return (out, prod) if t["value"] else prod

    return product


@st.composite
def chains(draw: st.DrawFn) -> tuple[str, list[dict], tuple, Callable, int | None]:
    """A model, a chain of 1-3 transforms, arguments for it, the local function, and the depth
    at which local JAX refuses the chain (None: it accepts it)."""
    name = draw(st.sampled_from(sorted(MODELS)))
    f, shapes = MODELS[name]
    avals = list(_avals(shapes))
    chain: list[dict] = []
    refused_at: int | None = None
    for depth in range(draw(st.integers(1, 3))):
        t = draw(transforms(len(avals)))
        g = local_transform(f, t)
        if t["op"] == "vmap":
            avals = [
                jax.tree.map(lambda a: jax.ShapeDtypeStruct((BATCH, *a.shape), a.dtype), a)
                for a in avals
            ]
        elif t["op"] == "jvp":
            avals = avals + [avals[i] for i in _argnums(t, len(avals))]
        elif t["op"] == "vjp":
            try:
                out = jax.eval_shape(f, *avals)
            except Exception:  # the level inside is refused: any cotangent will do
                out = jax.ShapeDtypeStruct((), np.float32)
            avals = [*avals, out]
        if refused_at is None:
            try:
                jax.eval_shape(g, *avals)
            except Exception:
                refused_at = depth
        chain.append(t)
        f = g
    elements = st.floats(-1.5, 1.5, width=32, allow_nan=False, allow_infinity=False)
    args = tuple(
        jax.tree.map(lambda a: draw(hnp.arrays(np.float32, a.shape, elements=elements)), a)
        for a in avals
    )
    return name, chain, args, f, refused_at


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    """Its own app: every example is a new program, past the default shape budget."""
    with TestClient(create_app(Settings(max_shapes_per_minute=100_000))) as client:
        yield client


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(chains())
def test_random_chains_match_local_jax_or_name_the_refusing_step(client, case):
    name, chain, args, f, refused_at = case
    response = post_raw(client, name, "call", args=list(args), transforms=chain)
    if refused_at is None:
        assert response.status_code == 200, (chain, response.text)
        got = wire.decode_tree(response.json()["value"])
        assert_tree_equal(got, jax.jit(f)(*args), rtol=1e-4, atol=1e-5)
        return
    assert response.status_code == 422, (chain, response.text)
    inside = "".join(f"{t['op']} of " for t in reversed(chain[:refused_at]))
    step = f"{chain[refused_at]['op']} of {inside}'{name}'"
    assert step in response.json()["detail"], (chain, response.json())

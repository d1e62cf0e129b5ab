"""No server: model config options (registry), and the UM-Bridge layout of a model: sizes,
pytrees flattened as ravel_pytree does, complex slots, integer checks, the support flags."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from umbridge_util import registry

from client.errors import InvalidInput
from service.registry import ConfigOption, ModelDef, Registry
from service.umbridge_layout import Catalog, Layout, Part, build_layout


def test_config_resolves_to_the_values_that_differ_from_defaults():
    spec = registry().get("banana").spec
    assert spec.resolve_config({}) == spec.resolve_config(None) == ()
    assert spec.resolve_config({"a": 2.0, "scale": 1}) == ()  # the defaults: one program
    assert spec.resolve_config({"scale": 2, "b": 0.5}) == (("b", 0.5), ("scale", 2.0))
    assert isinstance(spec.resolve_config({"scale": 2})[0][1], float)


@pytest.mark.parametrize(
    ("given", "words"),
    [
        ({"c": 1.0}, ["no config option 'c'", "a, b, scale"]),
        ({"a": "2"}, ["'a'", "finite number"]),
        ({"a": True}, ["'a'"]),
        ({"a": float("nan")}, ["'a'"]),
        ({"a": [1.0]}, ["'a'"]),
        ([("a", 1.0)], ["JSON object"]),
    ],
)
def test_a_wrong_config_names_the_key(given, words):
    with pytest.raises(InvalidInput) as caught:
        registry().get("banana").spec.resolve_config(given)
    assert caught.value.code == "invalid_config" and caught.value.status == 422
    for word in words:
        assert word in caught.value.detail


def test_config_option_types_and_declarations():
    power = ConfigOption("power", int, 2)
    assert power.check(3.0, "m") == 3 and isinstance(power.check(3.0, "m"), int)
    with pytest.raises(InvalidInput, match="integer"):
        power.check(2.5, "m")
    with pytest.raises(InvalidInput, match="bool"):
        ConfigOption("flag", bool, False).check(1, "m")
    with pytest.raises(ValueError, match="identifier"):
        ConfigOption("not a name", float, 1.0)
    with pytest.raises(ValueError, match="type"):
        ConfigOption("x", list, [])
    with pytest.raises(ValueError, match="twice"):
        ModelDef("m", lambda x: x, config=[ConfigOption("a", int, 1), ConfigOption("a", int, 2)])


def test_config_is_bound_as_static_keyword_arguments():
    reg = Registry()
    seen = []

    def f(x, *, power):
        seen.append(type(power))
        return x**power

    model = reg.register("pow", f, inputs=[((2,), "float32")], config={"power": 2})
    x = np.array([1.5, 2.0], np.float32)
    np.testing.assert_array_equal(jax.jit(model.bound())(None, x), x**2)
    np.testing.assert_array_equal(jax.jit(model.bound((("power", 3),)))(None, x), x**3)
    assert seen == [int, int]  # a Python int, never a tracer


def _layout(name: str, config=(), x64=False) -> Layout:
    return build_layout(registry().get(name), config, x64)


def test_sizes_and_pytrees_follow_ravel_pytree():
    layout = _layout("two_outputs")
    assert layout.input_sizes == [2, 4] and layout.output_sizes == [2, 4]
    assert layout.sequence and layout.differentiable
    p = {"w": np.array([1.0, 2.0, 3.0], np.float32), "s": np.float32(4.0)}
    flat, _ = ravel_pytree(p)
    assert Part.flatten(p).tolist() == np.asarray(flat).tolist()  # "s" before "w"
    back = layout.inputs[1].unflatten(np.asarray(flat, np.float64), "input 1")
    assert back["s"].dtype == np.float32 and back["s"].shape == ()
    np.testing.assert_array_equal(back["w"], p["w"])
    assert _layout("logistic_loss").input_sizes == [3, 1]
    assert _layout("logistic_loss_dict").input_sizes == [4]
    assert (
        _layout("logistic_predict").output_sizes == [4] and not _layout("logistic_predict").sequence
    )


def test_complex_values_take_two_slots():
    layout = _layout("complex_linear")
    assert layout.input_sizes == [4, 2] and layout.output_sizes == [2]
    assert layout.support() == {
        "Evaluate": True,
        "Gradient": False,
        "ApplyJacobian": False,
        "ApplyHessian": False,
    }
    z = layout.inputs[1].unflatten(np.array([3.0, -4.0]), "input 1")
    assert z.dtype == np.complex64 and z == np.complex64(3 - 4j)
    assert Part.flatten(jnp.array([1 + 2j, 3 - 4j], jnp.complex64)).tolist() == [1, 2, 3, -4]


def test_integer_inputs_must_hold_whole_numbers():
    layout = _layout("scaled_counts")
    assert not layout.differentiable
    n = layout.inputs[0].unflatten(np.array([1.0, -2.0, 3.0]), "input 0")
    assert n.dtype == np.int32 and n.tolist() == [1, -2, 3]
    for bad in ([1.5, 0, 0], [np.nan, 0, 0], [2.0**40, 0, 0]):
        with pytest.raises(InvalidInput, match="whole numbers"):
            layout.inputs[0].unflatten(np.array(bad), "input 0")


def test_benchmarks_take_the_servers_float():
    assert _layout("donut").inputs[0].dtypes == (np.dtype("float32"),)
    assert _layout("donut", x64=True).inputs[0].dtypes == (np.dtype("float64"),)


def test_models_without_fixed_sizes_are_not_listed():
    catalog = Catalog(x64=False)
    reg = registry()
    for name in ("tanh", "mlp", "sin"):
        assert isinstance(catalog.layout(reg.get(name), ()), str)
    assert "no fixed shape" in catalog.layout(reg.get("tanh"), ())
    assert catalog.listed([reg.get("tanh"), reg.get("donut")]) == ["donut"]
    # A model failing at a client's config is that model's error, not "unlisted".
    with pytest.raises(InvalidInput, match="explode was set") as caught:
        catalog.layout(reg.get("fails"), (("explode", True),))
    assert caught.value.code == "model_error"

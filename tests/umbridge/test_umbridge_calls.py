"""Every UM-Bridge call the real `umbridge` client makes equals local JAX: the cookbook, the
benchmark and the test models, every output and input index, config, float64 under --x64."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest
import requests
import umbridge
from umbridge_util import BENCHMARKS, DOCUMENTED, REAL_MODELS, Local, tolerance

from service.models.cookbook import INPUTS, cholesky_loss


def _point(rng: np.random.Generator, sizes: list[int]) -> list[list[float]]:
    return [rng.normal(size=n).tolist() for n in sizes]


@pytest.fixture(scope="module")
def url(umbridge_server) -> str:
    return umbridge_server.url


def test_info_lists_the_fixed_size_models(url):
    listed = umbridge.supported_models(url)
    for name in (*REAL_MODELS, "cholesky_loss", "complex_linear", "scaled_counts"):
        assert name in listed
    for unlisted in ("tanh", "tanh_sq_sum", "square3", "mlp", "mlp_loss", "sin"):
        assert unlisted not in listed  # inputs of any shape: sizes unknown without a request


@pytest.mark.parametrize("name", REAL_MODELS)
def test_every_call_equals_local_jax(url, name):
    model = umbridge.HTTPModel(url, name)
    local = Local(name)
    assert model.get_input_sizes() == local.input_sizes
    assert model.get_output_sizes() == local.output_sizes
    assert all(
        [model.supports_evaluate(), model.supports_gradient(), model.supports_apply_jacobian()]
    )
    close = tolerance(local)
    rng = np.random.default_rng(len(name))
    inputs = _point(rng, local.input_sizes)
    for got, want in zip(model(inputs), local.evaluate(inputs), strict=True):
        np.testing.assert_allclose(got, want, **close)
    pairs = itertools.product(range(len(local.output_sizes)), range(len(local.input_sizes)))
    for out_wrt, in_wrt in pairs:
        sens = rng.normal(size=local.output_sizes[out_wrt]).tolist()
        vec = rng.normal(size=local.input_sizes[in_wrt]).tolist()
        np.testing.assert_allclose(
            model.gradient(out_wrt, in_wrt, inputs, sens),
            local.gradient(out_wrt, in_wrt, inputs, sens),
            **close,
        )
        np.testing.assert_allclose(
            model.apply_jacobian(out_wrt, in_wrt, inputs, vec),
            local.apply_jacobian(out_wrt, in_wrt, inputs, vec),
            **close,
        )
    assert model.supports_apply_hessian()
    triples = itertools.product(
        *(range(len(s)) for s in (local.output_sizes, *[local.input_sizes] * 2))
    )
    for out_wrt, in_wrt1, in_wrt2 in triples:  # cross terms (inWrt1 != inWrt2) included
        sens = rng.normal(size=local.output_sizes[out_wrt]).tolist()
        vec = rng.normal(size=local.input_sizes[in_wrt2]).tolist()
        got = model.apply_hessian(out_wrt, in_wrt1, in_wrt2, inputs, sens, vec)
        assert len(got) == local.input_sizes[in_wrt1]
        np.testing.assert_allclose(
            got, local.apply_hessian(out_wrt, in_wrt1, in_wrt2, inputs, sens, vec), **close
        )


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmarks_give_their_documented_values(url, name):
    model = umbridge.HTTPModel(url, name)
    for point, value in DOCUMENTED[name]:
        assert model([point])[0][0] == pytest.approx(value, rel=1e-12)


def test_benchmarks_compute_in_float64_under_x64(url):
    inputs = [[0.3141592653589793, -1.2718281828459045]]
    here64, here32 = Local("banana", x64=True), Local("banana", x64=False)
    got = umbridge.HTTPModel(url, "banana")(inputs)[0][0]
    want = float(here64.evaluate(inputs)[0][0])
    assert got == pytest.approx(want, rel=1e-14)
    # float32 would be this far off: the test could tell the two apart.
    assert abs(float(here32.evaluate(inputs)[0][0]) - want) > 1e3 * abs(got - want)


def test_config_sets_the_models_options(url):
    banana = umbridge.HTTPModel(url, "banana")
    inputs = [[0.4, -0.7]]
    config = {"a": 1.5, "b": 0.3, "scale": 2}
    got = banana(inputs, config)[0][0]
    assert got == pytest.approx(float(Local("banana", config).evaluate(inputs)[0][0]), rel=1e-14)
    assert banana(inputs, {})[0][0] == banana(inputs, {"a": 2.0})[0][0]  # the default
    assert got != banana(inputs)[0][0]
    sens = [1.0]
    np.testing.assert_allclose(
        banana.gradient(0, 0, inputs, sens, config),
        Local("banana", config).gradient(0, 0, inputs, sens),
        rtol=1e-12,
    )
    two = umbridge.HTTPModel(url, "two_outputs")
    cube = Local("two_outputs", {"power": 3})
    points = [[0.5, -1.5], [0.1, 0.2, 0.3, 2.0]]
    for got_out, want in zip(two(points, {"power": 3}), cube.evaluate(points), strict=True):
        np.testing.assert_allclose(got_out, want, **tolerance(cube))
    assert two.get_output_sizes({"power": 3}) == [2, 4]


def test_complex_and_integer_models_are_evaluate_only(url):
    # A complex number takes two slots, real and imaginary part (numpy's layout).
    a = np.array(
        [[5.0, 2.0 + 3j, 5j], [2.0 - 3j, 7.0, 1.0 + 7j], [-5j, 1.0 - 7j, 12.0]], np.complex64
    )
    chol = umbridge.HTTPModel(url, "cholesky_loss")
    assert chol.get_input_sizes() == [18] and chol.get_output_sizes() == [2]
    assert not (chol.supports_gradient() or chol.supports_apply_jacobian())
    assert not chol.supports_apply_hessian()
    got = chol([a.astype(np.complex128).view(np.float64).ravel().tolist()])[0]
    want = np.complex64(cholesky_loss(a))
    np.testing.assert_allclose(got, [want.real, want.imag], rtol=2e-6)

    counts = umbridge.HTTPModel(url, "scaled_counts")
    assert counts.get_input_sizes() == [3, 1] and not counts.supports_gradient()
    assert counts([[1, 2, -3], [0.5]])[0] == [0.5, 1.0, -1.5]


def test_cookbook_loss_matches_the_seed(url):
    # The seed's W and b (In[3]) give the loss In[6] prints.
    loss = umbridge.HTTPModel(url, "logistic_loss")
    w, b = [-0.36838785, -2.275689, 0.01144757], [0.8535516]
    assert INPUTS.shape == (4, 3)
    assert loss([w, b])[0][0] == pytest.approx(3.0519385, rel=1e-6)


def _compiles(url: str, model: str) -> float:
    text = requests.get(f"{url}/metrics", timeout=10).text
    found = re.search(rf'^gradserve_compiles_total{{model="{model}"}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def test_each_config_value_compiles_once(url):
    model = umbridge.HTTPModel(url, "two_outputs")
    points = [[0.5, -1.5], [0.1, 0.2, 0.3, 2.0]]
    model(points, {"power": 4})  # Evaluate at a new config value: one compile
    before = _compiles(url, "two_outputs")
    for _ in range(3):
        model(points, {"power": 4})
    model([[1.0, 1.0], [0.0, 0.0, 0.0, 1.0]], {"power": 4})  # same shapes: cached
    assert _compiles(url, "two_outputs") == before
    model(points, {"power": 5})
    assert _compiles(url, "two_outputs") == before + 1

"""examples/umbridge_emcee.py samples the donut through umbridge's emcee integration, and
examples/umbridge_client.py's answers equal local JAX."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np
from umbridge_util import Local, tolerance

from service.models.benchmarks import DONUT_RADIUS

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_emcee_samples_the_donut(umbridge_server):
    example = _example("umbridge_emcee")
    chain = example.sample(umbridge_server.url)  # a few hundred steps
    assert chain.shape == (8 * 200, 2)
    assert abs(example.mean_radius(chain) - DONUT_RADIUS) < 0.1
    assert DONUT_RADIUS == 2.6
    # Not stuck: the walkers went round the ring, not just to one spot on it.
    angles = np.arctan2(chain[:, 1], chain[:, 0])
    assert np.ptp(angles) > np.pi


def test_client_example_equals_local_jax(umbridge_server):
    got = _example("umbridge_client").run(umbridge_server.url)
    local = Local("logistic_loss")
    inputs = [[-0.36838785, -2.275689, 0.01144757], [0.8535516]]
    close = tolerance(local)
    assert got["input_sizes"] == [3, 1] and got["output_sizes"] == [1]
    np.testing.assert_allclose(got["value"][0], local.evaluate(inputs)[0], **close)
    np.testing.assert_allclose(got["gradient_W"], local.gradient(0, 0, inputs, [1.0]), **close)
    np.testing.assert_allclose(got["gradient_b"], local.gradient(0, 1, inputs, [1.0]), **close)
    np.testing.assert_allclose(
        got["jacobian_action"], local.apply_jacobian(0, 0, inputs, [1.0, 0.0, 0.0]), **close
    )
    np.testing.assert_allclose(
        got["hessian_action_WW"],
        local.apply_hessian(0, 0, 0, inputs, [1.0], [1.0, 0.0, 0.0]),
        **close,
    )
    np.testing.assert_allclose(
        got["hessian_action_Wb"], local.apply_hessian(0, 0, 1, inputs, [1.0], [1.0]), **close
    )
    # The seed's printed numbers (In[4] gradient, In[6] loss).
    np.testing.assert_allclose(got["value"][0], [3.0519385], rtol=1e-6)
    np.testing.assert_allclose(got["gradient_W"], [-0.16965583, -0.8774644, -1.4901346], rtol=1e-6)
    np.testing.assert_allclose(got["gradient_b"], [-0.29227245], rtol=1e-6)

"""Local JAX in UM-Bridge's terms, for the expected values of the UM-Bridge tests.

Independent of the server's mapping: inputs and outputs are flattened with
`jax.flatten_util.ravel_pytree` (as the issue defines the mapping) and every product is taken
in that flat space, the Hessian action from `jax.hessian` of the sensitivity-weighted output.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from client.specs import ArraySpec
from service.registry import Registry

MODELS_FILE = str(Path(__file__).with_name("umbridge_models.py"))
SOURCES = ("service.models.cookbook", "service.models.benchmarks", MODELS_FILE)
BENCHMARKS = ("banana", "donut", "funnel", "gaussian_mixture")
# Cookbook and test models that UM-Bridge can differentiate (real, fixed-size inputs).
REAL_MODELS = (
    "logistic_loss",
    "logistic_predict",
    "logistic_loss_dict",
    "piecewise",
    "two_outputs",
    "held_affine",
    *BENCHMARKS,
)
# UM-Bridge/benchmarks' own output tests (benchmarks/analytic-*/test_output.py): input, value.
DOCUMENTED = {
    "banana": [([0.0, 0.0], -5.534036030183454), ([2.0, 0.0], -3.3207026968501214)],
    "donut": [([0.0, 0.0], -204.84848484848487), ([2.0, 2.0], -1.581180343024592)],
    "funnel": [([0.0, 0.0], -2.936489355077455), ([2.0, 2.0], -4.429382143772902)],
    "gaussian_mixture": [([0.0, 0.0], -3.7296275264036907), ([2.0, 2.0], -1.9272329630852132)],
}


@functools.cache
def registry() -> Registry:
    found = Registry()
    for source in SOURCES:
        found.load(source)
    return found


def _example(spec: Any, x64: bool) -> Any:
    if isinstance(spec, ArraySpec):
        dtype = spec.dtype or ("float64" if x64 else "float32")
        return np.zeros(spec.shape, dtype)
    if isinstance(spec, dict):
        return {k: _example(v, x64) for k, v in spec.items()}
    return type(spec)(_example(v, x64) for v in spec)


@dataclass
class Local:
    """Model `name` at `config`, as local JAX computes it on flat vectors."""

    name: str
    config: dict[str, Any] = field(default_factory=dict)
    x64: bool = True  # the server's --x64: the dtype of inputs that declare none

    def __post_init__(self) -> None:
        model = registry().get(self.name)
        spec = model.spec
        values = {o.name: o.default for o in spec.config} | self.config
        held = (model.params,) if model.has_params else ()  # parameters the server holds
        self.fn = functools.partial(spec.fn, *held, **values)
        with jax.enable_x64(self.x64):
            raveled = [ravel_pytree(_example(s, self.x64)) for s in spec.inputs]
            self.dtypes = [flat.dtype for flat, _ in raveled]
            self.unravel = [unravel for _, unravel in raveled]
            self.input_sizes = [int(flat.size) for flat, _ in raveled]
            self.output_sizes = [int(o.size) for o in self._outputs(*self._flat(self._zeros()))]

    def _zeros(self) -> list[np.ndarray]:
        return [np.zeros(n) for n in self.input_sizes]

    def _flat(self, inputs: Any) -> list[jax.Array]:
        return [jnp.asarray(np.asarray(v), d) for v, d in zip(inputs, self.dtypes, strict=True)]

    def _outputs(self, *flat: jax.Array) -> list[jax.Array]:
        out = self.fn(*(u(f) for u, f in zip(self.unravel, flat, strict=True)))
        return [ravel_pytree(o)[0] for o in (out if isinstance(out, (tuple, list)) else [out])]

    def evaluate(self, inputs: list) -> list[np.ndarray]:
        with jax.enable_x64(self.x64):
            return [np.asarray(o) for o in self._outputs(*self._flat(inputs))]

    def gradient(self, out_wrt: int, in_wrt: int, inputs: list, sens: list) -> np.ndarray:
        with jax.enable_x64(self.x64):
            flat = self._flat(inputs)
            y, pull = jax.vjp(lambda *a: self._outputs(*a)[out_wrt], *flat)
            return np.asarray(pull(jnp.asarray(sens, y.dtype))[in_wrt])

    def apply_jacobian(self, out_wrt: int, in_wrt: int, inputs: list, vec: list) -> np.ndarray:
        with jax.enable_x64(self.x64):
            flat = self._flat(inputs)
            tangents = [
                jnp.asarray(vec, x.dtype) if i == in_wrt else jnp.zeros_like(x)
                for i, x in enumerate(flat)
            ]
            return np.asarray(jax.jvp(lambda *a: self._outputs(*a)[out_wrt], flat, tangents)[1])

    def apply_hessian(
        self, out_wrt: int, in_wrt1: int, in_wrt2: int, inputs: list, sens: list, vec: list
    ) -> np.ndarray:
        """sum_k sens_k d2 f_k / dx_in1 dx_in2 . vec, from the whole Hessian of sens . f."""
        with jax.enable_x64(self.x64):
            flat = self._flat(inputs)

            def weighted(*a: jax.Array) -> jax.Array:
                y = self._outputs(*a)[out_wrt]
                return jnp.dot(jnp.asarray(sens, y.dtype), y)

            every = tuple(range(len(flat)))
            block = jax.hessian(weighted, argnums=every)(*flat)[in_wrt1][in_wrt2]
            return np.asarray(block @ jnp.asarray(vec, block.dtype))


def tolerance(local: Local) -> dict[str, float]:
    """allclose at the precision the model computes in."""
    if all(d == np.float64 for d in local.dtypes):
        return {"rtol": 1e-10, "atol": 1e-12}
    return {"rtol": 2e-5, "atol": 2e-6}

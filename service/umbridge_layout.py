"""UM-Bridge's view of a JAX model: lists of float64 vectors in, lists of float64 vectors out.

Each positional argument is one UM-Bridge input and each element of a tuple/list output one
UM-Bridge output (any other output is one output). A pytree is flattened as
`jax.flatten_util.ravel_pytree` does: leaves in JAX's order, each in C order. A complex leaf
takes two slots per element, real and imaginary part interleaved (numpy's own memory layout of
complex numbers), so nothing is lost either way.

A `Layout` is known without a request when every input has a fixed shape: the output's
shapes then come from `jax.eval_shape`, once per model and config (`Catalog`).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from client.errors import InvalidInput
from client.specs import ArraySpec, canonical_dtype, dtype_from_name
from service.registry import Config, Model

log = logging.getLogger("gradserve")


class NotMappable(Exception):
    """The model's sizes are not known without a request, so UM-Bridge cannot list it."""


@dataclass(frozen=True)
class Part:
    """One UM-Bridge vector: a pytree of arrays, flattened."""

    treedef: Any
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[np.dtype, ...]

    @classmethod
    def of(cls, tree: Any) -> Part:
        flat, treedef = jax.tree.flatten(tree)
        return cls(
            treedef, tuple(tuple(x.shape) for x in flat), tuple(np.dtype(x.dtype) for x in flat)
        )

    @property
    def sizes(self) -> tuple[int, ...]:
        """Slots per leaf: its elements, twice for complex ones."""
        return tuple(
            int(np.prod(s)) * (2 if d.kind == "c" else 1)
            for s, d in zip(self.shapes, self.dtypes, strict=True)
        )

    @property
    def size(self) -> int:
        return sum(self.sizes)

    @property
    def real(self) -> bool:
        """Every leaf is a real floating-point array: derivatives are defined for it."""
        return all(d.kind == "f" for d in self.dtypes)

    def unflatten(self, values: np.ndarray, where: str) -> Any:
        """A float64 vector of `self.size` -> the pytree, each leaf cast to its dtype."""
        leaves, start = [], 0
        for shape, dtype, size in zip(self.shapes, self.dtypes, self.sizes, strict=True):
            chunk = values[start : start + size]
            start += size
            leaves.append(_cast(chunk, shape, dtype, where))
        return jax.tree.unflatten(self.treedef, leaves)

    def zeros(self) -> Any:
        return jax.tree.unflatten(
            self.treedef, [np.zeros(s, d) for s, d in zip(self.shapes, self.dtypes, strict=True)]
        )

    @staticmethod
    def flatten(tree: Any) -> np.ndarray:
        """The pytree -> one float64 vector (complex leaves as interleaved real, imaginary)."""
        chunks = []
        for leaf in jax.tree.leaves(tree):
            x = np.asarray(leaf)
            if x.dtype.kind == "c":
                x = np.ascontiguousarray(x, np.complex128).view(np.float64)
            chunks.append(np.asarray(x, np.float64).ravel())
        return np.concatenate(chunks) if chunks else np.zeros(0)


def _cast(chunk: np.ndarray, shape: tuple[int, ...], dtype: np.dtype, where: str) -> np.ndarray:
    if dtype.kind == "c":
        return np.ascontiguousarray(chunk).view(np.complex128).reshape(shape).astype(dtype)
    if dtype.kind in "iub":
        finite = chunk[np.isfinite(chunk)]
        info = (0, 1) if dtype.kind == "b" else (np.iinfo(dtype).min, np.iinfo(dtype).max)
        if (
            finite.size != chunk.size
            or np.any(finite != np.round(finite))
            or np.any(finite < info[0])
            or np.any(finite > info[1])
        ):
            raise InvalidInput(
                f"{where} holds a {dtype.name} array: its values must be whole numbers from "
                f"{info[0]} to {info[1]}",
                code="invalid_input",
            )
    return chunk.reshape(shape).astype(dtype)


@dataclass(frozen=True)
class Layout:
    """How a model (at one config) maps onto UM-Bridge's inputs and outputs."""

    inputs: tuple[Part, ...]
    outputs: tuple[Part, ...]
    sequence: bool  # the output is a tuple or list: one UM-Bridge output per element

    @property
    def input_sizes(self) -> list[int]:
        return [p.size for p in self.inputs]

    @property
    def output_sizes(self) -> list[int]:
        return [p.size for p in self.outputs]

    @property
    def differentiable(self) -> bool:
        """Gradient, ApplyJacobian and ApplyHessian need real floating inputs and outputs."""
        return all(p.real for p in self.inputs) and all(p.real for p in self.outputs)

    def support(self) -> dict[str, bool]:
        d = self.differentiable
        return {"Evaluate": True, "Gradient": d, "ApplyJacobian": d, "ApplyHessian": d}

    def split_output(self, value: Any) -> list[Any]:
        """The model's output -> one tree per UM-Bridge output."""
        return list(value) if self.sequence else [value]

    def cotangent(self, out_wrt: int, sens: np.ndarray) -> list[Any]:
        """A cotangent of the whole output: `sens` on output `out_wrt`, zeros elsewhere
        (lists for tuples: a JSON document; the engine restores the output's own tree)."""
        parts = [
            as_document(part.unflatten(sens, "sens") if i == out_wrt else part.zeros())
            for i, part in enumerate(self.outputs)
        ]
        return parts if self.sequence else parts[0]

    def tangents(self, in_wrt: int, vec: np.ndarray) -> list[Any]:
        """Tangents for every input: `vec` on input `in_wrt`, zeros elsewhere."""
        return [
            as_document(part.unflatten(vec, "vec") if i == in_wrt else part.zeros())
            for i, part in enumerate(self.inputs)
        ]

    def arguments(self, inputs: Sequence[np.ndarray]) -> list[Any]:
        """Checked float64 input vectors -> the model's positional arguments."""
        return [
            as_document(part.unflatten(values, f"input {i}"))
            for i, (part, values) in enumerate(zip(self.inputs, inputs, strict=True))
        ]


def as_document(tree: Any) -> Any:
    """Tuples -> lists: a request document has no tuples (the model's spec restores them)."""
    if isinstance(tree, dict):
        return {k: as_document(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [as_document(v) for v in tree]
    return tree


def _input_example(spec: Any, x64: bool, where: str) -> Any:
    """A spec tree -> ShapeDtypeStructs, or `NotMappable` saying why sizes are not fixed."""
    if isinstance(spec, ArraySpec):
        if spec.shape is None or any(d is None for d in spec.shape):
            raise NotMappable(f"{where} has no fixed shape ({spec.describe()})")
        if spec.dtype is None:
            dtype = np.dtype(np.float64 if x64 else np.float32)
        else:
            dtype = canonical_dtype(dtype_from_name(spec.dtype), x64)
        return jax.ShapeDtypeStruct(spec.shape, dtype)
    if isinstance(spec, dict):
        return {k: _input_example(v, x64, where) for k, v in spec.items()}
    if isinstance(spec, (list, tuple)):
        return type(spec)(_input_example(v, x64, where) for v in spec)
    raise NotMappable(f"{where} has no declared spec")


def build_layout(model: Model, config: Config, x64: bool) -> Layout:
    """The layout of `model` at `config` (JAX tracing: call it off the event loop).

    `NotMappable` saying why when the sizes are not known without a request.
    """
    specs = model.spec.inputs
    if not specs:
        raise NotMappable("it declares no input specs")
    examples = [_input_example(s, x64, f"input {i}") for i, s in enumerate(specs)]
    out = jax.eval_shape(model.bound(config), model.params, *examples)
    if not all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(out)):
        raise NotMappable("its output holds values that are not arrays")
    sequence = isinstance(out, (tuple, list))
    outputs = tuple(Part.of(e) for e in out) if sequence else (Part.of(out),)
    return Layout(tuple(Part.of(e) for e in examples), outputs, sequence)


class Catalog:
    """Layouts by (model, config), built on first use and kept (bounded: configs come from
    clients). A model whose sizes are not fixed is remembered with the reason."""

    max_entries = 4096

    def __init__(self, x64: bool) -> None:
        self.x64 = x64
        self._layouts: OrderedDict[tuple[str, Config], Layout | str] = OrderedDict()
        self._lock = threading.Lock()

    def cached(self, model: Model, config: Config) -> Layout | str | None:
        with self._lock:
            found = self._layouts.get((model.name, config))
            if found is not None:
                self._layouts.move_to_end((model.name, config))
            return found

    def layout(self, model: Model, config: Config) -> Layout | str:
        """The layout, or a sentence saying why the model has none (blocking: JAX tracing).

        The model's own code failing to trace at a client's config is that model's error
        (`InvalidInput` with code `model_error`); at its defaults, it is not listed.
        """
        found = self.cached(model, config)
        if found is not None:
            return found
        try:
            found = build_layout(model, config, self.x64)
        except NotMappable as e:
            found = str(e)
        except Exception as e:
            message = (str(e).splitlines() or [type(e).__name__])[0][:500]
            if config:
                raise InvalidInput(
                    f"'{model.name}' failed with config {dict(config)}: {message}",
                    code="model_error",
                ) from None
            log.warning("UM-Bridge: cannot trace %r: %s", model.name, message)
            found = f"tracing it failed: {message}"
        with self._lock:
            self._layouts[(model.name, config)] = found
            while len(self._layouts) > self.max_entries:
                self._layouts.popitem(last=False)
        return found

    def listed(self, models: Sequence[Model]) -> list[str]:
        """Names of the models UM-Bridge can reach (blocking on first use)."""
        return [m.name for m in models if isinstance(self.layout(m, ()), Layout)]

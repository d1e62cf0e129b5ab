"""The model registry: named JAX functions with their input specs and server-held parameters.

Model files mark functions with `@model(...)`; the decorator only attaches a `ModelDef` to the
function, so importing a models file changes no global state. `Registry.load` then collects the
marked functions of a file or module that the operator named (never one named by a request).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from client.errors import ModelNotFound
from client.specs import SpecTree, parse_spec

log = logging.getLogger("gradserve")

NAME_RE = re.compile(r"[a-z0-9_.-]{1,64}")


@dataclass(frozen=True)
class ModelDef:
    """What a model author declares. `params` is a pytree, an .npz path, or None; with `init`
    the parameters are `init(jax.random.PRNGKey(seed))` instead."""

    name: str
    fn: Callable[..., Any]
    description: str = ""
    inputs: Sequence[SpecTree] | None = None
    output: SpecTree = None
    params: Any = None
    init: Callable[[Any], Any] | None = None
    seed: int = 0
    device: str | None = None
    replicas: int = 1  # devices of the preferred platform to place it on; 0: all of them
    max_batch_size: int | None = None  # overrides the server's; 1 turns batching off
    version: str = "1"
    example: Any = None  # args at which the model pages plot it (service/pages.py)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not NAME_RE.fullmatch(self.name):
            raise ValueError(f"model name {self.name!r} must match [a-z0-9_.-]{{1,64}}")
        if self.params is not None and self.init is not None:
            raise ValueError(f"model {self.name!r}: give params or init, not both")
        if self.inputs is not None:
            object.__setattr__(self, "inputs", [parse_spec(s) for s in self.inputs])
        object.__setattr__(self, "output", parse_spec(self.output))


@dataclass
class Model:
    """A loaded model: its definition and, if it has them, its parameters as numpy arrays."""

    spec: ModelDef
    params: Any = None
    has_params: bool = False

    @property
    def name(self) -> str:
        return self.spec.name

    def bound(self) -> Callable[..., Any]:
        """The function clients differentiate: parameters (if any) come first, never from them."""
        fn = self.spec.fn
        if not self.has_params:
            return lambda params, *args: fn(*args)
        return fn


def model(name: str, **options: Any) -> Callable[[Callable], Callable]:
    """Mark `fn` as a gradserve model (see `ModelDef` for the options).

    >>> @model("square", inputs=[((None,), "float32")])
    ... def square(x): return x ** 2
    """

    def mark(fn: Callable) -> Callable:
        fn.__gradserve_model__ = ModelDef(name, fn, **options)  # type: ignore[attr-defined]
        return fn

    return mark


def _load_params(spec: ModelDef) -> tuple[Any, bool]:
    if spec.init is not None:
        import jax

        return jax.tree.map(np.asarray, spec.init(jax.random.PRNGKey(spec.seed))), True
    if isinstance(spec.params, (str, Path)):
        return _read_npz_params(Path(spec.params)), True
    if spec.params is not None:
        return spec.params, True
    return None, False


def _read_npz_params(path: Path) -> dict[str, Any]:
    """An .npz of parameters; keys like `layer0/W` nest into dicts."""
    tree: dict[str, Any] = {}
    with np.load(path, allow_pickle=False) as npz:
        for key in npz.files:
            node = tree
            *parents, leaf = key.split("/")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = npz[key]
    return tree


class Registry:
    """Name -> `Model`. Built once at start-up; read-only while serving."""

    def __init__(self) -> None:
        self._models: dict[str, Model] = {}

    def register(self, name: str | ModelDef, fn: Callable | None = None, **options: Any) -> Model:
        """Add a model: `register("tanh", jnp.tanh, inputs=[((None,), "float32")])`."""
        spec = name if isinstance(name, ModelDef) else ModelDef(name, fn, **options)
        if spec.name in self._models:
            raise ValueError(f"model {spec.name!r} is registered twice")
        params, has_params = _load_params(spec)
        self._models[spec.name] = loaded = Model(spec, params, has_params)
        return loaded

    def load(self, source: str) -> list[Model]:
        """Register every `@model` function of a Python file or importable module."""
        module = _import_source(source)
        marked = [
            obj.__gradserve_model__
            for obj in vars(module).values()
            if isinstance(getattr(obj, "__gradserve_model__", None), ModelDef)
        ]
        if not marked:
            raise ValueError(f"{source} defines no @model functions")
        return [self.register(spec) for spec in marked]

    def get(self, name: str) -> Model:
        try:
            return self._models[name]
        except KeyError:
            raise ModelNotFound(
                f"no model named {name!r}; GET /v1/models lists the {len(self._models)} served",
                code="model_not_found",
            ) from None

    def __iter__(self) -> Iterator[Model]:
        return iter(self._models.values())

    def __len__(self) -> int:
        return len(self._models)


def _import_source(source: str) -> Any:
    path = Path(source)
    if path.suffix == ".py" or path.exists():
        module_name = f"gradserve_models_{path.stem}"
        loader_spec = importlib.util.spec_from_file_location(module_name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise ValueError(f"cannot load models from {source}")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[module_name] = module
        loader_spec.loader.exec_module(module)
        return module
    return importlib.import_module(source)

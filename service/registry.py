"""The model registry: named JAX functions with their input specs and server-held parameters.

Model files mark functions with `@model(...)`; the decorator only attaches a `ModelDef` to the
function, so importing a models file changes no global state. `Registry.load` then collects the
marked functions of a file or module that the operator named (never one named by a request).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import math
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from client.errors import InvalidInput, ModelNotFound
from client.specs import SpecTree, parse_spec

log = logging.getLogger("gradserve")

NAME_RE = re.compile(r"[a-z0-9_.-]{1,64}")
CONFIG_TYPES = (bool, int, float, str)
_MAX_CONFIG_STR = 256

# A resolved config: the options that differ from their defaults, sorted by name. Hashable, so
# it keys the compile cache; `()` means every option at its default.
Config = tuple[tuple[str, Any], ...]


@dataclass(frozen=True)
class ConfigOption:
    """A static option of a model, set per request by the `config` field (UM-Bridge's, and the
    same field on the native API). Each distinct value compiles its own program.

    >>> ConfigOption("scale", float, 1.0, "variance factor")
    ConfigOption(name='scale', type=<class 'float'>, default=1.0, description='variance factor')
    """

    name: str
    type: type
    default: Any
    description: str = ""

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"config option {self.name!r} must be a Python identifier")
        if self.type not in CONFIG_TYPES:
            raise ValueError(f"config option {self.name!r}: type must be bool, int, float or str")
        object.__setattr__(self, "default", self.check(self.default, "model"))

    def check(self, value: Any, model: str) -> Any:
        """`value` as this option's type; `InvalidInput` naming the option if it is not one."""
        kind = self.type
        ok = (
            (kind is bool and isinstance(value, bool))
            or (kind is str and isinstance(value, str) and len(value) <= _MAX_CONFIG_STR)
            or (kind is int and isinstance(value, int) and not isinstance(value, bool))
            or (kind is int and isinstance(value, float) and value.is_integer())
            or (
                kind is float
                and isinstance(value, (int, float))
                and not isinstance(value, bool)
                and math.isfinite(value)
            )
        )
        if not ok:
            shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:40] + "..."
            raise InvalidInput(
                f"config option {self.name!r} of '{model}' must be a {_TYPE_WORDS[kind]}, "
                f"got {shown}",
                code="invalid_config",
                loc=("config", self.name),
            )
        return kind(value)


_TYPE_WORDS = {bool: "bool", int: "integer", float: "finite number", str: "string (<= 256 chars)"}


def _config_options(config: Any) -> tuple[ConfigOption, ...]:
    """A model author's `config=`: a dict name -> default (its type taken from the default),
    or a sequence of `ConfigOption`s."""
    if config is None:
        return ()
    if isinstance(config, Mapping):
        return tuple(ConfigOption(k, type(v), v) for k, v in config.items())
    options = tuple(config)
    if not all(isinstance(o, ConfigOption) for o in options):
        raise TypeError("config must be a dict of defaults or a sequence of ConfigOption")
    return options


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
    # Warm-up also compiles the batched programs of the common ops up to this many requests
    # (each power-of-two bucket), so the first burst runs batched instead of one by one.
    warmup_batch_size: int = 0
    version: str = "1"
    example: Any = None  # args at which the model pages plot it (service/pages.py)
    # Static options passed to `fn` as keyword arguments: {name: default} or ConfigOptions.
    config: Any = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not NAME_RE.fullmatch(self.name):
            raise ValueError(f"model name {self.name!r} must match [a-z0-9_.-]{{1,64}}")
        if self.params is not None and self.init is not None:
            raise ValueError(f"model {self.name!r}: give params or init, not both")
        if self.inputs is not None:
            object.__setattr__(self, "inputs", [parse_spec(s) for s in self.inputs])
        object.__setattr__(self, "output", parse_spec(self.output))
        options = _config_options(self.config)
        if len({o.name for o in options}) != len(options):
            raise ValueError(f"model {self.name!r}: a config option is declared twice")
        object.__setattr__(self, "config", options)

    def resolve_config(self, given: Any) -> Config:
        """A request's `config` -> the canonical `Config` (only values that differ from their
        defaults, sorted), so `{}` and `{"a": <default>}` share one compiled program.

        An unknown key or a value of the wrong type is an `InvalidInput` naming the key.
        """
        if given is None or (isinstance(given, Mapping) and not given):
            return ()
        if not isinstance(given, Mapping):
            raise InvalidInput(
                f"config must be a JSON object, got {type(given).__name__}",
                code="invalid_config",
                loc=("config",),
            )
        options = {o.name: o for o in self.config}
        resolved = []
        for key, value in given.items():
            option = options.get(key)
            if option is None:
                known = ", ".join(sorted(options)) or "none"
                raise InvalidInput(
                    f"'{self.name}' has no config option {key!r}; its options: {known}",
                    code="invalid_config",
                    loc=("config", str(key)),
                )
            value = option.check(value, self.name)
            if value != option.default:
                resolved.append((key, value))
        return tuple(sorted(resolved))


@dataclass
class Model:
    """A loaded model: its definition and, if it has them, its parameters as numpy arrays."""

    spec: ModelDef
    params: Any = None
    has_params: bool = False

    @property
    def name(self) -> str:
        return self.spec.name

    def bound(self, config: Config = ()) -> Callable[..., Any]:
        """The function clients differentiate: parameters (if any) come first, never from them.

        Config options are bound as keyword arguments: Python values, so static under `jit`.
        """
        fn = self.spec.fn
        if self.spec.config:
            values = {o.name: o.default for o in self.spec.config} | dict(config)
            fn = functools.partial(fn, **values)
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

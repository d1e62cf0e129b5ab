"""Remote functions: a model plus a lazy chain of transforms, and the pullbacks of `vjp`.

Calling one runs a flow of `client._core` through its client, so with a `Client` it returns
the value and with an `AsyncClient` an awaitable of it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from client import _trees
from client._core import Flow, ModelInfo, Transform

if TYPE_CHECKING:
    from client._client import _BaseClient


class RemoteFunction:
    """A model served by gradserve, under zero or more transforms. Call it like the JAX
    function it stands for; building it (``grad(grad(f))``) sends nothing."""

    def __init__(self, client: _BaseClient, model: str, chain: tuple[Transform, ...] = ()) -> None:
        self._client, self.model, self.chain = client, model, chain

    def __call__(self, *args: Any) -> Any:
        return self._client._run(self._client._core.compute(self.model, self.chain, "eval", args))

    def then(self, transform: Transform) -> RemoteFunction:
        """This function with one more transform on the outside."""
        return RemoteFunction(self._client, self.model, (*self.chain, transform))

    @property
    def info(self) -> ModelInfo:
        """The model's description, fetched once per client (async clients: after a call or
        ``await client.model_info(name)``)."""
        cached = self._client._core.infos.get(self.model)
        if cached is not None:
            return cached
        return self._client._info_now(self.model)

    @property
    def spec(self) -> Any:
        """The model's input specs: one spec tree per positional argument (None: undeclared)."""
        return self.info.inputs

    def __repr__(self) -> str:
        inner = f"<remote {self.model!r}>"
        for t in self.chain:
            opts = ", ".join(f"{k}={v!r}" for k, v in t.options)
            inner = f"{t.op}({inner}{', ' + opts if opts else ''})"
        return inner


def _moveaxis_tree(tree: Any, source: int, dest: int) -> Any:
    if source == dest:
        return tree
    return _trees.tree_map(lambda x: np.moveaxis(np.asarray(x), source, dest), tree)


class _Bound:
    """A linear function bound to primals (a pullback or a pushforward); `vmap` of it is one
    batched request."""

    apply = ""

    def __init__(
        self, fn: RemoteFunction, primals: tuple, in_axes: int | None = None, out_axes: int = 0
    ) -> None:
        self.fn, self.primals, self.in_axes, self.out_axes = fn, primals, in_axes, out_axes

    def batched(self, in_axes: Any, out_axes: Any) -> _Bound:
        if self.in_axes is not None:
            raise TypeError(f"vmap of vmap of a remote {self._name} is not supported")
        if not isinstance(in_axes, int) or not isinstance(out_axes, int):
            raise TypeError(
                f"vmap of a remote {self._name} takes an int in_axes and out_axes "
                f"(one batch axis shared by every leaf), got in_axes={in_axes!r}, "
                f"out_axes={out_axes!r}"
            )
        return type(self)(self.fn, self.primals, in_axes, out_axes)

    @property
    def _name(self) -> str:
        return type(self).__name__.lower()

    def _flow(self, extra: Any) -> Flow:
        batched = self.in_axes is not None
        if batched:
            extra = _moveaxis_tree(extra, self.in_axes, 0)
        _value, result = yield from self.fn._client._core.compute(
            self.fn.model, self.fn.chain, self.apply, self.primals, extra, batched=batched
        )
        return _moveaxis_tree(result, 0, self.out_axes) if batched else result

    def __repr__(self) -> str:
        batched = "" if self.in_axes is None else f", in_axes={self.in_axes}"
        return f"<{self._name} of {self.fn!r}{batched}>"


class Pullback(_Bound):
    """``pullback(cotangent)`` -> a tuple of cotangents, one per primal, as `jax.vjp` gives."""

    apply = "vjp"

    def __call__(self, cotangent: Any) -> Any:
        return self.fn._client._run(self._flow(cotangent))


class Pushforward(_Bound):
    """``f_jvp(*tangents)`` -> the output tangent, as `jax.linearize` gives."""

    apply = "jvp"

    def __call__(self, *tangents: Any) -> Any:
        return self.fn._client._run(self._flow(tangents))

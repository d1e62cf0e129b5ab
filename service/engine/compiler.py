"""Programs -> compiled executables: checks at trace time, then XLA; kept in a bounded LRU.

Every executable is compiled ahead of time (`jit(...).lower(...).compile()`), so compile time
is measured apart from compute and a request never triggers a hidden recompile.
"""

from __future__ import annotations

import copy
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from client.errors import APIError, InvalidInput, PayloadTooLarge
from client.specs import ArraySpec, check_args, dtype_name
from service.calls import Call, avals_key
from service.engine.linearization import Linearization, ProductProgram
from service.metrics import Metrics
from service.transforms import compose, program_function


@dataclass(frozen=True)
class CacheKey:
    model: str
    version: str
    program: Any
    device: int
    avals: tuple
    bucket: int = 0  # 0: unbatched; else the padded batch size of a vmapped executable
    config: tuple = ()  # the model's static options (Call.config)


class CompileCache:
    """A bounded LRU of executables, holding at most `max_shapes` input shapes per model.

    Shapes come from clients, so without the per-model cap one model fed ever-new shapes would
    evict everything else; with it, that model only churns its own entries.
    """

    def __init__(self, max_entries: int, max_shapes: int, metrics: Metrics) -> None:
        self.max_entries, self.max_shapes, self.metrics = max_entries, max_shapes, metrics
        self._entries: OrderedDict[CacheKey, Callable] = OrderedDict()
        self._shapes: dict[str, OrderedDict[tuple, None]] = {}
        self._lock = threading.Lock()

    def get(self, key: CacheKey) -> Callable | None:
        with self._lock:
            compiled = self._entries.get(key)
            if compiled is None:
                self.metrics.cache_miss.inc()
                return None
            self._entries.move_to_end(key)
            self._shapes[key.model].move_to_end(key.avals)
            self.metrics.cache_hit.inc()
            return compiled

    def put(self, key: CacheKey, compiled: Callable) -> None:
        with self._lock:
            self._entries[key] = compiled
            shapes = self._shapes.setdefault(key.model, OrderedDict())
            shapes[key.avals] = None
            shapes.move_to_end(key.avals)
            while len(shapes) > self.max_shapes:
                old, _ = shapes.popitem(last=False)
                for k in [k for k in self._entries if k.model == key.model and k.avals == old]:
                    self._evict(k)
            while len(self._entries) > self.max_entries:
                self._evict(next(iter(self._entries)))

    def _evict(self, key: CacheKey) -> None:
        del self._entries[key]
        shapes = self._shapes.get(key.model)
        if shapes is not None and not any(
            k.model == key.model and k.avals == key.avals for k in self._entries
        ):
            shapes.pop(key.avals, None)
        self.metrics.cache.labels("eviction").inc()

    def __len__(self) -> int:
        return len(self._entries)

    def shapes(self, model: str) -> int:
        return len(self._shapes.get(model, ()))


class Compiler:
    """Builds, checks and caches the executable of a `Call` on a device.

    Refusals are cached too (a bounded LRU of the error per key): a trace-time error is as
    deterministic as a compile, and without the cache a client repeating a request that fails
    (grad of a vector output, say) would cost a trace each time, a third of a device's rate.
    """

    max_refusals = 1024

    def __init__(self, cache: CompileCache, metrics: Metrics, max_output_elements: int) -> None:
        self.cache, self.metrics, self.max_output_elements = cache, metrics, max_output_elements
        self._refusals: OrderedDict[CacheKey, APIError] = OrderedDict()
        self._refusals_lock = threading.Lock()

    def executable(
        self, call: Call, device: jax.Device, params: Any, args: Any, extra: Any, bucket: int = 0
    ) -> tuple[Callable, float]:
        """The compiled program for `call` and the seconds spent compiling it (0 on a hit).

        With `bucket`, the program is vmapped over `bucket` stacked calls; its errors propagate
        unchanged so the worker can fall back to unbatched runs (whose checks name the fault).
        """
        model = call.model
        key = self._key(call, device, args, extra, bucket)
        compiled = self.cache.get(key)
        if compiled is not None:
            return compiled, 0.0
        if not bucket:
            self._raise_if_refused(key)
        t0 = time.perf_counter()
        fn = _function(call)
        if bucket:
            # Products of one session share its residuals: only their tangents are stacked.
            shared = getattr(call.program, "shares_args", False)
            stacked = jax.vmap(fn, in_axes=(None, None if shared else 0, 0))
            compiled = _lower(stacked, device, params, args, extra).compile()
        else:
            try:
                if call.op == "vjp":
                    self._check_cotangent(call, params, args)
                self._check_output_size(call, jax.eval_shape(fn, params, args, extra))
                lowered = _lower(fn, device, params, args, extra)
            except APIError as e:
                self._refused(key, e)
                raise
            except Exception as e:  # the model's own code, or JAX refusing the transform
                raise self._refused(key, model_error(call, e)) from None
            try:
                compiled = lowered.compile()
            except Exception as e:  # XLA failing, out of memory say: may pass, so not kept
                raise model_error(call, e) from None
        seconds = time.perf_counter() - t0
        self.cache.put(key, compiled)
        self.metrics.compiles.labels(model.name).inc()
        self.metrics.compile_seconds.observe(seconds)
        return compiled, seconds

    def linearization(
        self, call: Call, device: jax.Device, params: Any, budget: int
    ) -> tuple[Linearization, float]:
        """The traced and compiled linearize program of `call` (a session's first step), and
        the seconds spent compiling it (0 on a hit).

        Its residuals' sizes are known once it is traced, so a session over `budget` bytes is
        refused (413, remembered like any refusal) before anything compiles or runs.
        """
        model = call.model
        key = self._key(call, device, call.args, None, 0)
        found = self.cache.get(key)
        if found is not None:
            return found, 0.0
        self._raise_if_refused(key)
        t0 = time.perf_counter()
        lin = Linearization()
        fn = lin.tracer(model.bound(call.config), call.program, model.name)
        try:
            lowered = _lower(fn, device, params, call.args, None)
            self._check_output_size(call, list(lin.out_avals))
            lin.check_size(model.name, budget)
        except APIError as e:
            self._refused(key, e)
            raise
        except Exception as e:
            raise self._refused(key, model_error(call, e)) from None
        try:
            lin.executable = lowered.compile()
        except Exception as e:
            raise model_error(call, e) from None
        seconds = time.perf_counter() - t0
        self.cache.put(key, lin)
        self.metrics.compiles.labels(model.name).inc()
        self.metrics.compile_seconds.observe(seconds)
        return lin, seconds

    def _raise_if_refused(self, key: CacheKey) -> None:
        with self._refusals_lock:
            refusal = self._refusals.get(key)
            if refusal is None:
                return
            self._refusals.move_to_end(key)
        raise copy.copy(refusal)  # a fresh one: raising shares its traceback between threads

    def _refused(self, key: CacheKey, error: APIError) -> APIError:
        with self._refusals_lock:
            self._refusals[key] = copy.copy(error)
            while len(self._refusals) > self.max_refusals:
                self._refusals.popitem(last=False)
        return error

    def cached(
        self, call: Call, device: jax.Device, args: Any, extra: Any, bucket: int = 0
    ) -> Callable | None:
        """The executable if it is compiled already; never compiles."""
        return self.cache.get(self._key(call, device, args, extra, bucket))

    @staticmethod
    def _key(call: Call, device: jax.Device, args: Any, extra: Any, bucket: int) -> CacheKey:
        avals = avals_key((args, extra)) if bucket else call.signature[1]
        model = call.model
        return CacheKey(
            model.name, model.spec.version, call.program, device.id, avals, bucket, call.config
        )

    def _check_output_size(self, call: Call, out: Any) -> None:
        size = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(out))
        limit = self.max_output_elements
        if size > limit:
            raise PayloadTooLarge(
                f"{call.op} of '{call.model.name}' would return {size} elements, over the limit "
                f"of {limit}. Ask for products instead of the full matrix: jvp, vjp or hvp.",
                code="output_too_large",
            )

    def _check_cotangent(self, call: Call, params: Any, args: tuple) -> None:
        """The cotangent must match the output of the function being pulled back."""
        bound = call.model.bound(call.config)
        f = compose(lambda *a: bound(params, *a), call.program.transforms, call.model.name)
        function_output = jax.eval_shape(f, *args)
        batched = call.program.batched

        def spec(x: Any) -> ArraySpec:
            return ArraySpec((None, *x.shape) if batched else tuple(x.shape), dtype_name(x.dtype))

        check_args(
            call.model.name, [jax.tree.map(spec, function_output)], [call.extra], what="cotangent"
        )


def _function(call: Call) -> Callable:
    """`(params, args, extra) -> output` for `call`'s program."""
    if isinstance(call.program, ProductProgram):
        return call.program.function()
    return program_function(call.model.bound(call.config), call.program, call.model.name)


def _lower(fn: Callable, device: jax.Device, *args: Any) -> Any:
    # Host (numpy) arguments are uncommitted, so without a default device XLA would place
    # every executable on device 0 whichever worker compiled it; under it, the executable
    # runs where its worker is, and the arguments move there as it is called.
    with jax.default_device(device):
        return jax.jit(fn).lower(*args)


def model_error(call: Call, e: Exception, running: bool = False) -> InvalidInput:
    """An exception from the model's code (or JAX refusing it) as a clean 422.

    At trace time the first line says what went wrong; at run time (a host callback raising)
    JAX puts a traceback first and the cause last.
    """
    lines = [line for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
    message = (lines[-1] if running else lines[0])[:500]
    code = "invalid_transform" if isinstance(e, TypeError) else "model_error"
    return InvalidInput(f"{call.op} of '{call.model.name}' failed: {message}", code=code)

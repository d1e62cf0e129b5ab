"""The execution engine: one worker thread per device, and the compile cache.

JAX work (tracing, compiling, running, fetching results) happens only on the workers, never on
the event loop, so the server keeps answering while a device is busy.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np

from client.errors import APIError, InvalidInput, PayloadTooLarge
from client.specs import ArraySpec, check_args, dtype_name
from service.calls import Call
from service.metrics import Metrics
from service.registry import Model, Registry
from service.settings import Settings
from service.transforms import compose, program_function

log = logging.getLogger("gradserve")


@dataclass
class Outcome:
    """A computed result (numpy pytree) and where the time went, in seconds."""

    value: Any
    timings: dict[str, float] = field(default_factory=dict)


def avals_key(tree: Any) -> tuple:
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((x.shape, np.dtype(x.dtype).str) for x in leaves)


def _fetch(out: Any) -> Any:
    """Device results -> numpy. float0 (the tangent type of integers) has no wire dtype: bool."""
    host = jax.device_get(out)
    return jax.tree.map(
        lambda x: np.zeros(x.shape, bool) if x.dtype == jax.dtypes.float0 else np.asarray(x), host
    )


class Engine:
    """Runs `Call`s on device workers with a cache of compiled programs."""

    def __init__(self, registry: Registry, settings: Settings, metrics: Metrics) -> None:
        self.registry, self.settings, self.metrics = registry, settings, metrics
        self.devices = jax.devices()
        self._workers = {
            d: ThreadPoolExecutor(1, thread_name_prefix=f"gradserve-{d.platform}{d.id}")
            for d in self.devices
        }
        self._cache: dict[tuple, Callable[..., Any]] = {}
        self._params: dict[tuple[str, int], Any] = {}
        self._lock = threading.Lock()

    def device_for(self, model: Model) -> jax.Device:
        want = model.spec.device
        if want:
            platform, _, index = want.partition(":")
            matching = [d for d in self.devices if d.platform == platform]
            if matching:
                return matching[int(index or 0) % len(matching)]
        return self.devices[0]

    async def run(self, call: Call) -> Outcome:
        device = self.device_for(call.model)
        enqueued = time.perf_counter()
        future = self._workers[device].submit(self._execute, call, device, enqueued)
        return await asyncio.wrap_future(future)

    def close(self) -> None:
        for worker in self._workers.values():
            worker.shutdown(wait=False, cancel_futures=True)

    # -- on the worker thread -------------------------------------------------------------

    def _execute(self, call: Call, device: jax.Device, enqueued: float) -> Outcome:
        started = time.perf_counter()
        params = self._device_params(call.model, device)
        args, extra = jax.device_put((call.args, call.extra), device)
        exe, compile_s = self._executable(call, device, params, args, extra)
        t0 = time.perf_counter()
        value = _fetch(exe(params, args, extra))
        compute_s = time.perf_counter() - t0
        timings = {"queue": started - enqueued, "compile": compile_s, "compute": compute_s}
        for phase, seconds in timings.items():
            self.metrics.phase.labels(phase).observe(seconds)
        return Outcome(value, timings)

    def _device_params(self, model: Model, device: jax.Device) -> Any:
        key = (model.name, device.id)
        if key not in self._params:
            self._params[key] = jax.device_put(model.params, device) if model.has_params else None
        return self._params[key]

    def _executable(
        self, call: Call, device: jax.Device, params: Any, args: Any, extra: Any
    ) -> tuple[Callable[..., Any], float]:
        model = call.model
        key = (model.name, model.spec.version, call.program, device.id, avals_key((args, extra)))
        with self._lock:
            cached = self._cache.get(key)
        if cached is not None:
            return cached, 0.0
        t0 = time.perf_counter()
        fn = program_function(model.bound(), call.program, model.name)
        try:
            if call.op == "vjp":
                self._check_cotangent(call, params, args)
            self._check_output_size(call, jax.eval_shape(fn, params, args, extra))
            compiled = jax.jit(fn).lower(params, args, extra).compile()
        except APIError:
            raise
        except Exception as e:  # the model's own code, or JAX refusing the transform
            raise _model_error(call, e) from None
        with self._lock:
            self._cache[key] = compiled
        self.metrics.compiles.labels(model.name).inc()
        return compiled, time.perf_counter() - t0

    def _check_output_size(self, call: Call, out: Any) -> None:
        size = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(out))
        limit = self.settings.max_output_elements
        if size > limit:
            raise PayloadTooLarge(
                f"{call.op} of '{call.model.name}' would return {size} elements, over the limit "
                f"of {limit}. Ask for products instead of the full matrix: jvp, vjp or hvp.",
                code="output_too_large",
            )

    def _check_cotangent(self, call: Call, params: Any, args: tuple) -> None:
        """The cotangent must match the output of the function being pulled back."""
        bound = call.model.bound()
        f = compose(lambda *a: bound(params, *a), call.program.transforms, call.model.name)
        function_output = jax.eval_shape(f, *args)
        batched = call.program.batched

        def spec(x: Any) -> ArraySpec:
            return ArraySpec((None, *x.shape) if batched else tuple(x.shape), dtype_name(x.dtype))

        want = jax.tree.map(spec, function_output)
        check_args(call.model.name, [want], [call.extra], what="cotangent")


def _model_error(call: Call, e: Exception) -> InvalidInput:
    message = str(e).split("\n", 1)[0][:500]
    code = "invalid_transform" if isinstance(e, TypeError) else "model_error"
    return InvalidInput(f"{call.op} of '{call.model.name}' failed: {message}", code=code)

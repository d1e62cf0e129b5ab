"""The execution engine: model placement, per-device workers, deadlines and warm-up.

JAX work (tracing, compiling, running, fetching results) happens only on the device workers,
never on the event loop, so the server keeps answering while every device is busy.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import threading
import time
from collections.abc import Awaitable, Iterator
from contextlib import contextmanager
from typing import Any

import jax
import numpy as np

from client.errors import APIError, DeadlineExceeded
from client.specs import ArraySpec, dtype_from_name
from service import disconnect
from service.calls import Call
from service.engine.batching import batch_key
from service.engine.compiler import CompileCache, Compiler
from service.engine.worker import DeviceWorkers, Item, Outcome
from service.metrics import Metrics
from service.registry import Model, Registry
from service.sessions import SessionStore
from service.settings import Settings
from service.transforms import build_program

__all__ = ["Engine", "Outcome"]

log = logging.getLogger("gradserve")


class _Arrival:
    """A request counted in `Engine._arriving` until its call is queued."""

    def __init__(self, model: str) -> None:
        self.model, self.counted = model, True


_ARRIVAL: contextvars.ContextVar[_Arrival | None] = contextvars.ContextVar(
    "gradserve_arrival", default=None
)

WARMUP_OPS = ("eval", "grad", "value_and_grad")


def configure_jax(settings: Settings) -> None:
    """Process-wide JAX options; must run before JAX starts its backends."""
    # JAX grabs 75% of a GPU's memory at start by default, so a second server (or a notebook)
    # on the same GPU fails. Allocate on demand unless the operator chose otherwise.
    if settings.gpu_memory_fraction is not None:
        os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{settings.gpu_memory_fraction:g}"
    else:
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    jax.config.update("jax_enable_x64", settings.x64)
    if settings.cpu_devices:
        jax.config.update("jax_num_cpu_devices", settings.cpu_devices)
    if settings.compile_cache_dir is not None:
        settings.compile_cache_dir.mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", str(settings.compile_cache_dir))
        # JAX skips programs that compile fast or are small; ours are mostly both on CPU.
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


class Engine:
    """Places models on devices and runs `Call`s on them, batched where it pays."""

    def __init__(self, registry: Registry, settings: Settings, metrics: Metrics) -> None:
        self.registry, self.settings, self.metrics = registry, settings, metrics
        self.cache = CompileCache(
            settings.compile_cache_size, settings.max_shapes_per_model, metrics
        )
        self.compiler = Compiler(self.cache, metrics, settings.max_output_elements)
        self._params: dict[tuple[str, int], Any] = {}
        self._params_lock = threading.Lock()
        self._placement = {model.name: self._place(model) for model in registry}
        # Requests received for a model and not yet queued (still being decoded): workers
        # wait for companions only while some are on their way.
        self._arriving: dict[str, int] = {}
        used = {d for devices in self._placement.values() for d in devices}
        self.sessions = SessionStore(
            {d: session_budget(d, settings, sum(u.platform == "cpu" for u in used)) for d in used},
            ttl_s=settings.session_ttl_s,
            max_per_key=settings.session_max_per_key,
            metrics=metrics,
        )
        self._workers = {
            device: DeviceWorkers(
                device,
                self.compiler,
                metrics,
                self.params_for,
                self._arriving,
                threads=settings.workers_per_device,
                max_overdue=settings.max_overdue_workers,
                max_queue=settings.max_queue,
                max_batch_size=settings.max_batch_size,
                max_batch_delay=settings.max_batch_delay_ms / 1e3,
                batch_patience=settings.batch_patience_ms / 1e3,
                sessions=self.sessions,
                in_flight=settings.batches_in_flight,
            )
            for device in sorted(used, key=lambda d: (d.platform, d.id))
        }
        self._listener = metrics.count_persistent_cache_events()

    # -- placement ------------------------------------------------------------------------

    def _place(self, model: Model) -> list[jax.Device]:
        """`device="gpu"` falls back to the CPU with one log line; `"cpu:1"` names one device."""
        platform, _, index = (model.spec.device or jax.default_backend()).partition(":")
        try:
            candidates = jax.devices(platform)
        except RuntimeError:
            log.warning(
                "model %r prefers %s, which this machine lacks: placed on cpu", model.name, platform
            )
            candidates, index = jax.devices("cpu"), ""
        if index:
            return [candidates[int(index) % len(candidates)]]
        replicas = model.spec.replicas or len(candidates)
        return candidates[:replicas]

    def device_for(self, model: Model) -> str:
        return ",".join(str(d) for d in self._placement[model.name])

    def params_for(self, model: Model, device: jax.Device) -> Any:
        """The model's parameters on `device`, transferred once."""
        key = (model.name, device.id)
        with self._params_lock:
            if key not in self._params:
                self._params[key] = (
                    jax.device_put(model.params, device) if model.has_params else None
                )
            return self._params[key]

    # -- running --------------------------------------------------------------------------

    @contextmanager
    def arriving(self, model: str) -> Iterator[None]:
        """Count a request for `model` as on its way to a queue while the block runs, or until
        `submit` queues it (the count and the queue change together, under the queue's lock)."""
        self._arriving[model] = self._arriving.get(model, 0) + 1
        arrival = _Arrival(model)
        token = _ARRIVAL.set(arrival)
        try:
            yield
        finally:
            _ARRIVAL.reset(token)
            if arrival.counted:  # it never reached a queue (refused, or the client left)
                left = self._arriving[model] - 1
                self._arriving[model] = left
                if not left:  # workers waiting for these companions need not wait any longer
                    for device in self._placement.get(model, ()):
                        self._workers[device].poke()

    def submit(self, call: Call, device: jax.Device | None = None) -> Awaitable[Outcome]:
        """Queue `call` on the least-loaded device of its model now; await the result later.

        `device` pins it instead (a session's products run where its residuals are). 429 when
        that queue is full; 504 at the deadline, with the work dropped if it has not started
        (work already running finishes, and its answer is discarded).
        """
        watch = disconnect.current()
        if watch is not None and watch.gone:  # its client left while it was being decoded
            self.metrics.cancelled.labels("queued").inc()
            raise disconnect.ClientGone()
        if device is not None:
            workers = self._workers[device]
        else:
            workers = min(
                (self._workers[d] for d in self._placement[call.model.name]),
                key=lambda w: w.load,
            )
        loop = asyncio.get_running_loop()
        item = Item(call, batch_key(call), loop.create_future(), loop, time.perf_counter())
        arrival = _ARRIVAL.get()
        arrived = arrival is not None and arrival.counted and arrival.model == call.model.name
        workers.submit(item, arrived=arrived)
        if arrived:
            arrival.counted = False
        if watch is not None:
            watch.on_disconnect(lambda: self._abandon(item))
        return self._result(item, workers, loop)

    def _abandon(self, item: Item) -> None:
        """The client left: drop `item` if no worker took it yet, else discard its result."""
        if item.future.done():
            return
        item.cancelled = True  # workers skip it, and a batch gathering it leaves it out
        self.metrics.cancelled.labels("queued" if item.runner is None else "running").inc()
        item.future.set_exception(disconnect.ClientGone())

    async def _result(
        self, item: Item, workers: DeviceWorkers, loop: asyncio.AbstractEventLoop
    ) -> Outcome:
        timer = loop.call_later(self.settings.request_timeout_s, self._expire, item, workers)
        try:
            return await item.future
        finally:
            timer.cancel()

    def _expire(self, item: Item, workers: DeviceWorkers) -> None:
        if not item.future.done():
            item.cancelled = True
            workers.overdue(item)
            item.future.set_exception(
                DeadlineExceeded(
                    f"{item.call.op} of '{item.call.model.name}' did not finish within "
                    f"{self.settings.request_timeout_s:g} s",
                    code="deadline_exceeded",
                )
            )

    def close(self) -> None:
        for workers in self._workers.values():
            workers.close()
        self.sessions.close()
        self.metrics.stop_counting_persistent_cache_events(self._listener)

    # -- warm-up --------------------------------------------------------------------------

    def warm_up(self) -> int:
        """Compile each model's common ops for its declared inputs (a size-1 stand-in for each
        free dimension) on every device it is placed on, and their batched programs up to the
        model's `warmup_batch_size`. Returns the programs compiled."""
        compiled = 0
        for model in self.registry:
            if model.spec.inputs is None:
                continue
            args = tuple(_example(spec) for spec in model.spec.inputs)
            for op in WARMUP_OPS:
                call = Call(model, op, build_program(op, {}), args, None)
                for device in self._placement[model.name]:
                    try:
                        _, seconds = self.compiler.executable(
                            call, device, self.params_for(model, device), args, None
                        )
                    except APIError:
                        break  # e.g. grad of a non-scalar model: not a common op for it
                    compiled += seconds > 0
                    if model.spec.warmup_batch_size > 1:
                        workers = self._workers[device]
                        compiled += workers.buckets.compile_now(call, model.spec.warmup_batch_size)
        return compiled


# Without GRADSERVE_SESSION_MEMORY, sessions may hold this share of an accelerator's memory,
# or of the host's RAM split over the CPU devices the server uses.
SESSION_MEMORY_SHARE = 0.25
SESSION_HOST_MEMORY_SHARE = 0.125


def session_budget(device: jax.Device, settings: Settings, cpu_devices: int) -> int:
    """Bytes of residuals sessions may hold on `device` (CPU devices share the host's RAM)."""
    if settings.session_memory is not None:
        return settings.session_memory
    if device.platform != "cpu":
        try:
            limit = (device.memory_stats() or {}).get("bytes_limit")
        except Exception:  # some backends do not report memory
            limit = None
        if limit:
            return int(limit * SESSION_MEMORY_SHARE)
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX host
        ram = 8 * 2**30
    return int(ram * SESSION_HOST_MEMORY_SHARE / max(1, cpu_devices))


def _example(spec: Any) -> Any:
    if isinstance(spec, ArraySpec):
        shape = () if spec.shape is None else tuple(1 if d is None else d for d in spec.shape)
        return np.zeros(shape, dtype_from_name(spec.dtype or "float32"))
    if isinstance(spec, dict):
        return {k: _example(v) for k, v in spec.items()}
    if isinstance(spec, (list, tuple)):
        return type(spec)(_example(v) for v in spec)
    return np.zeros((), np.float32)

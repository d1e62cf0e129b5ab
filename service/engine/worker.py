"""A device's workers: a bounded queue, dynamic batching, and execution off the event loop.

Which requests share a batch, and how long a worker waits for more, is `batching`'s; this
module runs the threads that take batches off the queue, execute them and answer.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np

from client.errors import APIError, ServerBusy
from service.calls import Call
from service.engine.batching import BucketNotReady, Demand, bucket_for, stack
from service.engine.buckets import Buckets
from service.engine.compiler import Compiler, model_error
from service.engine.linearization import LinearizeCall, LinearizeProgram
from service.metrics import Metrics
from service.sessions import SessionStore

log = logging.getLogger("gradserve")


@dataclass
class Outcome:
    """A computed result (numpy pytree) and where the time went, in seconds."""

    value: Any
    timings: dict[str, float] = field(default_factory=dict)
    batch_size: int = 1
    device: str = ""


@dataclass(eq=False)
class Item:
    """One queued request, resolved on its event loop when done."""

    call: Call
    key: tuple
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    enqueued: float
    cancelled: bool = False  # set by the event loop at the deadline: drop if not started
    runner: int | None = None  # the worker thread that took it
    batch_wait: float = 0.0  # seconds its worker waited for companions (0: it never waited)

    def resolve(self, outcome: Outcome | None, error: BaseException | None = None) -> None:
        self.loop.call_soon_threadsafe(_settle, self.future, outcome, error)


def _settle(future: asyncio.Future, outcome: Outcome | None, error: BaseException | None) -> None:
    if future.done():  # the deadline answered first
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(outcome)


def _to_host(x: Any) -> np.ndarray:
    # float0 (the tangent type of integers) has no wire dtype: bool zeros stand in for it.
    return np.zeros(x.shape, bool) if x.dtype == jax.dtypes.float0 else np.asarray(x)


def _fetch(out: Any) -> tuple[Any, str]:
    """Device results -> numpy (np.asarray per leaf: cheaper than jax.device_get when small),
    and the device that computed them, as reported by the result itself."""
    first = next((x for x in jax.tree.leaves(out) if isinstance(x, jax.Array)), None)
    where = (
        "" if first is None else ",".join(sorted(f"{d.platform}:{d.id}" for d in first.devices()))
    )
    return jax.tree.map(_to_host, out), where


def batches_in_flight(device: jax.Device, setting: int | None) -> int:
    """Batches of one model a device runs at once: what it can overlap.

    A CPU runs one XLA program on all its cores, so a second batch of the same model would only
    split them; holding it back lets its requests join the next, larger batch instead. A GPU
    overlaps one batch's transfers with another's compute: two.
    """
    if setting is not None:
        return setting
    return 1 if device.platform == "cpu" else 2


class DeviceWorkers:
    """The queue of one device and the threads that drain it."""

    def __init__(
        self,
        device: jax.Device,
        compiler: Compiler,
        metrics: Metrics,
        params_for: Callable[[Any, jax.Device], Any],
        arriving: Mapping[str, int],
        *,
        threads: int,
        max_overdue: int,
        max_queue: int,
        max_batch_size: int,
        max_batch_delay: float,
        batch_patience: float = 0.0,
        sessions: SessionStore | None = None,
        in_flight: int | None = None,
    ) -> None:
        self.sessions = sessions
        self.device, self.compiler, self.metrics, self.params_for = (
            device,
            compiler,
            metrics,
            params_for,
        )
        self.max_queue, self.max_batch_size, self.max_batch_delay = (
            max_queue,
            max_batch_size,
            max_batch_delay,
        )
        self._queue: deque[Item] = deque()
        lock = threading.RLock()
        self._cond = threading.Condition(lock)  # idle workers wait here for work
        # Workers holding a batch wait here for companions: a request leaving "arriving"
        # wakes only them, not every idle worker (two needless thread switches per request).
        self._companions = threading.Condition(lock)
        self._closed = False
        self._arriving = arriving  # model name -> requests received, not yet queued
        self._demand = Demand(batch_patience)
        self.buckets = Buckets(device, compiler, params_for, max_batch_size)
        self._active: set[int] = set()  # worker threads running a batch (their load)
        # Batches running per batch key, at most `in_flight` each: the queue fills meanwhile,
        # and the next worker takes it whole (up to the limit) as one batch.
        self.in_flight = batches_in_flight(device, in_flight)
        self._running: dict[tuple, int] = {}
        self._running_key: dict[int, tuple] = {}  # worker thread -> the key it holds a slot of
        # Those of `_active` inside a computation that passed its deadline. Python cannot stop
        # them, so each is replaced by a fresh thread (up to `max_overdue`) and leaves when
        # its computation ends: one hung model cannot take every worker of a device.
        self.max_overdue = max_overdue
        self._overdue: set[int] = set()
        self._name = f"{device.platform}:{device.id}"
        self._depth = metrics.queue_depth.labels(self._name)
        self._overdue_gauge = metrics.overdue_workers.labels(self._name)
        self._started = 0
        self._threads: list[threading.Thread] = []
        for _ in range(threads):
            self._start_thread()

    def _start_thread(self) -> None:
        thread = threading.Thread(
            target=self._run, name=f"gradserve-{self.device}-{self._started}", daemon=True
        )
        self._started += 1
        self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()

    @property
    def load(self) -> int:
        return len(self._queue) + len(self._active)

    def submit(self, item: Item, arrived: bool = False) -> None:
        """Queue `item`. `arrived`: it was counted as arriving for its model, and stops being
        so now, in the same step (a worker never waits for the request it already holds)."""
        with self._cond:
            if len(self._queue) >= self.max_queue:
                raise ServerBusy(
                    f"the queue of {self.device} is full ({self.max_queue} requests); retry shortly",
                    code="queue_full",
                    status=429,
                    headers={"Retry-After": "1"},
                )
            self._queue.append(item)
            model = item.call.model.name
            if arrived:
                self._arriving[model] -= 1
            self._demand.arrived(item.key, self._arriving.get(model, 0))
            self._depth.set(len(self._queue))
            self._cond.notify()
            self._companions.notify_all()

    def overdue(self, item: Item) -> None:
        """`item` passed its deadline: if a worker is still inside it, start a replacement."""
        with self._cond:
            runner = item.runner
            if runner not in self._active or runner in self._overdue or self._closed:
                return
            if len(self._overdue) >= self.max_overdue:
                if self.max_overdue:  # 0: replacing is turned off, nothing to report
                    log.error(
                        "%d workers of %s are stuck past their deadlines; starting no more",
                        len(self._overdue),
                        self._name,
                    )
                return
            self._overdue.add(runner)
            self._overdue_gauge.set(len(self._overdue))
            self._release_slot(runner)  # a stuck batch must not hold back its model's next
            self._start_thread()
        log.warning(
            "%s of '%s' is still running past its deadline; another worker took its place on %s",
            item.call.op,
            item.call.model.name,
            self._name,
        )

    def poke(self) -> None:
        """Wake workers waiting for companions: the requests they waited for will not come."""
        with self._cond:
            self._companions.notify_all()

    def close(self, timeout: float = 5.0) -> None:
        """Stop taking work; join the threads so none is left inside JAX at interpreter exit."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            self._companions.notify_all()
        self.buckets.close()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    # -- worker threads -------------------------------------------------------------------

    def _run(self) -> None:
        me = threading.get_ident()
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            live = [item for item in batch if not item.cancelled]  # clients gone meanwhile
            try:
                answers = self._execute(live) if live else []
            except BaseException as bug:
                log.exception("worker of %s failed", self._name)
                answers = [(item, None, bug) for item in batch]
            with self._cond:
                self._demand.left(batch[0].key, len(batch))
                self._active.discard(me)
                self._release_slot(me)
                replaced = me in self._overdue
                self._overdue.discard(me)
                self._overdue_gauge.set(len(self._overdue))
            for item, outcome, error in answers:
                item.resolve(outcome, error)
            if replaced:
                return

    def _release_slot(self, thread: int) -> None:
        """Give back `thread`'s in-flight slot (lock held); waiting workers re-check the queue."""
        key = self._running_key.pop(thread, None)
        if key is None:
            return
        left = self._running[key] - 1
        if left:
            self._running[key] = left
        else:
            del self._running[key]
        self._cond.notify_all()

    def _take_first(self) -> Item | None:
        """The oldest queued request whose key has a free in-flight slot (lock held)."""
        if any(item.cancelled for item in self._queue):
            for item in self._queue:
                if item.cancelled:
                    self._demand.left(item.key)
            self._queue = deque(item for item in self._queue if not item.cancelled)
        for index, item in enumerate(self._queue):
            if self._running.get(item.key, 0) < self.in_flight:
                del self._queue[index]
                return item
        return None

    def _next_batch(self) -> list[Item] | None:
        with self._cond:
            while True:
                if self._closed:
                    return None
                first = self._take_first()
                if first is not None:
                    break
                self._cond.wait()
            me = threading.get_ident()
            self._running[first.key] = self._running.get(first.key, 0) + 1
            self._running_key[me] = first.key
            now = time.perf_counter()
            limit = self.buckets.limit(first.call, first.key)
            batch = [first]
            self._take_same_key(batch, limit)
            model = first.call.model.name
            while len(batch) < limit:
                arriving = self._arriving.get(model, 0)
                waited = time.perf_counter() - now
                if arriving > 0 and waited < self.max_batch_delay:
                    self._companions.wait(self.max_batch_delay - waited)
                elif more := self._demand.wait_for_more(first.key, len(batch), arriving, waited):
                    self._companions.wait(more)  # each new request wakes it to re-check
                else:
                    break
                self._take_same_key(batch, limit)
            self._depth.set(len(self._queue))
            waited = time.perf_counter() - now if len(batch) > 1 else 0.0
            for item in batch:
                item.runner = me
                item.batch_wait = waited
            self._active.add(me)
            return batch

    def _take_same_key(self, batch: list[Item], limit: int) -> None:
        key = batch[0].key
        kept: deque[Item] = deque()
        while self._queue:
            item = self._queue.popleft()
            if item.cancelled:
                self._demand.left(item.key)
                continue
            if item.key == key and len(batch) < limit:
                batch.append(item)
            else:
                kept.append(item)
        self._queue = kept

    def _execute(
        self, batch: list[Item]
    ) -> list[tuple[Item, Outcome | None, BaseException | None]]:
        started = time.perf_counter()
        try:
            if len(batch) == 1:
                value, compile_s, compute_s, where = self._run_single(batch[0].call)
                values = [value]
            else:
                values, compile_s, compute_s, where = self._run_batched(batch)
        except BucketNotReady:
            # Halves, each in the largest bucket below: compiled already, or split further.
            half = bucket_for(len(batch)) // 2
            return self._execute(batch[:half]) + self._execute(batch[half:])
        except Exception as error:
            if len(batch) > 1 and not isinstance(error, APIError):
                # The stacked program failed (say, the model cannot be vmapped): never batch
                # this key again, and answer each request on its own.
                self.buckets.give_up(batch[0].key, batch[0].call, error)
                return [answer for item in batch for answer in self._execute([item])]
            return [(item, None, error) for item in batch]
        self.metrics.batch_size.observe(len(batch))
        with self._cond:
            self._demand.ran(batch[0].key, bucket_for(len(batch)), compute_s)
        answers: list[tuple[Item, Outcome | None, BaseException | None]] = []
        for item, value in zip(batch, values, strict=True):
            timings = {"queue": started - item.enqueued, "compile": compile_s, "compute": compute_s}
            for phase, seconds in timings.items():
                self.metrics.phases[phase].observe(seconds)
            timings["batch_wait"] = item.batch_wait  # Server-Timing: what batching cost it
            answers.append((item, Outcome(value, timings, len(batch), where), None))
        return answers

    def _run_single(self, call: Call) -> tuple[Any, float, float, str]:
        if isinstance(call.program, LinearizeProgram):
            return self._run_linearize(call)
        params = self.params_for(call.model, self.device)
        # Host arrays go straight in: the executable moves them to its device, at a fraction
        # of the cost of a separate jax.device_put.
        compiled, compile_s = self.compiler.executable(
            call, self.device, params, call.args, call.extra
        )
        t0 = time.perf_counter()
        try:
            value, where = _fetch(compiled(params, call.args, call.extra))
        except Exception as e:  # the model's own code failing at run time
            raise model_error(call, e, running=True) from None
        return value, compile_s, time.perf_counter() - t0, where

    def _run_linearize(self, call: LinearizeCall) -> tuple[Any, float, float, str]:
        """A session's first step: run the linearize program, keep its residuals here.

        The value goes back to the client; the residuals stay on this device, in the store.
        """
        assert self.sessions is not None
        params = self.params_for(call.model, self.device)
        lin, compile_s = self.compiler.linearization(
            call, self.device, params, self.sessions.budget(self.device)
        )
        self.sessions.make_room(self.device, lin.nbytes)  # free the memory before using it
        t0 = time.perf_counter()
        try:
            value, residuals = lin.executable(params, call.args, None)
            jax.block_until_ready(residuals)
        except Exception as e:
            raise model_error(call, e, running=True) from None
        host, where = _fetch(value)
        session = self.sessions.open(
            call.owner, call.model, self.device, lin, tuple(residuals), call.ttl_s
        )
        return (host, session), compile_s, time.perf_counter() - t0, where

    def _run_batched(self, batch: list[Item]) -> tuple[list[Any], float, float, str]:
        call = batch[0].call
        bucket = bucket_for(len(batch))
        padded = [item.call for item in batch] + [call] * (bucket - len(batch))
        stacked_args, stacked_extra = stack(padded)
        params = self.params_for(call.model, self.device)
        # The unbatched program first: its checks (shapes, output size...) hold for every
        # item of the batch, and it is the fallback if the stacked program cannot be built.
        _, compile_s = self.compiler.executable(call, self.device, params, call.args, call.extra)
        compiled = self.compiler.cached(call, self.device, stacked_args, stacked_extra, bucket)
        if compiled is None:
            # Compiling a bucket takes longer than running the batch one by one: do that now,
            # and compile on the side for the next batch of this size.
            with self._cond:
                seen = len(batch) + sum(item.key == batch[0].key for item in self._queue)
            seen += self._arriving.get(call.model.name, 0)
            self.buckets.compile_later(batch[0].key, call, params, seen)
            raise BucketNotReady
        t0 = time.perf_counter()
        out, where = _fetch(compiled(params, stacked_args, stacked_extra))
        compute_s = time.perf_counter() - t0
        values = [jax.tree.map(lambda x, i=i: x[i], out) for i in range(len(batch))]
        return values, compile_s, compute_s, where

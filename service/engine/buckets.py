"""Batched programs, compiled before the batches that need them.

A batch of n requests runs the stacked program of its bucket (the next power of two).
Compiling a bucket takes longer than running its batch one by one, so a missing bucket is
compiled on a side thread, every bucket up to the concurrency seen, while the batch runs in
the largest buckets compiled already; a model's `warmup_batch_size` has warm-up compile them
before any traffic. A key whose stacked program fails (a model that cannot be vmapped) is
never batched again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax

from service.calls import Call
from service.engine.batching import batch_key, bucket_for, stack
from service.engine.compiler import Compiler

log = logging.getLogger("gradserve")


class Buckets:
    """One device's batched programs: which are being compiled, which keys cannot batch."""

    def __init__(
        self,
        device: jax.Device,
        compiler: Compiler,
        params_for: Callable[[Any, jax.Device], Any],
        max_batch_size: int,
    ) -> None:
        self.device, self.compiler, self.params_for = device, compiler, params_for
        self.max_batch_size = max_batch_size
        self._lock = threading.Lock()
        self._compiling: set[tuple] = set()
        self._unbatchable: set[tuple] = set()
        self._thread = ThreadPoolExecutor(1, thread_name_prefix=f"gradserve-compile-{device}")

    def limit(self, call: Call, key: tuple) -> int:
        """The most requests of `key` one batch may hold (1: run alone)."""
        if key in self._unbatchable:
            return 1
        return call.model.spec.max_batch_size or self.max_batch_size

    def give_up(self, key: tuple, call: Call, error: BaseException) -> None:
        """The stacked program of `key` failed: run its requests alone from now on."""
        log.warning("batching %s failed (%s); running unbatched", call.model.name, error)
        self._unbatchable.add(key)

    def compile_now(self, call: Call, upto: int) -> int:
        """Compile every bucket of `call`'s key from 2 up to `upto` requests not compiled yet
        (warm-up's `warmup_batch_size`). Returns the programs compiled."""
        key, params = batch_key(call), self.params_for(call.model, self.device)
        return sum(self._compile(key, call, params, b) for b in self._claim(key, call, upto))

    def compile_later(self, key: tuple, call: Call, params: Any, upto: int) -> None:
        """Compile, on the side thread, every bucket from 2 up to `upto` (the concurrency seen
        now) not compiled yet: the next burst of any size up to it runs batched at once."""
        for bucket in self._claim(key, call, upto):
            self._thread.submit(self._compile, key, call, params, bucket)

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)

    def _claim(self, key: tuple, call: Call, upto: int) -> list[int]:
        """The buckets up to `upto` that no one is compiling, marked as being compiled."""
        top = bucket_for(min(upto, self.limit(call, key)))
        with self._lock:
            buckets = []
            bucket = 2
            while bucket <= top:
                if (key, bucket) not in self._compiling:
                    self._compiling.add((key, bucket))
                    buckets.append(bucket)
                bucket *= 2
            return buckets

    def _compile(self, key: tuple, call: Call, params: Any, bucket: int) -> bool:
        try:
            if key in self._unbatchable:
                return False
            args, extra = stack([call] * bucket)
            _, seconds = self.compiler.executable(call, self.device, params, args, extra, bucket)
            return seconds > 0
        except Exception as error:  # the model cannot be vmapped: stop batching it
            self.give_up(key, call, error)
            return False
        finally:
            with self._lock:
                self._compiling.discard((key, bucket))

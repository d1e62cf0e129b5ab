"""How batches form: which requests may share a program, and how long a worker waits for more.

Requests with the same batch key (model, program, input avals) are stacked along a new axis
and run as one vmapped executable, padded to a power-of-two bucket so a model compiles at most
log2(max_batch_size) batched variants per shape.

A worker that holds a batch and could start it now waits for companions only when more are on
their way:

- requests for its model are being read and decoded (`arriving`): up to `max_batch_delay`;
- or the key's recent concurrency says so: fewer of its requests are in the server now than
  its recent peak (32 clients in a closed loop send their next requests while the last answers
  travel back), and they are still coming: the last arrived within a few of the key's usual
  gaps between arrivals (clients that hold their answers do not keep it waiting). Then it waits
  up to what running the batch it holds would take (the measured cost of that bucket), capped
  by `patience`. This is the ski-rental bound: waiting can at most double the latency of the
  requests already held, while a burst that would otherwise run as 1, 2, 5, 10, 14 runs as
  one batch of 32 at the cost of one.

A lone client's peak is 1, so a lone request never waits.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np

from service.calls import Call
from service.engine.linearization import LinearizeProgram

# A key's peak concurrency is forgotten after this long without reaching it again (seconds),
# or after a few of its largest batch's compute times, if those are longer.
PEAK_MEMORY_S = 1.0
PEAK_MEMORY_BATCHES = 4
# Weight of the newest measurement in a bucket's running cost (or gap) estimate.
COST_SMOOTHING = 0.3
# A burst has stopped arriving when none came for this many of its usual gaps, plus the slack.
GAPS_TO_DRY = 4
DRY_SLACK_S = 0.0005


def bucket_for(n: int) -> int:
    """The padded batch size `n` requests run at: the next power of two."""
    return 1 << (n - 1).bit_length()


def batch_key(call: Call) -> tuple:
    """Calls with equal keys may run as one stacked program."""
    if isinstance(call.program, LinearizeProgram):
        return (call.model.name, "linearize", id(call))  # each opens its own session
    if getattr(call.program, "shares_args", False):
        # Products batch within one session (a shared, unstacked argument), never across:
        # stacking different sessions' residuals would copy them all, costing more than it saves.
        return (call.model.name, *call.signature, id(call.args))
    return (call.model.name, *call.signature)


def stack(calls: list[Call]) -> tuple[Any, Any]:
    """The calls' arguments stacked on a new leading axis, on the host: one transfer per leaf
    instead of one per request."""
    call = calls[0]
    if getattr(call.program, "shares_args", False):
        # Products of one session: its residuals (on this device already) are shared.
        return call.args, jax.tree.map(lambda *xs: np.stack(xs), *[c.extra for c in calls])
    return jax.tree.map(lambda *xs: np.stack(xs), *[(c.args, c.extra) for c in calls])


class BucketNotReady(Exception):
    """The stacked program for this batch size is still being compiled."""


@dataclass
class _KeyDemand:
    pending: int = 0  # queued or in a running batch
    peak: int = 0
    peak_at: float = 0.0
    last_arrival: float = 0.0
    gap: float = 0.0  # smoothed seconds between arrivals while others are in the server
    costs: dict[int, float] = field(default_factory=dict)  # bucket -> seconds, smoothed


class Demand:
    """Per batch key: how many of its requests are in the server, their recent peak, and what
    each bucket has cost to run. Not thread-safe: the workers call it under their lock."""

    def __init__(self, patience: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.patience, self._clock = patience, clock
        self._keys: dict[tuple, _KeyDemand] = {}

    def _of(self, key: tuple) -> _KeyDemand:
        demand = self._keys.get(key)
        if demand is None:
            demand = self._keys[key] = _KeyDemand()
        return demand

    def arrived(self, key: tuple, arriving: int) -> None:
        """A request of `key` was queued; `arriving` more of its model are being decoded."""
        demand = self._of(key)
        now = self._clock()
        if demand.pending:  # within a burst: the gap between two of its arrivals
            gap = now - demand.last_arrival
            demand.gap = gap if not demand.gap else demand.gap + COST_SMOOTHING * (gap - demand.gap)
        demand.last_arrival = now
        demand.pending += 1
        level = demand.pending + arriving
        if level >= demand.peak or now - demand.peak_at > self._memory(demand):
            demand.peak, demand.peak_at = level, now

    def left(self, key: tuple, n: int = 1) -> None:
        """`n` requests of `key` were answered (or dropped)."""
        demand = self._keys.get(key)
        if demand is None:
            return
        demand.pending -= n
        if demand.pending <= 0 and self._clock() - demand.peak_at > self._memory(demand):
            del self._keys[key]  # keys come and go with input shapes: keep only live ones

    def ran(self, key: tuple, bucket: int, seconds: float) -> None:
        """A batch padded to `bucket` took `seconds` to run."""
        costs = self._of(key).costs
        old = costs.get(bucket)
        costs[bucket] = seconds if old is None else old + COST_SMOOTHING * (seconds - old)

    def wait_for_more(self, key: tuple, held: int, arriving: int, waited: float) -> float:
        """How much longer a worker holding `held` requests of `key`, having waited `waited`
        seconds already, should wait for more that recent concurrency says are coming (0: none).
        """
        demand = self._keys.get(key)
        if demand is None or self.patience <= 0:
            return 0.0
        now = self._clock()
        if now - demand.peak_at > self._memory(demand):
            return 0.0  # the burst that set the peak is over
        if demand.pending + arriving >= demand.peak:
            return 0.0  # every request expected is here already
        dry_in = demand.last_arrival + GAPS_TO_DRY * demand.gap + DRY_SLACK_S - now
        if dry_in <= 0:
            return 0.0  # the rest are not coming now (their clients wait for this batch)
        budget = min(self.patience, self._cost(demand, bucket_for(held))) - waited
        return max(0.0, min(budget, dry_in))

    def _cost(self, demand: _KeyDemand, bucket: int) -> float:
        """The smoothed cost of `bucket`, or of the largest measured bucket below it; 0 when
        nothing is measured yet (the first burst does not wait on a guess)."""
        below = [b for b in demand.costs if b <= bucket]
        return demand.costs[max(below)] if below else 0.0

    def _memory(self, demand: _KeyDemand) -> float:
        largest = max(demand.costs.values(), default=0.0)
        return max(PEAK_MEMORY_S, PEAK_MEMORY_BATCHES * largest)

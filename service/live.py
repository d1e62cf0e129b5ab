"""Live figures for the pages: each model's last minute of requests, and the server's state.

Prometheus counters only ever grow, so "requests in the last minute" and "p99 latency now"
need a window. `RecentRequests` keeps one: a one-second slot per second of the last minute,
each holding counts and a log-spaced latency histogram, so recording costs a few integer
increments on the request path and reading costs a pass over 60 slots, whatever the load.
"""

from __future__ import annotations

import importlib.metadata
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.metrics import Metrics
    from service.state import State

WINDOW_S = 60
# Latency bins: 10 per decade from 10 us to 1000 s. A percentile is read as its bin's
# geometric middle, within 12% of the true value: plenty for a figure a person glances at.
_BINS_PER_DECADE = 10
_LOWEST_DECADE = -5
_NBINS = 8 * _BINS_PER_DECADE


def _bin(seconds: float) -> int:
    if seconds <= 0:
        return 0
    index = int((math.log10(seconds) - _LOWEST_DECADE) * _BINS_PER_DECADE)
    return min(max(index, 0), _NBINS - 1)


def _bin_middle(index: int) -> float:
    return 10 ** ((index + 0.5) / _BINS_PER_DECADE + _LOWEST_DECADE)


class _Slot:
    __slots__ = ("batch_n", "batch_sum", "count", "errors", "hist", "second")

    def __init__(self) -> None:
        self.second = -1
        self.count = self.errors = self.batch_n = self.batch_sum = 0
        self.hist = [0] * _NBINS

    def reset(self, second: int) -> None:
        self.second = second
        self.count = self.errors = self.batch_n = self.batch_sum = 0
        self.hist = [0] * _NBINS


@dataclass(frozen=True)
class Recent:
    """One model's last minute."""

    requests: int = 0
    errors: int = 0
    p50_s: float | None = None
    p99_s: float | None = None
    mean_batch: float | None = None


class RecentRequests:
    """Requests per model over the last `WINDOW_S` seconds.

    >>> recent = RecentRequests()
    >>> recent.record("tanh", 200, 0.002, batch=4)
    >>> recent.of("tanh").requests
    1
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._slots: dict[str, list[_Slot]] = {}
        self._lock = threading.Lock()

    def record(self, model: str, status: int, seconds: float, batch: int | None = None) -> None:
        second = int(self._clock())
        with self._lock:
            slots = self._slots.get(model)
            if slots is None:
                slots = self._slots[model] = [_Slot() for _ in range(WINDOW_S)]
            slot = slots[second % WINDOW_S]
            if slot.second != second:
                slot.reset(second)
            slot.count += 1
            slot.errors += status >= 400
            slot.hist[_bin(seconds)] += 1
            if batch:
                slot.batch_n += 1
                slot.batch_sum += batch

    def of(self, model: str) -> Recent:
        now = int(self._clock())
        hist = [0] * _NBINS
        count = errors = batch_n = batch_sum = 0
        with self._lock:
            for slot in self._slots.get(model, ()):
                if slot.count and now - WINDOW_S < slot.second <= now:
                    count += slot.count
                    errors += slot.errors
                    batch_n += slot.batch_n
                    batch_sum += slot.batch_sum
                    hist = [a + b for a, b in zip(hist, slot.hist, strict=True)]
        if not count:
            return Recent()
        return Recent(
            count,
            errors,
            _percentile(hist, count, 0.50),
            _percentile(hist, count, 0.99),
            batch_sum / batch_n if batch_n else None,
        )


def _percentile(hist: list[int], count: int, q: float) -> float:
    rank, seen = q * count, 0
    for index, n in enumerate(hist):
        seen += n
        if seen >= rank and n:
            return _bin_middle(index)
    return _bin_middle(len(hist) - 1)


# ---------------------------------------------------------------------------- snapshot


class _Samples:
    """The app's metrics read once per snapshot (`collect()` builds every family afresh)."""

    def __init__(self, metrics: Metrics) -> None:
        self._families = {m.name: m.samples for m in metrics.registry.collect()}

    def sum(self, family: str, **labels: str) -> float | None:
        """Sum of a family's samples whose labels include `labels`; None if it is absent."""
        if family not in self._families:
            return None
        return sum(
            s.value
            for s in self._families[family]
            if s.name in (family, f"{family}_total")
            and all(s.labels.get(k) == v for k, v in labels.items())
        )

    def sessions(self, **labels: str) -> int | None:
        # Live sessions come from the sessions issue's gauge when the server has one; until
        # then the figure is absent rather than a made-up zero.
        for family in SESSION_GAUGES:
            value = self.sum(family, **labels)
            if value is not None:
                return int(value)
        return None


SESSION_GAUGES = ("gradserve_sessions", "gradserve_live_sessions")


def _version() -> str:
    try:
        return importlib.metadata.version("gradserve")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def snapshot(state: State, started: float) -> dict[str, Any]:
    """Every live figure the pages show, as plain numbers (None: not known)."""
    import jax  # initialised by the lifespan already: listing devices is a cheap lookup

    samples, recent = _Samples(state.metrics), state.metrics.recent
    models = {}
    for model in state.registry:
        r = recent.of(model.name)
        compiles = samples.sum("gradserve_compiles", model=model.name)
        models[model.name] = {
            "requests": r.requests,
            "errors": r.errors,
            "p50_ms": None if r.p50_s is None else r.p50_s * 1e3,
            "p99_ms": None if r.p99_s is None else r.p99_s * 1e3,
            "mean_batch": r.mean_batch,
            "compiles": int(compiles or 0),
            "sessions": samples.sessions(model=model.name),
        }
    return {
        "server": {
            "version": _version(),
            "devices": [str(d) for d in jax.devices()],
            "uptime_s": time.monotonic() - started,
            "queue_depth": int(samples.sum("gradserve_queue_depth") or 0),
            "sessions": samples.sessions(),
            "ready": state.ready,
            "models": len(state.registry),
        },
        "models": models,
    }


def text(figures: dict[str, Any]) -> dict[str, str]:
    """The snapshot as the strings the pages print, keyed `server.field` / `model.field`."""
    out = {f"server.{k}": _format(k, v) for k, v in figures["server"].items()}
    for name, fields in figures["models"].items():
        out.update({f"{name}.{k}": _format(k, v) for k, v in fields.items()})
    return out


def _format(field: str, value: Any) -> str:
    if value is None:
        return "—"
    if field == "uptime_s":
        return _duration(value)
    if field.endswith("_ms"):
        return f"≈{value:.3g} ms" if value < 1000 else f"≈{value / 1e3:.3g} s"
    if field == "mean_batch":
        return f"{value:.1f}"
    if field == "devices":
        return ", ".join(value)
    if field == "ready":
        return "ready" if value else "warming up"
    return str(value)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"

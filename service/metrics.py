"""Prometheus metrics on a registry the app owns (no process globals, so apps never collide)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from service.live import RecentRequests

_LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_PERSISTENT_CACHE_EVENTS = {
    "/jax/compilation_cache/cache_hits": "hit",
    "/jax/compilation_cache/cache_misses": "miss",
}


class Metrics:
    """The server's instruments. One instance per app."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "gradserve_requests",
            "HTTP requests answered, by model, op and status",
            ["model", "op", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "gradserve_request_seconds",
            "Time from request received to response ready",
            ["model", "op"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.phase = Histogram(
            "gradserve_phase_seconds",
            "Time per phase of a request: decode, queue, compile, compute, encode",
            ["phase"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "gradserve_batch_size",
            "Requests run together in one executable",
            buckets=_BATCH_BUCKETS,
            registry=registry,
        )
        self.compiles = Counter(
            "gradserve_compiles", "XLA compilations, by model", ["model"], registry=registry
        )
        self.compile_seconds = Histogram(
            "gradserve_compile_seconds",
            "Time to trace and compile one program",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.cache = Counter(
            "gradserve_compile_cache",
            "In-memory executable cache: hit, miss, eviction",
            ["result"],
            registry=registry,
        )
        self.persistent_cache = Counter(
            "gradserve_persistent_cache",
            "JAX persistent compilation cache lookups: hit (compile skipped) or miss",
            ["result"],
            registry=registry,
        )
        self.queue_depth = Gauge(
            "gradserve_queue_depth", "Requests waiting, by device", ["device"], registry=registry
        )
        self.overdue_workers = Gauge(
            "gradserve_overdue_workers",
            "Worker threads still inside a computation past its deadline (each replaced)",
            ["device"],
            registry=registry,
        )
        self.bytes = Counter(
            "gradserve_bytes",
            "Body bytes, by direction (in, out)",
            ["direction"],
            registry=registry,
        )
        # Derivative sessions (service/sessions.py).
        self.sessions_live = Gauge(
            "gradserve_sessions",
            "Live derivative sessions, by device",
            ["device"],
            registry=registry,
        )
        self.session_bytes = Gauge(
            "gradserve_session_bytes",
            "Bytes of residuals held by sessions, by device",
            ["device"],
            registry=registry,
        )
        self.session_evictions = Counter(
            "gradserve_session_evictions",
            "Sessions evicted before their TTL: memory (the device's budget), key_cap",
            ["reason"],
            registry=registry,
        )
        self.session_expirations = Counter(
            "gradserve_session_expirations", "Sessions dropped at their TTL", registry=registry
        )
        self.session_hits = Counter(
            "gradserve_session_hits", "Products served from a live session", registry=registry
        )
        self.session_misses = Counter(
            "gradserve_session_misses",
            "Session requests answered session_not_found",
            registry=registry,
        )

        # Children bound once: `labels()` takes a lock and a dict lookup per call, and these
        # are hit several times by every request.
        self.phases = {
            p: self.phase.labels(p) for p in ("decode", "queue", "compile", "compute", "encode")
        }
        self.bytes_in, self.bytes_out = self.bytes.labels("in"), self.bytes.labels("out")
        self.cache_hit, self.cache_miss = self.cache.labels("hit"), self.cache.labels("miss")
        # The last minute per model, for the pages' live figures (service/live.py).
        self.recent = RecentRequests()

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def count_persistent_cache_events(self) -> Callable[..., None]:
        """Count JAX's persistent-cache events (JAX only reports them process-wide)."""
        import jax.monitoring

        def listener(event: str, **_: object) -> None:
            result = _PERSISTENT_CACHE_EVENTS.get(event)
            if result is not None:
                self.persistent_cache.labels(result).inc()

        jax.monitoring.register_event_listener(listener)
        return listener

    def stop_counting_persistent_cache_events(self, listener: Callable[..., None]) -> None:
        from jax._src import monitoring  # the public module has no unregister yet

        with contextlib.suppress(AttributeError, ValueError):
            monitoring.unregister_event_listener(listener)

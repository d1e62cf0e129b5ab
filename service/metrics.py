"""Prometheus metrics on a registry the app owns (no process globals, so apps never collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    """The server's instruments. One instance per app."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "gradserve_requests",
            "HTTP requests answered, by model, op and status",
            ["model", "op", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "gradserve_request_seconds",
            "Time from request received to response ready",
            ["model", "op"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.phase = Histogram(
            "gradserve_phase_seconds",
            "Time per phase of a computation: queue, compile, compute",
            ["phase"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.compiles = Counter(
            "gradserve_compiles", "XLA compilations", ["model"], registry=self.registry
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

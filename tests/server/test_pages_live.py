"""The pages' live figures: a one-minute window per model, read from a histogram."""

from __future__ import annotations

import numpy as np

from service.live import RecentRequests, text


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_counts_errors_and_batches_of_the_last_minute_only():
    clock = Clock()
    recent = RecentRequests(clock)
    recent.record("a", 200, 0.001, batch=4)
    recent.record("a", 422, 0.002)
    clock.now += 30
    recent.record("a", 200, 0.003, batch=2)
    recent.record("b", 500, 0.5)
    a = recent.of("a")
    assert (a.requests, a.errors, a.mean_batch) == (3, 1, 3.0)
    assert recent.of("b").errors == 1
    clock.now += 31  # the first two are now older than a minute
    a = recent.of("a")
    assert (a.requests, a.errors, a.mean_batch) == (1, 0, 2.0)
    clock.now += 60
    assert recent.of("a").requests == 0 and recent.of("a").p50_s is None
    assert recent.of("never-seen").requests == 0


def test_percentiles_are_within_twelve_percent():
    clock = Clock()
    recent = RecentRequests(clock)
    rng = np.random.default_rng(0)
    samples = np.exp(rng.normal(np.log(0.004), 1.0, 5000))
    for i, s in enumerate(samples):
        clock.now = 1000 + i / 100  # 50 s of traffic
        recent.record("m", 200, float(s))
    got = recent.of("m")
    assert got.requests == len(samples)
    for q, value in ((50, got.p50_s), (99, got.p99_s)):
        want = np.percentile(samples, q)
        assert abs(value / want - 1) < 0.13, (q, value, want)


def test_text_formats_what_the_pages_print():
    figures = {
        "server": {
            "uptime_s": 3725.0,
            "devices": ["cpu:0", "cpu:1"],
            "ready": True,
            "sessions": None,
        },
        "models": {"m": {"p50_ms": 1.234, "p99_ms": 2500.0, "mean_batch": 2.0, "requests": 7}},
    }
    assert text(figures) == {
        "server.uptime_s": "1 h 2 min",
        "server.devices": "cpu:0, cpu:1",
        "server.ready": "ready",
        "server.sessions": "—",
        "m.p50_ms": "≈1.23 ms",
        "m.p99_ms": "≈2.5 s",
        "m.mean_batch": "2.0",
        "m.requests": "7",
    }

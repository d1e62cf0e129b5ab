"""Per-key quotas: a token bucket of requests per second and a cap on concurrent compute.

The engine's queue is shared, so without these one busy key fills it and every other key gets
429 `queue_full`. With them, a key past its own quota gets 429 `quota_exceeded` with
`Retry-After` while the others are served as before. A quota is judged after the key is
checked (service/auth.py) and before the route reads the body, so it reaches every door that
needs a key: the v1 API, sessions, UM-Bridge and the pages with their plots.

Quotas come from three places, the later winning field by field:

1. `GRADSERVE_QUOTA_RATE`, `GRADSERVE_QUOTA_BURST`, `GRADSERVE_QUOTA_CONCURRENT`;
2. `GRADSERVE_SCOPE_QUOTAS`, per scope (a key with several scopes takes the most generous);
3. the key's own line in the keys file: `<sha256>:compute rate=5 burst=10 concurrent=2`.

`0` means "no limit". Without keys there are no quotas (nothing tells clients apart).

Metrics name a key by its id, the first 8 hex digits of its sha256 digest (`key_id`), never by
the key: the keys file already holds full digests, so the id reveals nothing new.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace

from fastapi import FastAPI
from prometheus_client import Counter, Gauge
from starlette.types import ASGIApp, Receive, Scope, Send

from client.errors import ServerBusy
from service.errors import render
from service.metrics import Metrics
from service.settings import Settings

FIELDS = ("rate", "burst", "concurrent")
STATE_KEY = "key_digest"  # scope["state"] entry set by service.auth.Authenticate


def key_id(digest: bytes) -> str:
    """A key's short public name: the first 8 hex digits of its sha256 digest.

    >>> key_id(bytes.fromhex("ab" * 32))
    'abababab'
    """
    return digest[:4].hex()


@dataclass(frozen=True)
class Quota:
    """`rate` requests/s refilling a bucket of `burst`; at most `concurrent` computing at once."""

    rate: float = 0.0
    burst: float = 0.0
    concurrent: int = 0

    def merge(self, options: Mapping[str, float]) -> Quota:
        return replace(self, **{k: type(getattr(self, k))(v) for k, v in options.items()})


def parse_quota(text: str, where: str) -> dict[str, float]:
    """`"rate=5 burst=10 concurrent=2"` -> its fields; `ValueError` naming `where` otherwise.

    >>> parse_quota("rate=5 concurrent=2", "example")
    {'rate': 5.0, 'concurrent': 2.0}
    """
    options: dict[str, float] = {}
    for item in text.replace(",", " ").split():
        name, eq, value = item.partition("=")
        try:
            number = float(value) if eq and name in FIELDS else math.nan
        except ValueError:
            number = math.nan
        if not (number >= 0 and math.isfinite(number)):
            raise ValueError(
                f"{where}: bad quota option {item!r}; expected name=number (>= 0) with name "
                f"one of {', '.join(FIELDS)}"
            )
        options[name] = number
    return options


def quota_for(scopes: Iterable[str], override: Mapping[str, float], settings: Settings) -> Quota:
    """The quota of a key with `scopes` and its own keys-file `override`."""
    default = Quota(settings.quota_rate, settings.quota_burst, settings.quota_concurrent)
    # Each scope: the defaults with that scope's entry over them. A key with several scopes
    # takes the most generous value of each field (0, "unlimited", above any number).
    per_scope = [
        default.merge(
            parse_quota(settings.scope_quotas.get(s, ""), f"GRADSERVE_SCOPE_QUOTAS[{s!r}]")
        )
        for s in sorted(scopes)
    ] or [default]

    def best(name: str) -> float:
        values = [getattr(q, name) for q in per_scope]
        return 0.0 if 0 in values else max(values)

    quota = default.merge({name: best(name) for name in FIELDS})
    return quota.merge(override)


class _Bucket:
    """A token bucket plus the count of requests of one key computing now."""

    __slots__ = ("in_flight", "quota", "stamp", "tokens")

    def __init__(self, quota: Quota) -> None:
        self.quota = quota
        self.tokens = max(quota.burst, 1.0)
        self.stamp = time.monotonic()
        self.in_flight = 0

    def take(self, now: float) -> float:
        """Take a token; 0.0 when granted, else the seconds until one is there."""
        rate = self.quota.rate
        if rate <= 0:
            return 0.0
        capacity = max(self.quota.burst, 1.0)
        self.tokens = min(capacity, self.tokens + (now - self.stamp) * rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / rate


class Quotas:
    """The ASGI layer, inside `Authenticate`: judged on the event loop, so it needs no lock."""

    def __init__(
        self,
        app: ASGIApp,
        quotas: Mapping[bytes, Quota],
        metrics: Metrics,
        is_compute: Callable[[Scope], bool],
    ) -> None:
        self.app = app
        self._buckets = {digest: _Bucket(q) for digest, q in quotas.items()}
        self._is_compute = is_compute
        self._requests = Counter(
            "gradserve_key_requests",
            "Requests per API key id (first 8 hex of the key's sha256): admitted, "
            "rate_limited or concurrency_limited",
            ["key", "result"],
            registry=metrics.registry,
        )
        self._in_flight = Gauge(
            "gradserve_key_in_flight",
            "Compute requests in flight per API key id",
            ["key"],
            registry=metrics.registry,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        digest = scope.get("state", {}).get(STATE_KEY) if scope["type"] == "http" else None
        bucket = self._buckets.get(digest) if digest is not None else None
        if bucket is None:
            await self.app(scope, receive, send)
            return
        name = key_id(digest)
        wait = bucket.take(time.monotonic())
        compute = self._is_compute(scope)
        limit = bucket.quota.concurrent
        if wait:
            refusal = self._refuse(
                name,
                "rate_limited",
                f"API key {name} is over its quota of {bucket.quota.rate:g} requests/s "
                f"(burst {bucket.quota.burst:g}); retry in {math.ceil(wait)} s",
                wait,
            )
        elif compute and limit and bucket.in_flight >= limit:
            refusal = self._refuse(
                name,
                "concurrency_limited",
                f"API key {name} already has {bucket.in_flight} requests computing, its quota "
                f"is {limit} at once; wait for one to finish",
                1.0,
            )
        else:
            refusal = None
        if refusal is not None:
            request_id = scope.get("state", {}).get("request_id")
            await render(refusal, request_id, scope["path"])(scope, receive, send)
            return
        self._requests.labels(name, "admitted").inc()
        if not compute:
            await self.app(scope, receive, send)
            return
        gauge = self._in_flight.labels(name)
        bucket.in_flight += 1
        gauge.set(bucket.in_flight)
        try:
            await self.app(scope, receive, send)
        finally:
            bucket.in_flight -= 1
            gauge.set(bucket.in_flight)

    def _refuse(self, name: str, result: str, detail: str, wait: float) -> ServerBusy:
        self._requests.labels(name, result).inc()
        return ServerBusy(
            detail,
            code="quota_exceeded",
            status=429,
            headers={"Retry-After": str(max(1, math.ceil(wait)))},
        )


def install(
    app: FastAPI,
    settings: Settings,
    metrics: Metrics,
    keys: Mapping[bytes, tuple[frozenset[str], Mapping[str, float]]],
    is_compute: Callable[[Scope], bool],
) -> None:
    """Add the quota layer for `keys` (digest -> scopes, keys-file override); none without keys.

    Must be added before `Authenticate` so that it runs inside it, after the key is known.
    """
    if not keys:
        return
    quotas = {d: quota_for(scopes, override, settings) for d, (scopes, override) in keys.items()}
    app.add_middleware(Quotas, quotas=quotas, metrics=metrics, is_compute=is_compute)

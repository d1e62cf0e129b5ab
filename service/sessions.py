"""The session store: linearizations kept on their devices, bounded in memory, time and count.

A session is a cache entry, never state a client depends on: it holds the residuals of one
linearization (device arrays, never written anywhere) until its TTL passes, its device's memory
budget needs the room (least recently used first), its owner opens more than the per-key cap,
or the owner deletes it. A client that finds it gone recomputes from the primals it kept.

Ids come from `secrets` and belong to the key that opened the session; for any other key, and
once expired, evicted or deleted, an id is answered alike (404 `session_not_found`), so an
answer never tells a stranger whether an id exists.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from client.errors import ModelNotFound
from service.metrics import Metrics

log = logging.getLogger("gradserve")

ANONYMOUS = "anonymous"  # the one owner when the server runs without keys
_NOT_FOUND = (
    "no such session: ids are valid only for the key that opened them, until they expire, are "
    "evicted or are deleted. Open a new one (POST /v1/models/{name}/linearize) or use the "
    "stateless jvp/vjp/hvp ops."
)


def session_not_found() -> ModelNotFound:
    """The one answer for every id that cannot be used, whatever the reason."""
    return ModelNotFound(_NOT_FOUND, code="session_not_found")


@dataclass(eq=False)
class Session:
    """One linearization at one point, held on `device` for `owner`."""

    id: str
    owner: str
    model: Any  # service.registry.Model
    device: Any  # jax.Device
    linearization: Any  # service.engine.linearization.Linearization
    residuals: tuple
    nbytes: int
    ttl_s: float
    expires_at: float

    def describe(self, now: float) -> dict[str, Any]:
        return {
            "id": self.id,
            "model": self.model.name,
            "expires_in_s": round(max(0.0, self.expires_at - now), 3),
            "bytes": self.nbytes,
        }


class SessionStore:
    """Sessions by id, with an LRU per device within that device's byte budget.

    Thread-safe: device workers open sessions, the event loop looks them up and deletes them,
    and a sweeper thread drops expired ones so their memory does not wait for the next request.
    """

    def __init__(
        self,
        budgets: Mapping[Any, int],
        *,
        ttl_s: float,
        max_per_key: int,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
        sweep_every_s: float = 1.0,
    ) -> None:
        self.budgets, self.ttl_s, self.max_per_key = dict(budgets), ttl_s, max_per_key
        self.metrics, self.clock = metrics, clock
        self._lock = threading.Lock()
        self._by_id: dict[str, Session] = {}
        self._lru: dict[Any, OrderedDict[str, Session]] = {d: OrderedDict() for d in budgets}
        self._used: dict[Any, int] = dict.fromkeys(budgets, 0)
        self._by_owner: dict[str, OrderedDict[str, None]] = {}
        self._stop = threading.Event()
        self._sweeper = threading.Thread(
            target=self._sweep_forever,
            args=(sweep_every_s,),
            name="gradserve-sessions",
            daemon=True,
        )
        self._sweeper.start()

    # -- limits ---------------------------------------------------------------------------

    def budget(self, device: Any) -> int:
        return self.budgets[device]

    def ttl_for(self, requested: float | None) -> float:
        """The TTL a new session gets: the one asked for, capped by the server's."""
        return self.ttl_s if requested is None else min(requested, self.ttl_s)

    def used(self, device: Any) -> int:
        return self._used[device]

    def __len__(self) -> int:
        return len(self._by_id)

    # -- opening --------------------------------------------------------------------------

    def make_room(self, device: Any, nbytes: int) -> None:
        """Evict least recently used sessions of `device` until `nbytes` more fit its budget.

        Called before a linearization runs, so the memory is freed before it is needed.
        """
        with self._lock:
            self._sweep(self.clock())
            self._fit(device, nbytes)

    def open(
        self,
        owner: str,
        model: Any,
        device: Any,
        linearization: Any,
        residuals: tuple,
        ttl_s: float,
    ) -> Session:
        """Keep `residuals` as a new session of `owner`; evicts to stay within the limits."""
        nbytes = linearization.nbytes
        with self._lock:
            now = self.clock()
            self._sweep(now)
            self._fit(device, nbytes)  # again: other workers may have opened sessions since
            owned = self._by_owner.setdefault(owner, OrderedDict())
            while len(owned) >= self.max_per_key:
                self._remove(self._by_id[next(iter(owned))], "key_cap")
            session = Session(
                secrets.token_urlsafe(24),
                owner,
                model,
                device,
                linearization,
                residuals,
                nbytes,
                ttl_s,
                now + ttl_s,
            )
            self._by_id[session.id] = session
            self._lru[device][session.id] = session
            owned[session.id] = None
            self._used[device] += nbytes
            self._gauge(device)
            return session

    def _fit(self, device: Any, nbytes: int) -> None:
        lru = self._lru[device]
        while lru and self._used[device] + nbytes > self.budgets[device]:
            self._remove(next(iter(lru.values())), "memory")

    # -- using ----------------------------------------------------------------------------

    def get(self, session_id: str, owner: str, *, renew: bool = True) -> Session:
        """The session, if `owner` may use it; with `renew` its TTL restarts (a product)."""
        with self._lock:
            now = self.clock()
            session = self._by_id.get(session_id)
            if session is None or not hmac.compare_digest(session.owner, owner):
                self.metrics.session_misses.inc()
                raise session_not_found()
            if session.expires_at <= now:
                self._remove(session, "expired")
                self.metrics.session_misses.inc()
                raise session_not_found()
            if renew:
                session.expires_at = now + session.ttl_s
                self._lru[session.device].move_to_end(session.id)
                self._by_owner[owner].move_to_end(session.id)
                self.metrics.session_hits.inc()
            return session

    def delete(self, session_id: str, owner: str) -> str:
        """Forget the session now (its residuals are freed once no product still runs on
        them); the name of its model."""
        session = self.get(session_id, owner, renew=False)
        with self._lock:
            if session.id in self._by_id:
                self._remove(session, "deleted")
        return session.model.name

    # -- housekeeping ---------------------------------------------------------------------

    def _remove(self, session: Session, reason: str) -> None:
        del self._by_id[session.id]
        del self._lru[session.device][session.id]
        owned = self._by_owner[session.owner]
        del owned[session.id]
        if not owned:
            del self._by_owner[session.owner]
        # The store held the only lasting reference: the residuals' device memory is freed
        # now, or when the last product still running on them ends.
        self._used[session.device] -= session.nbytes
        if reason == "expired":
            self.metrics.session_expirations.inc()
        elif reason != "deleted":
            self.metrics.session_evictions.labels(reason).inc()
        self._gauge(session.device)

    def _sweep(self, now: float) -> None:
        for session in [s for s in self._by_id.values() if s.expires_at <= now]:
            self._remove(session, "expired")

    def _sweep_forever(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            try:
                with self._lock:
                    self._sweep(self.clock())
            except Exception:  # never let the sweeper die silently: log and keep sweeping
                log.exception("sweeping expired sessions failed")

    def _gauge(self, device: Any) -> None:
        name = f"{device.platform}:{device.id}"
        self.metrics.sessions_live.labels(name).set(len(self._lru[device]))
        self.metrics.session_bytes.labels(name).set(self._used[device])

    def close(self) -> None:
        """Stop sweeping and drop every session (the server is stopping)."""
        self._stop.set()
        self._sweeper.join(timeout=5)
        with self._lock:
            for session in list(self._by_id.values()):
                self._remove(session, "deleted")
